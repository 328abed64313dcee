"""floodd against forged queries carrying real clients' addresses: every source believed
(the baseline: ``trust.hop_check: false``, ``trust.udp_evidence_bans: all``) against the
shipped defaults, in one lab, one process.

Each real client asks 100 queries/s with dnsperf; its packets arrive with TTL / hop
limit 64.  Each scenario forges one client's address (lab.forge):

  any-handful    5 ANY queries at TTL 50
  a-flood        A queries at 6,000/s for 5 s, TTL 50
  a-flood-v6     the same over IPv6 (hop limit 50)
  same-ttl       A queries at 6,000/s for 5 s at TTL 64: nothing tells them apart
  rotating-any   ANY queries from 2,000 sources of 198.18.0.0/15 and the client's
                 address, 8 rounds at 2,500/s

Per scenario and variant: the real client's answered share over the MEASURED seconds
from the first forged query (dnsperf's per-second answers), BIND's replies to the forged
queries per second from 1 s after the ban to the end (counted on their source ports as
they arrive in the client namespace), the time from the first forged query to the ban in
the kernel (rotating-any: to 90% of the sources banned), and whether the kernel then
drops the real client's own A queries over UDP, and answers them over TCP.

Each variant runs one ``floodd run`` (nftables) with etc/floodd.yaml, or with
``--fast-window S`` its faster variant (lab.forge.fast_rules); with hop checks on, the
real clients are first asked for ``trust.hop_learn_after`` + 2 s, so their TTL is known
(the shipped 60 s make a run of about five minutes; ``--fast-window 3`` about one).

    .venv/bin/python -m bench.bench_forged [--fast-window S] [--scenario NAME ...]

Target (exit status 1 if missed): with the defaults, the real client >= 99% answered
wherever the forger's TTL differs from its own, and every forged flood banned within 3 s.
Needs root, ip, named, nft, dnsperf, tcpreplay, stdbuf.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from floodd.config import load_config
from floodd.qtypes import qtype_code
from lab import forge, load
from lab.netns import Lab

LEGIT_RATE = 100
FLOOD_RATE = 6000
FLOOD_SECONDS = 5
FORGED_HOPS = 50
ROTATING_SOURCES = 2000
ROTATING_ROUNDS = 8
ROTATING_RATE = 2500
BANNED_SHARE = 0.9  # rotating-any is mitigated once this share of its sources is banned
SETTLE = 1.0  # seconds after a ban before its effect is measured, and after a scenario
BAN_TARGET = 3.0
ANSWER_TARGET = 0.99
TOOLS = ("ip", "named", "nft", "dnsperf", "tcpreplay", "stdbuf", "dig")
A = qtype_code("A")
VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {"hop_check": False, "udp_evidence_bans": "all"},
    "defaults": {},
}


@dataclass(frozen=True)
class Scenario:
    name: str
    real: str  # the real client whose address is forged
    kind: str  # handful | flood | rotating
    hops: int  # the forged queries' TTL / hop limit

    @property
    def hops_differ(self) -> bool:
        return self.hops != forge.REAL_HOPS


SCENARIOS = (
    Scenario("any-handful", "203.0.113.10", "handful", FORGED_HOPS),
    Scenario("a-flood", "203.0.113.20", "flood", FORGED_HOPS),
    Scenario("a-flood-v6", "2001:db8:1::20", "flood", FORGED_HOPS),
    Scenario("same-ttl", "198.51.100.40", "flood", forge.REAL_HOPS),
    Scenario("rotating-any", "198.51.100.50", "rotating", FORGED_HOPS),
)
SLOT = 12.0  # seconds of a real client's run given to its scenario
MEASURED = SLOT - 2  # seconds of its answers counted from the first forged query


@dataclass
class Result:
    started: float = 0.0  # unix time of the first forged query
    forged: int = 0  # forged queries sent
    forged_answered: int = 0  # replies to them, all told
    replies_after: float = math.nan  # replies/s to them from SETTLE s after the ban
    mitigation: float | None = None  # seconds from the first forged query to the ban
    answered: float = math.nan  # the real client's answered share meanwhile
    cut_off_udp: bool = False  # the kernel drops the real client's A queries over UDP
    tcp_answered: bool = False  # dig +tcp from the real client answered afterwards


def forger(lab: Lab, wire: load.Wire, work: Path, scenario: Scenario) -> forge.Forger:
    path = work / f"{scenario.name}.pcap"
    if scenario.kind == "handful":
        frames = forge.forged_queries(wire, scenario.real, 5, hops=scenario.hops, qtype="ANY",
                                      qname=lab.zone)
        return forge.Forger(lab, frames, path, pps=20)
    if scenario.kind == "flood":
        frames = forge.forged_queries(wire, scenario.real, FLOOD_RATE, hops=scenario.hops)
        return forge.Forger(lab, frames, path, pps=FLOOD_RATE, loops=FLOOD_SECONDS,
                            duration=FLOOD_SECONDS)
    sources = [scenario.real, *load.spoofed_sources(ROTATING_SOURCES - 1, seed=11)]
    frames = forge.rotating_queries(wire, sources, ROTATING_ROUNDS, hops=scenario.hops)
    return forge.Forger(lab, frames, path, pps=ROTATING_RATE)


def banned_at(watcher: load.BanWatcher, scenario: Scenario) -> float | None:
    """Unix time the scenario's forged traffic counts as banned (None: not yet)."""
    if scenario.kind != "rotating":
        return watcher.first_seen.get(scenario.real)
    times = sorted(t for s, t in list(watcher.first_seen.items())
                   if s == scenario.real or s.startswith("198.1"))
    wanted = math.ceil(BANNED_SHARE * ROTATING_SOURCES)
    return times[wanted - 1] if len(times) >= wanted else None


