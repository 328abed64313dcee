"""Forged sources end to end: floodd must not let forged UDP queries cut a real client off.

One lab and BIND serve the whole module.  Each scenario starts ``floodd run`` with the
shipped configuration (etc/floodd.yaml) or, where hop values must be learned first, a
faster variant (lab.forge.fast_rules: windows of FAST_WINDOW seconds, the same rates,
hop values learned after FAST_WINDOW seconds).  A real client asks 100 queries/s with
dnsperf; its packets arrive with TTL / hop limit 64 (lab.forge.REAL_HOPS).  Forged
queries are raw frames replayed from the client namespace with the real client's
address and a chosen TTL.

Asserted: what the DNS clients experienced (dnsperf's answers, dig over UDP and TCP,
the server's replies to the forged queries, counted on their own source ports) and what
the kernel holds (nftables set elements or iptables rules, read back and asked whether
they drop a given packet), and the ban's scope as ``floodd bans --json`` shows it.
"""

from __future__ import annotations

import ipaddress
import json
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import yaml

from conftest import LOAD_TOOLS, backend_problem, lab_problem
from daemon_helpers import Floodd, floodd_cli, wait_until
from floodd.qtypes import qtype_code
from lab import forge, load
from lab.netns import Lab

REAL = "203.0.113.10"  # the legitimate client whose address is forged
REAL6 = "2001:db8:1::10"
OTHER = "198.51.100.20"  # another legitimate client
FLOODER = "198.51.100.11"  # a real flooder, from its own address (not REAL's /24)
FORGED_HOPS = 50  # the forger's TTL: another path than the real client's
LEGIT_RATE = 100
FLOOD_RATE = 6000
BAN_WITHIN = 3.0  # seconds from a flood's start to its ban in the kernel (as test_scenarios)
FAST_WINDOW = 3.0
LEARN = FAST_WINDOW + 1.5  # the real client's traffic before a forgery: its TTL is usual
A, ANY = qtype_code("A"), qtype_code("ANY")
@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    problem = lab_problem(LOAD_TOOLS)
    if problem:
        pytest.skip(problem)
    with Lab("fg") as the_lab:
        the_lab.start_bind()
        for address in (REAL, REAL6, OTHER, FLOODER):
            load.add_address(the_lab, address)
        yield the_lab


@pytest.fixture(scope="module")
def wire(lab: Lab) -> load.Wire:
    return load.lab_wire(lab)


def _clean_firewall(lab: Lab) -> None:
    load.delete_table(lab)
    for tool in ("iptables-legacy", "ip6tables-legacy"):
        if shutil.which(tool):
            lab.run(lab.server_ns, [tool, "-F", "FLOODD"], check=False)
    if shutil.which("ipset"):
        lab.run(lab.server_ns, ["ipset", "flush"], check=False)


