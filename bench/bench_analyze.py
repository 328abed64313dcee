"""``floodd analyze`` of a large capture, as a whole process, against a dpkt full decode.

Generates a capture of DNS queries from many sources (lab.synth) in a temporary
directory, then runs, each as its own process and best of --repeat runs:

  (a) ``python -m floodd analyze FILE --json`` (the default rules), interpreter start,
      imports and report included;
  (b) a dpkt full decode of the same file (pcap reader -> Ethernet -> IP -> UDP ->
      dpkt.dns.DNS, counting the queries per source), interpreter start included;

and checks (a) counted every packet.  Target: (a) >= 8 times as fast as (b).  Times
are the child process's CPU time (user + system: one thread, so per core), so that
other load on the machine disturbs them less; wall-clock times are printed too.
The default capture comes from 50,000 sources (five send 30% of it), mostly distinct
in every batch; ``--sources 20`` is a flood of a few sources.

    .venv/bin/python -m bench.bench_analyze [--packets N] [--sources N] [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from lab.synth import generate_flood_capture

TARGET_RATIO = 8.0

DPKT_DECODE = """
import collections, sys
import dpkt
counts = collections.Counter()
with open(sys.argv[1], "rb") as f:
    for _, buf in dpkt.pcap.Reader(f):
        ip = dpkt.ethernet.Ethernet(buf).data
        if isinstance(ip, dpkt.ip.IP) and isinstance(ip.data, dpkt.udp.UDP) \\
                and ip.data.dport == 53:
            dns = dpkt.dns.DNS(ip.data.data)
            if dns.qr == dpkt.dns.DNS_Q and dns.qd:
                counts[ip.src] += 1
print(sum(counts.values()))
"""


def timed(argv: list[str], repeat: int) -> tuple[float, float, str]:
    """(best CPU seconds, best wall seconds, stdout of the last run) of a child process."""
    cpu = wall = float("inf")
    out = ""
    for _ in range(repeat):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
        wall = min(wall, time.perf_counter() - started)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            raise SystemExit(f"{argv[2:4]} failed: {proc.stderr.strip()}")
        cpu = min(cpu, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        out = proc.stdout
    return cpu, wall, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--packets", type=int, default=1_000_000)
    ap.add_argument("--sources", type=int, default=50_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each, the best counts")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="floodd-bench-") as tmp:
        path = os.path.join(tmp, "flood.pcap")
        flood = generate_flood_capture(path, args.packets, args.sources, seed=args.seed)
        print(f"generated {flood.packets:,} packets from {len(flood.per_source):,} sources "
              f"({os.path.getsize(path) / 1e6:.1f} MB)")
        env_python = sys.executable
        a_cpu, a_wall, a_out = timed([env_python, "-m", "floodd", "analyze", path, "--json"],
                                     args.repeat)
        b_cpu, b_wall, b_out = timed([env_python, "-c", DPKT_DECODE, path], args.repeat)

    n = flood.packets
    ratio = b_cpu / a_cpu
    total = json.loads(a_out)["total"]
    print(f"floodd analyze (whole process): {a_cpu:6.2f} s CPU, {n / a_cpu:10,.0f} packets/s "
          f"(wall clock {a_wall:.2f} s)")
    print(f"dpkt full decode (whole process): {b_cpu:6.2f} s CPU, {n / b_cpu:10,.0f} packets/s "
          f"(wall clock {b_wall:.2f} s)")
    print(f"ratio floodd / dpkt: {ratio:.1f}x")
    ok = True
    for what, passed in (
        ("floodd analyze counted every packet", total == n),
        ("dpkt counted every packet", int(b_out) == n),
        (f"ratio >= {TARGET_RATIO:g}x dpkt", ratio >= TARGET_RATIO),
    ):
        print(f"{'PASS' if passed else 'FAIL'}  {what}")
        ok = ok and passed
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
