"""Parse-stage throughput: floodd's parser against a dpkt full decode of the same frames.

Generates a capture of DNS queries from many sources (lab.synth) in a temporary
directory, then times in this process

  (a) floodd: OfflineCapture -> Parser.parse_batch -> per-source Counter update;
  (b) floodd's daemon path: the same, counted into the rate tables of the default
      rules (floodd.detect.traffic.Traffic: per source, per /24, per source+ANY over
      60 s and over 10 s, per qtype), each batch at its last packet's time;
  (c) dpkt: pcap reader -> Ethernet -> IP -> UDP -> dpkt.dns.DNS, per-source Counter;

and checks (a) and (c) agree on the per-source counts.  Targets: parse-and-count (a)
>= 500,000 packets/s per core and >= 5 times (c); (b), the whole counting stage of
the daemon, >= 15 times (c).  Rates are packets per second of this process's CPU
time (one thread: per core), best of --repeat runs, so that other load on the
machine disturbs them less; wall-clock rates are printed too.

The default capture is the hard case for the counting stage: 50,000 sources, five of
them sending 30% of the packets, so a batch's sources are mostly distinct and every
table update is one per packet.  ``--sources 20`` is a flood of a few sources (the
same five heavy ones), where each batch is counted once per distinct source.

    .venv/bin/python -m bench.bench_parse [--packets N] [--sources N] [--linktype 1|113]
                                          [--repeat N]
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
from operator import itemgetter
from typing import Callable

import dpkt

from floodd.detect.capture import OfflineCapture
from floodd.config import default_config
from floodd.detect.parse import Records
from floodd.detect.traffic import Traffic
from lab.synth import generate_flood_capture

TARGET_RATE = 500_000.0
TARGET_RATIO = 5.0
TARGET_TABLES_RATIO = 15.0  # the whole counting stage (b) against (c)


Counts = collections.Counter[bytes]


def run_floodd(path: str) -> Counts:
    counts: Counts = collections.Counter()
    source = itemgetter(1)
    capture = OfflineCapture(path, batch_size=4096)
    while (batch := capture.read(0.0)) is not None:
        counts.update(map(source, batch.records))
    capture.close()
    return counts


def run_floodd_tables(path: str) -> Counts:
    traffic = Traffic(default_config())
    capture = OfflineCapture(path, batch_size=1024)
    while (batch := capture.read(0.0)) is not None:
        records = Records.of(batch.records)
        if records:
            traffic.add_batch(records.last_time(), records)
    capture.close()
    return collections.Counter({b"packets": traffic.packets})


def run_dpkt(path: str) -> Counts:
    counts: Counts = collections.Counter()
    with open(path, "rb") as f:
        reader = dpkt.pcap.Reader(f)
        sll = reader.datalink() == dpkt.pcap.DLT_LINUX_SLL
        for _, buf in reader:
            frame = dpkt.sll.SLL(buf) if sll else dpkt.ethernet.Ethernet(buf)
            ip = frame.data
            if not isinstance(ip, dpkt.ip.IP) or not isinstance(ip.data, dpkt.udp.UDP):
                continue
            udp = ip.data
            if udp.dport != 53:
                continue
            dns = dpkt.dns.DNS(udp.data)
            if dns.qr == dpkt.dns.DNS_Q and dns.qd:
                counts[ip.src] += 1
    return counts


def timed(run: Callable[[str], Counts], path: str,
          repeat: int) -> tuple[float, float, Counts]:
    """(best CPU seconds, best wall seconds, counts of the last run)."""
    cpu = wall = float("inf")
    counts: Counts = collections.Counter()
    for _ in range(repeat):
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        counts = run(path)
        cpu = min(cpu, time.process_time() - cpu_start)
        wall = min(wall, time.perf_counter() - wall_start)
    return cpu, wall, counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--packets", type=int, default=1_000_000)
    ap.add_argument("--sources", type=int, default=50_000)
    ap.add_argument("--linktype", type=int, default=1, choices=(1, 113),
                    help="1 Ethernet, 113 Linux cooked (the 'any' interface)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each, the best counts")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="floodd-bench-") as tmp:
        path = os.path.join(tmp, "flood.pcap")
        started = time.perf_counter()
        flood = generate_flood_capture(path, args.packets, args.sources, seed=args.seed,
                                       linktype=args.linktype)
        print(f"generated {flood.packets:,} packets from {len(flood.per_source):,} sources "
              f"(link type {args.linktype}, {os.path.getsize(path) / 1e6:.1f} MB) "
              f"in {time.perf_counter() - started:.1f} s")
        floodd_cpu, floodd_wall, floodd_counts = timed(run_floodd, path, args.repeat)
        tables_cpu, tables_wall, tables_counts = timed(run_floodd_tables, path, args.repeat)
        dpkt_cpu, dpkt_wall, dpkt_counts = timed(run_dpkt, path, args.repeat)

    expected = collections.Counter(flood.per_source)
    n = flood.packets
    floodd_rate = n / floodd_cpu
    tables_rate = n / tables_cpu
    dpkt_rate = n / dpkt_cpu
    ratio = floodd_rate / dpkt_rate
    print(f"floodd parse + per-source count: {floodd_rate:12,.0f} packets/s per core "
          f"({floodd_cpu:.2f} s CPU; wall clock {n / floodd_wall:,.0f} packets/s)")
    print(f"floodd parse + rate tables:      {tables_rate:12,.0f} packets/s per core "
          f"({tables_cpu:.2f} s CPU; wall clock {n / tables_wall:,.0f} packets/s)")
    print(f"dpkt full decode + count:        {dpkt_rate:12,.0f} packets/s per core "
          f"({dpkt_cpu:.2f} s CPU; wall clock {n / dpkt_wall:,.0f} packets/s)")
    print(f"ratio floodd / dpkt:             {ratio:12.1f}x "
          f"(with the rate tables: {tables_rate / dpkt_rate:.1f}x)")
    ok = True
    for what, passed in (
        ("per-source counts agree with the generator (floodd)", floodd_counts == expected),
        ("per-source counts agree with the generator (dpkt)", dpkt_counts == expected),
        ("every packet reached the rate tables", tables_counts[b"packets"] == n),
        (f"parse and count >= {TARGET_RATE:,.0f} packets/s", floodd_rate >= TARGET_RATE),
        (f"ratio >= {TARGET_RATIO:g}x dpkt", ratio >= TARGET_RATIO),
        (f"with the rate tables >= {TARGET_TABLES_RATIO:g}x dpkt",
         tables_rate / dpkt_rate >= TARGET_TABLES_RATIO),
    ):
        print(f"{'PASS' if passed else 'FAIL'}  {what}")
        ok = ok and passed
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
