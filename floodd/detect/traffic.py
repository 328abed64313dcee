"""Rate-table stage: turns parsed batches into the sliding-window counts the rules read.

One rate table per distinct (key kind, window) the rules read, so that each table
answers exactly one rule window; a table is kept across :meth:`Traffic.reconfigure`
while its definition (:class:`TableSpec`) is unchanged.  Keys are bytes, cheap to
slice from the packet and to hash:
  * source:         the packed address (4 bytes IPv4, 16 bytes IPv6);
  * prefix:         the packed network address of the rule's prefix length (see
                    :func:`prefix_key`), one table per (v4, v6) prefix-length pair;
  * source + qtype: the packed address followed by the qtype in 3 bytes, for the
                    query types some rule matches (``malformed`` is the pseudo
                    type ``MALFORMED_QTYPE``);
  * qtype:          the qtype code (an int), every source's packets together, for
                    the rotating-source guards of qtype rules.
Evidence (what the trust decision reads, :meth:`Traffic.evidence`): each rule table
has two more, of the same window and bucket and an eighth of its capacity:
  * ``+hop``: keyed by the rule's key followed by the packet's hop value (IPv4 TTL /
    IPv6 hop limit) in one byte (:func:`floodd.detect.hops.hop_keys`), when
    ``trust.hop_check`` is on; only the packets arriving with a value the history
    holds for their key (see :meth:`Traffic._feed`);
  * ``+tcp``: keyed like the rule's, the packets over handshake-verified TCP
    (``F_VERIFIED``) only.
and, with ``trust.hop_check``, a :class:`floodd.detect.hops.HopHistory` learns the
usual hop values of each key a rule aggregates on: one per source (for the per-source
and source + qtype rules), one per prefix-length pair.  The evidence counts are as
exact as the rule's own: within one bucket of each key's packets (see
:mod:`floodd.detect.ratetable`).

Per batch every per-packet step runs in C (``map``, ``compress``, ``Counter``, and the
rate table's ``add_keys``); Python-level loops touch only the records of the query
types a rule watches, and the hop histories' budgeted observations.

Cost.  Each ``+hop`` table is one more rate-table update per packet of a key with
history arriving at a value held for it; a flood of forged or unknown sources costs one
C pass and no entries.  ``+tcp`` tables cost nothing without TCP; the hop histories look
at no more than their budget of packets a second (:mod:`floodd.detect.hops`).
bench/bench_parse.py, 1,000,000 packets from 50,000 sources (none with history): parse
and all the shipped rules' tables 276,000 packets/s per core, 5.9 times dpkt's full
decode in the same run (7.5 times before the evidence tables, on a faster day);
bench/bench_memory.py, with every table and history filled over verified TCP: 221 MB
peak, within the 256 MB target.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, replace
from itertools import compress, repeat
from operator import add, and_, itemgetter, not_
from typing import Any, NamedTuple

from floodd.config import MATCH_ALL, MATCH_MALFORMED, Config, Network, Rule
from floodd.detect.hops import HOP_BYTES, HopEvidence, HopHistory
from floodd.detect.parse import F_EXTRA, F_MALFORMED, F_VERIFIED, Record
from floodd.detect.ratetable import RateTable

# Not a real qtype (those are 0..65535): marks malformed packets in the qtype tables.
MALFORMED_QTYPE = 0x1_0000
_QT_BYTES = 3  # bytes used for the qtype suffix of a source+qtype key
# Every qtype's all-source total: at most 65,537 keys, so such a table is never pruned.
QTYPE_CAPACITY = 70_000

SOURCE, PREFIX, SOURCE_QTYPE, QTYPE = "source", "prefix", "source+qtype", "qtype"
HOP_SUFFIX, TCP_SUFFIX = "+hop", "+tcp"  # the kinds of a rule table's evidence tables
EVIDENCE_SHARE = 8  # an evidence table holds 1/8 of its rule table's capacity

_src = itemgetter(1)
_qtype = itemgetter(3)
_flags = itemgetter(4)
_hop = itemgetter(5)
_source_part = itemgetter(slice(None, -3))  # the source of a source + qtype key (_QT_BYTES)


def prefix_key(src: bytes, v4: int, v6: int) -> bytes:
    """The packed network address of ``src`` cut to /v4 or /v6 (host bits zeroed).

    198.51.100.7 with v4=24 -> the 4 bytes of 198.51.100.0.  Keys keep the
    address's length, so IPv4 (4 bytes) and IPv6 (16 bytes) prefixes never collide.
    """
    bits = v4 if len(src) == 4 else v6
    whole, rest = divmod(bits, 8)
    pad = bytes(len(src) - whole - (1 if rest else 0))
    if not rest:
        return src[:whole] + pad
    mask = (0xFF << (8 - rest)) & 0xFF
    return src[:whole] + bytes((src[whole] & mask,)) + pad


def prefix_keys(sources: list[bytes], v4: int, v6: int) -> list[bytes]:
    """:func:`prefix_key` of every source, at C speed for the usual cases."""
    if v4 % 8 == 0 and v6 % 8 == 0:
        lengths = set(map(len, sources))
        if len(lengths) == 1:  # one address family, byte-aligned (e.g. /24 or /64)
            size = lengths.pop()
            keep = (v4 if size == 4 else v6) // 8
            return list(map(add, map(itemgetter(slice(0, keep)), sources),
                            repeat(bytes(size - keep))))
    return [prefix_key(src, v4, v6) for src in sources]


def address_network(src: bytes) -> Network:
    """The /32 or /128 of a packed source address."""
    return ipaddress.ip_network(ipaddress.ip_address(src))


def prefix_network(key: bytes, v4: int, v6: int) -> Network:
    """The network a :func:`prefix_key` stands for."""
    return ipaddress.ip_network((key, v4 if len(key) == 4 else v6))


def qtype_key(src: bytes, qtype: int) -> bytes:
    return src + qtype.to_bytes(_QT_BYTES, "big")


def split_qtype_key(key: bytes) -> tuple[bytes, int]:
    return key[:-_QT_BYTES], int.from_bytes(key[-_QT_BYTES:], "big")


def rule_qtype(rule: Rule) -> int | None:
    """The qtype code a rule counts by (the pseudo type for malformed), or None for all."""
    if rule.match == MATCH_ALL:
        return None
    if rule.match == MATCH_MALFORMED:
        return MALFORMED_QTYPE
    return rule.qtype


def _with_flag(records: Sequence[Record], flag: int) -> list[Record]:
    return list(compress(records, map(and_, map(_flags, records), repeat(flag))))


def _without_flag(records: Sequence[Record], flag: int) -> list[Record]:
    return list(compress(records, map(not_, map(and_, map(_flags, records), repeat(flag)))))


def _not_from(records: Sequence[Record], skip: AbstractSet[bytes]) -> list[Record]:
    return list(compress(records, map(not_, map(skip.__contains__, map(_src, records)))))


def _hop_bytes(records: Sequence[Record]) -> list[bytes]:
    return list(map(HOP_BYTES.__getitem__, map(_hop, records)))


def packet_sources(records: Sequence[Record]) -> list[bytes]:
    """The source of every packet among ``records``.

    Records flagged F_EXTRA (further DNS messages in one TCP segment) are queries
    but not packets, so they are left out.
    """
    if any(map(_flags, records)):
        records = _without_flag(records, F_EXTRA)
    return list(map(_src, records))


@dataclass(frozen=True)
class TableSpec:
    """What one rate table counts: its definition, compared across reloads."""

    kind: str  # SOURCE, PREFIX, SOURCE_QTYPE or QTYPE; + HOP_SUFFIX or TCP_SUFFIX: evidence
    window: float
    bucket: float
    capacity: int
    prefix_v4: int = 0  # PREFIX only
    prefix_v6: int = 0


def table_spec(rule: Rule, config: Config) -> TableSpec:
    """The table a rule compares its threshold against."""
    rt = config.rate_table
    if rule.aggregate == "prefix":
        return TableSpec(PREFIX, rule.window, rt.bucket, rt.capacity,
                         rule.prefix_v4, rule.prefix_v6)
    kind = SOURCE if rule_qtype(rule) is None else SOURCE_QTYPE
    return TableSpec(kind, rule.window, rt.bucket, rt.capacity)


def hop_spec(spec: TableSpec) -> TableSpec:
    """The table of a rule table's packets per key and hop value."""
    return replace(spec, kind=spec.kind + HOP_SUFFIX, capacity=_evidence_capacity(spec))


