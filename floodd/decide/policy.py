"""Policy stage (pure): which keys the rules say to ban or warn about, right now.

``evaluate`` reads the rate tables at time ``now`` (the clock the tables are fed
with) and returns one :class:`Trigger` per (rule, source or prefix) over its
threshold, with the scope its evidence allows (floodd.decide.trust).  ``plan``
turns triggers into bans safely (safety checks, the ban cap, escalation).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network
from typing import Callable, Iterable, Iterator, Mapping, Sequence

from floodd.config import Network, Rule, TrustConfig
from floodd.decide.trust import Narrowing, ban_scope
from floodd.detect.traffic import (Candidates, Traffic, address_network, prefix_network,
                                   rule_qtype, split_qtype_key)
from floodd.scope import WHOLE, Scope, Target


@dataclass(frozen=True)
class Trigger:
    rule: str
    action: str  # "ban" or "warn"
    network: Network
    count: int  # matching packets in the rule's window (within one bucket, see ratetable)
    window: float
    ban_time: float
    key: bytes = b""  # the table key: packed address, or packed prefix address
    scope: Scope = WHOLE  # what a ban drops (ban triggers)
    narrowing: Narrowing | None = None  # why usual hop values are spared, if they are

    @property
    def rate(self) -> float:
        """Packets per second over the rule's window."""
        return self.count / self.window

    @property
    def target(self) -> Target:
        return Target(self.network, self.scope)


def evaluate(now: float, traffic: Traffic, rules: Sequence[Rule], trust: TrustConfig,
             candidates: Candidates | None = None,
             reported: Mapping[tuple[str, bytes], Trigger] | None = None) -> list[Trigger]:
    """A trigger for every key counting more than a rule's threshold in its window.

    A rule with ``total_threshold`` is skipped unless all sources together count
    more than that; a qtype rule reads only its own qtype's keys.  A ban trigger
    carries the scope its evidence allows (:func:`floodd.decide.trust.ban_scope`).
    Given ``candidates`` (the keys the counting saw cross a ban threshold), only
    those are looked at, and only by ban rules.  Given ``reported`` ((rule name,
    :attr:`Trigger.key`) -> a trigger), a key it holds triggers only when it counts
    more than that trigger (a replay keeping each key's trigger of the highest count:
    no trigger, nor its evidence, is built for a key that did not grow).
    """
    triggers: list[Trigger] = []
    for rule in rules:
        if candidates is not None and rule.action != "ban":
            continue
        if rule.total_threshold is not None and \
                traffic.rule_total(now, rule) <= rule.total_threshold:
            continue  # rotating-source guard not armed
        qtype = rule_qtype(rule)
        name = rule.name
        for key, count in traffic.over(now, rule, candidates):
            if qtype is not None and rule.aggregate != "prefix":
                key, key_qtype = split_qtype_key(key)
                if key_qtype != qtype:
                    continue
            if reported is not None and (old := reported.get((name, key))) is not None \
                    and count <= old.count:
                continue
            if rule.aggregate == "prefix":
                network = prefix_network(key, rule.prefix_v4, rule.prefix_v6)
            else:
                network = address_network(key)
            scope, narrowing = WHOLE, None
            if rule.action == "ban":
                scope, narrowing = ban_scope(rule, count, traffic.evidence(now, rule, key),
                                             trust)
            triggers.append(Trigger(rule.name, rule.action, network, count, rule.window,
                                    rule.ban_time, key, scope, narrowing))
    return triggers


@dataclass(frozen=True, slots=True)
class Offence:
    """A network's ban history, for escalating repeat offenders."""

    count: int  # bans so far
    last: float  # time of the latest ban (monotonic in the daemon, unix in the state file)


# Repeat offenders remembered at most; beyond, the one banned longest ago is forgotten.
MAX_OFFENCES = 100_000


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