def run_scenario(lab: Lab, wire: load.Wire, work: Path, scenario: Scenario,
                 watcher: load.BanWatcher, replies: load.ReplyCounter) -> Result:
    result = Result()
    sender = forger(lab, wire, work, scenario)
    before = replies.packets()
    sender.start()
    started = result.started = sender.started
    after: tuple[float, int] | None = None  # (time, replies) SETTLE s after the ban
    while sender.running:
        at = banned_at(watcher, scenario)
        if after is None and at is not None and time.time() >= at + SETTLE:
            after = (time.time(), replies.packets())
        time.sleep(0.05)
    result.forged = sender.wait().packets
    ended = time.time()
    final = replies.packets()
    if after is not None and ended - after[0] >= 0.5:
        result.replies_after = (final - after[1]) / (ended - after[0])
    time.sleep(SETTLE)
    result.forged_answered = replies.packets() - before
    at = banned_at(watcher, scenario)
    result.mitigation = None if at is None else at - started
    result.cut_off_udp = any(e.drops(scenario.real, hop=forge.REAL_HOPS, qtype=A)
                             for e in load.kernel_elements(lab))
    result.tcp_answered = lab.dig(f"www.{lab.zone}", scenario.real, tcp=True)
    return result


def run_variant(lab: Lab, wire: load.Wire, work: Path, name: str, scenarios: list[Scenario],
                fast_window: float | None) -> dict[str, Result]:
    load.delete_table(lab)
    vdir = work / name
    vdir.mkdir()
    config = forge.shipped_config(vdir, fast_window=fast_window, trust=VARIANTS[name])
    trust = load_config(str(config)).trust
    learn = trust.hop_learn_after + 2 if trust.hop_check else 0.0
    floodd = load.FlooddProcess(lab, config, vdir / "floodd.log").start()
    watcher = load.BanWatcher(lab, interval=0.2, limit=learn + SLOT * len(scenarios) + 60)
    results: dict[str, Result] = {}
    try:
        # Each real client runs until its scenario's slot ends: scenario i starts at
        # learn + i * SLOT at the latest.
        clients = [load.Dnsperf(lab, s.real, vdir, duration=learn + SLOT * (i + 1),
                                rate=LEGIT_RATE, interval=1).start()
                   for i, s in enumerate(scenarios)]
        watcher.start()
        if learn:
            print(f"  {name}: the real clients ask for {learn:g} s (their TTL is learned)",
                  flush=True)
        time.sleep(learn)
        with load.ReplyCounter(lab, None, ports=forge.FORGED_PORTS) as replies:
            for i, (scenario, client) in enumerate(zip(scenarios, clients)):
                slot_start = client.started + learn + SLOT * i
                time.sleep(max(0.0, slot_start - time.time()))
                results[scenario.name] = run_scenario(lab, wire, vdir, scenario, watcher,
                                                      replies)
                print(f"  {name}: {scenario.name} done", flush=True)
        for scenario, client in zip(scenarios, clients):
            result = results[scenario.name]
            shares = [min(q / LEGIT_RATE, 1.0) for t, q in client.wait().intervals
                      if result.started < t <= result.started + MEASURED]
            result.answered = statistics.mean(shares) if shares else math.nan
    finally:
        watcher.stop()
        floodd.stop()
        load.delete_table(lab)
    return results


