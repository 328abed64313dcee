"""floodd's live demo: ``python -m lab.demo`` (root), or ``--offline`` (anyone).

Live: two network namespaces with a real BIND, ``floodd run`` on the server's interface
(nftables backend, the built-in rules), three dnsperf flooders starting a few seconds
apart and one legitimate client.  Every second it shows what floodd sees (``status`` and
``top`` on its control socket), the bans with the packets the firewall dropped
(``bans``, as ``floodd bans --json``) and how many of the legitimate client's queries
are answered; then a summary.  Everything is removed at the end, on Ctrl-C too.

Offline: a generated capture (heavy hitters among thousands of sources) and what
``floodd analyze`` makes of it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any, Sequence, TextIO

from floodd.config import DEFAULT_RULES, default_config
from floodd.errors import FlooddError
from lab import load
from lab.netns import Lab

LEGIT = "198.51.100.10"
FLOODERS = ("203.0.113.11", "203.0.113.12", "203.0.113.13")
TOOLS = ("ip", "named", "nft", "dnsperf", "stdbuf")
FIRST_FLOOD = 3.0  # seconds after the start
FLOOD_GAP = 3.0  # between flooders
SHOWN_BANS = 12  # offline: would-ban lines printed


def _num(n: float) -> str:
    return f"{n:,.0f}"


def _host(source: str) -> str:
    """``203.0.113.11/32`` -> ``203.0.113.11``; prefixes stay as they are."""
    return source.removesuffix("/32") if "." in source else source.removesuffix("/128")


class Screen:
    """Redraws the live frame in place on a terminal; appends frames elsewhere."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self._lines = 0

    def frame(self, lines: list[str]) -> None:
        if self.tty and self._lines:
            self.out.write(f"\x1b[{self._lines}F\x1b[J")
        self.out.write("\n".join(lines) + "\n")
        if not self.tty:
            self.out.write("\n")
        self.out.flush()
        self._lines = len(lines)

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()
        self._lines = 0


# --- live --------------------------------------------------------------------------------
def _check_live() -> None:
    if os.geteuid() != 0:
        raise FlooddError("the live demo needs root (network namespaces, firewall); "
                          "try --offline")
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        raise FlooddError(f"the live demo needs {', '.join(missing)}: run sh scripts/setup.sh")


def _frame(elapsed: float, status: dict[str, Any], bans: list[dict[str, Any]],
           legit: load.Dnsperf, legit_rate: float) -> list[str]:
    lines = [f" t={elapsed:4.0f}s  floodd sees {_num(status['pps'])} packets/s, "
             f"{_num(status['kernel_drops'])} kernel drops, {len(bans)} bans",
             f"   {'busiest sources (not banned)':<34}{'queries':>9}{'per s':>9}"]
    top = [row for row in status["top"] if not row["banned"]][:5]
    lines += [f"   {row['source']:<34}{_num(row['packets']):>9}{row['rate']:>9.1f}"
              for row in top] or ["   (none)"]
    lines.append(f"   {'bans in the firewall':<34}{'rule':<14}{'dropped':>9}")
    lines += [f"   {_host(b['source']):<34}{b['rule']:<14}{_num(b['packets']):>9}"
              for b in bans] or ["   (none)"]
    intervals = legit.intervals()
    if intervals:
        answered = intervals[-1][1]
        lines.append(f"   legitimate client {LEGIT}: {answered:.0f} answers/s for "
                     f"{legit_rate:.0f} queries/s ({min(answered / legit_rate, 1.0):.0%})")
    else:
        lines.append(f"   legitimate client {LEGIT}: starting")
    return lines


