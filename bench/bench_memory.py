"""Memory of floodd's counting stage in the worst case of the shipped configuration.

Drives floodd.detect.traffic.Traffic, configured from etc/floodd.yaml (the
built-in defaults), the way the daemon does (batches of 1,024 records, each
counted at one time), on a simulated clock, with the traffic shapes that fill
it most:

  (a) steady: ``rate_table.capacity`` IPv6 sources, each in its own /64, each
      sending one ANY query (a qtype a rule watches) over handshake-verified TCP
      (TTL 64) in every bucket, for the longest rule window plus two buckets: every
      table (per source, per /64, per source+ANY over 60 s and over 10 s, per qtype,
      and each rule table's ``+hop`` and ``+tcp`` evidence tables) holds
      ``capacity`` keys, each seen in every bucket of its window, and both hop
      histories (per source, per /64) hold ``trust.hop_capacity`` keys (verified
      values are learned at once);
  (b) the same sources going on, plus a spoofed flood of one-packet UDP sources
      (one ANY query each, a new /64 every packet, a hop value each) at
      --spoofed packets/s, so the bound drops keys all the time and the hop
      histories' probation is full.

IPv6 keys are the largest (16-byte addresses); counts stay below 256 per bucket
(one byte each: more would take over 25 million packets/s at capacity
100,000).  Then the steady shape (a) again through the textbook sliding window
in the same process: one dict of key -> packets per bucket for each table, the
layout floodd's rate table had before it kept a ring of per-bucket counts per
key (the hop histories have no counterpart there).

    .venv/bin/python -m bench.bench_memory [--spoofed N] [--spoofed-seconds S]
                                           [--tracemalloc]

Target (exit status 1 if missed): the peak RSS of the process while floodd's
tables run is at most half of the systemd unit's MemoryMax (with --tracemalloc,
whose own bookkeeping inflates the RSS: the RSS before plus the traced peak).
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import sys
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.rss import peak_rss_mb, vm_rss_mb
from floodd.config import default_config, load_config
from floodd.detect.hops import hop_keys
from floodd.detect.parse import F_VERIFIED, TCP, UDP, Record
from floodd.detect.traffic import (HOP_SUFFIX, PREFIX, QTYPE, SOURCE_QTYPE, TCP_SUFFIX,
                                   TableSpec, Traffic, prefix_keys, qtype_key)

ROOT = Path(__file__).resolve().parents[1]
ANY = 255
BATCH = 1024
START = 1000.0
STEADY_HOP = 64



def memory_max_mb() -> float:
    """The MemoryMax= of systemd/floodd.service, in MiB."""
    text = (ROOT / "systemd" / "floodd.service").read_text()
    match = re.search(r"^MemoryMax=(\d+)([KMG])$", text, re.M)
    if match is None:
        raise RuntimeError("no MemoryMax= in systemd/floodd.service")
    return int(match[1]) * {"K": 1 / 1024, "M": 1, "G": 1024}[match[2]]


def steady_source(i: int) -> bytes:
    """A fresh bytes object (as sliced from a packet) for the i-th steady source:
    2001:db8:HHHH:LLLL::7, one /64 each."""
    return b"\x20\x01\x0d\xb8" + i.to_bytes(4, "big") + bytes(7) + b"\x07"


class Clock:
    """The simulated time, in seconds since START, shared by the shapes."""

    def __init__(self) -> None:
        self.elapsed = 0


def shape(clock: Clock, sources: int, seconds: int, spoofed: int
          ) -> Iterator[tuple[float, list[Record]]]:
    """(time, records) of each batch: every one of ``sources`` steady sources once a
    second (verified TCP), and ``spoofed`` new one-packet sources a second (UDP) spread
    evenly among them."""
    per_second = sources + spoofed
    for second in range(seconds):
        t0 = START + clock.elapsed + second
        for first in range(0, per_second, BATCH):
            records: list[Record] = []
            now = t0 + first / per_second
            for j in range(first, min(first + BATCH, per_second)):
                before, upto = j * spoofed // per_second, (j + 1) * spoofed // per_second
                if upto > before:
                    noise = os.urandom(13)
                    records.append((now, b"\x20\x01\x0d\xb8" + noise[:12], UDP, ANY, 0,
                                    noise[12]))
                else:
                    records.append((now, steady_source(j - upto), TCP, ANY, F_VERIFIED,
                                    STEADY_HOP))
            yield now, records
    clock.elapsed += seconds


def feed_floodd(traffic: Traffic, batches: Iterator[tuple[float, list[Record]]]) -> int:
    packets = 0
    for now, records in batches:
        traffic.add_batch(now, records)
        packets += len(records)
    return packets


class PerBucketDicts:
    """The textbook sliding window for one table: a dict key -> packets per bucket."""

    def __init__(self, spec: TableSpec) -> None:
        self.bucket = spec.bucket
        self.slots = round(spec.window / spec.bucket) + 1
        self.buckets: list[dict[object, int]] = [{} for _ in range(self.slots)]
        self.totals: dict[object, int] = {}
        self.cur: int | None = None

    def add(self, now: float, keys: list[Any]) -> None:
        target = int(now // self.bucket)
        if self.cur is None:
            self.cur = target
        while self.cur < target:
            self.cur += 1
            old = self.buckets[self.cur % self.slots]
            for key, n in old.items():
                left = self.totals[key] - n
                if left:
                    self.totals[key] = left
                else:
                    del self.totals[key]
            old.clear()
        bucket, totals = self.buckets[self.cur % self.slots], self.totals
        for key in keys:
            bucket[key] = bucket.get(key, 0) + 1
            totals[key] = totals.get(key, 0) + 1


def table_keys(spec: TableSpec, records: list[Record]) -> list[Any]:
    """The keys ``spec``'s table counts for ``records`` (every record a packet)."""
    if spec.kind.endswith(TCP_SUFFIX):
        records = [r for r in records if r[4] & F_VERIFIED]
    kind = spec.kind.removesuffix(HOP_SUFFIX).removesuffix(TCP_SUFFIX)
    if kind == QTYPE:
        return [r[3] for r in records]
    if kind == SOURCE_QTYPE:
        records = [r for r in records if r[3] == ANY]
    sources = [r[1] for r in records]
    if kind == PREFIX:
        keys = prefix_keys(sources, spec.prefix_v4, spec.prefix_v6)
    elif kind == SOURCE_QTYPE:
        keys = [qtype_key(src, ANY) for src in sources]
    else:
        keys = sources
    return hop_keys(keys, [r[5] for r in records]) if spec.kind.endswith(HOP_SUFFIX) else keys