class Run:
    """One floodd for a scenario and the means to read the kernel it writes to."""

    def __init__(self, lab: Lab, floodd: Floodd, backend: str) -> None:
        self.lab = lab
        self.floodd = floodd
        self.backend = backend

    def kernel(self) -> list[Any]:
        """What floodd's firewall holds: nftables elements or iptables rules, each with
        ``drops(address, hop=, qtype=, udp=)``."""
        if self.backend == "iptables":
            return load.iptables_rules(self.lab)
        return load.kernel_elements(self.lab)

    def watcher(self) -> load.BanWatcher:
        read = load.iptables_bans if self.backend == "iptables" else load.kernel_bans
        return load.BanWatcher(self.lab, interval=0.1, limit=60, read=read).start()

    def scopes(self, address: str) -> list[dict[str, Any]]:
        """The scopes of the bans ``floodd bans --json`` lists for ``address`` or a prefix
        holding it."""
        proc = floodd_cli(self.lab, self.floodd.config, "bans", "--json")
        assert proc.returncode == 0, proc.stderr
        ip = ipaddress.ip_address(address)
        return [r["scope"] for r in json.loads(proc.stdout)
                if ip in ipaddress.ip_network(r["source"])]

    def dropped_when(self, address: str, hop: int, qtype: int, timeout: float) -> float:
        """Unix time the kernel first drops such a query from ``address`` (over UDP),
        polled every 0.1 s; infinity if not within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _dropping(self.kernel(), address, hop, qtype):
                return time.time()
            time.sleep(0.1)
        return float("inf")


Start = Callable[..., Run]


@pytest.fixture
def floodd(lab: Lab, tmp_path: Path) -> Iterator[Start]:
    """``floodd(backend="nftables", fast=True, **trust)``: floodd running with the
    shipped rules (or their faster variant) on a clean firewall; stopped afterwards, its
    bans flushed, its log shown on failure."""
    started: list[Floodd] = []

    def start(backend: str = "nftables", fast: bool = True, **trust: Any) -> Run:
        if backend == "iptables":
            problem = backend_problem("iptables")
            if problem:
                pytest.skip(f"iptables backend: {problem}")
        _clean_firewall(lab)
        config = forge.shipped_config(tmp_path, backend=backend,
                                      fast_window=FAST_WINDOW if fast else None, trust=trust)
        fl = Floodd(lab, config)
        started.append(fl)
        fl.start()
        fl.wait_ready()
        return Run(lab, fl, backend)

    yield start
    for fl in started:
        if fl.running():
            fl.stop()
        print(fl.log()[-4000:])
        fl.close()
    _clean_firewall(lab)


def _legit(lab: Lab, source: str, tmp_path: Path, seconds: float) -> load.Dnsperf:
    return load.Dnsperf(lab, source, tmp_path, duration=seconds, rate=LEGIT_RATE,
                        interval=1).start()


def _served(report: load.DnsperfReport, seconds: float) -> None:
    """The legitimate client sent at its rate and was answered (>= 99%), every second
    (dnsperf's first per-second line may come before its first answer: left out)."""
    assert report.sent >= 0.9 * LEGIT_RATE * seconds, report
    assert report.answered >= 0.99, report
    assert min(q for _, q in report.intervals[1:]) >= 0.9 * LEGIT_RATE, report.intervals


def _dropping(kernel: list[Any], address: str, hop: int, qtype: int,
              udp: bool = True) -> list[Any]:
    return [e for e in kernel if e.drops(address, hop=hop, qtype=qtype, udp=udp)]


def _dropped_sources(kernel: list[Any], addresses: list[str], hop: int,
                     qtype: int) -> list[str]:
    """The addresses such a query from which the kernel drops (over UDP); elements
    looked up by address, so that thousands of sources and bans take little time."""
    by_address: dict[str, list[Any]] = {}
    wide = []
    for e in kernel:
        if "/" in e.source or "-" in e.source:
            wide.append(e)
        else:
            by_address.setdefault(e.source, []).append(e)
    return [a for a in addresses
            if _dropping(by_address.get(a, []) + wide, a, hop, qtype)]


def _forged_flood(run: Run, wire: load.Wire, tmp_path: Path, source: str, hops: int,
                  seconds: int) -> forge.Forger:
    frames = forge.forged_queries(wire, source, FLOOD_RATE, hops=hops)
    return forge.Forger(run.lab, frames, tmp_path / f"forged-{hops}.pcap", pps=FLOOD_RATE,
                        loops=seconds, duration=seconds).start()


def _about(element: Any, address: str) -> bool:
    """Whether a kernel element or rule is about ``address`` (its address or a prefix)."""
    return any(element.drops(address, hop=h, qtype=q) for h in (FORGED_HOPS, forge.REAL_HOPS)
               for q in (A, ANY))


def _shipped_any_rules() -> set[str]:
    rules = yaml.safe_load(forge.SHIPPED_CONFIG.read_text())["rules"]
    return {r["name"] for r in rules if str(r.get("match", "all")).upper() == "ANY"}


# 1 ----------------------------------------------------------------------------------
def test_a_handful_of_forged_any_queries_leaves_the_real_client_answered(
        lab: Lab, wire: load.Wire, floodd: Start, tmp_path: Path) -> None:
    run = floodd(fast=False)  # the shipped configuration as it is
    watcher = run.watcher()
    legit = _legit(lab, REAL, tmp_path, 8)
    time.sleep(2)
    forger = forge.Forger(lab, forge.forged_queries(wire, REAL, 5, hops=FORGED_HOPS,
                                                    qtype="ANY", qname="lab.example"),
                          tmp_path / "any.pcap", pps=20).start()
    assert forger.wait().packets == 5
    banned = watcher.wait_for([REAL], 4)
    kernel = run.kernel()
    scopes = run.scopes(REAL)
    udp_answered = lab.dig("www.lab.example", REAL, tcp=False)
    report = legit.wait()
    watcher.stop()
    print(f"legit {report}; kernel {kernel}; scopes {scopes}")

    assert banned, "the forged ANY queries got no ban at all"
    _served(report, 8)
    assert udp_answered
    mine = [e for e in kernel if _about(e, REAL)]
    # An ANY-only ban over UDP: the forged queries' kind is dropped, nothing else.
    assert mine and all(e.qtype == ANY for e in mine), mine
    assert {e.rule for e in mine} <= _shipped_any_rules()
    assert _dropping(kernel, REAL, FORGED_HOPS, ANY)
    assert not _dropping(kernel, REAL, forge.REAL_HOPS, A)
    assert not _dropping(kernel, REAL, forge.REAL_HOPS, ANY, udp=False)
    assert scopes and all(s["protocols"] == "udp" and s["qtype"] == "ANY" for s in scopes)


def test_forged_any_queries_at_another_ttl_spare_the_real_clients_own(
        lab: Lab, wire: load.Wire, floodd: Start, tmp_path: Path) -> None:
    run = floodd()
    watcher = run.watcher()
    legit = _legit(lab, REAL, tmp_path, LEARN + 4)
    time.sleep(LEARN)
    forge.Forger(lab, forge.forged_queries(wire, REAL, 5, hops=FORGED_HOPS, qtype="ANY",
                                           qname="lab.example"),
                 tmp_path / "any.pcap", pps=20).start().wait()
    banned = watcher.wait_for([REAL], 4)
    kernel = run.kernel()
    # The real client's own ANY query (TTL 64) is still answered.
    own_any = lab.dig("lab.example", REAL, qtype="ANY", tcp=False)
    scopes = run.scopes(REAL)
    report = legit.wait()
    watcher.stop()
    print(f"legit {report}; kernel {kernel}; scopes {scopes}")

    assert banned
    _served(report, LEARN + 4)
    assert _dropping(kernel, REAL, FORGED_HOPS, ANY)
    assert not _dropping(kernel, REAL, forge.REAL_HOPS, ANY)
    assert not _dropping(kernel, REAL, forge.REAL_HOPS, A)
    assert own_any
    assert scopes and all(s["qtype"] == "ANY" and s["except_hops"] == [forge.REAL_HOPS]
                          for s in scopes), scopes


# 2 ----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_forged_flood_at_another_ttl_is_dropped_the_real_client_answered(
        lab: Lab, wire: load.Wire, floodd: Start, tmp_path: Path, backend: str) -> None:
    _forged_flood_at_another_hop_value(lab, wire, floodd, tmp_path, backend, REAL)


