"""The daemon's fast drop (floodd.service.fastdrop) with a real ``floodd run``, BIND and
dnsperf in a lab: the kernel's meters drop a flood far over the rule's rate with no help
from floodd's counting, spare the whitelist and a client under the rate, are reported
(journal, status), follow a reload, and go with floodd.

floodd's capture filter leaves the flooders out here (``capture.bpf_filter``), so that what
is dropped is the kernel's doing alone: with the capture seeing them, floodd's own ban
follows within milliseconds and takes over (bench/bench_e2e.py measures that race)."""

from __future__ import annotations

import ipaddress
import json
import shutil
import signal
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from daemon_helpers import (Floodd, daemon_config, finish, flood, floodd_cli, nft_table,
                            wait_until, write_config)
from floodd.config import build_config
from floodd.decide.safety import LOOPBACK
from floodd.service.fastdrop import spared_networks
from lab.load import Dnsperf

FLOODER = "198.51.100.7"
SPARED = "198.51.100.8"  # whitelisted, floods as hard
LEGIT = "198.51.100.9"

pytestmark = pytest.mark.skipif(shutil.which("dnsperf") is None or shutil.which("nft") is None,
                                reason="needs dnsperf and nft")

Start = Callable[..., Floodd]


@pytest.fixture
def floodd(dns_lab: Any) -> Iterator[Start]:
    started: list[Floodd] = []

    def start(config: Path) -> Floodd:
        daemon = Floodd(dns_lab, config)
        started.append(daemon)
        return daemon.start()
    yield start
    for daemon in started:
        print(daemon.log()[-3000:])
        daemon.close()


def _config(run_dir: Path, whitelist: list[str], backend: str = "nftables") -> Path:
    # 1,000 queries in 2 s, x2 in the kernel: a source over 1,000/s, bucket 1,000
    return write_config(run_dir / "floodd.yaml", daemon_config(
        run_dir, whitelist=whitelist, fast_drop={"factor": 2, "hold": 3},
        firewall={"backend": backend},
        capture={"bpf_filter": f"not src host {FLOODER} and not src host {SPARED}"}))


def _fast_table(lab: Any) -> str:
    proc = lab.run(lab.server_ns, ["nft", "list", "table", "inet", "floodd_fast"], check=False,
                   text=True)
    return proc.stdout if proc.returncode == 0 else ""


def test_the_kernel_drops_a_flood_far_over_the_rate_and_spares_the_rest(
        dns_lab: Any, floodd: Start, tmp_path: Path, backend_name: str) -> None:
    """With either backend for the bans: the meters are an nftables table of their own."""
    for address in (FLOODER, SPARED, LEGIT):
        dns_lab.add_client_address(address)
    cfg = _config(tmp_path, ["127.0.0.0/8", f"{SPARED}/32"], backend_name)
    daemon = floodd(cfg)
    daemon.wait_ready()
    daemon.wait_log(r"fast drop: the kernel drops at once the UDP queries of a source and TTL "
                    r"sending query-flood over 1,000 q/s \(x2 the rule's rate\), until 3 s "
                    r"after; at most 10000 at once")
    table = _fast_table(dns_lab)
    assert f"{SPARED}" in table and "127.0.0.0/8" in table, table
    legit = Dnsperf(dns_lab, LEGIT, tmp_path, duration=4, rate=100, interval=1).start()
    floods = [flood(dns_lab, tmp_path, source, seconds=3, qps=5000)
              for source in (FLOODER, SPARED)]
    found = daemon.wait_log(r"fast drop: the kernel dropped (\d+) UDP queries from "
                            rf"{FLOODER} \(TTL/hop limit 64\): query-flood over 1,000 q/s",
                            timeout=10)
    assert int(found.group(1)) > 0
    finish(*floods)
    report = legit.wait()
    status = daemon.request("status")
    fast = status["fast_drop"]
    assert fast["meters"] == [{"rule": "query-flood", "rate": 1000.0, "burst": 1000}]
    assert fast["packets"] >= int(found.group(1))
    log = daemon.log()
    assert SPARED not in log.split("fast drop: the kernel drops at once")[1], log[-2000:]
    assert report.answered >= 0.99, report  # 100 q/s: never over the rate
    assert LEGIT not in log.split("fast drop: the kernel drops at once")[1]
    # floodd's own counting never saw the flooders: no ban of its own
    assert daemon.request("bans")["bans"] == []
    shown = floodd_cli(dns_lab, cfg, "status")
    assert "fast drop (query-flood over 1,000 q/s): " in shown.stdout, shown.stdout

    # A reload follows the whitelist into the kernel's spare set.
    _config(tmp_path, ["127.0.0.0/8", f"{SPARED}/32", f"{FLOODER}/32"], backend_name)
    daemon.send(signal.SIGHUP)
    wait_until(lambda: FLOODER in _fast_table(dns_lab).split("set meter4_0")[0], 10,
               what="the reloaded whitelist in spare4")

    # A table removed by someone else is set up again at the next rescan.
    dns_lab.run(dns_lab.server_ns, ["nft", "delete", "table", "inet", "floodd_fast"])
    daemon.wait_log(r"repair: the fast drop's table could not be read \(nft -j list failed: "
                    r".*\); set up again")
    assert "set meter4_0" in _fast_table(dns_lab)

    assert daemon.stop() == 0
    assert _fast_table(dns_lab) == ""  # the meters go with floodd
    if backend_name == "nftables":
        assert nft_table(dns_lab) is not None  # its bans' table stays (on_exit: keep)


def test_off_and_a_leftover_table_is_removed(dns_lab: Any, floodd: Start,
                                             tmp_path: Path) -> None:
    dns_lab.run(dns_lab.server_ns, ["nft", "add", "table", "inet", "floodd_fast"])
    cfg = write_config(tmp_path / "floodd.yaml",
                       daemon_config(tmp_path, fast_drop={"factor": 0}))
    daemon = floodd(cfg)
    daemon.wait_ready()
    assert daemon.request("status")["fast_drop"] is None
    assert _fast_table(dns_lab) == ""
    daemon.stop()


def test_spared_networks_are_the_ones_floodd_never_bans() -> None:
    config = build_config({"whitelist": ["192.0.2.0/24"]})
    own = [ipaddress.ip_network("192.0.2.53/32"), ipaddress.ip_network("2001:db8::53/128")]
    assert spared_networks(config, own) == (ipaddress.ip_network("192.0.2.0/24"), *own,
                                            *LOOPBACK)
    assert json.dumps([str(n) for n in spared_networks(build_config({}), [])]) == \
        '["127.0.0.0/8", "::1/128"]'
