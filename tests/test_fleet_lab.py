"""Two nameservers, one CrowdSec Local API: floodd nodes A and B, each in front of its own
BIND in a lab of its own (lab.netns.Lab), share their bans through a real LAPI (Debian's
crowdsec, started by hand: lab.crowdsec.LocalAPI).

Topology: the LAPI runs in A's server namespace on ``LAPI_A``; a veth pair made here joins
A's and B's server namespaces (``LAPI_A`` - ``LINK_B``, a /30 of 198.18.0.0/15), so B
reaches it; both floodd capture only their client-facing veth.  Intervals are short
(tick 0.25 s, rescan 1 s, pull 0.5 s).
"""

from __future__ import annotations

import re
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import lab_problem
from daemon_helpers import (Floodd, daemon_config, finish, flood, floodd_cli, nft_elements,
                            wait_until, write_config)
from lab.crowdsec import LocalAPI, crowdsec_problem
from lab.netns import Lab

FLOODER = "198.51.100.7"
SECOND = "198.51.100.8"
LAPI_A, LINK_B = "198.19.255.1", "198.19.255.2"
PORT = 18080

pytestmark = pytest.mark.skipif(
    bool(lab_problem()) or bool(crowdsec_problem()) or shutil.which("dnsperf") is None
    or shutil.which("nft") is None,
    reason=lab_problem() or crowdsec_problem() or "needs dnsperf and nft")


class Fleet:
    """Labs A and B with BIND, joined server namespaces, the LAPI in A's, and a floodd
    configuration for each node (started with :meth:`start`)."""

    def __init__(self, tmp: Path, a: Lab, b: Lab, api: LocalAPI) -> None:
        self.tmp, self.labs, self.api = tmp, {"a": a, "b": b}, api
        self.daemons: dict[str, Floodd] = {}
        self.configs: dict[str, Path] = {}
        for name in ("a", "b"):
            run_dir = tmp / name
            run_dir.mkdir()
            password = api.add_machine(f"node-{name}")
            key = api.add_bouncer(f"node-{name}")
            (run_dir / "bouncer.key").write_text(key + "\n")
            (run_dir / "bouncer.key").chmod(0o600)
            self.configs[name] = write_config(run_dir / "floodd.yaml", daemon_config(
                run_dir, crowdsec={"url": api.url, "machine_id": f"node-{name}",
                                   "password": password,
                                   "api_key_file": str(run_dir / "bouncer.key"),
                                   "pull_interval": 0.5}))

    def start(self, name: str) -> Floodd:
        daemon = Floodd(self.labs[name], self.configs[name], f"floodd-{name}")
        self.daemons[name] = daemon
        daemon.start()
        daemon.wait_ready()
        daemon.wait_log(r"fleet link to \S+ is up")
        return daemon

    def banned(self, name: str, source: str) -> dict[str, Any] | None:
        return nft_elements(self.labs[name]).get(source)

    def close(self) -> None:
        for daemon in self.daemons.values():
            daemon.close()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    with Lab("fa") as a, Lab("fb") as b:
        a.start_bind()
        b.start_bind()
        # The link between the two server namespaces, removed again with them (and here).
        veth_a, veth_b = f"{a.server_ns}L"[:15], f"{b.server_ns}L"[:15]
        a.run(a.server_ns, ["ip", "link", "add", veth_a, "type", "veth", "peer", "name",
                            veth_b, "netns", b.server_ns])
        a.run(a.server_ns, ["ip", "addr", "add", f"{LAPI_A}/30", "dev", veth_a])
        b.run(b.server_ns, ["ip", "addr", "add", f"{LINK_B}/30", "dev", veth_b])
        a.run(a.server_ns, ["ip", "link", "set", veth_a, "up"])
        b.run(b.server_ns, ["ip", "link", "set", veth_b, "up"])
        try:
            with LocalAPI(LAPI_A, PORT, netns=a.server_ns) as api:
                the_fleet = Fleet(tmp_path, a, b, api)
                try:
                    yield the_fleet
                finally:
                    the_fleet.close()
        finally:
            a.run(a.server_ns, ["ip", "link", "del", veth_a], check=False)


def _appears(fleet: Fleet, name: str, source: str, timeout: float) -> float:
    """When ``source``'s ban showed up in node ``name``'s kernel (monotonic)."""
    wait_until(lambda: fleet.banned(name, source), timeout, interval=0.02,
               what=f"{source} banned on node {name}")
    return time.monotonic()


