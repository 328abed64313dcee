"""Policy stage (pure): which keys the rules say to ban or warn about, right now.

``evaluate`` reads the rate tables at time ``now`` and returns one
:class:`Trigger` per (rule, source or prefix) over its threshold.  What to do
with a trigger (safety checks, the ban cap, escalation) is decided by the caller.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Sequence

from floodd.config import Rule
from floodd.traffic import Traffic, address_network, prefix_network, rule_qtype, split_qtype_key

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Trigger:
    rule: str
    action: str  # "ban" or "warn"
    network: Network
    count: int  # matching packets in the rule's window
    window: float
    ban_time: float

    @property
    def rate(self) -> float:
        """Packets per second over the rule's window."""
        return self.count / self.window


def evaluate(now: float, traffic: Traffic, rules: Sequence[Rule]) -> list[Trigger]:
    triggers: list[Trigger] = []
    for rule in rules:
        if rule.total_threshold is not None and \
                traffic.rule_total(now, rule) <= rule.total_threshold:
            continue  # rotating-source guard not armed
        table = traffic.table_for(rule)
        qtype = rule_qtype(rule)
        for key, count in table.over(now, rule.threshold, rule.window):
            if rule.aggregate == "prefix":
                network = prefix_network(key, rule.prefix_v4, rule.prefix_v6)
            elif qtype is not None:
                src, key_qtype = split_qtype_key(key)
                if key_qtype != qtype:
                    continue
                network = address_network(src)
            else:
                network = address_network(key)
            triggers.append(Trigger(rule.name, rule.action, network, count, rule.window,
                                    rule.ban_time))
    return triggers

