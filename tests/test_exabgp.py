"""``floodd exabgp`` as ExaBGP's API process, against a real BGP peer: BIRD 2 in the lab's
client namespace (the upstream router), ExaBGP and floodd in the server namespace, BIND
answering and dnsperf flooding.

The link is configured small (``link_capacity: 1M``, trigger 80 %) so that a dnsperf
flood of 5,000 queries/s (about 3 Mbit/s) is over it; intervals are short (poll 0.25 s,
sustain 0.5 s, hold 2 s).  What BIRD learned is read back with ``birdc show route table
flowtab4 all``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from daemon_helpers import (FLOODD, Floodd, daemon_config, finish, floodd_cli, nft_elements,
                            query_file, wait_until, write_config)
from lab.bgp import Bird, ExaBGP, available, exabgp_config
from lab.netns import GATEWAY_V4

FLOODER = "198.51.100.7"
OTHER = "203.0.113.8"
WHITELISTED = "203.0.113.66"
ROUTER_AS, SERVER_AS = 65000, 65053

pytestmark = pytest.mark.skipif(
    not available() or shutil.which("dnsperf") is None or shutil.which("nft") is None,
    reason="needs bird2, exabgp, dnsperf and nft")


def upstream(**overrides: Any) -> dict[str, Any]:
    return {"enabled": True, "link_capacity": "1M", "trigger": 0.8, "sustain": 0.5,
            "hold": 2, "poll_interval": 0.25, **overrides}


def write(run_dir: Path, lab: Any, **overrides: Any) -> Path:
    return write_config(run_dir / "floodd.yaml", daemon_config(
        run_dir, capture={"interfaces": [lab.server_if]}, upstream=upstream(**overrides),
        whitelist=["127.0.0.0/8", f"{WHITELISTED}/32"]))


class Upstream:
    """floodd, BIRD in the client namespace and ExaBGP running ``floodd exabgp`` in the
    server namespace, peering over the lab link."""

    def __init__(self, lab: Any, run_dir: Path, config: Path) -> None:
        self.lab = lab
        self.run_dir = run_dir
        self.config = config
        self.floodd = Floodd(lab, config)
        self.bird = Bird(run_dir, lab.client_ns, router_id=GATEWAY_V4, local=GATEWAY_V4,
                         neighbor=lab.server_v4, local_as=ROUTER_AS, peer_as=SERVER_AS)
        self.exabgp: ExaBGP | None = None
        self.exabgp_logs: list[str] = []

    def start(self) -> Upstream:
        self.floodd.start()
        self.floodd.wait_ready()
        self.bird.start()
        self.start_exabgp()
        return self

    def start_exabgp(self) -> float:
        """ExaBGP (a new one); when the session came up."""
        command = [*FLOODD, "exabgp", "-c", str(self.config)]
        self.exabgp = ExaBGP(self.run_dir, self.lab.server_ns, exabgp_config(
            command, local=self.lab.server_v4, neighbor=GATEWAY_V4, local_as=SERVER_AS,
            peer_as=ROUTER_AS)).start()
        self.bird.wait_established()
        return time.monotonic()

    def stop_exabgp(self) -> None:
        assert self.exabgp is not None
        self.exabgp.stop()
        self.exabgp_logs.append(self.exabgp.log())
        self.exabgp.close()
        self.exabgp = None

    def log(self) -> str:
        return "".join(self.exabgp_logs) + (self.exabgp.log() if self.exabgp else "")

    def sources(self) -> list[str]:
        """The sources of BIRD's FlowSpec routes."""
        return sorted(r.part("src") or "" for r in self.bird.flow_routes())

    def close(self) -> None:
        if self.exabgp is not None:
            self.stop_exabgp()
        self.bird.close()
        self.floodd.close()


@pytest.fixture
def started(dns_lab: Any, tmp_path: Path) -> Iterator[list[Upstream]]:
    """Every :class:`Upstream` a test starts, closed at the end."""
    made: list[Upstream] = []
    yield made
    for one in made:
        # pytest shows what a failed test printed: ExaBGP's log, the feeder's lines in it
        print(one.log()[-6000:])
        one.close()