def test_a_flood_at_one_node_is_banned_at_the_other_and_lifted_with_it(fleet: Fleet) -> None:
    a, b = fleet.start("a"), fleet.start("b")
    lab_a = fleet.labs["a"]
    lab_a.add_client_address(FLOODER)
    dnsperf = flood(lab_a, fleet.tmp / "a", FLOODER, seconds=4, qps=3000)
    try:
        at_a = _appears(fleet, "a", FLOODER, 10)
        at_b = _appears(fleet, "b", FLOODER, 5)
    finally:
        finish(dnsperf, now=True)
    delay = at_b - at_a
    print(f"A's ban reached B's kernel {delay:.3f} s later")
    assert delay < 2.0
    elem_a, elem_b = fleet.banned("a", FLOODER), fleet.banned("b", FLOODER)
    assert elem_a is not None and elem_b is not None
    # B enforces what A banned (UDP only: A's evidence is UDP), shown as a fleet ban.
    assert "scope=udp rule=query-flood" in elem_a["comment"]
    assert "scope=udp rule=fleet/floodd/query-flood" in elem_b["comment"]
    assert elem_b["set"] == elem_a["set"]
    assert 20 <= elem_b["expires"] <= 30  # the rest of A's 30 s ban
    b.wait_log(rf"notice: ban {FLOODER}/32 \(UDP only\) for \d+ s: fleet/floodd/query-flood")
    # A does not take its own decision back as a fleet ban.
    time.sleep(1.0)
    assert "fleet/" not in (fleet.banned("a", FLOODER) or {}).get("comment", "")
    decisions = fleet.api.decisions()
    assert [d["scenario"] for d in decisions] == ["floodd/query-flood scope=udp"]
    assert f"{FLOODER}" in decisions[0]["message"] and "/s)" in decisions[0]["message"]

    status = b.request("status")["fleet"]
    assert status["state"] == "up" and status["bans"] == 1 and status["decisions"] == 1
    assert a.request("status")["fleet"]["pushed"] == 1
    shown = floodd_cli(fleet.labs["b"], fleet.configs["b"], "status")
    assert re.search(rf"^fleet: {re.escape(fleet.api.url)} up since [\d:]+: 1 fleet bans from "
                     r"1 decisions; 0 bans pushed, 0 waiting$", shown.stdout, re.M), shown.stdout

    # The operator lifts the ban on A: the decision goes, and B lifts it too.
    assert a.request("unban", source=FLOODER)["ok"]
    started = time.monotonic()
    wait_until(lambda: fleet.banned("b", FLOODER) is None, 3, interval=0.02,
               what="B to lift the ban")
    print(f"A's unban reached B's kernel {time.monotonic() - started:.3f} s later")
    b.wait_log(rf"info: unban {FLOODER}/32 \(UDP only\): the fleet's decision is over")
    assert fleet.api.decisions() == []
    for daemon in (a, b):
        assert "Traceback" not in daemon.log() and "error:" not in daemon.log()


def test_both_nodes_keep_banning_while_the_lapi_is_down_and_catch_up(fleet: Fleet) -> None:
    a, b = fleet.start("a"), fleet.start("b")
    lab_a, lab_b = fleet.labs["a"], fleet.labs["b"]
    lab_a.add_client_address(FLOODER)
    lab_b.add_client_address(SECOND)
    fleet.api.stop(signal.SIGKILL)  # mid-flood: the LAPI dies
    floods = [flood(lab_a, fleet.tmp / "a", FLOODER, seconds=4, qps=3000),
              flood(lab_b, fleet.tmp / "b", SECOND, seconds=4, qps=3000)]
    try:
        _appears(fleet, "a", FLOODER, 10)  # each node still bans on its own
        _appears(fleet, "b", SECOND, 10)
        for daemon in (a, b):
            daemon.wait_log(r"warning: fleet link to \S+ lost: ")
        status = a.request("status")["fleet"]
        assert status["state"] == "down" and status["queued"] >= 1, status
        assert fleet.banned("b", FLOODER) is None and fleet.banned("a", SECOND) is None
    finally:
        finish(*floods, now=True)
    time.sleep(1.5)  # a few failed attempts: the journal says it once
    assert len([line for line in a.log().splitlines() if "fleet link" in line
                and "lost" in line]) == 1

    back = time.monotonic()
    fleet.api.start()
    # The queued pushes are delivered; each node gets the other's ban.
    _appears(fleet, "b", FLOODER, 15)
    _appears(fleet, "a", SECOND, 15)
    print(f"caught up {time.monotonic() - back:.3f} s after the LAPI came back")
    for daemon in (a, b):
        daemon.wait_log(r"notice: fleet link to \S+ is back")
        assert daemon.request("status")["fleet"]["state"] == "up"
        assert "Traceback" not in daemon.log()
    assert "fleet/floodd/query-flood" in (fleet.banned("b", FLOODER) or {})["comment"]
    assert "fleet/floodd/query-flood" in (fleet.banned("a", SECOND) or {})["comment"]
