"""Memory and speed of floodd's rate table under a spoofed-source flood.

Streams distinct pseudo-random IPv4 sources (4-byte keys, one packet each) at a
simulated packet rate in capture batches, plus one heavy hitter (203.0.113.7)
at a steady rate, through RateTable.add_counts on a fake clock.  Then streams
the same packets through a plain unbounded dict counter in the same process.

    .venv/bin/python -m bench.bench_ratetable [--sources N] [--window S] ...

Targets (exit status 1 if missed): peak RSS of the bounded run at most
--max-rss-mb, the heavy hitter reported in top() and over(), its count and
total() within one bucket of the truth (the packets of the batches stamped
within the last window), as the table's docstring bounds them.
"""

from __future__ import annotations

import argparse
import gc
import struct
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from bench.rss import peak_rss_mb, vm_rss_mb
from floodd.detect.ratetable import RateTable

HITTER = bytes([203, 0, 113, 7])
START = 1000.0
_MIX = 0x9E3779B1   # odd, so i -> i * _MIX mod 2**32 is a bijection: sources are distinct



def row(label: str, value: object = None) -> None:
    print(label if value is None else f"  {label:<22} {value}")


def capture_batches(args: argparse.Namespace) -> Iterator[tuple[float, Counter[bytes]]]:
    """(time of the batch's last packet, packets per source) for each capture batch."""
    hitter_sent = 0
    for first in range(0, args.sources, args.batch):
        end = min(first + args.batch, args.sources)
        raw = struct.pack(f">{end - first}I",
                          *[(i * _MIX) & 0xFFFFFFFF for i in range(first, end)])
        counts = Counter([raw[j:j + 4] for j in range(0, len(raw), 4)])
        now = START + (end - 1) / args.rate
        # The heavy hitter's k-th packet leaves at k / hitter_rate seconds.
        due = (end - 1) * args.hitter_rate // args.rate + 1
        if due > hitter_sent:
            counts[HITTER] += due - hitter_sent
            hitter_sent = due
        yield now, counts


@dataclass(frozen=True)
class TableRun:
    keys: int
    packets: int
    seconds: float
    rss_growth: float
    peak_rss: float
    tracked: int
    pruned: int
    true: int
    reported: int
    threshold: int
    in_over: bool
    over_keys: int
    in_top: bool
    over_ms: float
    top_ms: float
    hitter_bound: int
    total: int
    true_total: int
    total_bound: int


@dataclass(frozen=True)
class BaselineRun:
    keys: int
    seconds: float
    rss_growth: float
    tracked: int