def run_live(duration: float, rate: float, legit_rate: float, out: TextIO) -> int:
    _check_live()
    screen = Screen(out)
    with tempfile.TemporaryDirectory(prefix="floodd-demo-") as tmp, Lab("demo") as lab:
        work = Path(tmp)
        screen.say("floodd live demo: building the lab (two network namespaces, BIND at "
                   f"{lab.server_v4})...")
        lab.start_bind()
        config = load.lab_config(work, list(DEFAULT_RULES), rate_table={"window": 60},
                                 firewall={"rescan_interval": 2})
        floodd = load.FlooddProcess(lab, config, work / "floodd.service.journal").start()
        screen.say(f"floodd {floodd.request('status')['version']} runs in the server "
                   f"namespace (pid {floodd.pid}, nftables), with its built-in rules "
                   "(query-flood: more than 5,000 queries in 10 s from one source).")
        screen.say(f"{len(FLOODERS)} flooders at {_num(rate)} queries/s each start "
                   f"{FLOOD_GAP:g} s apart; a legitimate client asks {_num(legit_rate)} "
                   "queries/s throughout. Ctrl-C stops.\n")
        watcher = load.BanWatcher(lab, interval=0.2, limit=duration + 30).start()
        started = time.time()
        legit = load.Dnsperf(lab, LEGIT, work, duration=duration, rate=legit_rate,
                             interval=1).start()
        flooders: list[load.Dnsperf] = []
        try:
            while time.time() - started < duration:
                elapsed = time.time() - started
                due = int((elapsed - FIRST_FLOOD) // FLOOD_GAP) + 1  # flooders started by now
                while len(flooders) < min(due, len(FLOODERS)):
                    left = duration - (time.time() - started) - 2
                    flooders.append(load.Dnsperf(lab, FLOODERS[len(flooders)], work,
                                                 duration=max(left, 1), rate=rate).start())
                status = floodd.request("status")
                bans = floodd.request("bans")["bans"]
                screen.frame(_frame(elapsed, status, bans, legit, legit_rate))
                time.sleep(max(0.0, 1 - (time.time() - started - elapsed)))
            reports = [f.wait() for f in flooders]
            legit_report = legit.wait()
            status = floodd.request("status")
            bans = {b["source"]: b for b in floodd.request("bans")["bans"]}
            cpu, rss = load.cpu_seconds(floodd.pid), load.rss_kib(floodd.pid)
        finally:
            watcher.stop()
            floodd.stop()
        screen.say("\nsummary")
        for f, r in zip(flooders, reports):
            banned = watcher.first_seen.get(f.source)
            dropped = bans.get(f"{f.source}/32", {}).get("packets", 0)
            when = (f"banned {banned - f.started:.1f} s after its first query"
                    if banned else "not banned")
            screen.say(f"  flooder {f.source}: {_num(r.sent)} queries "
                       f"({_num(r.sent / r.runtime)}/s), {when};\n"
                       f"    {_num(r.completed)} answered, {_num(dropped)} dropped by the "
                       "firewall")
        screen.say(f"  legitimate client {LEGIT}: {_num(legit_report.completed)} of "
                   f"{_num(legit_report.sent)} queries answered "
                   f"({legit_report.answered:.2%}), "
                   f"{'BANNED' if LEGIT in watcher.first_seen else 'never banned'}")
        screen.say(f"  floodd: {_num(status['packets'])} packets counted, "
                   f"{_num(status['kernel_drops'])} kernel drops, {cpu:.1f} s of CPU in all "
                   f"({cpu / duration:.1%} of a core), RSS {rss / 1024:.0f} MiB")
        screen.say("removing the lab (namespaces, BIND, floodd, its firewall table)...")
    screen.say("done.")
    return 0


# --- offline -----------------------------------------------------------------------------
def run_offline(capture: str | None, out: TextIO) -> int:
    from floodd.cli.analyze import analyze_file, format_report
    from lab.synth import generate_flood_capture

    screen = Screen(out)
    with tempfile.TemporaryDirectory(prefix="floodd-demo-") as tmp:
        path = capture or os.path.join(tmp, "sample.pcap")
        screen.say("floodd offline demo: a 10 s capture of 300,000 DNS queries from 20,000 "
                   "sources of 198.18.0.0/15, three of them sending 30% of it, 5% ANY "
                   "queries;\n" f"then: floodd analyze {path}\n")
        generate_flood_capture(path, 300_000, 20_000, heavy=3, heavy_share=0.3,
                               rate=30_000.0)
        report = analyze_file(path, default_config())
        more = report.would_ban[SHOWN_BANS:]
        screen.say(format_report(dataclasses.replace(report,
                                                     would_ban=report.would_ban[:SHOWN_BANS])))
        if more:
            rules = Counter(b["rule"] for b in more)
            screen.say(f"  ... and {len(more)} more: "
                       + ", ".join(f"{n} by rule {r}" for r, n in rules.most_common())
                       + " (sources repeating ANY while ANY floods in)")
        if capture:
            screen.say(f"\nthe capture stays in {capture}")
    return 0


# --- command line ----------------------------------------------------------------------
def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lab.demo",
        description="floodd against a live flood in a lab of network namespaces (root), "
                    "or, with --offline, floodd analyze of a generated capture.")
    parser.add_argument("--offline", action="store_true",
                        help="no namespaces: analyze a generated capture instead")
    parser.add_argument("--capture", metavar="FILE",
                        help="--offline: write the generated capture here and keep it")
    parser.add_argument("--duration", type=float, default=25.0, metavar="SECONDS",
                        help="length of the live demo, 15 to 300 (default 25)")
    parser.add_argument("--rate", type=float, default=6000.0, metavar="QPS",
                        help="queries/s of each flooder, 600 to 100000 (default 6000)")
    parser.add_argument("--legit-rate", type=float, default=150.0, metavar="QPS",
                        help="queries/s of the legitimate client, 1 to 500 (default 150)")
    args = parser.parse_args(argv)
    try:
        if args.offline:
            return run_offline(args.capture, sys.stdout)
        if not 15 <= args.duration <= 300:
            raise FlooddError("--duration: expected 15 to 300 seconds")
        if not 600 <= args.rate <= 100_000:
            raise FlooddError("--rate: expected 600 to 100000 queries/s")
        if not 1 <= args.legit_rate <= 500:
            raise FlooddError("--legit-rate: expected 1 to 500 queries/s")
        signal.signal(signal.SIGTERM, _stop_on_sigterm)  # removes the lab too
        return run_live(args.duration, args.rate, args.legit_rate, sys.stdout)
    except FlooddError as exc:
        print(f"floodd demo: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nfloodd demo: interrupted; the lab is removed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
