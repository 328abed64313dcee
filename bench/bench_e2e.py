"""floodd end to end under the hardest flood this machine can make (scenario 1 of
tests/test_scenarios.py at full speed), against the same flood with no floodd.

In a lab (lab.netns: BIND in a namespace, one worker thread), three flooders hit
BIND for --seconds while a legitimate client asks --legit-rate queries/s with dnsperf:

  * generator ``tcpreplay`` (default): a capture of queries from the three flooders'
    addresses, round robin, replayed with ``tcpreplay --topspeed`` in a loop;
  * generator ``dnsperf``: one unthrottled dnsperf per flooder (stateful: they slow down
    to what BIND answers, and once banned to their outstanding-queries limit).

Run twice in the same lab, the baseline first:

  baseline  floodd not running: BIND's CPU and the legitimate answer rate;
  floodd    ``floodd run`` (nftables, built-in rules, rescans every 2 s): time from the
            flood's start to each flooder's ban in the kernel (polled with nft every
            0.05 s), capture kernel drops (``floodd status``), floodd's CPU and RSS
            (/proc), BIND's CPU before the last ban and from 1 s after it to the end,
            the legitimate answer rate.

    .venv/bin/python -m bench.bench_e2e [--seconds S] [--generator tcpreplay|dnsperf]
                                        [--legit-rate QPS]

Target (exit status 1 if missed): with floodd, every flooder banned within 3 s of the
flood's start, and from 1 s after the last ban >= 99% of the legitimate client's queries
answered (before the bans BIND is swamped, floodd or not).  Needs root, ip, named, nft, dnsperf,
tcpreplay, stdbuf.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from floodd.config import DEFAULT_RULES
from lab import load
from lab.netns import Lab

FLOODERS = ("203.0.113.11", "203.0.113.12", "203.0.113.13")
LEGIT = "198.51.100.10"
BAN_TARGET = 3.0
ANSWER_TARGET = 0.99
TOOLS = ("ip", "named", "nft", "dnsperf", "tcpreplay", "stdbuf")


class Sampler:
    """CPU seconds and RSS of some processes, every ``interval`` s, in a thread."""

    def __init__(self, pids: dict[str, int], interval: float = 0.1) -> None:
        self.pids = pids
        self.interval = interval
        self.samples: list[tuple[float, dict[str, float]]] = []
        self.rss: dict[str, int] = {name: 0 for name in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.time()
            cpu = {}
            for name, pid in self.pids.items():
                try:
                    cpu[name] = load.cpu_seconds(pid)
                    self.rss[name] = max(self.rss[name], load.rss_kib(pid))
                except (OSError, RuntimeError):
                    cpu[name] = float("nan")
            self.samples.append((now, cpu))
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _at(self, t: float, name: str) -> float:
        return min(self.samples, key=lambda s: abs(s[0] - t))[1][name]

    def share(self, name: str, start: float, end: float) -> float:
        """CPU used between two times, as a share of one core."""
        if end - start < 0.5:
            return float("nan")
        return (self._at(end, name) - self._at(start, name)) / (end - start)


@dataclass
class Run:
    label: str
    flood_pps: float = 0.0
    flood_packets: int = 0
    ban_delays: dict[str, float] = field(default_factory=dict)
    bind_before: float = float("nan")
    bind_after: float = float("nan")
    bind_all: float = float("nan")
    floodd_cpu: float = float("nan")
    floodd_rss: int = 0
    kernel_drops: int = 0
    received: int = 0
    legit: load.DnsperfReport | None = None
    legit_after: float = float("nan")  # answers/s from 1 s after the last ban


@dataclass(frozen=True)
class Trace:
    """When a run's flood started and ended, and what was sampled meanwhile."""

    started: float
    ended: float
    sampler: Sampler
    legit: load.Dnsperf


def flood(lab: Lab, work: Path, generator: str, seconds: float
          ) -> tuple[float, list[load.Dnsperf] | load.Replay]:
    """Start the flood; (its start time, what runs it)."""
    if generator == "dnsperf":
        perfs = [load.Dnsperf(lab, f, work, duration=seconds, clients=4).start()
                 for f in FLOODERS]
        return min(p.started for p in perfs), perfs
    capture = work / "flood.pcap"
    if not capture.exists():
        wire = load.lab_wire(lab)
        load.write_frames(capture, load.interleave(
            *(load.query_frames(wire, f, 20_000, qname=f"www.{lab.zone}") for f in FLOODERS)))
    replay = load.Replay(lab, capture, loops=10_000, duration=seconds).start()
    return replay.started, replay


def measure(lab: Lab, work: Path, generator: str, seconds: float, legit_rate: float,
            with_floodd: bool) -> tuple[Run, Trace]:
    run = Run("floodd" if with_floodd else "baseline (no floodd)")
    fl: load.FlooddProcess | None = None
    pids = {"bind": lab.named_pid or 0}
    if with_floodd:
        config = load.lab_config(work, list(DEFAULT_RULES), rate_table={"window": 60},
                                 firewall={"rescan_interval": 2})
        fl = load.FlooddProcess(lab, config, work / "floodd.service.journal").start()
        pids["floodd"] = fl.pid
    watcher = load.BanWatcher(lab, interval=0.05, limit=seconds + 30).start()
    sampler = Sampler(pids).start()
    legit = load.Dnsperf(lab, LEGIT, work, duration=seconds + 2, rate=legit_rate,
                         interval=1).start()
    time.sleep(1)
    started, runner = flood(lab, work, generator, seconds)
    try:
        if isinstance(runner, load.Replay):
            report = runner.wait()
            run.flood_packets, run.flood_pps = report.packets, report.pps
        else:
            reports = [p.wait() for p in runner]
            run.flood_packets = sum(r.sent for r in reports)
            run.flood_pps = sum(r.sent / r.runtime for r in reports)
        ended = time.time()
        run.legit = legit.wait()
        if fl is not None:
            status = fl.request("status")
            run.kernel_drops, run.received = status["kernel_drops"], status["received"]
    finally:
        sampler.stop()
        watcher.stop()
        if fl is not None:
            fl.stop()
        load.delete_table(lab)
    run.ban_delays = {f: watcher.first_seen[f] - started
                      for f in FLOODERS if f in watcher.first_seen}
    run.bind_all = sampler.share("bind", started, ended)
    if fl is not None:
        run.floodd_cpu = sampler.share("floodd", started, ended)
        run.floodd_rss = sampler.rss["floodd"]
    return run, Trace(started, ended, sampler, legit)