def run_table(args: argparse.Namespace) -> TableRun:
    table: RateTable[bytes] = RateTable(args.window, args.bucket, args.capacity,
                                        track_peak=args.track_peak)
    span = round(args.window / args.bucket)
    batches: list[tuple[float, int, int]] = []  # (time, hitter packets, packets)
    gc.collect()
    rss_before = vm_rss_mb()
    spent = 0.0
    keys = packets = 0
    now = START
    for now, counts in capture_batches(args):
        keys += len(counts)
        packets += counts.total()
        batches.append((now, counts.get(HITTER, 0), counts.total()))
        started = time.perf_counter()
        table.add_counts(now, counts)
        spent += time.perf_counter() - started
    rss_after = vm_rss_mb()
    oldest = int(now // args.bucket) - span
    true = sum(h for t, h, _ in batches if t > now - args.window)
    true_total = sum(n for t, _, n in batches if t > now - args.window)
    threshold = true // 2
    started = time.perf_counter()
    over = table.over(now, threshold)
    over_ms = (time.perf_counter() - started) * 1000
    started = time.perf_counter()
    top = table.top(now, 10)
    top_ms = (time.perf_counter() - started) * 1000
    in_oldest = [(h, n) for t, h, n in batches if int(t // args.bucket) == oldest]
    return TableRun(
        keys=keys, packets=packets, seconds=spent, rss_growth=rss_after - rss_before,
        peak_rss=peak_rss_mb(), tracked=len(table), pruned=table.pruned,
        true=true, reported=table.count(now, HITTER), threshold=threshold,
        in_over=any(key == HITTER for key, _ in over), over_keys=len(over),
        in_top=any(key == HITTER for key, _ in top), over_ms=over_ms, top_ms=top_ms,
        hitter_bound=sum(h for h, _ in in_oldest), total=table.total(now),
        true_total=true_total, total_bound=sum(n for _, n in in_oldest))


def run_baseline(args: argparse.Namespace) -> BaselineRun:
    counter: dict[bytes, int] = {}
    get = counter.get
    gc.collect()
    rss_before = vm_rss_mb()
    spent = 0.0
    keys = 0
    for _, counts in capture_batches(args):
        keys += len(counts)
        started = time.perf_counter()
        for key, n in counts.items():
            counter[key] = get(key, 0) + n
        spent += time.perf_counter() - started
    return BaselineRun(keys=keys, seconds=spent, rss_growth=vm_rss_mb() - rss_before,
                       tracked=len(counter))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sources", type=int, default=5_000_000,
                        help="distinct one-packet sources (default: 5,000,000)")
    parser.add_argument("--rate", type=int, default=500_000, help="packets/s (default: 500,000)")
    parser.add_argument("--batch", type=int, default=1024, help="packets per capture batch")
    parser.add_argument("--window", type=float, default=10.0, help="seconds (default: 10)")
    parser.add_argument("--bucket", type=float, default=1.0, help="seconds (default: 1)")
    parser.add_argument("--capacity", type=int, default=100_000, help="keys (default: 100,000)")
    parser.add_argument("--hitter-rate", type=int, default=50,
                        help="heavy hitter packets/s (default: 50)")
    parser.add_argument("--track-peak", action="store_true",
                        help="create the table with track_peak=True")
    parser.add_argument("--max-rss-mb", type=float, default=150.0,
                        help="peak RSS target of the bounded run (default: 150)")
    args = parser.parse_args()

    print(f"stream: {args.sources:,} sources at {args.rate:,} packets/s in batches of "
          f"{args.batch}, heavy hitter {args.hitter_rate} packets/s; table window "
          f"{args.window:g} s, bucket {args.bucket:g} s, capacity {args.capacity:,}"
          + (", track_peak" if args.track_peak else ""))
    print(f"interpreter RSS before: {vm_rss_mb():.1f} MB")
    t = run_table(args)
    row("bounded RateTable:")
    row("peak RSS (ru_maxrss)", f"{t.peak_rss:.1f} MB")
    row("RSS growth (VmRSS)", f"{t.rss_growth:.1f} MB")
    row("keys tracked", f"{t.tracked:,}")
    row("keys pruned", f"{t.pruned:,}")
    row("heavy hitter", f"reported {t.reported} / true {t.true} packets in the window")
    row("in top(10)", t.in_top)
    row(f"in over({t.threshold})", f"{t.in_over} ({t.over_keys} key(s) over)")
    row("total()", f"{t.total:,} / true {t.true_total:,} packets in the window")
    row("throughput", f"{t.keys / t.seconds:,.0f} keys/s, {t.packets / t.seconds:,.0f} "
        f"packets/s ({t.seconds:.2f} s in add_counts)")
    row("query time", f"over {t.over_ms:.1f} ms, top(10) {t.top_ms:.1f} ms")
    b = run_baseline(args)
    row("baseline, unbounded dict counter:")
    row("RSS growth (VmRSS)", f"{b.rss_growth:.1f} MB")
    row("keys tracked", f"{b.tracked:,}")
    row("throughput", f"{b.keys / b.seconds:,.0f} keys/s ({b.seconds:.2f} s)")
    row("peak RSS (ru_maxrss)", f"{peak_rss_mb():.1f} MB")
    row("ratio bounded / baseline:")
    row("RSS growth", f"{t.rss_growth / b.rss_growth:.3f}")
    row("throughput", f"{b.seconds / t.seconds:.2f}")

    checks = {
        f"peak RSS <= {args.max_rss_mb:g} MB": t.peak_rss <= args.max_rss_mb,
        "heavy hitter in top(10)": t.in_top,
        f"heavy hitter in over({t.threshold})": t.in_over,
        "heavy hitter within one bucket of the truth":
            abs(t.reported - t.true) <= t.hitter_bound,
        "total() within one bucket of the truth": abs(t.total - t.true_total) <= t.total_bound,
    }
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}: {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
