"""``floodd analyze FILE``: the operator's ``tcpdump | sort | uniq -c | sort -n`` in one command.

It counts exactly what the daemon counts (queries to the DNS ports, malformed ones
included, attributed to their source), replays the configured rules over the
capture's own timeline (its timestamps are the tables' clock; the rules are
evaluated at the last packet of every bucket) and reports who they would ban.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, TextIO

from floodd.cli.common import add_config_option, config_from_args
from floodd.detect.capture import OfflineCapture
from floodd.config import Config
from floodd.errors import FlooddError
from floodd.detect.parse import F_MALFORMED, Batch, Record
from floodd.decide.policy import Trigger, evaluate
from floodd.qtypes import qtype_name
from floodd.detect.ratetable import RateTable
from floodd.detect.traffic import (MALFORMED_QTYPE, Traffic, address_network, packet_sources,
                            prefix_keys, prefix_network, qtype_key, split_qtype_key)

_qtype = itemgetter(3)

# One bucket wider than any capture: a RateTable that never slides is a bounded counter.
_FOREVER = float(2**40)


def qtype_label(code: int) -> str:
    return "malformed" if code == MALFORMED_QTYPE else qtype_name(code)


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


def by_bucket(records: list[Record], bucket: float) -> list[list[Record]]:
    """``records`` cut wherever their timestamps enter another bucket."""
    if records[0][0] // bucket == records[-1][0] // bucket:
        return [records]
    parts = []
    start = 0
    current = records[0][0] // bucket
    for i, rec in enumerate(records):
        b = rec[0] // bucket
        if b != current:
            parts.append(records[start:i])
            start, current = i, b
    parts.append(records[start:])
    return parts


class Analyzer:
    """Feeds batches to the daemon's tables plus capture-long per-source counters."""

    def __init__(self, config: Config, file: str) -> None:
        self.config = config
        self.report = Report(file=file)
        cap = config.rate_table.capacity
        self.traffic = Traffic(config, track_peak=True)
        self.first_ts: float | None = None
        self.last_ts: float | None = None
        self.malformed = 0
        self.qtype_counts: Counter[int] = Counter()
        self.lifetime: RateTable[bytes] = RateTable(_FOREVER, _FOREVER, cap)
        self.lifetime_qtypes: RateTable[bytes] = RateTable(_FOREVER, _FOREVER, cap)
        self.lifetime_prefixes: RateTable[bytes] = RateTable(_FOREVER, _FOREVER, cap)
        self.first: dict[tuple[str, str], Trigger] = {}
        self.first_at: dict[tuple[str, str], float] = {}

    def add(self, batch: Batch) -> None:
        self.report.frames += batch.frames
        self.report.ignored += batch.ignored
        records = batch.records
        if not records:
            return
        self.qtype_counts.update(map(_qtype, records))
        self.malformed += sum(1 for r in records if r[4] & F_MALFORMED)
        bucket = self.config.rate_table.bucket
        if self.first_ts is None:
            self.first_ts = records[0][0]
        for part in by_bucket(records, bucket):
            # The rules are evaluated at the last packet before another bucket.
            if self.last_ts is not None and part[0][0] // bucket != self.last_ts // bucket:
                self._evaluate(self.last_ts)
            self.traffic.add_batch(part[-1][0], part)
            self.last_ts = part[-1][0]
        sources = packet_sources(records)
        self.lifetime.add_keys(0.0, sources)
        self.lifetime_prefixes.add_keys(0.0, prefix_keys(sources, 24, 64))
        # Each source's query-type mix; packets with no query type known (e.g. a
        # bare TCP segment) have none to add.
        self.lifetime_qtypes.add_keys(0.0, [
            qtype_key(r[1], MALFORMED_QTYPE if r[4] & F_MALFORMED else r[3])
            for r in records if r[3] >= 0 or r[4] & F_MALFORMED])

    def _evaluate(self, now: float) -> None:
        for trig in evaluate(now, self.traffic, self.config.rules):
            key = (trig.rule, str(trig.network))
            old = self.first.get(key)
            if old is None:
                self.first_at[key] = now
            if old is None or trig.count > old.count:
                self.first[key] = trig

    def finish(self, top: int) -> Report:
        rep = self.report
        t = self.traffic
        if self.last_ts is not None:
            self._evaluate(self.last_ts)
        rep.total = t.packets
        rep.malformed = self.malformed
        if self.first_ts is not None and self.last_ts is not None:
            rep.duration = self.last_ts - self.first_ts
        rep.qtypes = {qtype_label(code): n for code, n in self.qtype_counts.most_common()
                      if code != -1}
        bucket = self.config.rate_table.bucket
        mixes: dict[bytes, Counter[str]] = {}
        for key, n in self.lifetime_qtypes.top(0.0, len(self.lifetime_qtypes)):
            src, code = split_qtype_key(key)
            mixes.setdefault(src, Counter())[qtype_label(code)] += n
        for src, n in self.lifetime.top(0.0, top):
            rep.sources.append({
                "source": str(address_network(src).network_address), "packets": n,
                "peak_rate": round(t.sources.peak(src) / bucket, 1),
                "qtypes": dict(mixes.get(src, Counter()).most_common(5)),
            })
        for key, n in self.lifetime_prefixes.top(0.0, top):
            rep.prefixes.append({"prefix": str(prefix_network(key, 24, 64)), "packets": n})
        start = self.first_ts or 0.0
        for which, trig in sorted(self.first.items(), key=lambda kv: (-kv[1].rate, kv[0])):
            rep.would_ban.append({
                "source": str(trig.network), "rule": trig.rule, "action": trig.action,
                "count": trig.count, "window": trig.window, "rate": round(trig.rate, 1),
                "after": round(self.first_at[which] - start, 3),
            })
        return rep


