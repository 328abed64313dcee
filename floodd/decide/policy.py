"""Policy stage (pure): which keys the rules say to ban or warn about, right now.

``evaluate`` reads the rate tables at time ``now`` and returns one
:class:`Trigger` per (rule, source or prefix) over its threshold.  What to do
with a trigger (safety checks, the ban cap, escalation) is decided by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from floodd.config import Network, Rule
from floodd.detect.traffic import Traffic, address_network, prefix_network, rule_qtype, split_qtype_key


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


@dataclass(frozen=True)
class Offence:
    """A network's ban history, for escalating repeat offenders."""

    count: int  # bans so far
    last: float  # unix time of the latest ban


@dataclass(frozen=True)
class Refusal:
    trigger: Trigger
    reason: str


@dataclass(frozen=True)
class Plan:
    """What to do this tick: bans to install (with their ban time), warnings, refusals."""

    bans: list[tuple[Trigger, float]]
    warnings: list[Trigger]
    refused: list[Refusal]


def remembered(offence: Offence | None, now: float, cap: float) -> Offence | None:
    """The offence if it still counts: it is forgotten ``cap`` seconds after its last ban."""
    return offence if offence is not None and now - offence.last <= cap else None


def ban_time(trigger: Trigger, offence: Offence | None, now: float, factor: float,
             cap: float) -> float:
    """The rule's ban time, times ``factor`` per earlier ban still remembered, capped."""
    offence = remembered(offence, now, cap)
    if offence is None:
        return min(trigger.ban_time, cap)
    return min(trigger.ban_time * factor ** offence.count, cap)


def plan(now: float, triggers: Sequence[Trigger], banned: Sequence[Network],
         protected: Callable[[Network], str | None], max_bans: int,
         offences: Mapping[Network, Offence], factor: float, cap: float) -> Plan:
    """Turn triggers into bans, safely.

    Invariants: a protected network (whitelist, own addresses, loopback) is never
    banned; a network already covered by a ban is not banned again; the number of
    bans never exceeds ``max_bans`` (the highest rates are banned first); one
    network is banned once per tick even if several rules fire.
    """
    bans: list[tuple[Trigger, float]] = []
    warnings: list[Trigger] = []
    refused: list[Refusal] = []
    current = set(banned)
    prefixes = [n for n in banned if n.prefixlen < n.max_prefixlen]
    room = max_bans - len(current)
    for trig in sorted(triggers, key=lambda t: -t.rate):
        if trig.action == "warn":
            warnings.append(trig)
            continue
        net = trig.network
        if net in current or any(net.version == p.version and net.subnet_of(p)  # type: ignore[arg-type]
                                 for p in prefixes):
            continue
        reason = protected(net)
        if reason is not None:
            refused.append(Refusal(trig, reason))
            continue
        if room <= 0:
            refused.append(Refusal(trig, f"max_bans ({max_bans}) reached"))
            continue
        bans.append((trig, ban_time(trig, offences.get(net), now, factor, cap)))
        current.add(net)
        room -= 1
    return Plan(bans, warnings, refused)
