"""Firewall-stage speed: 10,000 bans in one batch, and what 10,000 bans cost BIND.

In lab namespaces (lab.netns, a real BIND), for each backend this host can run
(nftables; iptables through python-iptables and ipset when usable), in the same run, a
process inside the server namespace times

  (a) setup + ban 10,000 sources from 198.18.0.0/15 in one batch (one commit);
  (b) reading every ban with its counters back (one list());
  (c) unbanning all 10,000 in one batch;
  (d) the same three steps for bans of narrower scopes: 10,000 UDP-only bans, and a
      tenth as many (1,000) bans of UDP at all hop values but 64, of ANY queries, and of
      ANY queries at all hop values but 63 and 64 (nftables keeps these in concatenated
      interval sets, several elements per ban, whose deletes are slow; iptables makes
      them one rule each, ipset matching neither hop values nor questions);

and, as the baseline, 50 bans made the way fail2ban does, one process per ban
(``nft add element ...`` / ``iptables-legacy -I ...``, one rule per ban), extrapolated
to 10,000.
Then ``dnsperf`` from an unbanned address queries BIND for --seconds with floodd's rules
and 0 bans, and again with the 10,000 bans installed, alternating --rounds times (the
machine is shared: the best rate of each kind is kept): the ratio of the two rates is what
the ruleset costs every query.

    .venv/bin/python -m bench.bench_firewall [--bans N] [--seconds S] [--rounds N]
                                             [--backend NAME]

Targets (exit status 1 if missed): each of (a), (b), (c) at most 1 s for 10,000 bans; in
(d), 1 s per 10,000 UDP-only bans and per 1,000 of the others; BIND's rate with the
10,000 bans at least 0.95 of its rate with none.
Needs root, ip, named, dnsperf (and ipset for iptables).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from floodd.config import FirewallConfig
from floodd.enforce.firewall import make_backend
from floodd.enforce.firewall.base import Backend, Ban
from floodd.scope import UDP_ONLY, WHOLE, Scope

TARGET_SECONDS = 1.0
TARGET_RATIO = 0.95  # DNS rate with the bans / without
BASELINE_BANS = 50
FLOOD_BASE = ipaddress.ip_address("198.18.0.0")
CLIENT = "198.51.100.7"  # dnsperf's source, never banned
ANY = 255
# (name, scope, bans timed per 10,000 of --bans) of (d)
SCOPES = (("UDP only", UDP_ONLY, 10_000), ("UDP, hop not 64", Scope(True, None, (64,)), 1_000),
          ("ANY queries", Scope(True, ANY), 1_000),
          ("ANY, hop not 63/64", Scope(True, ANY, (63, 64)), 1_000))


def _backend(name: str) -> Backend:
    backend, _ = make_backend(FirewallConfig(backend=name), [53], ["udp", "tcp"])
    return backend


def _bans(count: int, offset: int = 0, scope: Scope = WHOLE) -> list[Ban]:
    now = time.time()
    return [Ban(ipaddress.ip_network(FLOOD_BASE + offset + i), "bench", now, now + 3600,
                scope) for i in range(count)]


def _one_process_per_ban(name: str, count: int) -> float:
    """Seconds for ``count`` bans made by one command each, as fail2ban's actions do."""
    bans = _bans(count, offset=100_000)
    if name == "nftables":
        argvs = [["nft", "add", "element", "inet", "floodd", "ban4",
                  f"{{ {b.network.network_address} timeout 3600s }}"] for b in bans]
    else:
        subprocess.run(["iptables-legacy", "-w", "-N", "f2b-bench"], check=True)
        argvs = [["iptables-legacy", "-w", "-I", "f2b-bench", "1", "-s",
                  str(b.network.network_address), "-j", "DROP"] for b in bans]
    started = time.perf_counter()
    for argv in argvs:
        subprocess.run(argv, check=True)
    elapsed = time.perf_counter() - started
    if name == "iptables":
        subprocess.run(["iptables-legacy", "-w", "-F", "f2b-bench"], check=True)
        subprocess.run(["iptables-legacy", "-w", "-X", "f2b-bench"], check=True)
    return elapsed


def inner(name: str, count: int) -> dict[str, Any]:
    """Runs inside the server namespace; leaves floodd's rules set up, with no bans."""
    backend = _backend(name)
    backend.setup()
    baseline = _one_process_per_ban(name, BASELINE_BANS)
    backend.teardown()

    bans = _bans(count)
    started = time.perf_counter()
    backend.setup()
    backend.ban(bans)
    backend.commit()
    t_ban = time.perf_counter() - started
    t_list, t_unban = _list_and_unban(name, backend, bans)
    scoped = {}
    for what, scope, per_10k in SCOPES:
        bans = _bans(max(1, count * per_10k // 10_000), scope=scope)
        started = time.perf_counter()
        backend.ban(bans)
        taken = len(backend.commit().added)
        if taken != len(bans):
            raise SystemExit(f"{name}: {taken} of {len(bans)} {what} bans taken")
        scoped[what] = (len(bans), time.perf_counter() - started,
                        *_list_and_unban(name, backend, bans))
    return {"ban": t_ban, "list": t_list, "unban": t_unban,
            "baseline": baseline / BASELINE_BANS * count, "scoped": scoped}


def _list_and_unban(name: str, backend: Backend, bans: list[Ban]) -> tuple[float, float]:
    """Seconds to list ``bans`` (all that is banned) and to unban them all."""
    started = time.perf_counter()
    listed = backend.list()
    t_list = time.perf_counter() - started
    if {b.target for b in listed} != {b.target for b in bans} or \
            sum(b.packets for b in listed) != 0:
        raise SystemExit(f"{name}: listed {len(listed)} bans, expected {len(bans)}")

    started = time.perf_counter()
    backend.unban([b.target for b in bans])
    backend.commit()
    t_unban = time.perf_counter() - started
    if backend.list():
        raise SystemExit(f"{name}: bans left after unbanning them all")
    return t_list, t_unban


def _inner_cmd(name: str, what: str, count: int) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), "--inner", what, "--backend", name,
            "--bans", str(count)]