def analyze_file(path: str, config: Config, top: int = 10,
                 progress: TextIO | None = None) -> Report:
    capture = OfflineCapture(path, ports=config.capture.ports,
                             protocols=config.capture.protocols)
    analyzer = Analyzer(config, path)
    try:
        shown = -1
        while True:
            batch = capture.read(0.0)
            if batch is None:
                break
            analyzer.add(batch)
            if progress is not None:
                pct = int(capture.progress * 100)
                if pct != shown:
                    shown = pct
                    bar = "#" * (pct // 4)
                    progress.write(f"\ranalyzing {bar:<25} {pct:3d}%")
                    progress.flush()
    finally:
        capture.close()
        if progress is not None:
            progress.write("\r" + " " * 45 + "\r")
            progress.flush()
    return analyzer.finish(top)


def format_report(rep: Report) -> str:
    lines = [
        f"capture: {rep.file}",
        f"  {rep.total} packets to the DNS port(s) in {rep.frames} frames over "
        f"{rep.duration:.3f} s ({rep.pps:.1f}/s); {rep.malformed} malformed; "
        f"{rep.ignored} frames were not queries to it",
        "query types: " + (", ".join(f"{k} {v}" for k, v in rep.qtypes.items()) or "none"),
        "",
        f"{'packets':>10} {'peak/s':>9}  source and query types",
    ]
    for s in rep.sources:
        mix = ", ".join(f"{k} {v}" for k, v in s["qtypes"].items())
        lines.append(f"{s['packets']:>10} {s['peak_rate']:>9}  {s['source']}  {mix}")
    lines += ["", f"{'packets':>10}  prefix"]
    lines += [f"{p['packets']:>10}  {p['prefix']}" for p in rep.prefixes]
    lines.append("")
    if rep.would_ban:
        lines.append("the configured rules would act on:")
        for b in rep.would_ban:
            lines.append(f"  {b['action']:<4} {b['source']:<24} rule {b['rule']}: "
                         f"{b['count']} in {b['window']:g} s ({b['rate']}/s), "
                         f"{b['after']:.1f} s into the capture")
    else:
        lines.append("the configured rules would not act on any source")
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    if args.top < 1:
        raise FlooddError(f"analyze: --top: expected a positive number, got {args.top}")
    config = config_from_args(args)
    progress = sys.stderr if sys.stderr.isatty() and not args.json else None
    rep = analyze_file(args.file, config, top=args.top, progress=progress)
    if args.json:
        json.dump(rep.as_json(), sys.stdout, indent=1)
        print()
    else:
        print(format_report(rep))
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "analyze", help="count a capture file's DNS queries per source, like sort | uniq -c",
        description="Read a pcap or pcapng capture and report what floodd would count: "
                    "queries per source and prefix, query types, malformed packets, peak "
                    "rates, and which sources the configured rules would ban.")
    p.add_argument("file", metavar="FILE", help="capture file (pcap or pcapng)")
    p.add_argument("--top", type=int, default=10, metavar="N",
                   help="how many sources and prefixes to list (default 10)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    add_config_option(p)
    p.set_defaults(handler=_run)