def _forged_flood_at_another_hop_value(lab: Lab, wire: load.Wire, floodd: Start,
                                       tmp_path: Path, backend: str, real: str) -> None:
    run = floodd(backend=backend)
    flood_seconds = 5
    legit = _legit(lab, real, tmp_path, LEARN + flood_seconds + 1)
    with load.ReplyCounter(lab, None, ports=forge.FORGED_PORTS) as replies:
        time.sleep(LEARN)
        flood = _forged_flood(run, wire, tmp_path, real, FORGED_HOPS, flood_seconds)
        # A ban of the address or of its prefix, whichever rule fires first.
        delay = run.dropped_when(real, FORGED_HOPS, A, BAN_WITHIN + 1) - flood.started
        time.sleep(1)
        after_ban, replied_by_then = time.time(), replies.packets()
        sent = flood.wait()
        flood_end = time.time()
        time.sleep(0.3)
        replied_after = replies.packets() - replied_by_then
        kernel = run.kernel()
        scopes = run.scopes(real)
        report = legit.wait()
    forged_after = sent.pps * max(0.0, flood_end - after_ban)
    print(f"{backend}: ban after {delay:.2f} s; {sent}; {replied_after} replies to "
          f"~{forged_after:.0f} forged queries from 1 s after the ban; legit {report}; "
          f"scopes {scopes}")

    assert delay <= BAN_WITHIN, delay
    assert sent.pps >= 0.9 * FLOOD_RATE, sent
    _served(report, LEARN + flood_seconds + 1)
    # The kernel drops the forged traffic (TTL 50) and lets the real client's (64) pass.
    forged = _dropping(kernel, real, FORGED_HOPS, A)
    assert forged, kernel
    assert not _dropping(kernel, real, forge.REAL_HOPS, A)
    assert not _dropping(kernel, real, forge.REAL_HOPS, A, udp=False)
    assert sum(e.packets for e in forged) >= sent.packets // 2
    assert replied_after <= 0.01 * forged_after + 10, (replied_after, forged_after)
    if backend == "nftables":
        assert {e.set for e in forged} <= load.HOP_SETS, forged
    else:
        assert all(e.udp_only and e.except_hops == (forge.REAL_HOPS,) for e in forged), forged
    assert scopes and all(s["protocols"] == "udp" and s["except_hops"] == [forge.REAL_HOPS]
                          for s in scopes), scopes
    # The journal says why the ban spares the real client, with the evidence.
    assert re.search(rf"notice: narrow the ban of \S+ to traffic with other TTL/hop limits, "
                     rf"as it looks forged: usual TTL/hop limit {forge.REAL_HOPS} \(learned\); "
                     r"\d+ of \d+ packets came with other values", run.floodd.log()), \
        run.floodd.log()[-3000:]