def dnsperf(lab: Any, queries: str, seconds: float) -> float:
    proc = lab.run(lab.client_ns, ["dnsperf", "-s", lab.server_v4, "-a", CLIENT, "-d", queries,
                                   "-l", f"{seconds:g}", "-c", "4", "-q", "200"],
                   text=True, timeout=seconds + 30)
    m = re.search(r"Queries per second:\s+([\d.]+)", proc.stdout)
    if m is None:
        raise SystemExit(f"dnsperf printed no rate:\n{proc.stdout}{proc.stderr}")
    return float(m.group(1))


def usable(name: str) -> bool:
    if name == "nftables":
        return shutil.which("nft") is not None
    from floodd.enforce.firewall import legacy_iptables_problem
    return shutil.which("iptables-legacy") is not None and shutil.which("ipset") is not None \
        and legacy_iptables_problem() is None


def outer(names: list[str], count: int, seconds: float, rounds: int) -> int:
    from lab.netns import Lab

    missed = False
    with tempfile.TemporaryDirectory(prefix="floodd-bench-") as tmp, Lab("fb") as lab:
        queries = os.path.join(tmp, "queries.txt")
        with open(queries, "w") as f:
            f.write(f"www.{lab.zone} A\n{lab.zone} TXT\nns.{lab.zone} A\n")
        lab.start_bind()
        lab.add_client_address(CLIENT)
        for name in names:
            proc = lab.run(lab.server_ns, _inner_cmd(name, "timings", count), text=True,
                           timeout=600)
            t = json.loads(proc.stdout)
            idle = loaded = 0.0
            for _ in range(rounds):
                idle = max(idle, dnsperf(lab, queries, seconds))
                lab.run(lab.server_ns, _inner_cmd(name, "install", count), text=True)
                loaded = max(loaded, dnsperf(lab, queries, seconds))
                lab.run(lab.server_ns, _inner_cmd(name, "clear", count), text=True)
            lab.run(lab.server_ns, _inner_cmd(name, "teardown", count), text=True)
            print(f"{name}:")
            for step, what in (("ban", f"ban {count} sources in one batch"),
                               ("list", f"read {count} bans and counters"),
                               ("unban", f"unban {count} in one batch")):
                ok = t[step] <= TARGET_SECONDS * count / 10_000
                missed |= not ok
                print(f"  {what:<36} {t[step]:7.3f} s  {'ok' if ok else 'MISSED'} "
                      f"(target {TARGET_SECONDS:g} s per 10,000)")
            for what, _, per_10k in SCOPES:
                n, *times = t["scoped"][what]
                for step, took in zip(("ban", "list", "unban"), times):
                    ok = took <= TARGET_SECONDS * n / per_10k
                    missed |= not ok
                    print(f"  {what + ':':<19} {step:<5} {n:>6} bans       {took:7.3f} s  "
                          f"{'ok' if ok else 'MISSED'} (target {TARGET_SECONDS:g} s per "
                          f"{per_10k:,})")
            print(f"  one process per ban ({BASELINE_BANS} timed, x{count // BASELINE_BANS}) "
                  f"{t['baseline']:7.3f} s  -> one batch is {t['baseline'] / t['ban']:.0f}x "
                  "faster")
            ok = loaded >= TARGET_RATIO * idle
            missed |= not ok
            print(f"  dnsperf, best of {rounds} x {seconds:g} s from {CLIENT}: {idle:,.0f} q/s "
                  f"with 0 bans, {loaded:,.0f} q/s with {count} bans: ratio "
                  f"{loaded / idle:.2f}  {'ok' if ok else 'MISSED'} (target {TARGET_RATIO:g})")
    return 1 if missed else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bans", type=int, default=10_000)
    p.add_argument("--seconds", type=float, default=5.0, help="each dnsperf run (default 5)")
    p.add_argument("--backend", choices=["nftables", "iptables"], action="append",
                   help="only this backend (repeat for several; default: all usable)")
    p.add_argument("--rounds", type=int, default=3,
                   help="dnsperf runs with and without bans, alternating (default 3)")
    p.add_argument("--inner", choices=["timings", "install", "clear", "teardown"],
                   help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.inner:
        [name] = args.backend
        backend = _backend(name)
        if args.inner == "timings":
            print(json.dumps(inner(name, args.bans)))
        elif args.inner == "install":
            backend.ban(_bans(args.bans))
            backend.commit()
        elif args.inner == "clear":
            backend.unban([b.target for b in backend.list()])
            backend.commit()
        else:
            backend.teardown()
        return 0
    if os.geteuid() != 0:
        print("bench_firewall: needs root (network namespaces)", file=sys.stderr)
        return 2
    names = args.backend or [n for n in ("nftables", "iptables") if usable(n)]
    return outer(names, args.bans, args.seconds, args.rounds)


if __name__ == "__main__":
    sys.exit(main())
