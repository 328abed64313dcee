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
Per batch every per-packet step runs in C (``map``, ``Counter``, and the rate
table's ``add_keys``); Python-level loops touch only flagged records and the
query types a rule watches.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from itertools import filterfalse, repeat
from operator import add, itemgetter
from typing import Any

from floodd.config import MATCH_ALL, MATCH_MALFORMED, Config, Network, Rule
from floodd.detect.parse import F_EXTRA, F_MALFORMED, Record
from floodd.detect.ratetable import RateTable

# Not a real qtype (those are 0..65535): marks malformed packets in the qtype tables.
MALFORMED_QTYPE = 0x1_0000
_QT_BYTES = 3  # bytes used for the qtype suffix of a source+qtype key
# Every qtype's all-source total: at most 65,537 keys, so such a table is never pruned.
QTYPE_CAPACITY = 70_000

SOURCE, PREFIX, SOURCE_QTYPE, QTYPE = "source", "prefix", "source+qtype", "qtype"

_src = itemgetter(1)
_qtype = itemgetter(3)
_flags = itemgetter(4)


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


def packet_sources(records: Sequence[Record]) -> list[bytes]:
    """The source of every packet among ``records``.

    Records flagged F_EXTRA (further DNS messages in one TCP segment) are queries
    but not packets, so they are left out.
    """
    if any(map(_flags, records)):
        return [r[1] for r in records if not r[4] & F_EXTRA]
    return list(map(_src, records))  # the usual case, at C speed


@dataclass(frozen=True)
class TableSpec:
    """What one rate table counts: its definition, compared across reloads."""

    kind: str  # SOURCE, PREFIX, SOURCE_QTYPE or QTYPE
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


def status_spec(config: Config) -> TableSpec:
    """The per-source table status and ``top`` read: the longest per-source rule
    window, or ``rate_table.window`` when no rule counts per source."""
    rt = config.rate_table
    windows = [rule.window for rule in config.rules
               if table_spec(rule, config).kind == SOURCE]
    return TableSpec(SOURCE, max(windows, default=rt.window), rt.bucket, rt.capacity)


class Traffic:
    """All sliding-window tables floodd's rules need, fed batch by batch.

    Every method takes the clock as ``now`` (see :mod:`floodd.detect.ratetable`):
    the daemon's monotonic clock, or a capture's own timestamps offline.
    """

    def __init__(self, config: Config, track_peak: bool = False) -> None:
        self.packets = 0  # every packet counted since start (banned sources included)
        self._track_peak = track_peak
        self.tables: dict[TableSpec, RateTable[Any]] = {}  # read only: see reconfigure
        self.reconfigure(config)

    def reconfigure(self, config: Config) -> None:
        """Follow a new configuration: a table whose :class:`TableSpec` is unchanged
        keeps its counts; new ones start empty; those no rule reads any more go."""
        self._config = config
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
        old = self.tables
        self.tables = {spec: self._make(spec, config) if old.get(spec) is None else old[spec]
                        for spec in specs}
        self.sources: RateTable[bytes] = self.tables[status_spec(config)]
        tables = self.tables.items()
        self._source_tables = [t for s, t in tables if s.kind == SOURCE]
        prefixes: dict[tuple[int, int], list[RateTable[bytes]]] = {}
        for s, t in tables:
            if s.kind == PREFIX:
                prefixes.setdefault((s.prefix_v4, s.prefix_v6), []).append(t)
        self._prefix_tables = list(prefixes.items())
        self._qtype_tables = [t for s, t in tables if s.kind == QTYPE]
        # Source+qtype tables grouped by the qtypes their rules watch.
        groups: dict[frozenset[int], list[RateTable[bytes]]] = {}
        for spec, qtypes in watched.items():
            groups.setdefault(frozenset(qtypes), []).append(self.tables[spec])
        self._pair_tables = list(groups.items())
        self.watched_qtypes: frozenset[int] = frozenset().union(*groups)

    def _make(self, spec: TableSpec, config: Config) -> RateTable[Any]:
        peak = self._track_peak and spec == status_spec(config)
        return RateTable(spec.window, spec.bucket, spec.capacity, track_peak=peak)

    def _total_spec(self, rule: Rule) -> TableSpec:
        return TableSpec(QTYPE, rule.window, self._config.rate_table.bucket, QTYPE_CAPACITY)

    def add_batch(self, now: float, records: Sequence[Record],
                  skip: AbstractSet[bytes] = frozenset()) -> None:
        """Count every record at ``now``; sources in ``skip`` (already banned) count
        only in ``packets`` and the all-source qtype totals."""
        if not records:
            return
        # Every per-packet step below runs in C (map, Counter, set and dict
        # methods); Python-level loops only touch flagged records and watched qtypes.
        qtypes = Counter(map(_qtype, records))
        malformed = [r[1] for r in records if r[4] & F_MALFORMED] \
            if any(map(_flags, records)) else []
        sources = packet_sources(records)
        self.packets += len(sources)
        if malformed:
            qtypes[MALFORMED_QTYPE] = len(malformed)
        for table in self._qtype_tables:
            table.add_counts(now, qtypes)
        if skip:
            sources = list(filterfalse(skip.__contains__, sources))
            if not sources:
                return
        for table in self._source_tables:
            table.add_keys(now, sources)
        for (v4, v6), tables in self._prefix_tables:
            keys = prefix_keys(sources, v4, v6)
            for table in tables:
                table.add_keys(now, keys)
        if self.watched_qtypes.isdisjoint(qtypes):
            return
        for watched, tables in self._pair_tables:
            if watched.isdisjoint(qtypes):
                continue
            pairs = [qtype_key(r[1], r[3]) for r in records
                     if r[3] in watched and r[1] not in skip]
            if MALFORMED_QTYPE in watched:
                pairs += [qtype_key(src, MALFORMED_QTYPE) for src in malformed
                          if src not in skip]
            for table in tables:
                table.add_keys(now, pairs)

    def forget(self, src: bytes) -> None:
        """Drop the counts of source ``src`` from every table keyed by it (per source and
        per source + qtype), as when it is banned or unbanned; prefixes keep theirs."""
        for table in self._source_tables:
            table.forget(src)
        for watched, tables in self._pair_tables:
            for qt in watched:
                key = qtype_key(src, qt)
                for table in tables:
                    table.forget(key)

    def table_for(self, rule: Rule) -> RateTable[bytes]:
        """The table whose counts ``rule`` compares against its threshold."""
        return self.tables[table_spec(rule, self._config)]

    def rule_total(self, now: float, rule: Rule) -> int:
        """All sources' matching packets in the rule's window (for rotating-source guards)."""
        qt = rule_qtype(rule)
        if qt is None:
            return self.table_for(rule).total(now)
        return self.tables[self._total_spec(rule)].count(now, qt)