def tcp_spec(spec: TableSpec) -> TableSpec:
    """The table of a rule table's packets over verified TCP."""
    return replace(spec, kind=spec.kind + TCP_SUFFIX, capacity=_evidence_capacity(spec))


def _evidence_capacity(spec: TableSpec) -> int:
    """Evidence tables hold a share of their rule table's keys: lossy counting keeps every
    key with more than 2/capacity of the table's packets (a flood, and a real client
    beside it), and a count lost to pruning can only narrow a ban (fewer packets at the
    usual values) or keep TCP open (fewer verified packets)."""
    return max(spec.capacity // EVIDENCE_SHARE, 100)


def status_spec(config: Config) -> TableSpec:
    """The per-source table status and ``top`` read: the longest per-source rule
    window, or ``rate_table.window`` when no rule counts per source."""
    rt = config.rate_table
    windows = [rule.window for rule in config.rules
               if table_spec(rule, config).kind == SOURCE]
    return TableSpec(SOURCE, max(windows, default=rt.window), rt.bucket, rt.capacity)


def _history_key(spec: TableSpec) -> tuple[str, int, int]:
    """Which hop history a rule table's keys are learned in: per prefix-length pair,
    or per source (per-source and source + qtype rules alike)."""
    if spec.kind == PREFIX:
        return PREFIX, spec.prefix_v4, spec.prefix_v6
    return SOURCE, 0, 0


class _RuleEvidence(NamedTuple):
    """The evidence tables and hop history of one rule."""

    qtype: int | None  # the rule's qtype (its table keys carry it), or None
    tcp: RateTable[bytes]  # its packets over verified TCP
    hops: RateTable[bytes] | None  # its packets per key and hop value (hop_check)
    history: HopHistory | None  # where its keys' hop values are learned (hop_check)
    prefix: bool  # a prefix rule


@dataclass
class _Fed:
    """The tables fed with one kind of key: the counts, and the evidence tables of those
    that rules read."""

    counts: list[RateTable[bytes]] = field(default_factory=list)
    hops: list[RateTable[bytes]] = field(default_factory=list)
    tcp: list[RateTable[bytes]] = field(default_factory=list)

    def add(self, spec: TableSpec, table: RateTable[bytes]) -> None:
        kind = spec.kind
        (self.hops if kind.endswith(HOP_SUFFIX) else self.tcp if kind.endswith(TCP_SUFFIX)
         else self.counts).append(table)


class Traffic:
    """All sliding-window tables floodd's rules need, fed batch by batch.

    Every method takes the clock as ``now`` (see :mod:`floodd.detect.ratetable`):
    the daemon's monotonic clock, or a capture's own timestamps offline.
    """

    def __init__(self, config: Config, track_peak: bool = False) -> None:
        self.packets = 0  # every packet counted since start (banned sources included)
        self._track_peak = track_peak
        self.tables: dict[TableSpec, RateTable[Any]] = {}  # read only: see reconfigure
        self.histories: dict[tuple[str, int, int], HopHistory] = {}  # read only
        self.reconfigure(config)

    def reconfigure(self, config: Config) -> None:
        """Follow a new configuration: a table whose :class:`TableSpec` is unchanged
        keeps its counts, a hop history its values while ``trust.hop_capacity`` is
        unchanged; new ones start empty; those no rule reads any more go."""
        self._config = config
        trust = config.trust
        specs = {status_spec(config): None}
        watched: dict[TableSpec, set[int]] = {}
        for rule in config.rules:
            spec = table_spec(rule, config)
            specs[spec] = None
            qt = rule_qtype(rule)
            if qt is not None:
                watched.setdefault(spec, set()).add(qt)
                if rule.total_threshold is not None:
                    specs[self._total_spec(rule)] = None
        rule_specs = dict.fromkeys(table_spec(rule, config) for rule in config.rules)
        for spec in rule_specs:
            specs[tcp_spec(spec)] = None
            if trust.hop_check:
                specs[hop_spec(spec)] = None
        old = self.tables
        self.tables = {spec: self._make(spec, config) if old.get(spec) is None else old[spec]
                        for spec in specs}
        self.sources: RateTable[bytes] = self.tables[status_spec(config)]

        old_histories = self.histories
        self.histories = {}
        for key in dict.fromkeys(map(_history_key, rule_specs)) if trust.hop_check else ():
            history = old_histories.get(key)
            if history is None or history.capacity != trust.hop_capacity:
                history = HopHistory(trust.hop_capacity, trust.hop_learn_after)
            history.learn_after = trust.hop_learn_after
            self.histories[key] = history
        self._source_history = self.histories.get((SOURCE, 0, 0))
        # What evidence() and suspect() read for each rule, looked up once per reload
        # rather than once per trigger.
        self._evidence: dict[Rule, _RuleEvidence] = {}
        for rule in config.rules:
            spec = table_spec(rule, config)
            self._evidence[rule] = _RuleEvidence(
                rule_qtype(rule), self.tables[tcp_spec(spec)],
                self.tables.get(hop_spec(spec)), self.histories.get(_history_key(spec)),
                spec.kind == PREFIX)

        tables = self.tables.items()
        self._source = _Fed()
        prefixes: dict[tuple[int, int], _Fed] = {}
        for s, t in tables:
            if s.kind.startswith(SOURCE_QTYPE) or s.kind == QTYPE:
                continue
            if s.kind.startswith(SOURCE):
                self._source.add(s, t)
            elif s.kind.startswith(PREFIX):
                prefixes.setdefault((s.prefix_v4, s.prefix_v6), _Fed()).add(s, t)
        self._prefixes = [(bits, fed, self.histories.get((PREFIX, *bits)))
                          for bits, fed in prefixes.items()]
        self._qtype_tables = [t for s, t in tables if s.kind == QTYPE]
        # Source+qtype tables grouped by the qtypes their rules watch.
        groups: dict[frozenset[int], _Fed] = {}
        for spec, qtypes in watched.items():
            fed = groups.setdefault(frozenset(qtypes), _Fed())
            for each in (spec, tcp_spec(spec), hop_spec(spec)):
                if each in self.tables:
                    fed.add(each, self.tables[each])
        self._pair_groups = list(groups.items())
        self.watched_qtypes: frozenset[int] = frozenset().union(*groups)

    def _make(self, spec: TableSpec, config: Config) -> RateTable[Any]:
        peak = self._track_peak and spec == status_spec(config)
        return RateTable(spec.window, spec.bucket, spec.capacity, track_peak=peak)

    def _total_spec(self, rule: Rule) -> TableSpec:
        return TableSpec(QTYPE, rule.window, self._config.rate_table.bucket, QTYPE_CAPACITY)

    def add_batch(self, now: float, records: Sequence[Record],
                  skip: AbstractSet[bytes] = frozenset()) -> None:
        """Count every record at ``now``; sources in ``skip`` (already banned) count
        only in ``packets`` and the all-source qtype totals, and teach no hop value."""
        if not records:
            return
        qtypes = Counter(map(_qtype, records))
        flagged = any(map(_flags, records))
        malformed = _with_flag(records, F_MALFORMED) if flagged else []
        packets = _without_flag(records, F_EXTRA) if flagged else records
        self.packets += len(packets)
        if malformed:
            qtypes[MALFORMED_QTYPE] = len(malformed)
        for table in self._qtype_tables:
            table.add_counts(now, qtypes)
        if skip:
            packets = _not_from(packets, skip)
            if not packets:
                return
        verified = _with_flag(packets, F_VERIFIED) if flagged else []
        sources = list(map(_src, packets))
        vsources = list(map(_src, verified))
        hop_check = bool(self.histories)
        hops = _hop_bytes(packets) if hop_check else []
        vhops = _hop_bytes(verified) if hop_check and verified else []
        self._feed(now, self._source, sources, vsources, hops, vhops, self._source_history)
        for (v4, v6), fed, history in self._prefixes:
            self._feed(now, fed, prefix_keys(sources, v4, v6),
                       prefix_keys(vsources, v4, v6) if vsources else [], hops, vhops,
                       history)
        if self.watched_qtypes.isdisjoint(qtypes):
            return
        for watched, fed in self._pair_groups:
            if watched.isdisjoint(qtypes):
                continue
            chosen = list(compress(records, map(watched.__contains__, map(_qtype, records))))
            if MALFORMED_QTYPE in watched:
                chosen += malformed
            if skip:
                chosen = _not_from(chosen, skip)
            keys = [qtype_key(r[1], MALFORMED_QTYPE if r[4] & F_MALFORMED else r[3])
                    for r in chosen]
            vkeys = list(compress(keys, map(and_, map(_flags, chosen), repeat(F_VERIFIED)))) \
                if flagged else []
            self._feed(now, fed, keys, vkeys, _hop_bytes(chosen) if hop_check else [], [],
                       None, self._source_history)

    @staticmethod
    def _feed(now: float, fed: _Fed, keys: list[bytes], vkeys: list[bytes], hops: list[bytes],
              vhops: list[bytes], history: HopHistory | None,
              values_of: HopHistory | None = None) -> None:
        """Count ``keys`` (of the packets whose hop bytes are ``hops``, when hops are
        checked), ``vkeys`` those over verified TCP (hop bytes ``vhops``, for the
        history), and let ``history`` learn from them.

        The ``+hop`` tables count only the packets arriving with a value ``values_of``
        (default: ``history``; for source + qtype keys, the per-source history) holds
        for their source: evidence is read at the usual values only, which are held
        values, so a forged flood, or one of unknown sources, costs one C pass here and
        no table entries.  A value is counted from when it is held: a value held since
        less than the window counts fewer packets, which can only narrow a ban."""
        for table in fed.counts:
            table.add_keys(now, keys)
        if vkeys:
            for table in fed.tcp:
                table.add_keys(now, vkeys)
        if not (fed.hops or history is not None):
            return
        pairs = list(map(add, keys, hops))
        if history is not None:
            history.observe(now, pairs, list(map(add, vkeys, vhops)))
        source_values = values_of or history
        if not fed.hops or source_values is None:
            return
        held = source_values.held_pairs()
        if values_of is None:
            wanted = map(held.__contains__, pairs)
        else:  # source + qtype keys: the source, then the hop byte
            wanted = map(held.__contains__, map(add, map(_source_part, keys), hops))
        counted = list(compress(pairs, wanted))
        if counted:
            for table in fed.hops:
                table.add_keys(now, counted)

    def forget(self, src: bytes) -> None:
        """Drop the counts of source ``src`` from every table keyed by it (per source and
        per source + qtype, their evidence too), as when it is banned or unbanned;
        prefixes keep theirs, and the hop history its usual values."""
        # Hop evidence is read at the usual values only, and a value that is not held
        # now becomes usual no sooner than learn_after (at least the longest window)
        # after it is next seen: so only the values held have counts to drop.
        held = [HOP_BYTES[h] for h in self._source_history.held(src)] \
            if self._source_history is not None else []
        fed_keys = [(self._source, [src])] + [(fed, [qtype_key(src, qt) for qt in watched])
                                               for watched, fed in self._pair_groups]
        for fed, keys in fed_keys:
            for key in keys:
                for table in fed.counts + fed.tcp:
                    table.forget(key)
                for table in fed.hops:
                    for hop in held:
                        table.forget(key + hop)

    def table_for(self, rule: Rule) -> RateTable[bytes]:
        """The table whose counts ``rule`` compares against its threshold."""
        return self.tables[table_spec(rule, self._config)]

    def rule_total(self, now: float, rule: Rule) -> int:
        """All sources' matching packets in the rule's window (for rotating-source guards)."""
        qt = rule_qtype(rule)
        if qt is None:
            return self.table_for(rule).total(now)
        return self.tables[self._total_spec(rule)].count(now, qt)

    def evidence(self, now: float, rule: Rule, key: bytes) -> HopEvidence:
        """What ``rule``'s packets from ``key`` (a packed source address, or for a prefix
        rule the packed prefix address) in its window say about their source."""
        ev = self._evidence[rule]
        table_key = key if ev.qtype is None else qtype_key(key, ev.qtype)
        tcp = ev.tcp.count(now, table_key)
        if ev.history is None or ev.hops is None:
            return HopEvidence((), False, 0, tcp)
        usual = ev.history.usual(key)
        at_usual = sum(ev.hops.count(now, table_key + HOP_BYTES[h]) for h in usual)
        return HopEvidence(usual, ev.history.verified(key), at_usual, tcp)

    def suspect(self, now: float, rule: Rule, key: bytes) -> None:
        """``rule`` fired on ``key`` (as for :meth:`evidence`): its flood must not teach
        its hop values.  Marks the key flooding in the rule's hop history, and a source
        in every prefix history too (its packets taught those as well)."""
        ev = self._evidence[rule]
        if ev.history is None:
            return
        ev.history.suspect(key, now)
        if not ev.prefix:
            for (v4, v6), _, prefix_history in self._prefixes:
                if prefix_history is not None:
                    prefix_history.suspect(prefix_key(key, v4, v6), now)