def start(made: list[Upstream], lab: Any, run_dir: Path, config: Path) -> Upstream:
    one = Upstream(lab, run_dir, config)
    made.append(one)
    return one.start()


def flood(lab: Any, run_dir: Path, source: str, seconds: float, qps: int = 5000
          ) -> subprocess.Popen[bytes]:
    """dnsperf from ``source`` at ``qps`` for ``seconds``, as many queries outstanding as
    it sends in a second: a banned source gets no answers, and the flood must go on at
    its rate anyway (with daemon_helpers.flood's 500 it would fall to 500 queries/s)."""
    proc: subprocess.Popen[bytes] = lab.popen(
        lab.client_ns,
        ["dnsperf", "-s", lab.server_v4, "-a", source, "-d", str(query_file(run_dir)),
         "-l", f"{seconds:g}", "-c", "4", "-Q", str(qps), "-q", str(qps), "-t", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc


def feeders(config: Path) -> list[int]:
    """The pids of ``floodd exabgp -c CONFIG`` processes."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "exabgp" in argv and str(config) in argv and "floodd" in argv:
            found.append(int(pid))
    return found


def ban_seen(lab: Any, source: str) -> float:
    wait_until(lambda: source in nft_elements(lab), 15, interval=0.02,
               what=f"the ban of {source}")
    return time.monotonic()


def test_a_flood_over_the_link_announces_the_banned_source_and_withdraws_it_after(
        dns_lab: Any, tmp_path: Path, started: list[Upstream]) -> None:
    up = start(started, dns_lab, tmp_path, write(tmp_path, dns_lab))
    assert up.bird.flow_routes() == []
    dns_lab.add_client_address(FLOODER)
    dnsperf = flood(dns_lab, tmp_path, FLOODER, seconds=4)
    banned_at = ban_seen(dns_lab, FLOODER)
    wait_until(lambda: up.sources() == [f"{FLOODER}/32"], 5, interval=0.02,
               what="the FlowSpec route in BIRD")
    delay = time.monotonic() - banned_at
    print(f"ban -> FlowSpec route in BIRD: {delay:.2f} s")
    assert delay < 2.0
    [route] = up.bird.flow_routes()
    assert route.part("dst") == f"{dns_lab.server_v4}/32"
    assert route.part("proto") == "17" and route.part("dport") == "53"
    assert route.discards, route

    finish(dnsperf)
    ended_at = time.monotonic()
    wait_until(lambda: up.bird.flow_routes() == [], 10, interval=0.05,
               what="the route withdrawn after the flood")
    calm = time.monotonic() - ended_at
    print(f"flood end -> withdrawn: {calm:.2f} s (hold 2 s)")
    # Held 2 s, not withdrawn at the first quiet poll (dnsperf waits up to 1 s for its
    # last answers after its last query: the link was quiet before finish() returned).
    assert calm >= 0.9
    log = up.log()
    assert f"announcing {FLOODER}/32" in log, log
    assert re.search(r"flood over: .* under 80% of the link for [2-9] s", log), log
    assert "ExaBGP refused" not in log, log


def test_whitelisted_sources_never_go_upstream_and_a_restart_announces_the_set_again(
        dns_lab: Any, tmp_path: Path, started: list[Upstream]) -> None:
    up = start(started, dns_lab, tmp_path, write(tmp_path, dns_lab, hold=4))
    for source in (FLOODER, OTHER, WHITELISTED):
        dns_lab.add_client_address(source)
    # The operator bans a whitelisted source anyway: floodd drops it, upstream never does.
    forced = floodd_cli(dns_lab, up.config, "ban", WHITELISTED, "--force", "--for", "1m")
    assert forced.returncode == 0, forced.stderr
    floods = [flood(dns_lab, tmp_path, s, seconds=8, qps=3000)
              for s in (FLOODER, OTHER, WHITELISTED)]
    wanted = sorted([f"{FLOODER}/32", f"{OTHER}/32"])
    wait_until(lambda: up.sources() == wanted, 10, interval=0.05, what="both flooders")
    assert f"not announcing {WHITELISTED}/32: whitelisted" in up.log()

    # ExaBGP restarts: the session drops, BIRD forgets every route, and the new feeder
    # announces the whole set at once.
    up.stop_exabgp()
    wait_until(lambda: up.bird.flow_routes() == [], 5, what="BIRD dropping the routes")
    wait_until(lambda: not feeders(up.config), 5, what="the feeder ending with ExaBGP")
    up_at = up.start_exabgp()
    wait_until(lambda: up.sources() == wanted, 5, interval=0.02, what="the set again")
    print(f"session up -> set announced again: {time.monotonic() - up_at:.2f} s")
    assert "taking up the flood" in up.log()
    finish(*floods)
    wait_until(lambda: up.bird.flow_routes() == [], 15, what="the routes withdrawn")
    assert up.sources() == []


def test_the_blackhole_comes_only_when_configured_and_goes_with_the_flood(
        dns_lab: Any, tmp_path: Path, started: list[Upstream]) -> None:
    config = write(tmp_path, dns_lab, blackhole=True, blackhole_address=dns_lab.server_v4,
                   blackhole_after=1)
    up = start(started, dns_lab, tmp_path, config)
    dns_lab.add_client_address(FLOODER)
    dnsperf = flood(dns_lab, tmp_path, FLOODER, seconds=5)
    wait_until(lambda: up.sources() == [f"{FLOODER}/32"], 10, what="the FlowSpec route")
    # BIRD's FlowSpec drops nothing: the flood goes on over the link, and the blackhole
    # follows blackhole_after later.
    wait_until(lambda: up.bird.blackholes() == [f"{dns_lab.server_v4}/32"], 5,
               what="the blackhole route")
    finish(dnsperf)
    wait_until(lambda: up.bird.blackholes() == [] and up.bird.flow_routes() == [], 10,
               what="everything withdrawn")


def test_dry_run_announces_nothing(dns_lab: Any, tmp_path: Path,
                                   started: list[Upstream]) -> None:
    up = start(started, dns_lab, tmp_path, write(tmp_path, dns_lab, dry_run=True))
    dns_lab.add_client_address(FLOODER)
    dnsperf = flood(dns_lab, tmp_path, FLOODER, seconds=3)
    wait_until(lambda: "would send: announce flow route source 198.51.100.7/32" in up.log(),
               10, what="the dry run's line")
    assert up.bird.flow_routes() == []
    finish(dnsperf)


def test_errors_are_one_line(dns_lab: Any, tmp_path: Path) -> None:
    off = write_config(tmp_path / "off.yaml", daemon_config(tmp_path))
    proc = floodd_cli(dns_lab, off, "exabgp")
    assert proc.returncode == 2
    assert proc.stderr == (f"floodd: exabgp: upstream.enabled is not true in {off}: nothing "
                           "would be announced\n")
    proc = floodd_cli(dns_lab, write(tmp_path, dns_lab), "exabgp", "-i", "nosuch0")
    assert proc.returncode == 2
    assert proc.stderr == ("floodd: exabgp: no interface nosuch0 here "
                           "(/sys/class/net/nosuch0 does not exist)\n")


def test_a_peer_that_restarts_gets_the_set_again_from_exabgp(
        dns_lab: Any, tmp_path: Path, started: list[Upstream]) -> None:
    """The BGP session drops (the router restarts): ExaBGP keeps what the feeder
    announced and sends it again when the session is back; the feeder does nothing."""
    up = start(started, dns_lab, tmp_path, write(tmp_path, dns_lab, hold=30))
    dns_lab.add_client_address(FLOODER)
    dnsperf = flood(dns_lab, tmp_path, FLOODER, seconds=3)
    wait_until(lambda: up.sources() == [f"{FLOODER}/32"], 10, what="the FlowSpec route")
    finish(dnsperf)
    restarted = time.monotonic()
    up.bird.stop()
    up.bird.start()
    up.bird.wait_established(timeout=60)
    wait_until(lambda: up.sources() == [f"{FLOODER}/32"], 5, what="the route again")
    print(f"router restart -> route again: {time.monotonic() - restarted:.2f} s")
    assert up.log().count(f"announcing {FLOODER}/32") == 1