def split(run: Run, trace: Trace, at: float | None) -> None:
    """BIND's CPU before ``at`` s into the flood and from 1 s after it to the end; the
    legitimate answers/s over the latter.  Both runs are cut where the floodd run banned."""
    if at is None:
        return
    run.bind_before = trace.sampler.share("bind", trace.started, trace.started + at)
    run.bind_after = trace.sampler.share("bind", trace.started + at + 1, trace.ended)
    after = [q for t, q in trace.legit.intervals()
             if trace.started + at + 1 < t <= trace.ended]
    run.legit_after = statistics.mean(after) if after else float("nan")


def show(runs: list[Run], legit_rate: float) -> None:
    def pct(x: float) -> str:
        return "   n/a" if x != x else f"{x:6.1%}"

    print(f"\n{'':32}" + "".join(f"{r.label:>24}" for r in runs))
    rows = [
        ("flood sent (packets/s)", lambda r: f"{r.flood_pps:,.0f}"),
        ("flood sent (packets)", lambda r: f"{r.flood_packets:,}"),
        ("ban delay median (s)", lambda r: f"{statistics.median(r.ban_delays.values()):.2f}"
         if r.ban_delays else "-"),
        ("ban delay max (s)", lambda r: f"{max(r.ban_delays.values()):.2f}"
         if len(r.ban_delays) == len(FLOODERS) else "not all banned" if r.ban_delays else "-"),
        ("BIND CPU, flood start to ban", lambda r: pct(r.bind_before)),
        ("BIND CPU, ban + 1 s to end", lambda r: pct(r.bind_after)),
        ("BIND CPU, whole flood", lambda r: pct(r.bind_all)),
        ("legit answered (whole run)", lambda r: f"{r.legit.answered:.2%}" if r.legit else "-"),
        (f"legit answers/s after ban (of {legit_rate:g})",
         lambda r: f"{r.legit_after:.1f}"),
        ("floodd CPU (share of a core)", lambda r: pct(r.floodd_cpu)),
        ("floodd max RSS (MiB)", lambda r: f"{r.floodd_rss / 1024:.1f}" if r.floodd_rss else "-"),
        ("capture received / kernel drops",
         lambda r: f"{r.received:,} / {r.kernel_drops:,}" if r.received else "-"),
    ]
    for name, cell in rows:
        print(f"{name:32}" + "".join(f"{cell(r):>24}" for r in runs))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=12.0, help="flood length (5-120)")
    parser.add_argument("--generator", choices=("tcpreplay", "dnsperf"), default="tcpreplay")
    parser.add_argument("--legit-rate", type=float, default=150.0)
    args = parser.parse_args()
    if os.geteuid() != 0 or any(shutil.which(t) is None for t in TOOLS):
        print(f"bench_e2e: needs root and {', '.join(TOOLS)}", file=sys.stderr)
        return 2
    if not 5 <= args.seconds <= 120:
        print("bench_e2e: --seconds: 5 to 120", file=sys.stderr)
        return 2
    print(f"end to end: {len(FLOODERS)} flooders ({args.generator}, as fast as this machine "
          f"goes) for {args.seconds:g} s, a legitimate client at {args.legit_rate:g} q/s, "
          f"BIND with one worker; {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="floodd-bench-") as tmp, Lab("be") as lab:
        work = Path(tmp)
        lab.start_bind()
        for address in (*FLOODERS, LEGIT):
            load.add_address(lab, address)
        baseline, base_trace = measure(lab, work, args.generator, args.seconds,
                                       args.legit_rate, False)
        time.sleep(2)
        with_floodd, trace = measure(lab, work, args.generator, args.seconds,
                                     args.legit_rate, True)
        last_ban = max(with_floodd.ban_delays.values()) if with_floodd.ban_delays else None
        split(baseline, base_trace, last_ban)
        split(with_floodd, trace, last_ban)
    show([baseline, with_floodd], args.legit_rate)
    if with_floodd.bind_after == with_floodd.bind_after and baseline.bind_after > 0:
        print(f"\nBIND's CPU after the ban: {with_floodd.bind_after / baseline.bind_after:.2f}"
              " x the baseline's in the same seconds of the flood")
    ok = (len(with_floodd.ban_delays) == len(FLOODERS)
          and max(with_floodd.ban_delays.values()) <= BAN_TARGET
          and with_floodd.legit_after >= ANSWER_TARGET * args.legit_rate)
    print(f"target (every flooder banned within {BAN_TARGET:g} s; from 1 s after the last "
          f"ban, >= {ANSWER_TARGET:.0%} of the legitimate queries answered): "
          f"{'met' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
