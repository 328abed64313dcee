"""Rate-table stage: turns parsed batches into the sliding-window counts the rules read.

Keys are bytes, cheap to slice from the packet and to hash:
  * source:         the packed address (4 bytes IPv4, 16 bytes IPv6);
  * prefix:         the packed network address of the rule's prefix length (see
                    :func:`prefix_key`), one table per (v4, v6) prefix-length pair;
  * source + qtype: the packed address followed by the qtype in 3 bytes, for the
                    query types some rule matches (``malformed`` is the pseudo
                    type ``MALFORMED_QTYPE``).
Per batch every per-packet step runs in C (``map``, ``Counter``, and the rate
table's ``add_keys``); Python-level loops touch only flagged records and the
query types a rule watches.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from itertools import filterfalse, repeat
from operator import add, itemgetter
from typing import Any, Callable

from floodd.config import MATCH_ALL, MATCH_MALFORMED, Config, Network, Rule
from floodd.detect.parse import F_EXTRA, F_MALFORMED, Batch, Record
from floodd.detect.ratetable import RateTable

# Not a real qtype (those are 0..65535): marks malformed packets in the qtype tables.
MALFORMED_QTYPE = 0x1_0000
_QT_BYTES = 3  # bytes used for the qtype suffix of a source+qtype key

_src = itemgetter(1)
_qtype = itemgetter(3)
_flags = itemgetter(5)


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


def packet_sources(records: list[Record]) -> list[bytes]:
    """The source of every packet among ``records``.

    Records flagged F_EXTRA (further DNS messages in one TCP segment) are queries
    but not packets, so they are left out.
    """
    if any(map(_flags, records)):
        return [r[1] for r in records if not r[5] & F_EXTRA]
    return list(map(_src, records))  # the usual case, at C speed


@dataclass(frozen=True)
class TrafficTotals:
    """Capture-wide counts since start (for reports and status)."""

    packets: int
    malformed: int
    first_ts: float | None
    last_ts: float | None


class Traffic:
    """All sliding-window tables floodd's rules need, fed batch by batch."""

    def __init__(self, config: Config, track_peak: bool = False) -> None:
        rt = config.rate_table
        self.bucket = rt.bucket
        # Each table looks back only as far as the longest rule reading it: memory
        # grows with window / bucket when many real sources send in every bucket.
        windows: dict[str, float] = {}
        for rule in config.rules:
            for name in self._tables_of(rule):
                windows[name] = max(windows.get(name, rt.bucket), rule.window)

        def make(name: str, capacity: int = rt.capacity, peak: bool = False) -> RateTable[Any]:
            return RateTable(windows.get(name, rt.window), rt.bucket, capacity,
                             track_peak=peak)

        self.sources: RateTable[bytes] = make("sources", peak=track_peak)
        self.prefixes: dict[tuple[int, int], RateTable[bytes]] = {}
        self.watched_qtypes: set[int] = set()
        for rule in config.rules:
            if rule.aggregate == "prefix":
                pair = (rule.prefix_v4, rule.prefix_v6)
                self.prefixes.setdefault(pair, make(f"prefix {pair}"))
            qt = rule_qtype(rule)
            if qt is not None:
                self.watched_qtypes.add(qt)
        self.by_qtype: RateTable[bytes] = make("by_qtype")
        # Every qtype's all-source total: at most 65,537 keys, so never pruned.
        self.qtype_totals: RateTable[int] = make("qtype_totals", capacity=70_000)
        self.packets = 0
        self.malformed = 0
        self.qtype_counts: Counter[int] = Counter()
        self.first_ts: float | None = None
        self.last_ts: float | None = None
        # Called with the last timestamp of a bucket just before the first packet of
        # a later bucket is counted: an offline reader evaluates its rules there.
        self.on_bucket_end: Callable[[float], None] | None = None

    def add_batch(self, batch: Batch, skip: AbstractSet[bytes] = frozenset()) -> None:
        """Count a batch; sources in ``skip`` (already banned) are counted only in totals."""
        records = batch.records
        if not records:
            return
        bucket = self.bucket
        if self.first_ts is None:
            self.first_ts = records[0][0]
        elif self.on_bucket_end is not None and self.last_ts is not None and \
                records[0][0] // bucket != self.last_ts // bucket:
            self.on_bucket_end(self.last_ts)
        if records[0][0] // bucket == records[-1][0] // bucket:
            self._add_bucket(records[-1][0], records, skip)
        else:
            # A batch spanning buckets (slow traffic, offline files): split it.
            start = 0
            current = records[0][0] // bucket
            for i, rec in enumerate(records):
                b = rec[0] // bucket
                if b != current:
                    self._add_bucket(records[i - 1][0], records[start:i], skip)
                    if self.on_bucket_end is not None:
                        self.on_bucket_end(records[i - 1][0])
                    start, current = i, b
            self._add_bucket(records[-1][0], records[start:], skip)
        self.last_ts = records[-1][0]

    def _add_bucket(self, now: float, records: list[Record],
                    skip: AbstractSet[bytes]) -> None:
        # Every per-packet step below runs in C (map, Counter, set and dict
        # methods); Python-level loops only touch flagged records and watched qtypes.
        qtypes = Counter(map(_qtype, records))
        malformed = [r[1] for r in records if r[5] & F_MALFORMED] \
            if any(map(_flags, records)) else []
        sources = packet_sources(records)
        self.packets += len(sources)
        if malformed:
            self.malformed += len(malformed)
            qtypes[MALFORMED_QTYPE] = len(malformed)
        self.qtype_counts.update(qtypes)
        self.qtype_totals.add_counts(now, qtypes)
        if skip:
            sources = list(filterfalse(skip.__contains__, sources))
            if not sources:
                return
        self.sources.add_keys(now, sources)
        for (v4, v6), table in self.prefixes.items():
            table.add_keys(now, prefix_keys(sources, v4, v6))
        watched = self.watched_qtypes
        if watched and not watched.isdisjoint(qtypes):
            pairs = [qtype_key(r[1], r[3]) for r in records
                     if r[3] in watched and r[1] not in skip]
            if MALFORMED_QTYPE in watched:
                pairs += [qtype_key(src, MALFORMED_QTYPE) for src in malformed
                          if src not in skip]
            self.by_qtype.add_keys(now, pairs)

    @staticmethod
    def _tables_of(rule: Rule) -> list[str]:
        """Names of the tables a rule reads (see table_for and rule_total)."""
        if rule.aggregate == "prefix":
            names = [f"prefix {(rule.prefix_v4, rule.prefix_v6)}"]
        elif rule_qtype(rule) is not None:
            names = ["by_qtype"]
        else:
            names = ["sources"]
        if rule.total_threshold is not None:
            names.append("sources" if rule_qtype(rule) is None else "qtype_totals")
        return names

    def totals(self) -> TrafficTotals:
        return TrafficTotals(self.packets, self.malformed, self.first_ts, self.last_ts)

    def table_for(self, rule: Rule) -> RateTable[bytes]:
        if rule.aggregate == "prefix":
            return self.prefixes[(rule.prefix_v4, rule.prefix_v6)]
        if rule_qtype(rule) is not None:
            return self.by_qtype
        return self.sources

    def rule_total(self, now: float, rule: Rule) -> int:
        """All sources' matching packets in the rule's window (for rotating-source guards)."""
        qt = rule_qtype(rule)
        if qt is None:
            return self.sources.total(now, rule.window)
        return self.qtype_totals.count(now, qt, rule.window)