def feed_baseline(specs: list[TableSpec], batches: Iterator[tuple[float, list[Record]]]
                  ) -> list[PerBucketDicts]:
    tables = [(spec, PerBucketDicts(spec)) for spec in specs]
    for now, records in batches:
        for spec, table in tables:
            table.add(now, table_keys(spec, records))
    return [table for _, table in tables]


def row(label: str, value: object = None) -> None:
    print(label if value is None else f"  {label:<40} {value}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spoofed", type=int, default=200_000,
                        help="spoofed one-packet sources per second in (b) (default 200,000)")
    parser.add_argument("--spoofed-seconds", type=int, default=15,
                        help="how long (b) lasts, simulated seconds (default 15)")
    parser.add_argument("--tracemalloc", action="store_true",
                        help="also trace Python's allocations (slower): the tables' own bytes")
    args = parser.parse_args()

    config = load_config(str(ROOT / "etc" / "floodd.yaml"))
    if config.settings() != default_config().settings():
        print("etc/floodd.yaml differs from the built-in defaults", file=sys.stderr)
        return 1
    rt = config.rate_table
    longest = round(max(rule.window for rule in config.rules) / rt.bucket) + 2
    limit = memory_max_mb() / 2
    traffic = Traffic(config)
    specs = list(traffic.tables)
    print(f"shipped configuration: {len(config.rules)} rules, capacity {rt.capacity:,}, "
          f"bucket {rt.bucket:g} s, hop capacity {config.trust.hop_capacity:,}; tables: "
          + ", ".join(
              f"{s.kind} {s.window:g} s" for s in specs))
    print(f"interpreter RSS before: {vm_rss_mb():.1f} MB; target: peak RSS <= {limit:g} MB "
          f"(half of the unit's MemoryMax)")

    clock = Clock()
    gc.collect()
    start_rss = vm_rss_mb()
    if args.tracemalloc:
        tracemalloc.start()
    rss_before = vm_rss_mb()
    started = time.process_time()
    packets = feed_floodd(traffic, shape(clock, rt.capacity, longest, 0))
    steady = vm_rss_mb() - rss_before
    steady_traced = tracemalloc.get_traced_memory()[0] if args.tracemalloc else 0
    packets += feed_floodd(traffic, shape(clock, rt.capacity, args.spoofed_seconds,
                                          args.spoofed))
    spent = time.process_time() - started
    flood = vm_rss_mb() - rss_before
    traced_peak = tracemalloc.get_traced_memory()[1] if args.tracemalloc else 0
    tracemalloc.stop()
    floodd_peak = peak_rss_mb()
    tracked = ", ".join(f"{len(t):,}" for t in traffic.tables.values())
    pruned = sum(t.pruned for t in traffic.tables.values())
    histories = ", ".join(f"{kind} {h.established():,} + {len(h) - h.established():,}"
                          for (kind, _, _), h in traffic.histories.items())

    def traced(n: int) -> str:
        return f", traced {n / 2**20:.1f} MB" if args.tracemalloc else ""

    row(f"floodd ({packets:,} packets, {packets / spent:,.0f} packets/s of CPU"
        + (" under tracemalloc" if args.tracemalloc else "") + "):")
    row(f"(a) {rt.capacity:,} steady sources, {longest} s", f"RSS +{steady:.1f} MB"
        + traced(steady_traced))
    row(f"(b) + {args.spoofed:,} spoofed/s, {args.spoofed_seconds} s",
        f"RSS +{flood:.1f} MB" + (f", traced peak {traced_peak / 2**20:.1f} MB"
                                  if args.tracemalloc else ""))
    row("keys tracked per table at the end", tracked)
    row("keys pruned", f"{pruned:,}")
    row("hop histories: established + probation", histories)
    row("peak RSS of the process (ru_maxrss)", f"{floodd_peak:.1f} MB")

    del traffic
    gc.collect()
    rss_before = vm_rss_mb()
    clock = Clock()
    baseline = feed_baseline(specs, shape(clock, rt.capacity, longest, 0))
    base = vm_rss_mb() - rss_before
    row("baseline, one dict per bucket and table (no hop histories):")
    row(f"(a) {rt.capacity:,} steady sources, {longest} s",
        f"RSS +{base:.1f} MB ({sum(len(t.totals) for t in baseline):,} keys)")
    row("ratio floodd / baseline, (a)", f"{steady / base:.3f}")
    if args.tracemalloc:  # its own bookkeeping inflates the RSS: check what it traced
        figure, what = start_rss + traced_peak / 2**20, "RSS before + traced peak"
    else:
        figure, what = floodd_peak, "peak RSS"
    ok = figure <= limit
    print(f"{'PASS' if ok else 'FAIL'}: {what} {figure:.1f} MB <= {limit:g} MB")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
