"""``floodd analyze FILE``: the operator's ``tcpdump | sort | uniq -c | sort -n`` in one command.

It counts exactly what the daemon counts (queries to the DNS ports, malformed ones
included, attributed to their source), replays the configured rules over the
capture's own timeline (its timestamps are the tables' clock; the rules are
evaluated at the last packet of every bucket) and reports who they would ban.

Hop values (IPv4 TTL / IPv6 hop limit) tell a forged source address from the real
source (see floodd.scope): every source is reported with the hop values its packets
came with, and every per-source trigger with the hop values of the packets that made
it fire (the rule's matching packets in its window) against those the source used
before that window.  A trigger whose packets came with a value the source had not used
before is marked: that is what forged packets carrying a real client's address look
like.  Times are those of the buckets the packets came in (see :class:`SourceHops`), so
"before the window" is exact to within one bucket.

Cost (bench/bench_analyze.py, 1,000,000 packets from 50,000 sources, the whole process,
on a 2-core box): 3.8-4.1 s of CPU, 3.3-3.5 times dpkt's full decode of the same file
(13.3-13.9 s), against 4.6-4.9 s (2.7-2.9 times) for the previous version, alternated
in the same run.  A flood of 20 sources (``--sources 20``): 1.05 s, 11.9-12.4 times
dpkt (the previous version 1.38-1.40 s, 9.1-9.4 times, in the same run).
Beyond the daemon's counting (without its threshold-crossing checks: every rule is
evaluated at every bucket), every packet feeds the per-source hop tally, the lifetime
prefix and query-type tables and the last time of its (source, hop value) pair (the
query totals and the malformed count are the counting stage's own).  A batch that
repeats its sources feeds those once per distinct key: without flags, it is counted
once per record by (source, hop value, query type), everything else per distinct
triple.  The rules are evaluated at every bucket, but only a key counting more than it
did when last reported builds a trigger (and reads its evidence): a replay keeps each
trigger's highest count.  Then the parse, about a sixth of the time at 50,000 sources
and half of it for 20 (the counting stage is a third at 50,000 sources).

``--plot OUT`` draws the capture (floodd.cli.plot) after the report: a second pass over
the file counts the busiest sources and the query types per step; without --plot,
nothing of it runs and matplotlib is not imported.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from itertools import compress, islice, repeat
from operator import add, and_, floordiv, itemgetter, ne, not_, sub
from typing import Any, Iterable, Iterator, Mapping, Sequence, TextIO, TypeVar

from floodd.cli.common import add_config_option, config_from_args
from floodd.cli.plot import (MAX_LINES, Timeline, drawn_sources, picture, plot_format,
                             plot_step, render)
from floodd.detect.capture import OfflineCapture
from floodd.config import Config
from floodd.errors import FlooddError
from floodd.detect.parse import F_EXTRA, F_MALFORMED, Batch, Record, Records
from floodd.decide.policy import Trigger, evaluate
from floodd.detect.ratetable import RateTable
from floodd.detect.traffic import (MALFORMED_QTYPE, Traffic, address_network, packet_sources,
                                   prefix_counts, prefix_keys, prefix_network, qtype_key_source,
                                   qtype_label, qtype_suffix, repeating, rule_qtype,
                                   source_qtype_keys, split_qtype_key)

HOP_VALUES = range(256)  # IPv4 TTL / IPv6 hop limit
# A hop key is the packed source address followed by one byte, the hop value.
_HOP_SUFFIX = [bytes((hop,)) for hop in HOP_VALUES]
_pair_source = itemgetter(slice(None, -1))  # the source of a hop key
_SHOWN_HOPS = 5  # hop values the text report lists per source, the most common first

# One bucket wider than any capture: a RateTable that never slides is a bounded counter.
_FOREVER = float(2**40)

K = TypeVar("K")


def hop_tally(counts: dict[int, int]) -> dict[str, int]:
    """Hop value -> packets as JSON (string keys), the most common first."""
    return {str(hop): n for hop, n in sorted(counts.items(), key=lambda hn: (-hn[1], hn[0]))}


class SourceHops:
    """Every source's packets and hop values over a capture, in the memory of a rate table.

    Per (source, hop value) pair, keyed by :func:`hop_keys`: its packets (a rate table
    that never slides, bounded as any: see floodd.detect.ratetable; a source's packets
    are those of its pairs), and when the pair was first and last seen, the last also
    per query type a per-source rule counts (the pseudo type for malformed).  Times are
    kept for at most twice as many pairs as the table tracks; beyond, those of the
    pairs it no longer tracks go.  A pair first seen in a bucket is stamped with the
    bucket's first packet, last seen with its last packet.  Every per-record step runs
    in C (map, compress, Counter and dict methods; the pairs new in a bucket are read
    off the end of ``last``, not looked up per record); Python steps once per pair when
    it is first seen, to index it under its source.  A bucket counted beforehand
    (:meth:`add_pairs`) costs a step per distinct pair.
    """

    def __init__(self, capacity: int, qtypes: Iterable[int]) -> None:
        self.packets: RateTable[bytes] = RateTable(_FOREVER, _FOREVER, capacity)
        self.first: dict[bytes, float] = {}
        self.last: dict[bytes, float] = {}
        self.last_of: dict[int, dict[bytes, float]] = {qt: {} for qt in qtypes}
        # Invariants: ``first`` and ``last`` hold the same pairs, each of them, so the
        # pairs new in a bucket are the last ones ``last`` holds after it; the keys of
        # ``last_of`` are among those (an F_EXTRA record comes with its packet, in the
        # same bucket); ``values`` holds them by source (source -> its hop values), so
        # that a trigger reads its source's few pairs, not 256 possible ones.
        self.values: dict[bytes, list[int]] = {}

    def add(self, part: Sequence[Record]) -> None:
        """Count the records of one bucket, in time order."""
        cols = Records.of(part)
        keys = list(map(add, cols.src, map(_HOP_SUFFIX.__getitem__, cols.hop)))
        flags = cols.flags
        packets = keys
        if flags is not None:  # F_EXTRA records are further queries of a packet
            packets = list(compress(keys, map(not_, map(F_EXTRA.__and__, flags))))
        of_qtype: dict[int, Iterable[bytes]] = {}
        qtypes = set(cols.qtype) if self.last_of else set()
        for qt in self.last_of:
            if qt == MALFORMED_QTYPE:
                if flags is not None:
                    of_qtype[qt] = compress(keys, map(F_MALFORMED.__and__, flags))
            elif qt in qtypes:
                of_qtype[qt] = compress(keys, map(qt.__eq__, cols.qtype))
        # Few pairs (a flood of few sources): a step per pair.
        self.add_pairs(cols.first_time(), cols.last_time(),
                       Counter(packets) if repeating(packets) else packets, of_qtype)

    def add_pairs(self, start: float, end: float, packets: list[bytes] | Mapping[bytes, int],
                  of_qtype: Mapping[int, Iterable[bytes]]) -> None:
        """Count the packets of one bucket, from ``start`` to ``end``: their pairs
        (repeats allowed) or the pairs counted (pair -> packets), and the pairs of the
        records of each query type of ``last_of`` (repeats allowed)."""
        last = self.last
        seen = len(last)
        if isinstance(packets, list):
            self.packets.add_keys(0.0, packets)
        else:
            self.packets.add_counts(0.0, packets)
        last.update(zip(packets, repeat(end)))
        if len(last) > seen:  # new pairs, the last ones of ``last`` (see __init__)
            fresh = list(islice(reversed(last), len(last) - seen))
            fresh.reverse()
            self.first.update(zip(fresh, repeat(start)))
            self._index(fresh)
        for qt, keys in of_qtype.items():
            self.last_of[qt].update(zip(keys, repeat(end)))
        first = self.first
        if len(first) > 2 * self.packets.capacity:  # the times of pairs no longer tracked go
            tracked = [key for key, _ in self.packets.top(0.0, len(self.packets))]
            self.first = {key: first[key] for key in tracked}
            self.last = {key: last[key] for key in tracked}
            for qt, last_of in self.last_of.items():
                self.last_of[qt] = {key: last_of[key] for key in tracked if key in last_of}
            self.values = {}
            self._index(tracked)

    def _index(self, pairs: Iterable[bytes]) -> None:
        """Add new pairs to ``values``."""
        values = self.values
        for pair in pairs:
            values.setdefault(pair[:-1], []).append(pair[-1])

    def top(self, n: int) -> list[tuple[bytes, int, dict[int, int]]]:
        """The ``n`` sources with the most packets, most first: (source, packets, hop
        value -> packets)."""
        ranked = self.packets.top(0.0, len(self.packets))
        sources = list(map(_pair_source, map(itemgetter(0), ranked)))
        # Packets per source, in C (each ``get`` sees the sum so far), the sources in the
        # order of their busiest pair: the order ties are listed in.
        totals: Counter[bytes] = Counter()
        dict.update(totals, zip(sources, map(add, map(totals.get, sources, repeat(0)),
                                             map(itemgetter(1), ranked))))
        count = self.packets.count
        out = []
        for src, packets in totals.most_common(n):
            tally = {hop: count(0.0, src + _HOP_SUFFIX[hop]) for hop in self.values[src]}
            out.append((src, packets, {hop: n for hop, n in tally.items() if n}))
        return out

    def flood(self, src: bytes, now: float, window: float,
              qtype: int | None) -> dict[str, Any]:
        """Whether the packets from ``src`` that a rule of ``qtype`` (None: all queries)
        counts over ``window`` seconds up to ``now`` came with the hop values ``src``
        used before: the ``usual`` values (seen before the window), those of the
        ``flood`` (its matching packets in the window), and ``changed`` when a source
        seen before sent the flood with a value not usual."""
        since = now - window
        hops = sorted(self.values.get(src, ()))
        keys = [src + _HOP_SUFFIX[hop] for hop in hops]
        first = self.first
        usual = [hop for hop, key in zip(hops, keys) if first[key] <= since]
        last = self.last if qtype is None else self.last_of[qtype]
        flood = [hop for hop, key in zip(hops, keys) if last.get(key, since) > since]
        return {"usual": usual, "flood": flood,
                "changed": bool(usual) and not set(flood) <= set(usual)}


@dataclass
class Report:
    """Everything ``analyze`` prints; ``as_json`` is its machine-readable form."""

    file: str
    frames: int = 0
    ignored: int = 0
    total: int = 0
    malformed: int = 0
    duration: float = 0.0
    qtypes: dict[str, int] = field(default_factory=dict)
    sources: list[dict[str, Any]] = field(default_factory=list)
    prefixes: list[dict[str, Any]] = field(default_factory=list)
    would_ban: list[dict[str, Any]] = field(default_factory=list)

    @property
    def pps(self) -> float:
        return self.total / self.duration if self.duration > 0 else float(self.total)

    def as_json(self) -> dict[str, Any]:
        return {"file": self.file, "frames": self.frames, "ignored": self.ignored,
                "total": self.total, "malformed": self.malformed,
                "duration": round(self.duration, 6), "pps": round(self.pps, 1),
                "qtypes": self.qtypes, "sources": self.sources, "prefixes": self.prefixes,
                "would_ban": self.would_ban}


def by_bucket(records: Sequence[Record], bucket: float) -> list[Records]:
    """``records`` cut wherever their timestamps enter another bucket (cut points found
    in C)."""
    cols = Records.of(records)
    if cols.first_time() // bucket == cols.last_time() // bucket:
        return [cols]  # most batches: their times need not be computed
    times = cols.times
    buckets = list(map(floordiv, times, repeat(bucket)))
    cuts = [0, *compress(range(1, len(buckets)), map(ne, buckets[1:], buckets)), len(buckets)]
    return [cols[start:stop] for start, stop in zip(cuts, cuts[1:])]


class Analyzer:
    """Feeds batches to the daemon's tables plus capture-long per-source counters."""

    def __init__(self, config: Config, file: str) -> None:
        self.config = config
        self.report = Report(file=file)
        cap = config.rate_table.capacity
        # Every rule is evaluated at every bucket: no crossing to watch while counting.
        self.traffic = Traffic(config, track_peak=True, crossings=False)
        self.first_ts: float | None = None
        self.last_ts: float | None = None
        self.lifetime_qtypes: RateTable[bytes] = RateTable(_FOREVER, _FOREVER, cap)
        self.lifetime_prefixes: RateTable[bytes] = RateTable(_FOREVER, _FOREVER, cap)
        # Per (rule name, trigger key): its trigger of the highest count (the first of
        # them), and when it first triggered with what hop values.
        self.best: dict[tuple[str, bytes], Trigger] = {}
        self.first_at: dict[tuple[str, bytes], float] = {}
        self.rules = {rule.name: rule for rule in config.rules}
        self.hops = SourceHops(cap, {qt for rule in config.rules
                                     if rule.aggregate == "source"
                                     and (qt := rule_qtype(rule)) is not None})
        self.hops_at: dict[tuple[str, bytes], dict[str, Any] | None] = {}
        self._qtype_suffixes: dict[int, bytes] = {}  # qtype -> qtype_suffix(qtype)

    def add(self, batch: Batch) -> None:
        self.report.frames += batch.frames
        self.report.ignored += batch.ignored
        records = Records.of(batch.records)
        if not records:
            return
        bucket = self.config.rate_table.bucket
        if self.first_ts is None:
            self.first_ts = records.first_time()
        # A batch that repeats its sources (a flood of few), without flags (no TCP, no
        # malformed packet): counted once per record by (source, hop value, query
        # type), every further step per distinct one.
        counted = records.flags is None and repeating(records.src)
        per_source: dict[bytes, int] = {}  # the batch's packets per source, counted
        per_key: dict[bytes, int] = {}  # and per source + qtype key
        for part in by_bucket(records, bucket):
            # The rules are evaluated at the last packet before another bucket.
            start, end = part.first_time(), part.last_time()
            if self.last_ts is not None and start // bucket != self.last_ts // bucket:
                self._evaluate(self.last_ts)
            self.traffic.add_batch(end, part)
            if counted:
                self._add_counted(start, end, part, per_source, per_key)
            else:
                self.hops.add(part)
            self.last_ts = end
        if counted:
            self.lifetime_prefixes.add_counts(0.0, prefix_counts(per_source, 24, 64))
            self.lifetime_qtypes.add_counts(0.0, per_key)
            return
        sources = packet_sources(records)
        if repeating(sources):
            self.lifetime_prefixes.add_counts(0.0, prefix_counts(Counter(sources), 24, 64))
        else:
            self.lifetime_prefixes.add_keys(0.0, prefix_keys(sources, 24, 64))
        self.lifetime_qtypes.add_keys(0.0, source_qtype_keys(records))

    def _add_counted(self, start: float, end: float, part: Records,
                     per_source: dict[bytes, int], per_key: dict[bytes, int]) -> None:
        """Count a bucket's records without flags into the per-pair tables, and add them
        to ``per_source`` and ``per_key`` (source + qtype keys), in the order each key is
        first seen, as the per-record counting would: a Python step per distinct
        (source, hop value, query type)."""
        pairs: dict[bytes, int] = {}
        of_qtype: dict[int, list[bytes]] = {qt: [] for qt in self.hops.last_of}
        suffixes = self._qtype_suffixes
        for (src, hop, qt), n in Counter(zip(part.src, part.hop, part.qtype)).items():
            pair = src + _HOP_SUFFIX[hop]
            pairs[pair] = pairs.get(pair, 0) + n
            per_source[src] = per_source.get(src, 0) + n
            if qt >= 0:  # a bare TCP segment has no query type
                key = src + (suffixes.get(qt) or suffixes.setdefault(qt, qtype_suffix(qt)))
                per_key[key] = per_key.get(key, 0) + n
                if qt in of_qtype:
                    of_qtype[qt].append(pair)
        self.hops.add_pairs(start, end, pairs, of_qtype)

    def _trigger_hops(self, now: float, trig: Trigger) -> dict[str, Any] | None:
        """:meth:`SourceHops.flood` for a per-source trigger; None for a prefix (hop
        values are a source's)."""
        rule = self.rules[trig.rule]
        if rule.aggregate != "source":
            return None
        return self.hops.flood(trig.key, now, rule.window, rule_qtype(rule))

    def _evaluate(self, now: float) -> None:
        # Only the keys counting more than they did trigger (``reported``).
        for trig in evaluate(now, self.traffic, self.config.rules, self.config.trust,
                             reported=self.best):
            which = (trig.rule, trig.key)
            if which not in self.best:  # when the daemon would act: its time and hop values
                self.first_at[which] = now
                self.hops_at[which] = self._trigger_hops(now, trig)
            self.best[which] = trig

    def finish(self, top: int) -> Report:
        rep = self.report
        t = self.traffic
        if self.last_ts is not None:
            self._evaluate(self.last_ts)
        rep.total = t.packets
        rep.malformed = t.queries.get(MALFORMED_QTYPE, 0)
        if self.first_ts is not None and self.last_ts is not None:
            rep.duration = self.last_ts - self.first_ts
        rep.qtypes = {qtype_label(code): n for code, n in t.queries.most_common()
                      if code != MALFORMED_QTYPE}
        bucket = self.config.rate_table.bucket
        shown = self.hops.top(top)
        listed = {src for src, _, _ in shown}
        mixes: dict[bytes, Counter[str]] = {src: Counter() for src in listed}
        ranked = self.lifetime_qtypes.top(0.0, len(self.lifetime_qtypes))
        keys = list(map(itemgetter(0), ranked))  # the listed sources' keys picked in C
        for key, n in compress(ranked, map(listed.__contains__, map(qtype_key_source, keys))):
            src, code = split_qtype_key(key)
            mixes[src][qtype_label(code)] += n
        for src, n, hops in shown:
            rep.sources.append({
                "source": str(address_network(src).network_address), "packets": n,
                "peak_rate": round(t.sources.peak(src) / bucket, 1),
                "qtypes": dict(mixes[src].most_common(5)),
                "hops": hop_tally(hops),
            })
        for key, n in self.lifetime_prefixes.top(0.0, top):
            rep.prefixes.append({"prefix": str(prefix_network(key, 24, 64)), "packets": n})
        start = self.first_ts or 0.0
        named = [(str(trig.network), which, trig) for which, trig in self.best.items()]
        for network, which, trig in sorted(named, key=lambda nwt: (-nwt[2].rate, nwt[2].rule,
                                                                   nwt[0])):
            rep.would_ban.append({
                "source": network, "rule": trig.rule, "action": trig.action,
                "scope": trig.scope.as_json() if trig.action == "ban" else None,
                "count": trig.count, "window": trig.window, "rate": round(trig.rate, 1),
                "after": round(self.first_at[which] - start, 3),
                "hops": self.hops_at[which],
            })
        return rep