def show(scenarios: list[Scenario], runs: dict[str, dict[str, Result]]) -> None:
    def pct(x: float) -> str:
        return "n/a" if x != x else f"{x:.1%}"

    def rate(x: float) -> str:
        return "n/a" if x != x else f"{x:,.0f}"

    def secs(x: float | None) -> str:
        return "never" if x is None else f"{x:.2f}"

    rows: list[tuple[str, Any]] = [
        ("real client answered", lambda r: pct(r.answered)),
        ("forged queries answered", lambda r: f"{r.forged_answered:,} of {r.forged:,}"),
        ("forged replies/s after ban", lambda r: rate(r.replies_after)),
        ("time to mitigation (s)", lambda r: secs(r.mitigation)),
        ("real client's UDP cut off", lambda r: "yes" if r.cut_off_udp else "no"),
        ("real client's TCP answered", lambda r: "yes" if r.tcp_answered else "no"),
    ]
    names = list(runs)
    for scenario in scenarios:
        print(f"\n{scenario.name} (real client {scenario.real}, forged TTL {scenario.hops})")
        print(f"  {'':30}" + "".join(f"{n:>18}" for n in names))
        for label, cell in rows:
            print(f"  {label:30}" + "".join(f"{cell(runs[n][scenario.name]):>18}"
                                            for n in names))
        if len(names) == 2:
            base, new = (runs[n][scenario.name] for n in names)
            print(f"  {'ratio ' + names[1] + '/' + names[0]:30}"
                  f"answered {_ratio(new.answered, base.answered)}, forged replies/s "
                  f"{_ratio(new.replies_after, base.replies_after)}, time to mitigation "
                  f"{_ratio(new.mitigation, base.mitigation)}")


def _ratio(new: float | None, base: float | None) -> str:
    if new is None or base is None or new != new or base != base:
        return "n/a"
    if base == 0:
        return "both 0" if new == 0 else "n/a"
    return f"{new / base:.2f}x"


def target_met(scenarios: list[Scenario], results: dict[str, Result]) -> bool:
    ok = True
    for s in scenarios:
        r = results[s.name]
        if s.hops_differ and not r.answered >= ANSWER_TARGET:
            ok = False
        if s.kind == "flood" and (r.mitigation is None or r.mitigation > BAN_TARGET):
            ok = False
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast-window", type=float, metavar="S",
                        help="rule windows of at most S seconds (1-10), the same rates")
    parser.add_argument("--scenario", action="append", choices=[s.name for s in SCENARIOS],
                        help="run only these (repeatable)")
    args = parser.parse_args()
    if os.geteuid() != 0 or any(shutil.which(t) is None for t in TOOLS):
        print(f"bench_forged: needs root and {', '.join(TOOLS)}", file=sys.stderr)
        return 2
    if args.fast_window is not None and not 1 <= args.fast_window <= 10:
        print("bench_forged: --fast-window: 1 to 10 seconds", file=sys.stderr)
        return 2
    scenarios = [s for s in SCENARIOS if not args.scenario or s.name in args.scenario]
    print(f"forged queries with real clients' addresses ({len(scenarios)} scenarios), "
          f"floodd with etc/floodd.yaml"
          + (f" (windows cut to {args.fast_window:g} s)" if args.fast_window else "")
          + f", variants {', '.join(VARIANTS)}; {os.cpu_count()} CPUs", flush=True)
    runs: dict[str, dict[str, Result]] = {}
    with tempfile.TemporaryDirectory(prefix="floodd-bench-") as tmp, Lab("bf") as lab:
        work = Path(tmp)
        lab.start_bind()
        for s in scenarios:
            load.add_address(lab, s.real)
        wire = load.lab_wire(lab)
        for name in VARIANTS:
            runs[name] = run_variant(lab, wire, work, name, scenarios, args.fast_window)
            time.sleep(2)
    show(scenarios, runs)
    ok = target_met(scenarios, runs[list(VARIANTS)[-1]])
    print(f"\ntarget (with the defaults: the real client >= {ANSWER_TARGET:.0%} answered "
          f"wherever the forged TTL differs, forged floods banned within {BAN_TARGET:g} s): "
          f"{'met' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
