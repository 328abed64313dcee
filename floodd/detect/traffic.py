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

Per batch every per-packet step runs in C over the batch's columns
(:class:`floodd.detect.parse.Records`: ``map``, ``compress``, ``Counter``, and the rate
table's ``add_keys``); Python-level loops touch only the records of the query types a
rule watches, the hop histories' budgeted observations, and the keys going over a ban
threshold.  A batch that repeats its sources (:func:`repeating`: a flood of few
sources, the case that must be cheap) is counted in one pass per packet (``Counter``
of its sources, or of its source + qtype keys), and the tables are fed those counts
(``add_counts``; per prefix, the sources' counts summed: :func:`prefix_counts`), with
the crossings read per distinct key: every further step is per distinct key, not per
packet.  A batch of mostly distinct sources is counted per packet, which is cheaper
there; both ways count the same.

Crossings.  After counting a batch into a ban rule's table, one more C pass reads the
running totals of its keys: those that went over the rule's threshold (the lowest of
the table's ban rules; a guard's, ``total_threshold``, while it is armed, and all its
keys over when it arms) are kept as candidates (:meth:`Traffic.take_candidates`) and
:meth:`Traffic.add_batch` says so, so that the decision can look at once, at those
keys only (:meth:`Traffic.over` with candidates); a full :meth:`Traffic.over` selects
in C the keys whose running total is over before counting them.

Cost.  Each ``+hop`` table is one more rate-table update per packet of a key with
history arriving at a value held for it; a flood of forged or unknown sources costs one
C pass (over the batch, against the history's keys) and no entries.  ``+tcp`` tables
cost nothing without TCP; the hop histories look at no more than their budget of
packets a second (:mod:`floodd.detect.hops`), and the pairs they would look at are not
built beyond it.  bench/bench_parse.py, 1,000,000 packets from 50,000 sources (none
with history) on a loaded 2-core box: parse and all the shipped rules' tables
442,000 packets/s per core, 6.7 times dpkt's full decode in the same run (before the
columns: 234,000 packets/s, 3.6 times, the same day; 5.9 times on a quieter one).
Counting repeating batches per distinct key, alternated with the version before on the
same day: 50,000 sources 1.70-1.85 s against 1.74-1.89 s of CPU for parse and tables
(their batches are counted per packet, as before), 6-7 times dpkt; a flood of 20
sources (``--sources 20``) 0.72-0.84 s against 1.12-1.22 s, 16.5 times dpkt (before:
11.1 times, in the same run).
bench/bench_memory.py, with every table and history filled over verified TCP: 247 MB
peak, within the 256 MB target (221 MB before: each table now keeps its totals as of
the bucket's start instead of the bucket's own counts).
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, replace
from functools import partial
from itertools import compress, repeat
from operator import add, and_, itemgetter, le, mul, not_, or_
from types import MappingProxyType
from typing import Any, NamedTuple

from floodd.config import MATCH_ALL, MATCH_MALFORMED, Config, Network, Rule
from floodd.detect.hops import HOP_BYTES, HopEvidence, HopHistory, hop_keys
from floodd.detect.parse import F_EXTRA, F_MALFORMED, F_VERIFIED, Record, Records
from floodd.detect.ratetable import RateTable
from floodd.qtypes import qtype_name

# Not a real qtype (those are 0..65535): marks malformed packets in the qtype tables.
MALFORMED_QTYPE = 0x1_0000
_QT_BYTES = 3  # bytes used for the qtype suffix of a source+qtype key
# Every qtype's all-source total: at most 65,537 keys, so such a table is never pruned.
QTYPE_CAPACITY = 70_000

SOURCE, PREFIX, SOURCE_QTYPE, QTYPE = "source", "prefix", "source+qtype", "qtype"
HOP_SUFFIX, TCP_SUFFIX = "+hop", "+tcp"  # the kinds of a rule table's evidence tables
EVIDENCE_SHARE = 8  # an evidence table holds 1/8 of its rule table's capacity

# The per-source query-type mix (status and ``top`` only) counts 1 packet in this many:
# a mix is a proportion, and the busiest sources, the ones shown, have packets to spare.
MIX_SAMPLE = 16
MIX_QTYPES = 16  # query types looked up for a source's mix: the most counted overall
_SAMPLE = 256  # packets of a batch looked at to tell whether it repeats its sources


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


def prefix_counts(per_source: Mapping[bytes, int], v4: int, v6: int) -> dict[bytes, int]:
    """Packets per :func:`prefix_key` from packets per source, first seen first.

    In C: ``dict.update`` takes the (prefix, sum) pairs one by one, so each ``get``
    sees the sum so far."""
    out: dict[bytes, int] = {}
    keys = prefix_keys(list(per_source), v4, v6)
    dict.update(out, zip(keys, map(add, map(out.get, keys, repeat(0)), per_source.values())))
    return out


def repeating(sources: Sequence[bytes]) -> bool:
    """Whether a batch repeats its sources enough to be counted per distinct source
    (:meth:`Traffic.add_batch`): its first ``_SAMPLE`` packets come from at most half as
    many sources.  A guess, which only decides the cost: both ways count the same."""
    sample = sources[:_SAMPLE]
    return len(set(sample)) * 2 <= len(sample)


def address_network(src: bytes) -> Network:
    """The /32 or /128 of a packed source address.  Built from the address as an int:
    a fifth of the time ``ip_network(ip_address(src))`` takes (the policy builds one per
    key over a threshold)."""
    return _network(src, 32, 128)


def prefix_network(key: bytes, v4: int, v6: int) -> Network:
    """The network a :func:`prefix_key` stands for."""
    return _network(key, v4, v6)


def _network(key: bytes, v4: int, v6: int) -> Network:
    if len(key) == 4:
        return ipaddress.IPv4Network((int.from_bytes(key, "big"), v4))
    if len(key) == 16:
        return ipaddress.IPv6Network((int.from_bytes(key, "big"), v6))
    raise ValueError(f"not a packed IPv4 or IPv6 address: {key!r}")


def qtype_label(code: int) -> str:
    """A query type's name, ``malformed`` for the pseudo type of malformed packets."""
    return "malformed" if code == MALFORMED_QTYPE else qtype_name(code)


def qtype_key(src: bytes, qtype: int) -> bytes:
    return src + qtype_suffix(qtype)


def qtype_suffix(qtype: int) -> bytes:
    """The qtype suffix of a source + qtype key."""
    return qtype.to_bytes(_QT_BYTES, "big")


def split_qtype_key(key: bytes) -> tuple[bytes, int]:
    return key[:-_QT_BYTES], int.from_bytes(key[-_QT_BYTES:], "big")


qtype_key_source = itemgetter(slice(None, -_QT_BYTES))  # the source of a qtype_key, in C


def rule_qtype(rule: Rule) -> int | None:
    """The qtype code a rule counts by (the pseudo type for malformed), or None for all."""
    if rule.match == MATCH_ALL:
        return None
    if rule.match == MATCH_MALFORMED:
        return MALFORMED_QTYPE
    return rule.qtype


def source_qtype_keys(records: Sequence[Record]) -> list[bytes]:
    """The :func:`qtype_key` of every record with a query type (malformed ones: with
    MALFORMED_QTYPE; a bare TCP segment has none), for each source's query-type mix.
    Built in C for the usual batch, with no flags and every query type known."""
    cols = Records.of(records)
    srcs, qtypes, flags = cols.src, cols.qtype, cols.flags
    if flags is not None:
        if min(qtypes) < 0:
            malformed = list(map(and_, flags, repeat(F_MALFORMED)))
            qtypes = [MALFORMED_QTYPE if bad else qt for qt, bad in zip(qtypes, malformed)]
            typed = list(map(le, repeat(0), qtypes))  # a bare TCP segment has no qtype
            srcs, qtypes = list(compress(srcs, typed)), list(compress(qtypes, typed))
    elif qtypes and min(qtypes) < 0:  # bare TCP segments, without flags
        typed = list(map(le, repeat(0), qtypes))
        srcs, qtypes = list(compress(srcs, typed)), list(compress(qtypes, typed))
    suffix = {qt: qtype_suffix(qt) for qt in set(qtypes)}
    return list(map(add, srcs, map(suffix.__getitem__, qtypes)))


def every_nth(cols: Records, start: int, step: int) -> Records:
    """The records ``start``, ``start + step``, ... of ``cols`` (their columns sliced)."""
    flags = cols.flags[start::step] if cols.flags is not None else None
    return Records(cols.src[start::step], cols.qtype[start::step], cols.hop[start::step], flags)


def packet_sources(records: Sequence[Record]) -> list[bytes]:
    """The source of every packet among ``records``.

    Records flagged F_EXTRA (further DNS messages in one TCP segment) are queries
    but not packets, so they are left out.
    """
    cols = Records.of(records)
    if cols.flags is None:
        return list(cols.src)
    return list(compress(cols.src, map(not_, map(and_, cols.flags, repeat(F_EXTRA)))))


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
    """The tables fed with one kind of key: the counts (with their specs, for the ban
    thresholds watched), and the evidence tables of those that rules read."""

    counts: list[tuple[TableSpec, RateTable[bytes]]] = field(default_factory=list)
    hops: list[RateTable[bytes]] = field(default_factory=list)
    tcp: list[RateTable[bytes]] = field(default_factory=list)

    def add(self, spec: TableSpec, table: RateTable[bytes]) -> None:
        kind = spec.kind
        if kind.endswith(HOP_SUFFIX):
            self.hops.append(table)
        elif kind.endswith(TCP_SUFFIX):
            self.tcp.append(table)
        else:
            self.counts.append((spec, table))


Candidates = Mapping[TableSpec, frozenset[bytes]]  # rule table -> keys that went over
NO_CANDIDATES: Candidates = MappingProxyType({})


class Traffic:
    """All sliding-window tables floodd's rules need, fed batch by batch.

    Every method takes the clock as ``now`` (see :mod:`floodd.detect.ratetable`):
    the daemon's monotonic clock, or a capture's own timestamps offline.
    """

    def __init__(self, config: Config, track_peak: bool = False,
                 crossings: bool = True) -> None:
        """``crossings`` False: :meth:`add_batch` watches no threshold and reports no
        candidate (a replay that evaluates every key at every step, as ``analyze``)."""
        self.packets = 0  # every packet counted since start (banned sources included)
        # Every query counted since start by query type (MALFORMED_QTYPE: malformed
        # packets), banned sources included; bare TCP segments are not queries.
        self.queries: Counter[int] = Counter()
        self._mix_spec: TableSpec | None = None
        self._mix_next = 0  # the next sampled record's index in the next batch
        self._track_peak = track_peak
        self._crossings = crossings
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
        if self._mix_spec != status_spec(config):
            self._mix_spec = spec = status_spec(config)
            # Per source + qtype key, 1 in MIX_SAMPLE packets: see qtype_mixes().
            self.mix: RateTable[bytes] = RateTable(spec.window, spec.bucket, spec.capacity)

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
        # The ban rules each table's crossings are checked for; guards (total_threshold)
        # only while armed; none without crossings.
        self._bans: dict[TableSpec, list[Rule]] = {}
        for rule in config.rules if self._crossings else ():
            if rule.action == "ban":
                self._bans.setdefault(table_spec(rule, config), []).append(rule)
        self._guards = [rule for rules in self._bans.values() for rule in rules
                        if rule.total_threshold is not None]
        self._armed: set[Rule] = set()
        self._thresholds = self._watched_thresholds()
        self._candidates: dict[TableSpec, set[bytes]] = {}

    def _make(self, spec: TableSpec, config: Config) -> RateTable[Any]:
        peak = self._track_peak and spec == status_spec(config)
        return RateTable(spec.window, spec.bucket, spec.capacity, track_peak=peak)

    def _total_spec(self, rule: Rule) -> TableSpec:
        return TableSpec(QTYPE, rule.window, self._config.rate_table.bucket, QTYPE_CAPACITY)

    def add_batch(self, now: float, records: Sequence[Record],
                  skip: AbstractSet[bytes] = frozenset(), weight: int = 1) -> bool:
        """Count every record at ``now``; sources in ``skip`` (already banned) count
        only in ``packets`` and the all-source qtype totals, and teach no hop value.
        ``weight`` >= 1: the records are a 1-in-``weight`` sample of the packets, every
        count is multiplied by it (what the hop histories learn is not).

        Returns True when this batch made some key of a ban rule's table go over that
        rule's threshold (its running total: an upper bound of its window count; a
        guard's keys while it is armed, all of them when it arms) that was not reported
        since the last :meth:`take_candidates`: the decision should look now.

        Columns all the way (:class:`floodd.detect.parse.Records`; tuples are turned
        into columns first): one C pass per table over the batch's keys (over its
        distinct keys when it repeats its sources), one more per ban table for its
        crossings, nothing per packet for what no rule reads.
        """
        if weight < 1:
            raise ValueError(f"weight must be at least 1, got {weight!r}")
        cols = Records.of(records)
        if not cols:
            return False
        new: list[tuple[TableSpec, list[bytes]]] = []
        srcs, qtypes, hops, flags = cols.src, cols.qtype, cols.hop, cols.flags
        malformed: list[int] = []
        if flags is not None:
            malformed = list(map(and_, flags, repeat(F_MALFORMED)))
            extra = list(map(and_, flags, repeat(F_EXTRA)))
            if any(extra):  # further messages of a TCP segment: queries, not packets
                packet = list(map(not_, extra))
                srcs, hops, flags = (list(compress(srcs, packet)), list(compress(hops, packet)),
                                     list(compress(flags, packet)))
        self.packets += len(srcs) * weight
        counted = Counter(qtypes)
        if malformed and any(malformed):
            counted[MALFORMED_QTYPE] = len(malformed) - malformed.count(0)
        totals = counted if weight == 1 else Counter(
            dict(zip(counted, map(mul, counted.values(), repeat(weight)))))
        self.queries.update(totals)
        self.queries.pop(-1, None)  # malformed (counted above) and bare TCP segments
        self._count_mix(now, cols, weight)
        if self._qtype_tables:
            for table in self._qtype_tables:
                table.add_counts(now, totals)
            if self._guards:
                self._arm(now, new)
        if skip and not skip.isdisjoint(srcs):
            keep = list(map(not_, map(skip.__contains__, srcs)))
            srcs, hops = list(compress(srcs, keep)), list(compress(hops, keep))
            flags = list(compress(flags, keep)) if flags is not None else None
        hop_check = bool(self.histories)
        if srcs:
            vsrcs: list[bytes] = []
            vhops: list[int] = []
            if flags is not None:
                verified = list(map(and_, flags, repeat(F_VERIFIED)))
                if any(verified):
                    vsrcs = list(compress(srcs, verified))
                    vhops = list(compress(hops, verified))
            # A flood of few sources: the tables are fed each batch's per-source counts
            # (and per-prefix counts summed from them), a step per distinct key.
            per_source = Counter(srcs) if repeating(srcs) else None
            self._feed(now, self._source, srcs, per_source, srcs, vsrcs, hops, vhops,
                       self._source_history, None, weight, new)
            for (v4, v6), fed, history in self._prefixes:
                per_prefix = None if per_source is None else \
                    prefix_counts(per_source, v4, v6)
                keys: list[bytes] | Callable[[], list[bytes]] = \
                    prefix_keys(srcs, v4, v6) if per_prefix is None \
                    else partial(prefix_keys, srcs, v4, v6)
                self._feed(now, fed, keys, per_prefix, srcs,
                           prefix_keys(vsrcs, v4, v6) if vsrcs else [], hops, vhops,
                           history, None, weight, new)
        if not self.watched_qtypes.isdisjoint(counted):
            for watched, fed in self._pair_groups:
                if watched.isdisjoint(counted):
                    continue
                mask = list(map(watched.__contains__, qtypes))
                if MALFORMED_QTYPE in watched and malformed:
                    mask = list(map(or_, mask, malformed))
                csrc = list(compress(cols.src, mask))
                cqt = list(compress(qtypes, mask))
                if malformed:  # the malformed ones have qtype -1
                    cqt = [MALFORMED_QTYPE if qt < 0 else qt for qt in cqt]
                suffixes = {qt: qtype_suffix(qt) for qt in set(cqt)}
                ckeys = list(map(add, csrc, map(suffixes.__getitem__, cqt)))
                chops = list(compress(cols.hop, mask)) if hop_check else []
                cflags = list(compress(cols.flags, mask)) if cols.flags is not None else None
                if skip and not skip.isdisjoint(csrc):
                    keep = list(map(not_, map(skip.__contains__, csrc)))
                    csrc, ckeys = list(compress(csrc, keep)), list(compress(ckeys, keep))
                    chops = list(compress(chops, keep))
                    cflags = list(compress(cflags, keep)) if cflags is not None else None
                vkeys = list(compress(ckeys, map(and_, cflags, repeat(F_VERIFIED)))) \
                    if cflags is not None else []
                per_key = Counter(ckeys) if repeating(csrc) else None
                self._feed(now, fed, ckeys, per_key, csrc, vkeys, chops, [], None,
                           self._source_history, weight, new)
        return self._report(new)

    def _count_mix(self, now: float, cols: Records, weight: int) -> None:
        """Count every MIX_SAMPLE-th record, over batches, into the query-type mix."""
        start = self._mix_next
        self._mix_next = (start - len(cols)) % MIX_SAMPLE
        if start < len(cols):
            keys = source_qtype_keys(every_nth(cols, start, MIX_SAMPLE))
            self.mix.add_keys(now, keys, weight * MIX_SAMPLE)

    def qtype_mixes(self, now: float, sources: Sequence[bytes]) -> list[dict[int, int]]:
        """Each source's queries in the status window by query type, busiest first
        (estimated from a 1-in-MIX_SAMPLE sample), among the MIX_QTYPES types counted
        most overall (chosen once for all the sources)."""
        qtypes = [(qt, qtype_suffix(qt)) for qt, _ in self.queries.most_common(MIX_QTYPES)]
        mixes = []
        for src in sources:
            mix = {qt: self.mix.count(now, src + suffix) for qt, suffix in qtypes}
            mixes.append({qt: n for qt, n in sorted(mix.items(), key=lambda kv: -kv[1]) if n})
        return mixes

    def table_keys(self) -> dict[str, int]:
        """Keys tracked by the tables of each kind (source, prefix, source+qtype+hop...),
        the query-type mix's as ``mix``."""
        keys: Counter[str] = Counter()
        for spec, table in self.tables.items():
            keys[spec.kind] += len(table)
        keys["mix"] = len(self.mix)
        return dict(keys)

    def _feed(self, now: float, fed: _Fed, keys: list[bytes] | Callable[[], list[bytes]],
              counts: Mapping[bytes, int] | None, sources: list[bytes],
              vkeys: list[bytes], hops: list[int], vhops: list[int],
              history: HopHistory | None, values_of: HopHistory | None, weight: int,
              new: list[tuple[TableSpec, list[bytes]]]) -> None:
        """Count ``keys`` (of the packets from ``sources`` whose hop values are ``hops``,
        when hops are checked), ``vkeys`` those over verified TCP (hop values ``vhops``,
        for the history), let ``history`` learn from them, and note in ``new`` the keys
        that went over a ban threshold watched.  ``counts``, when given, are ``keys``
        counted (``Counter(keys)``): the tables are fed those, and ``keys`` may be a
        function building them, called only if the hop values need them.

        The ``+hop`` tables count only the packets arriving with a value ``values_of``
        (default: ``history``; for source + qtype keys, the per-source history) holds
        for their source: evidence is read at the usual values only, which are held
        values, so a forged flood, or one of unknown sources, costs one C pass here and
        no table entries.  A value is counted from when it is held: a value held since
        less than the window counts fewer packets, which can only narrow a ban."""
        thresholds = self._thresholds
        if counts is not None:
            weighted = counts if weight == 1 else dict(
                zip(counts, map(mul, counts.values(), repeat(weight))))
        for spec, table in fed.counts:
            threshold = thresholds.get(spec)
            if counts is not None:
                table.add_counts(now, weighted)
                crossed = table.crossed_counts(counts, threshold, weight) \
                    if threshold is not None else []
            else:
                assert isinstance(keys, list)
                table.add_keys(now, keys, weight)
                crossed = table.crossed(keys, threshold, weight) \
                    if threshold is not None else []
            if crossed:
                new.append((spec, crossed))
        if vkeys:
            for table in fed.tcp:
                table.add_keys(now, vkeys, weight)
        learns = history is not None and history.learns(now, len(sources), len(vkeys))
        values = values_of or history
        hop_tables = bool(fed.hops) and values is not None
        if not (learns or hop_tables):
            return
        # Only the packets of keys (sources) with values held can count: one C pass
        # (over the distinct keys, when counted).
        if not learns and values is not None:
            if values_of is not None:
                first: Iterable[bytes] = sources
            elif counts is not None:
                first = counts
            else:
                first = keys = keys if isinstance(keys, list) else keys()
            if values.established_keys().isdisjoint(first):
                return
        if not isinstance(keys, list):
            keys = keys()
        if learns and history is not None:
            history.observe(now, hop_keys(keys, hops), hop_keys(vkeys, vhops))
        if not hop_tables or values is None:
            return
        gate = keys if values_of is None else sources
        established = values.established_keys()
        if established.isdisjoint(gate):
            return
        known = list(map(established.__contains__, gate))
        pairs = hop_keys(compress(keys, known), compress(hops, known))
        if values_of is None:
            tests = pairs
        else:  # source + qtype keys: the source, then the hop byte
            tests = hop_keys(compress(sources, known), compress(hops, known))
        counted = list(compress(pairs, map(values.held_pairs().__contains__, tests)))
        if counted:
            for table in fed.hops:
                table.add_keys(now, counted, weight)

    def _watched_thresholds(self) -> dict[TableSpec, int]:
        """Per ban rule table, the lowest threshold of its ban rules (guards while armed)."""
        out: dict[TableSpec, int] = {}
        for spec, rules in self._bans.items():
            levels = [rule.threshold for rule in rules
                      if rule.total_threshold is None or rule in self._armed]
            if levels:
                out[spec] = min(levels)
        return out

    def _arm(self, now: float, new: list[tuple[TableSpec, list[bytes]]]) -> None:
        """Follow the guards' all-source totals: one that arms puts every key of its
        table over its threshold in ``new`` (they went over before it counted)."""
        armed = {rule for rule in self._guards
                 if self.rule_total(now, rule) > (rule.total_threshold or 0)}
        if armed == self._armed:
            return
        for rule in armed - self._armed:
            spec = table_spec(rule, self._config)
            keys = self.tables[spec].running_over(rule.threshold)
            if keys:
                new.append((spec, keys))
        self._armed = armed
        self._thresholds = self._watched_thresholds()

    def _report(self, new: list[tuple[TableSpec, list[bytes]]]) -> bool:
        """Add the keys that went over to the candidates: whether any was not there."""
        woke = False
        for spec, keys in new:
            pending = self._candidates.setdefault(spec, set())
            size = len(pending)
            pending.update(keys)
            woke = woke or len(pending) > size
        return woke

    def take_candidates(self) -> Candidates:
        """The keys reported by :meth:`add_batch` since the last call, per rule table
        (read only; for :meth:`over`), and forget them."""
        if not self._candidates:
            return NO_CANDIDATES
        taken = MappingProxyType({spec: frozenset(keys)
                                  for spec, keys in self._candidates.items()})
        self._candidates = {}
        return taken

    def over(self, now: float, rule: Rule,
             candidates: Candidates | None = None) -> list[tuple[bytes, int]]:
        """The keys of ``rule``'s table (for a qtype rule, those of its qtype) with more
        than its threshold in its window, most first; with ``candidates``, only among
        those (a handful of lookups).  Without, the keys whose running total is over
        are selected in C and only those counted: no Python step per key tracked.
        The guard (``total_threshold``) is the caller's to check (:meth:`rule_total`)."""
        spec = table_spec(rule, self._config)
        table = self.tables[spec]
        qt = rule_qtype(rule)
        if candidates is None:
            keys: Iterable[bytes] = table.running_over(rule.threshold)
        else:
            keys = candidates.get(spec, ())
        if qt is not None:
            suffix = qtype_suffix(qt)
            keys = [key for key in keys if key.endswith(suffix)]
        return table.over_among(now, keys, rule.threshold)

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
                for table in [t for _, t in fed.counts] + fed.tcp:
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