def read_capture(path: str, config: Config, progress: TextIO | None = None,
                 doing: str = "analyzing") -> Iterator[Batch]:
    """The batches of the capture at ``path``, with a progress bar on ``progress``."""
    capture = OfflineCapture(path, ports=config.capture.ports,
                             protocols=config.capture.protocols)
    try:
        shown = -1
        while True:
            batch = capture.read(0.0)
            if batch is None:
                break
            yield batch
            if progress is not None:
                pct = int(capture.progress * 100)
                if pct != shown:
                    shown = pct
                    bar = "#" * (pct // 4)
                    progress.write(f"\r{doing} {bar:<25} {pct:3d}%")
                    progress.flush()
    finally:
        capture.close()
        if progress is not None:
            progress.write("\r" + " " * 45 + "\r")
            progress.flush()


def analyze_file(path: str, config: Config, top: int = 10,
                 progress: TextIO | None = None) -> Report:
    analyzer = Analyzer(config, path)
    for batch in read_capture(path, config, progress):
        analyzer.add(batch)
    return analyzer.finish(top)


def read_timeline(path: str, config: Config, sources: Sequence[str], step: float,
                  progress: TextIO | None = None) -> Timeline:
    """``--plot``'s second pass over the capture: the packets of ``sources`` and the
    queries of every type, per ``step`` seconds from the first packet.  The busiest
    sources are known only at the end of the first pass, which stays as it is without
    --plot; the counts held are bounded by the steps times the sources and types."""
    wanted = {ipaddress.ip_address(src).packed: src for src in sources}
    per_source: Counter[tuple[float, bytes]] = Counter()  # (step, source) -> packets
    per_qtype: Counter[tuple[float, int]] = Counter()  # (step, qtype code) -> queries
    start: float | None = None
    for batch in read_capture(path, config, progress, "plotting"):
        records = Records.of(batch.records)
        if not records:
            continue
        times = records.times
        if start is None:
            start = times[0]
        steps = list(map(floordiv, map(sub, times, repeat(start)), repeat(step)))
        srcs, qtypes, packets = records.src, records.qtype, steps
        if records.flags is not None:  # malformed ones as such; F_EXTRA: not a packet
            flags = records.flags
            qtypes = [MALFORMED_QTYPE if qt < 0 and flag & F_MALFORMED else qt
                      for qt, flag in zip(qtypes, flags)]
            first = list(map(not_, map(and_, flags, repeat(F_EXTRA))))
            srcs, packets = list(compress(srcs, first)), list(compress(steps, first))
        per_qtype.update(zip(steps, qtypes))
        per_source.update(compress(zip(packets, srcs), map(wanted.__contains__, srcs)))
    count = 1 + int(max((at for at, _ in per_qtype), default=-1.0))

    def columns(counts: Counter[tuple[float, K]]) -> dict[K, list[int]]:
        out: dict[K, list[int]] = {}
        for (at, key), n in counts.items():  # a capture out of time order: first step
            out.setdefault(key, [0] * count)[max(0, int(at))] += n
        return out
    by_source, by_qtype = columns(per_source), columns(per_qtype)
    return Timeline(
        start or 0.0, step,
        {src: tuple(by_source.get(packed, [0] * count)) for packed, src in wanted.items()},
        {qtype_label(code): tuple(counts) for code, counts in by_qtype.items()
         if code != -1})  # -1: a TCP segment without a query


def _more(shown: list[str], total: int) -> str:
    return f" and {total - len(shown)} more" if total > len(shown) else ""


def _source_line(s: dict[str, Any]) -> str:
    mix = ", ".join(f"{k} {v}" for k, v in s["qtypes"].items())
    hops = s["hops"]
    if hops:
        shown = [f"{hop} ({n})" for hop, n in hops.items()][:_SHOWN_HOPS]
        name = "hop limit" if ":" in s["source"] else "TTL"
        mix += f"{'; ' if mix else ''}{name} {', '.join(shown)}{_more(shown, len(hops))}"
    return f"{s['packets']:>10} {s['peak_rate']:>9}  {s['source']}  {mix}"


def _hop_list(hops: list[int]) -> str:
    shown = list(map(str, hops[:_SHOWN_HOPS]))
    return "/".join(shown) + _more(shown, len(hops))


def _trigger_line(b: dict[str, Any]) -> str:
    line = (f"  {b['action']:<4} {b['source']:<24} rule {b['rule']}: "
            f"{b['count']} in {b['window']:g} s ({b['rate']}/s), "
            f"{b['after']:.1f} s into the capture")
    if b["action"] == "ban":
        line += f"; {b['scope']['text']}"
    hops = b["hops"]
    if hops is not None and hops["changed"]:
        line += (f"; hop values changed: usual {_hop_list(hops['usual'])}, "
                 f"flood {_hop_list(hops['flood'])}")
    return line


def format_report(rep: Report) -> str:
    lines = [
        f"capture: {rep.file}",
        f"  {rep.total} packets to the DNS port(s) in {rep.frames} frames over "
        f"{rep.duration:.3f} s ({rep.pps:.1f}/s); {rep.malformed} malformed; "
        f"{rep.ignored} frames were not queries to it",
        "query types: " + (", ".join(f"{k} {v}" for k, v in rep.qtypes.items()) or "none"),
        "",
        f"{'packets':>10} {'peak/s':>9}  source, query types; TTL or hop limit (packets)",
    ]
    lines += [_source_line(s) for s in rep.sources]
    lines += ["", f"{'packets':>10}  prefix"]
    lines += [f"{p['packets']:>10}  {p['prefix']}" for p in rep.prefixes]
    lines.append("")
    if rep.would_ban:
        lines.append("the configured rules would act on:")
        lines += [_trigger_line(b) for b in rep.would_ban]
    else:
        lines.append("the configured rules would not act on any source")
    return "\n".join(lines)


def report_json(report: dict[str, Any]) -> str:
    """The report as JSON, a line per field and per item of a list field: json's C
    encoder writes each line (it takes no ``indent``, and the Python one is several
    times slower on a report of thousands of triggers)."""
    fields = []
    for key, value in report.items():
        name = json.dumps(key)
        if isinstance(value, list) and value:
            items = ",\n  ".join(map(json.dumps, value))
            fields.append(f" {name}: [\n  {items}\n ]")
        else:
            fields.append(f" {name}: {json.dumps(value)}")
    return "{\n" + ",\n".join(fields) + "\n}\n"


def _run(args: argparse.Namespace) -> int:
    if args.top < 1:
        raise FlooddError(f"analyze: --top: expected a positive number, got {args.top}")
    fmt = plot_format(args.plot) if args.plot is not None else None
    config = config_from_args(args)
    progress = sys.stderr if sys.stderr.isatty() and not args.json else None
    rep = analyze_file(args.file, config, top=args.top, progress=progress)
    if args.json:
        sys.stdout.write(report_json(rep.as_json()))
    else:
        print(format_report(rep))
    if fmt is not None:
        sys.stdout.flush()  # the report is read while the picture is drawn
        sources = drawn_sources([s["source"] for s in rep.sources], rep.would_ban,
                                config.rules, min(args.top, MAX_LINES))
        step = plot_step(rep.duration, config.rate_table.bucket)
        timeline = read_timeline(args.file, config, sources, step, progress)
        render(picture(rep.file, rep.total, rep.duration, timeline, config.rules,
                       rep.would_ban), args.plot, fmt)
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "analyze", help="count a capture file's DNS queries per source, like sort | uniq -c",
        description="Read a pcap or pcapng capture and report what floodd would count: "
                    "queries per source and prefix, query types, TTL/hop-limit values, "
                    "malformed packets, peak rates, and which sources the configured rules "
                    "would ban, with what scope; a flood whose TTL/hop-limit values differ "
                    "from the ones its source used before is marked (forged packets "
                    "carrying a real client's address look like that).")
    p.add_argument("file", metavar="FILE", help="capture file (pcap or pcapng)")
    p.add_argument("--top", type=int, default=10, metavar="N",
                   help="how many sources and prefixes to list (default 10)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    p.add_argument("--plot", metavar="OUT", default=None,
                   help="also draw the capture into OUT (.png or .svg): queries/s over the "
                        f"capture's time of the busiest sources (--top, at most {MAX_LINES}; "
                        "log scale), each rule's threshold as queries/s (threshold / "
                        "window), a mark where a rule would have acted, and the queries/s "
                        "by query type; reads the capture a second time")
    add_config_option(p)
    p.set_defaults(handler=_run)