# 3 ----------------------------------------------------------------------------------
def test_rotating_any_flood_with_the_real_clients_address_among_its_sources(
        lab: Lab, wire: load.Wire, floodd: Start, tmp_path: Path) -> None:
    sources = [REAL, *load.spoofed_sources(1999, seed=9)]
    pps = 2500  # each source every 0.8 s
    run = floodd()
    legit = [_legit(lab, a, tmp_path, LEARN + 12) for a in (REAL, OTHER)]
    with load.ReplyCounter(lab, None, ports=forge.FORGED_PORTS) as replies:
        time.sleep(LEARN)
        # The flood: 5 rounds, until nearly every source is banned; then 2 more rounds.
        flood = forge.Forger(lab, forge.rotating_queries(wire, sources, 5, hops=FORGED_HOPS),
                             tmp_path / "rotating.pcap", pps=pps).start()
        sent = flood.wait()
        deadline = time.monotonic() + 8
        while True:
            banned = _dropped_sources(run.kernel(), sources, FORGED_HOPS, ANY)
            if len(banned) >= 0.99 * len(sources) or time.monotonic() >= deadline:
                break
            time.sleep(0.5)
        mitigated = time.time() - flood.started
        answered = replies.packets()
        again = forge.Forger(lab, forge.rotating_queries(wire, sources, 2, hops=FORGED_HOPS),
                             tmp_path / "again.pcap", pps=pps).start().wait()
        time.sleep(0.5)
        answered_again = replies.packets() - answered
    kernel = run.kernel()
    reports = [p.wait() for p in legit]
    scopes = run.scopes(REAL)
    print(f"{sent}; {answered} forged queries answered; {len(banned)} of {len(sources)} "
          f"sources banned {mitigated:.1f} s into the flood; then {answered_again} of "
          f"{again.packets} answered; legit {reports}; real client's scopes {scopes}")

    assert sent.packets == len(sources) * 5 and again.packets == len(sources) * 2
    # Mitigated: each source is banned once it sent its second ANY (how soon: see
    # bench/bench_forged.py); then the flood dies in the kernel.
    assert len(banned) >= 0.99 * len(sources), len(banned)
    assert answered_again <= 0.02 * again.packets, answered_again
    # ANY queries only: no source loses its other queries, the real client keeps its ANY.
    assert all(e.qtype == ANY for e in kernel if e.set not in load.GATE_SETS), kernel
    assert not _dropping(kernel, REAL, forge.REAL_HOPS, ANY)
    for report in reports:
        _served(report, LEARN + 12)
    assert scopes and all(s["qtype"] == "ANY" and forge.REAL_HOPS in s["except_hops"]
                          for s in scopes), scopes