class Offences(Mapping[Network, Offence]):
    """The repeat offenders, bounded: at most ``cap`` networks, and none whose last ban is
    more than ``forget_after`` seconds old once :meth:`forget_old` ran.

    Kept in the order of their last ban (oldest first), so the oldest is evicted first
    and forgetting stops at the first offence still remembered.  A network is held as its
    packed address and prefix length (an ``ip_network`` object costs ten times as much).
    """

    def __init__(self, forget_after: float, items: Iterable[tuple[Network, Offence]] = (),
                 cap: int = MAX_OFFENCES) -> None:
        self.forget_after = forget_after
        self.cap = cap
        self._by_age: OrderedDict[bytes, Offence] = OrderedDict()
        for network, offence in sorted(items, key=lambda item: item[1].last):
            self._by_age[_key(network)] = offence
            self._evict()

    def __getitem__(self, network: Network) -> Offence:
        return self._by_age[_key(network)]

    def __contains__(self, network: object) -> bool:
        return isinstance(network, (IPv4Network, IPv6Network)) and \
            _key(network) in self._by_age

    def __iter__(self) -> Iterator[Network]:
        return (_network(key) for key in self._by_age)

    def __len__(self) -> int:
        return len(self._by_age)

    def copy(self) -> Offences:
        """The same offences, apart from this one (a snapshot for another thread)."""
        twin = Offences(self.forget_after, cap=self.cap)
        twin._by_age = self._by_age.copy()
        return twin

    def record(self, network: Network, now: float) -> Offence:
        """``network`` is banned at ``now`` (a time no earlier than any before): its
        offence, counting the earlier bans still remembered."""
        key = _key(network)
        old = remembered(self._by_age.pop(key, None), now, self.forget_after)
        offence = Offence((old.count if old else 0) + 1, now)
        self._by_age[key] = offence
        self._evict()
        return offence

    def forget_old(self, now: float) -> None:
        """Drop the offences :func:`remembered` no longer counts at ``now``."""
        while self._by_age:
            key, offence = next(iter(self._by_age.items()))
            if remembered(offence, now, self.forget_after) is not None:
                return
            del self._by_age[key]

    def _evict(self) -> None:
        while len(self._by_age) > self.cap:
            self._by_age.popitem(last=False)


def _key(network: Network) -> bytes:
    """4 or 16 address bytes, then the prefix length: one key per network."""
    return network.network_address.packed + bytes((network.prefixlen,))


def _network(key: bytes) -> Network:
    family = IPv4Network if len(key) == 5 else IPv6Network
    return family((key[:-1], key[-1]))


def ban_time(trigger: Trigger, offence: Offence | None, now: float, factor: float,
             cap: float) -> float:
    """The rule's ban time, times ``factor`` per earlier ban still remembered, capped;
    only bans of all of a source's queries (``Scope.whole_source``) escalate."""
    offence = remembered(offence, now, cap)
    if offence is None or not trigger.scope.whole_source:
        return min(trigger.ban_time, cap)
    return min(trigger.ban_time * factor ** offence.count, cap)


def covered(target: Target, banned: Mapping[Network, Sequence[Scope]],
            prefixes: Sequence[Network]) -> bool:
    """Whether a ban among ``banned`` (network -> scopes) already drops everything a ban of
    ``target`` would: one of the same network or of a prefix holding it, of a scope that
    covers the target's."""
    net, scope = target
    holders = [net] + [p for p in prefixes if p != net and net.version == p.version
                       and net.subnet_of(p)]  # type: ignore[arg-type]
    return any(s.covers(scope) for h in holders for s in banned.get(h, ()))


def plan(now: float, triggers: Sequence[Trigger], banned: Sequence[Target],
         protected: Callable[[Network], str | None], max_bans: int,
         offences: Mapping[Network, Offence], factor: float, cap: float) -> Plan:
    """Turn triggers into bans, safely.

    Invariants: a protected network (whitelist, own addresses, loopback) is never
    banned; a trigger whose target an existing ban covers is not banned again; the
    number of bans never exceeds ``max_bans`` (the highest rates are banned first);
    of the triggers of one tick, none is banned that another chosen ban covers.
    """
    bans: list[tuple[Trigger, float]] = []
    warnings: list[Trigger] = []
    refused: list[Refusal] = []
    current: dict[Network, list[Scope]] = {}
    for net, scope in banned:
        current.setdefault(net, []).append(scope)
    prefixes = [n for n in current if n.prefixlen < n.max_prefixlen]
    room = max_bans - len(banned)
    for trig in sorted(triggers, key=lambda t: -t.rate):
        if trig.action == "warn":
            warnings.append(trig)
            continue
        if covered(trig.target, current, prefixes):
            continue
        reason = protected(trig.network)
        if reason is not None:
            refused.append(Refusal(trig, reason))
            continue
        if room <= 0:
            refused.append(Refusal(trig, f"max_bans ({max_bans}) reached"))
            continue
        bans.append((trig, ban_time(trig, offences.get(trig.network), now, factor, cap)))
        current.setdefault(trig.network, []).append(trig.scope)
        if trig.network.prefixlen < trig.network.max_prefixlen:
            prefixes.append(trig.network)
        room -= 1
    # a narrower ban chosen before a wider one of the same network is not needed
    chosen: dict[Network, list[Scope]] = {}
    for trig, _ in bans:
        chosen.setdefault(trig.network, []).append(trig.scope)
    bans = [(trig, seconds) for trig, seconds in bans
            if not any(s != trig.scope and s.covers(trig.scope)
                       for s in chosen[trig.network])]
    return Plan(bans, warnings, refused)