# 4 ----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_real_flooder_at_its_usual_ttl_is_banned_whole_over_udp(
        lab: Lab, floodd: Start, tmp_path: Path, backend: str) -> None:
    run = floodd(backend=backend)
    # The flooder is a real client first: its usual TTL is known, and its flood matches it.
    # A source's hop evidence counts from when its key is established (learn_after after
    # it was first seen), so it is a client for a whole window more: the packets in the
    # flood's window are then all counted at its usual TTL, and no ban is narrowed.
    learn = LEARN + FAST_WINDOW
    legit = _legit(lab, REAL, tmp_path, learn + 6)
    _legit(lab, FLOODER, tmp_path, learn).wait()
    flooder = load.Dnsperf(lab, FLOODER, tmp_path, duration=4, rate=FLOOD_RATE).start()
    delay = run.dropped_when(FLOODER, forge.REAL_HOPS, A, BAN_WITHIN + 1) - flooder.started
    flood = flooder.wait()
    kernel = run.kernel()
    over_udp = lab.dig("www.lab.example", FLOODER, tcp=False)
    over_tcp = lab.dig("www.lab.example", FLOODER, tcp=True)
    scopes = run.scopes(FLOODER)
    report = legit.wait()
    print(f"{backend}: flooder banned after {delay:.2f} s; {flood}; legit {report}; "
          f"scopes {scopes}")

    assert delay <= BAN_WITHIN, delay
    assert flood.sent / flood.runtime >= 0.9 * FLOOD_RATE, flood
    assert flood.completed < flood.sent / 2
    # All of its UDP, whatever the TTL; its TCP stays (UDP evidence never closes TCP).
    for hop in (forge.REAL_HOPS, FORGED_HOPS):
        assert _dropping(kernel, FLOODER, hop, A)
    assert not _dropping(kernel, FLOODER, forge.REAL_HOPS, A, udp=False)
    assert not over_udp and over_tcp
    if backend == "nftables":
        assert {e.set for e in _dropping(kernel, FLOODER, forge.REAL_HOPS, A)} \
            <= load.UDP_SETS
    assert scopes and all(s["protocols"] == "udp" and s["except_hops"] == [] and
                          s["qtype"] is None for s in scopes), scopes
    assert not _dropping(kernel, REAL, forge.REAL_HOPS, A)
    _served(report, LEARN + 6)


# 5 ----------------------------------------------------------------------------------
def test_ipv6_forged_flood_at_another_hop_limit(lab: Lab, wire: load.Wire, floodd: Start,
                                                tmp_path: Path) -> None:
    _forged_flood_at_another_hop_value(lab, wire, floodd, tmp_path, "nftables", REAL6)


# 6 ----------------------------------------------------------------------------------
def test_a_forger_matching_the_real_ttl_gets_udp_bans_only(
        lab: Lab, wire: load.Wire, floodd: Start, tmp_path: Path) -> None:
    """The documented behaviour when nothing tells the forger from the real client: a
    qtype rule drops that type over UDP, a flood over the threshold drops the address's
    UDP; its TCP queries are answered throughout."""
    run = floodd()
    watcher = run.watcher()
    legit = _legit(lab, REAL, tmp_path, LEARN + 9)
    time.sleep(LEARN)
    forge.Forger(lab, forge.forged_queries(wire, REAL, 5, hops=forge.REAL_HOPS, qtype="ANY",
                                           qname="lab.example"),
                 tmp_path / "any.pcap", pps=20).start().wait()
    assert watcher.wait_for([REAL], 4)
    kernel = run.kernel()
    any_scopes = run.scopes(REAL)
    any_udp = lab.dig("lab.example", REAL, qtype="ANY", tcp=False)
    any_tcp = lab.dig("lab.example", REAL, qtype="ANY", tcp=True)
    a_udp = lab.dig("www.lab.example", REAL, tcp=False)
    print(f"ANY at TTL 64: kernel {kernel}; scopes {any_scopes}")
    assert _dropping(kernel, REAL, forge.REAL_HOPS, ANY)
    assert not _dropping(kernel, REAL, forge.REAL_HOPS, A)
    assert not _dropping(kernel, REAL, forge.REAL_HOPS, ANY, udp=False)
    assert not any_udp and any_tcp and a_udp
    assert any_scopes and all(s["protocols"] == "udp" and s["qtype"] == "ANY" and
                              s["except_hops"] == [] for s in any_scopes), any_scopes

    flood = _forged_flood(run, wire, tmp_path, REAL, forge.REAL_HOPS, 3)
    wait_until(lambda: _dropping(run.kernel(), REAL, forge.REAL_HOPS, A), BAN_WITHIN + 1,
               interval=0.1, what="a ban of the address's UDP")
    flood.wait()
    kernel = run.kernel()
    a_tcp = lab.dig("www.lab.example", REAL, tcp=True)
    scopes = run.scopes(REAL)
    report = legit.wait()
    watcher.stop()
    print(f"flood at TTL 64: kernel {kernel}; scopes {scopes}; legit {report}")
    assert not _dropping(kernel, REAL, forge.REAL_HOPS, A, udp=False)
    assert a_tcp
    assert {"qtype": None, "except_hops": [], "protocols": "udp"}.items() \
        <= next(s for s in scopes if s["qtype"] is None).items(), scopes
    assert all(s["protocols"] == "udp" for s in scopes), scopes

