"""``floodd run`` as a real process in lab namespaces: systemd's notify protocol, journald,
reload, stop, crash and restart, a dying capture, the control socket, and the safety limits.

Every daemon runs under ``ip netns exec`` in the server namespace of its own lab, with BIND
answering and dnsperf flooding from client addresses; the bans are read back from the
kernel with ``nft``.  Intervals are configured short (tick 0.25 s, rescan 1 s).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from floodd.detect.capture import CaptureStats
from floodd.detect.parse import Batch
from floodd.errors import FlooddError

from conftest import backend_problem
from daemon_helpers import (FLOODD, Floodd, capture_interfaces, daemon_config, finish, flood,
                            floodd_cli, ifindex, nft_elements, nft_table,
                            packets, wait_until, write_config)
from faults import FaultyCommand

FLOODER = "198.51.100.7"
STATUS_FIGURES = re.compile(r"^\d+ packets/s, \d+ kernel drops, \d+ bans"
                            r"(, counting 1 in \d+ packets)?(, \d+ bans kept out of the capture)?$")

pytestmark = pytest.mark.skipif(shutil.which("dnsperf") is None or shutil.which("nft") is None,
                                reason="needs dnsperf and nft")

Start = Callable[..., Floodd]


@pytest.fixture
def floodd(dns_lab: Any) -> Iterator[Start]:
    """``floodd(config, name="floodd", **kw)``: a started :class:`Floodd` in the lab; every
    one started is killed at the end (also when the test fails)."""
    started: list[Floodd] = []

    def start(config: Path, name: str = "floodd", **kw: Any) -> Floodd:
        daemon = Floodd(dns_lab, config, name, **kw)
        started.append(daemon)
        return daemon.start()
    yield start
    for daemon in started:
        daemon.close()


def config(run_dir: Path, name: str = "floodd.yaml", **sections: Any) -> Path:
    return write_config(run_dir / name, daemon_config(run_dir, **sections))


def bans_logged(log: str) -> list[str]:
    """The networks of every ``ban NET [(SCOPE)] for ...`` line (not ``would ban``)."""
    return re.findall(r"(?:^|: )ban (\S+) (?:\([^)]*\) )?for ", log, re.M)


def offences(run_dir: Path) -> dict[str, list[float]]:
    data: dict[str, list[float]] = json.loads(
        (run_dir / "state" / "offences.json").read_text())["offences"]
    return data


# --- systemd's notify protocol -----------------------------------------------------------
def test_notify_ready_status_watchdog_reload_stop(dns_lab: Any, floodd: Start,
                                                  tmp_path: Path) -> None:
    at_ready: list[tuple[bool, set[int]]] = []

    def on_ready(fields: dict[str, str]) -> None:
        at_ready.append((nft_table(dns_lab) is not None, capture_interfaces(daemon.pid)))

    daemon = Floodd(dns_lab, config(tmp_path), watchdog_usec=1_000_000, on_ready=on_ready)
    try:
        daemon.start()
        ready_at = daemon.wait_ready()
        assert not daemon.notify.errors
        table_there, interfaces = at_ready[0]
        assert table_there, "READY=1 came before the nftables table existed"
        assert ifindex(dns_lab, dns_lab.server_ns, dns_lab.server_if) in interfaces, \
            "READY=1 came before the capture was open"
        ready = daemon.notify.with_key("READY", "1")[0][1]
        assert STATUS_FIGURES.match(ready["STATUS"]), ready
        before = [m for t, m in daemon.notify.snapshot() if t < ready_at]
        assert not any("WATCHDOG" in m for m in before)

        # WATCHDOG=1 keeps coming, well within WATCHDOG_USEC; STATUS carries figures.
        wait_until(lambda: len(daemon.notify.with_key("WATCHDOG", "1")) >= 5, 10,
                   what="five watchdog pings")
        pings = [t for t, _ in daemon.notify.with_key("WATCHDOG", "1")]
        gaps = [b - a for a, b in zip([ready_at, *pings], pings)]
        assert max(gaps) < 1.0, gaps
        statuses = [m["STATUS"] for _, m in daemon.notify.with_key("STATUS")]
        assert all(STATUS_FIGURES.match(s) for s in statuses), statuses

        hup = time.monotonic()
        daemon.send(signal.SIGHUP)
        reloading_at, reloading = daemon.notify.wait_for("RELOADING", "1", since=hup)
        assert int(reloading["MONOTONIC_USEC"]) > 0
        again_at, _ = daemon.notify.wait_for("READY", "1", since=reloading_at)
        assert reloading_at <= again_at
        daemon.wait_log(r"info: reloaded .*floodd\.yaml: 1 rules")

        term = time.monotonic()
        daemon.send(signal.SIGTERM)
        assert daemon.proc is not None
        assert daemon.proc.wait(timeout=2) == 0
        assert time.monotonic() - term < 2
        stopping_at, _ = daemon.notify.wait_for("STOPPING", "1", since=term, timeout=1)
        later = [m for t, m in daemon.notify.snapshot() if t > stopping_at]
        assert not any("READY" in m or "WATCHDOG" in m for m in later), later
        assert "Traceback" not in daemon.log()
    finally:
        daemon.close()


# --- journald ------------------------------------------------------------------------------


def test_ban_is_a_structured_journal_entry(journald: None, dns_lab: Any, floodd: Start,
                                           tmp_path: Path) -> None:
    dns_lab.add_client_address(FLOODER)
    daemon = floodd(config(tmp_path))
    daemon.wait_ready()
    assert daemon.journal
    dnsperf = flood(dns_lab, tmp_path, FLOODER, seconds=2)

    def ban_entry() -> dict[str, Any] | None:
        return next((e for e in daemon.journal_entries() if e.get("FLOODD_ACTION") == "ban"),
                    None)
    entry = wait_until(ban_entry, 15, interval=0.2, what="a ban in the journal")
    finish(dnsperf)
    assert entry["SYSLOG_IDENTIFIER"] == "floodd"
    assert entry["PRIORITY"] == "5"  # notice
    assert entry["FLOODD_SOURCE"] == f"{FLOODER}/32"
    assert entry["FLOODD_RULE"] == "query-flood"
    assert float(entry["FLOODD_RATE"]) >= 500  # over 1000 packets in the 2 s window
    assert int(entry["FLOODD_PACKETS"]) > 1000
    assert float(entry["FLOODD_BAN_TIME"]) == 30
    assert entry["MESSAGE"].startswith(
        f"ban {FLOODER}/32 (UDP only) for 30 s: rule query-flood, ")
    start = next(e for e in daemon.journal_entries() if e.get("FLOODD_ACTION") == "start")
    assert start["PRIORITY"] == "6"  # info
    assert daemon.stop() == 0
    stop = wait_until(lambda: [e for e in daemon.journal_entries()
                               if e.get("FLOODD_ACTION") == "stop"], 5, what="the stop entry")
    assert stop[0]["MESSAGE"] == "stopped; 1 bans kept in the firewall"
    # Without a terminal, nothing is written twice: stderr stays empty.
    assert daemon.log_path.read_text() == ""


# --- reload ------------------------------------------------------------------------------
def test_reload_refuses_a_broken_config_and_applies_a_good_one(
        dns_lab: Any, floodd: Start, tmp_path: Path) -> None:
    for source in (FLOODER, "198.51.100.8"):
        dns_lab.add_client_address(source)
    cfg = config(tmp_path)
    good = cfg.read_text()
    daemon = floodd(cfg)
    daemon.wait_ready()

    broken = [("threshold: lots", r"config error: \S+floodd\.yaml: rules\[0\]\.threshold: "
               r"expected a positive integer, got 'lots'"),
              ("bpf filter", r"bad capture filter")]
    for what, error in broken:
        data = daemon_config(tmp_path)
        if what == "bpf filter":
            data["capture"] = {"bpf_filter": "udp and ((("}
        else:
            data["rules"][0]["threshold"] = "lots"
        write_config(cfg, data)
        hup = time.monotonic()
        daemon.send(signal.SIGHUP)
        daemon.wait_log(r"error: reload failed, keeping the old configuration: " + error)
        reloading_at, _ = daemon.notify.wait_for("RELOADING", "1", since=hup)
        daemon.notify.wait_for("READY", "1", since=reloading_at)
        assert daemon.running()

    # The old rule still bans.
    finish(flood(dns_lab, tmp_path, FLOODER, seconds=1))
    daemon.wait_log(rf"ban {FLOODER}/32 \(UDP only\) for 30 s: rule query-flood,")
    assert FLOODER in nft_elements(dns_lab)

    # A good, changed configuration is applied: a new rule name and a smaller ban time.
    cfg.write_text(good.replace("query-flood", "hup-flood").replace("ban_time: 30",
                                                                     "ban_time: 20"))
    daemon.send(signal.SIGHUP)
    daemon.wait_log(r"info: reloaded \S+floodd\.yaml: 1 rules")
    finish(flood(dns_lab, tmp_path, "198.51.100.8", seconds=1))
    daemon.wait_log(r"ban 198\.51\.100\.8/32 \(UDP only\) for 20 s: rule hup-flood,")
    comment = nft_elements(dns_lab)["198.51.100.8"]["comment"]
    assert comment.endswith("rule=hup-flood")
    # The figures stay sane across the reload (the packet rate never goes negative).
    statuses = [m["STATUS"] for _, m in daemon.notify.with_key("STATUS")]
    assert all(STATUS_FIGURES.match(s) for s in statuses), sorted(set(statuses))
    assert "Traceback" not in daemon.log()
    assert daemon.stop() == 0


def _packets_from(daemon: Floodd, source: str) -> int:
    """What ``top`` shows for ``source`` (0 if it is not listed)."""
    return next((row["packets"] for row in daemon.request("top", n=20)["top"]
                 if row["source"] == source), 0)


def test_reload_keeps_the_counts_of_unchanged_rules(dns_lab: Any, floodd: Start,
                                                    tmp_path: Path) -> None:
    dns_lab.add_client_address(FLOODER)
    rule = {"name": "query-flood", "match": "all", "threshold": 5000, "window": 10,
            "ban_time": 30}
    cfg = config(tmp_path, rules=[rule])
    daemon = floodd(cfg)
    daemon.wait_ready()
    finish(flood(dns_lab, tmp_path, FLOODER, seconds=1, qps=500))
    before = wait_until(lambda: _packets_from(daemon, FLOODER), 5, what="the flood counted")
    # A new threshold and ban time, and a new rule: the 10 s table is the same one.
    write_config(cfg, daemon_config(tmp_path, rules=[
        {**rule, "threshold": 4000, "ban_time": 60},
        {"name": "any-queries", "match": "ANY", "threshold": 4, "window": 10,
         "ban_time": 30}]))
    daemon.send(signal.SIGHUP)
    daemon.wait_log(r"info: reloaded \S+floodd\.yaml: 2 rules")
    assert _packets_from(daemon, FLOODER) >= before > 100
    assert "Traceback" not in daemon.log()
    assert daemon.stop() == 0


# --- SIGTERM: bans kept, or flushed --------------------------------------------------------
def test_sigterm_keeps_bans_and_on_exit_flush_removes_them(dns_lab: Any, floodd: Start,
                                                           tmp_path: Path) -> None:
    dns_lab.add_client_address(FLOODER)
    daemon = floodd(config(tmp_path))
    daemon.wait_ready()
    dnsperf = flood(dns_lab, tmp_path, FLOODER, seconds=1)
    daemon.wait_log(rf"ban {FLOODER}/32 \(UDP only\) for 30 s")
    finish(dnsperf)
    term = time.monotonic()
    assert daemon.stop(timeout=5) == 0
    assert time.monotonic() - term < 2
    assert "stopped; 1 bans kept in the firewall" in daemon.log()
    assert FLOODER in nft_elements(dns_lab)
    assert not os.path.exists(daemon.control_socket)

    flushing = floodd(config(tmp_path, "flush.yaml", firewall={"on_exit": "flush"}), "flush")
    flushing.wait_ready()
    flushing.wait_log("1 bans adopted")  # logged just after READY=1
    term = time.monotonic()
    assert flushing.stop(timeout=5) == 0
    assert time.monotonic() - term < 2
    assert "stopped; 1 bans flushed (on_exit: flush)" in flushing.log()
    assert nft_table(dns_lab) is None


# --- kill -9 and restart ----------------------------------------------------------------
def test_restart_after_kill_9_adopts_bans_without_unbanning(dns_lab: Any, floodd: Start,
                                                            tmp_path: Path) -> None:
    dns_lab.add_client_address(FLOODER)
    cfg = config(tmp_path)
    first = floodd(cfg, "first")
    first.wait_ready()
    dnsperf = flood(dns_lab, tmp_path, FLOODER, seconds=15, qps=2000)
    first.wait_log(rf"ban {FLOODER}/32 \(UDP only\) for 30 s")

    samples: list[dict[str, Any] | None] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            samples.append(nft_elements(dns_lab).get(FLOODER))
            time.sleep(0.05)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        wait_until(lambda: samples and packets(samples[-1]) > 0, 10,
                   what="the ban's counter to count")
        assert first.stop(signal.SIGKILL) == -signal.SIGKILL
        at_kill = len(samples)
        assert os.path.exists(first.control_socket)  # left behind

        second = floodd(cfg, "second")
        second.wait_ready()
        second.wait_log("1 bans adopted")  # logged just after READY=1
        # Two rescans later the ban still counts, the restarted daemon reads it.
        wait_until(lambda: len(samples) > at_kill + 5 and packets(samples[-1]) >
                   packets(samples[at_kill]), 10, what="the counter to keep growing")
        time.sleep(2.5)  # two rescans of the restarted daemon: it must not unban
        reply = second.request("bans")
    finally:
        done.set()
        watcher.join(timeout=5)
    finish(dnsperf, now=True)

    assert all(s is not None for s in samples), "the ban vanished during the restart"
    counts = [packets(s) for s in samples if s is not None]
    assert counts == sorted(counts), "the ban's counter was reset"
    since = {re.search(r"since=(\d+)", s["comment"]).group(1)  # type: ignore[union-attr]
             for s in samples if s is not None}
    assert len(since) == 1, since
    assert [b["source"] for b in reply["bans"]] == [f"{FLOODER}/32"]
    assert reply["bans"][0]["rule"] == "query-flood"
    log = second.log()
    assert "unban" not in log and bans_logged(log) == []
    shown = floodd_cli(dns_lab, cfg, "bans")
    assert shown.returncode == 0
    assert re.search(rf"^{re.escape(FLOODER)}\s+UDP only\s+query-flood\s", shown.stdout, re.M)
    assert second.stop() == 0


# --- repair --------------------------------------------------------------------------------
def test_deleted_table_is_repaired_with_its_bans(dns_lab: Any, floodd: Start,
                                                 tmp_path: Path) -> None:
    dns_lab.add_client_address(FLOODER)
    daemon = floodd(config(tmp_path))
    daemon.wait_ready()
    finish(flood(dns_lab, tmp_path, FLOODER, seconds=1))
    daemon.wait_log(rf"ban {FLOODER}/32 \(UDP only\) for 30 s")
    dns_lab.run(dns_lab.server_ns, ["nft", "delete", "table", "inet", "floodd"])
    daemon.wait_log(r"warning: repair: floodd's firewall table is gone; re-created 1 bans")
    element = wait_until(lambda: nft_elements(dns_lab).get(FLOODER), 5, what="the ban back")
    assert element["comment"].endswith("rule=query-flood") and element["timeout"] <= 30
    assert not dns_lab.dig("www.lab.example", source=FLOODER)
    assert daemon.stop() == 0


def test_reload_makes_the_drop_rules_follow_the_dns_ports(dns_lab: Any, floodd: Start,
                                                          tmp_path: Path) -> None:
    cfg = config(tmp_path)
    daemon = floodd(cfg)
    daemon.wait_ready()

    def drop_rules() -> list[str]:
        chain = dns_lab.run(dns_lab.server_ns, ["nft", "list", "chain", "inet", "floodd",
                                                "input"], text=True, check=False).stdout
        return [line.strip() for line in chain.splitlines() if " drop " in line]
    # whole-source bans drop both protocols, the narrower scopes (UDP only, hop values,
    # the gates of qtype bans are jumps) UDP
    rules = drop_rules()
    assert len(rules) == 10 and \
        sum(rule.startswith("meta l4proto { tcp, udp } th dport 53 ") for rule in rules) == 4 \
        and sum(rule.startswith("udp dport 53 ") for rule in rules) == 6, rules
    write_config(cfg, daemon_config(tmp_path, capture={"ports": [53, 5353],
                                                       "protocols": ["udp"]}))
    daemon.send(signal.SIGHUP)
    daemon.wait_log(r"info: reloaded \S+floodd\.yaml")
    assert all(rule.startswith("udp dport { 53, 5353 } ") for rule in drop_rules()), \
        drop_rules()
    # ... and a repair keeps them so
    dns_lab.run(dns_lab.server_ns, ["nft", "delete", "table", "inet", "floodd"])
    daemon.wait_log(r"warning: repair: floodd's firewall table is gone")
    wait_until(lambda: len(drop_rules()) == 10, 5, what="the drop rules back")
    assert all(rule.startswith("udp dport { 53, 5353 } ") for rule in drop_rules()), \
        drop_rules()
    assert daemon.stop() == 0


# --- one owner of the bans -----------------------------------------------------------------
def test_a_ban_inside_a_banned_prefix_is_refused_not_repaired(dns_lab: Any, floodd: Start,
                                                              tmp_path: Path) -> None:
    cfg = config(tmp_path)
    daemon = floodd(cfg)
    daemon.wait_ready()
    assert floodd_cli(dns_lab, cfg, "ban", "198.51.0.0/16").returncode == 0
    inside = floodd_cli(dns_lab, cfg, "ban", "198.51.100.0/24")
    assert (inside.returncode, inside.stdout) == (1, "")
    assert inside.stderr == ("floodd: ban: 198.51.100.0/24 was not added: it lies inside "
                             "the banned prefix 198.51.0.0/16\n")
    time.sleep(2.5)  # two rescans
    assert "repair" not in daemon.log()
    assert set(nft_elements(dns_lab)) == {"198.51.0.0/16"}
    assert daemon.request("status")["bans"] == 1
    assert daemon.stop() == 0


def test_bans_made_beside_the_daemon_count_and_go_with_unban_all(
        dns_lab: Any, floodd: Start, tmp_path: Path) -> None:
    sources = [FLOODER, "198.51.100.8"]
    for source in sources:
        dns_lab.add_client_address(source)
    cfg = config(tmp_path, firewall={"max_bans": 2})
    daemon = floodd(cfg)
    daemon.wait_ready()
    # straight into the kernel while the daemon runs
    beside = floodd_cli(dns_lab, cfg, "ban", "203.0.113.0/24", "--backend", "nftables")
    assert beside.returncode == 0, beside.stderr
    wait_until(lambda: daemon.request("status")["bans"] == 1, 5, what="the ban counted")
    daemon.wait_log(r"info: adopted 1 bans found in the firewall: 203\.0\.113\.0/24")
    # it takes one of the two places max_bans allows
    floods = [flood(dns_lab, tmp_path, s, seconds=2, qps=1500) for s in sources]
    daemon.wait_log(r"warning: max_bans \(2\) reached: 1 more sources over a threshold")
    finish(*floods)
    assert len(nft_elements(dns_lab)) == 2 and len(bans_logged(daemon.log())) == 1
    assert daemon.request("status")["bans"] == 2
    everything = floodd_cli(dns_lab, cfg, "unban", "--all")
    assert (everything.returncode, everything.stdout) == (0, "unbanned 2 bans\n")
    assert nft_elements(dns_lab) == {}
    assert daemon.request("status")["bans"] == 0
    daemon.wait_log(r"unban 203\.0\.113\.0/24 by the operator")
    assert daemon.stop() == 0


def test_a_failed_nft_batch_leaves_the_bans_as_the_kernel_has_them(
        dns_lab: Any, floodd: Start, tmp_path: Path) -> None:
    """A rescan's repair fails while another ban ends: floodd's count and the sources it
    stops counting are what the kernel holds, so the source whose ban ended is banned
    again when it floods again."""
    dns_lab.add_client_address(FLOODER)
    nft = FaultyCommand(tmp_path / "bin", "nft")
    cfg = config(tmp_path)
    daemon = floodd(cfg, env={"PATH": f"{nft.dir}{os.pathsep}{os.environ['PATH']}"})
    daemon.wait_ready()
    assert floodd_cli(dns_lab, cfg, "ban", "203.0.113.50", "--for", "1h").returncode == 0
    assert floodd_cli(dns_lab, cfg, "ban", FLOODER, "--for", "2s").returncode == 0
    ends = time.monotonic() + 2
    nft.fail("-f")  # from now on every change fails
    dns_lab.run(dns_lab.server_ns, ["nft", "delete", "element", "inet", "floodd", "ban4",
                                    "{ 203.0.113.50 }"])  # to be repaired
    daemon.wait_log(r"error: rescan failed, will try again: nft -f - failed: Error: failing "
                    r"on purpose \(floodd test\)")
    time.sleep(max(0.0, ends + 2.5 - time.monotonic()))  # rescans after FLOODER's end
    assert nft_elements(dns_lab) == {}
    assert daemon.request("status")["bans"] == 0  # what the kernel holds
    nft.heal()
    daemon.wait_log(r"warning: repair: 1 bans vanished from the firewall; re-created 1 bans")
    assert set(nft_elements(dns_lab)) == {"203.0.113.50"}
    assert daemon.request("status")["bans"] == 1
    finish(flood(dns_lab, tmp_path, FLOODER, seconds=1.5))
    daemon.wait_log(rf"ban {FLOODER}/32 \(UDP only\) for 30 s: rule query-flood")
    assert daemon.stop() == 0


def test_a_hung_nft_never_stops_the_main_loop(dns_lab: Any, floodd: Start,
                                              tmp_path: Path) -> None:
    nft = FaultyCommand(tmp_path / "bin", "nft")
    cfg = config(tmp_path)
    daemon = floodd(cfg, watchdog_usec=20_000_000,
                    env={"PATH": f"{nft.dir}{os.pathsep}{os.environ['PATH']}"})
    daemon.wait_ready()
    hung_at = time.monotonic()
    nft.hang()
    with pytest.raises(FlooddError) as exc:
        daemon.request("ban", source="203.0.113.50/32", seconds=60.0, reason="manual",
                       force=False)
    assert time.monotonic() - hung_at < 8
    # A ban is one nft process, planned against floodd's mirror of its table.
    assert "nft -f - did not finish within 5 s (killed)" in str(exc.value), exc.value
    assert not [argv for argv in _children(daemon.pid) if "sleep" in argv], \
        "the hung nft was left behind"
    assert daemon.request("status")["ok"]
    with pytest.raises(FlooddError, match="the firewall did not answer"):
        daemon.request("bans")  # at once, without another nft
    # the firewall is left alone for 10 s, then read again: one more timeout
    wait_until(lambda: "nft -j list did not finish" in daemon.log(), 25,
               what="the second try")
    nft.heal()
    wait_until(lambda: _answers(daemon), 15, what="the bans listed again")
    assert floodd_cli(dns_lab, cfg, "ban", "203.0.113.50", "--for", "1m").returncode == 0
    assert set(nft_elements(dns_lab)) == {"203.0.113.50"}
    assert [b["source"] for b in daemon.request("bans")["bans"]] == ["203.0.113.50/32"]
    pings = [t for t, _ in daemon.notify.with_key("WATCHDOG", "1", since=hung_at)]
    gaps = [b - a for a, b in zip([hung_at, *pings], pings)]
    assert pings and max(gaps) < 15, gaps  # the unit's WatchdogSec is 30 s
    log = daemon.log()
    assert re.search(r"error: ban 203\.0\.113\.50/32 by the operator failed: .*nft -f - "
                     r"did not finish within 5 s \(killed\)", log), log
    assert "Traceback" not in log
    assert daemon.stop() == 0


def test_an_operator_ban_that_failed_is_never_applied_later(dns_lab: Any, floodd: Start,
                                                            tmp_path: Path) -> None:
    """iptables: the operator's ban goes to an ipset set, and ipset fails meanwhile."""
    problem = backend_problem("iptables")
    if problem:
        pytest.skip(f"iptables backend: {problem}")
    ipset = FaultyCommand(tmp_path / "bin", "ipset")
    cfg = config(tmp_path, firewall={"backend": "iptables"})
    daemon = floodd(cfg, env={"PATH": f"{ipset.dir}{os.pathsep}{os.environ['PATH']}"})
    daemon.wait_ready()
    ipset.fail()
    with pytest.raises(FlooddError) as exc:
        daemon.request("ban", source="203.0.113.50/32", seconds=60.0, reason="manual",
                       force=False)
    assert "failing on purpose" in str(exc.value), exc.value
    ipset.heal()
    time.sleep(11)  # the firewall is left alone for 10 s, then read again
    assert floodd_cli(dns_lab, cfg, "ban", "203.0.113.51").returncode == 0
    saved = dns_lab.run(dns_lab.server_ns, ["ipset", "save"], text=True).stdout
    assert "203.0.113.51" in saved and "203.0.113.50" not in saved, saved
    assert [b["source"] for b in daemon.request("bans")["bans"]] == ["203.0.113.51/32"]
    assert daemon.request("status")["bans"] == 1
    daemon.wait_log(r"error: ban 203\.0\.113\.50/32 by the operator failed: ")
    assert daemon.stop() == 0


def _children(pid: int) -> list[str]:
    """The command lines of process ``pid``'s children (its threads' too)."""
    argvs = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            for child in f.read().split():
                try:
                    with open(f"/proc/{child}/cmdline", "rb") as cmdline:
                        argvs.append(cmdline.read().replace(b"\0", b" ").decode())
                except OSError:
                    pass  # gone meanwhile
    return argvs


def _answers(daemon: Floodd) -> bool:
    try:
        return bool(daemon.request("bans")["ok"])
    except FlooddError:
        return False


# --- escalation across restarts ------------------------------------------------------------
def test_escalation_is_remembered_across_restarts(dns_lab: Any, floodd: Start,
                                                  tmp_path: Path) -> None:
    dns_lab.add_client_address(FLOODER)
    rules = [{"name": "query-flood", "match": "all", "threshold": 1000, "window": 2,
              "ban_time": 2}]
    cfg = config(tmp_path, rules=rules, firewall={
        "escalation_factor": 2, "rescan_interval": 0.5, "extend_active": False})
    first = floodd(cfg, "first")
    first.wait_ready()
    dnsperf = flood(dns_lab, tmp_path, FLOODER, seconds=2)
    first.wait_log(rf"ban {FLOODER}/32 \(UDP only\) for 2 s: rule query-flood, "
                   r"\d+ packets in 2 s "
                   r"\([\d.]+/s\)\n")
    finish(dnsperf, now=True)
    first.wait_log(rf"unban {FLOODER}/32", timeout=20)
    assert first.stop() == 0
    assert offences(tmp_path)[f"{FLOODER}/32"][0] == 1

    second = floodd(cfg, "second")
    second.wait_ready()
    dnsperf = flood(dns_lab, tmp_path, FLOODER, seconds=2)
    second.wait_log(rf"ban {FLOODER}/32 \(UDP only\) for 4 s: rule query-flood, .*, offence #2")
    reply = second.request("bans")
    finish(dnsperf, now=True)
    ban = reply["bans"][0]
    # The kernel keeps whole seconds: since rounded, expiry rounded down.
    assert 3 <= ban["expires"] - ban["since"] <= 4
    assert offences(tmp_path)[f"{FLOODER}/32"][0] == 2
    assert second.stop() == 0


def test_old_offences_are_forgotten(dns_lab: Any, floodd: Start, tmp_path: Path) -> None:
    """An offence older than max_ban_time no longer counts: the next ban is a first one."""
    dns_lab.add_client_address(FLOODER)
    rules = [{"name": "query-flood", "match": "all", "threshold": 1000, "window": 2,
              "ban_time": 1}]
    daemon = floodd(config(tmp_path, rules=rules,
                           firewall={"escalation_factor": 2, "max_ban_time": 2,
                                     "rescan_interval": 0.5, "extend_active": False}))
    daemon.wait_ready()
    ban_line = re.compile(rf"(?:^|: )(ban {FLOODER}/32 \(UDP only\) for .*)$", re.M)
    finish(flood(dns_lab, tmp_path, FLOODER, seconds=1))
    daemon.wait_log(rf"unban {FLOODER}/32", timeout=20)
    wait_until(lambda: time.time() - offences(tmp_path)[f"{FLOODER}/32"][1] > 2.5, 10,
               what="the offence to be older than max_ban_time")
    finish(flood(dns_lab, tmp_path, FLOODER, seconds=1))
    bans = wait_until(lambda: ban_line.findall(daemon.log())[1:], 10, what="the second ban")
    assert re.fullmatch(rf"ban {FLOODER}/32 \(UDP only\) for 1 s: rule query-flood, "
                        r"\d+ packets in 2 s "
                        r"\([\d.]+/s\)", bans[0]), bans[0]
    assert offences(tmp_path)[f"{FLOODER}/32"][0] == 1
    assert daemon.stop() == 0


# --- a capture that stops ----------------------------------------------------------------
def test_stopped_capture_stops_the_watchdog(dns_lab: Any, floodd: Start,
                                            tmp_path: Path) -> None:
    cfg = config(tmp_path)
    daemon = floodd(cfg, watchdog_usec=1_000_000)
    daemon.wait_ready()
    wait_until(lambda: len(daemon.notify.with_key("WATCHDOG", "1")) >= 2, 10,
               what="watchdog pings")
    dns_lab.run(dns_lab.server_ns, ["ip", "link", "del", dns_lab.server_if])

    def stopped() -> list[tuple[float, dict[str, str]]]:
        return [(t, m) for t, m in daemon.notify.with_key("STATUS")
                if m["STATUS"].startswith("capture stopped: ")]
    stopped_at, message = wait_until(stopped, 10, what="STATUS=capture stopped")[0]
    assert message["STATUS"].startswith(f"capture stopped: {dns_lab.server_if}: ")
    # No ping for longer than the watchdog's timeout: systemd would restart floodd.
    wait_until(lambda: daemon.notify.with_key("STATUS", since=stopped_at + 1.5), 10,
               what="more status messages")
    assert daemon.notify.with_key("WATCHDOG", since=stopped_at) == []
    assert daemon.running()
    daemon.wait_log(rf"error: capture stopped: {dns_lab.server_if}: ")
    status = floodd_cli(dns_lab, cfg, "status")
    assert status.returncode == 0, status.stderr
    assert "Traceback" not in daemon.log()
    assert daemon.stop() == 0


# --- the control socket ------------------------------------------------------------------
@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every user may enter (unlike pytest's tmp_path), removed after."""
    path = Path(tempfile.mkdtemp(prefix="floodd-test-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_control_commands_through_the_daemon(dns_lab: Any, floodd: Start,
                                             shared_dir: Path) -> None:
    cfg = config(shared_dir, daemon={"summary_interval": 1})
    cfg.chmod(0o644)
    daemon = floodd(cfg)
    daemon.wait_ready()
    assert os.stat(daemon.control_socket).st_mode & 0o777 == 0o600
    daemon.wait_log(r"info: summary: \d+ packets/s, \d+ packets, 0 kernel drops, 0 bans, "
                    r"0 packets dropped by them, \d+ keys pruned")

    status = floodd_cli(dns_lab, cfg, "status")
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert re.match(rf"floodd \S+ running for \d+ s \(pid {daemon.pid}, firewall backend "
                    r"nftables \(firewall\.backend\)\)$", lines[0]), lines
    assert lines[1].startswith(f"capture: {dns_lab.server_if}: ")
    assert lines[2] == "bans: 0 (max 10000)"

    # Traffic under the threshold shows in top.
    dns_lab.add_client_address("203.0.113.9")
    light = flood(dns_lab, shared_dir, "203.0.113.9", seconds=1.5, qps=200)
    wait_until(lambda: any(r["source"] == "203.0.113.9" for r in daemon.request("top")["top"]),
               10, what="203.0.113.9 in top")
    top = floodd_cli(dns_lab, cfg, "top", "-n", "5")
    finish(light)
    assert top.returncode == 0, top.stderr
    assert top.stdout.splitlines()[0].split()[:4] == ["packets", "per", "s", "source"]
    # dnsperf asks for A and AAAA: the source's query type mix, when the daemon sends it
    assert re.search(r"^\s+\d+\s+[\d.]+\s+203\.0\.113\.9(  +(A|AAAA) \d+%.*)?$", top.stdout,
                     re.M), top.stdout

    banned = floodd_cli(dns_lab, cfg, "ban", "203.0.113.50", "--for", "1m")
    assert (banned.returncode, banned.stdout) == (0, "banned 203.0.113.50 for 1m (manual)\n")
    element = nft_elements(dns_lab)["203.0.113.50"]
    assert element["comment"].endswith("rule=manual") and 55 <= element["timeout"] <= 60
    daemon.wait_log(r"ban 203\.0\.113\.50/32 for 60 s by the operator: manual")
    bans = floodd_cli(dns_lab, cfg, "bans")
    assert re.search(r"^203\.0\.113\.50\s+whole source\s+manual\s", bans.stdout, re.M), \
        bans.stdout
    assert daemon.request("status")["bans"] == 1
    # top's view of the bans, from the mirror: no kernel read in the main loop
    daemon.request("ban", source="203.0.113.51", seconds=60, reason="second")
    reply = daemon.request("top", n=1)
    assert reply["bans_by_rule"] == {"manual": [1, 0], "second": [1, 0]}
    assert [(b["source"], b["rule"], b["packets"], b["scope"]["text"])
            for b in reply["newest_bans"]] == [("203.0.113.51/32", "second", 0, "whole source"),
                                               ("203.0.113.50/32", "manual", 0, "whole source")]
    assert reply["newest_bans"][0]["since"] >= reply["newest_bans"][1]["since"]
    daemon.request("unban", source="203.0.113.51")
    assert daemon.request("top")["bans_by_rule"] == {"manual": [1, 0]}

    refused = floodd_cli(dns_lab, cfg, "ban", "127.0.0.1")
    assert refused.returncode == 2
    assert refused.stderr.startswith("floodd: ban: refusing to ban 127.0.0.1/32: whitelisted")
    assert refused.stderr.count("\n") == 1

    unbanned = floodd_cli(dns_lab, cfg, "unban", "203.0.113.50")
    assert (unbanned.returncode, unbanned.stdout) == (0, "unbanned 203.0.113.50\n")
    assert "203.0.113.50" not in nft_elements(dns_lab)
    daemon.wait_log(r"unban 203\.0\.113\.50/32 by the operator")
    assert floodd_cli(dns_lab, cfg, "bans").stdout == "no bans\n"

    # A user other than root may not use the socket: one line, exit status 2.
    nobody = floodd_cli(dns_lab, cfg, "status",
                        prefix=("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"))
    assert nobody.returncode == 2
    assert nobody.stdout == ""
    assert nobody.stderr == (f"floodd: cannot open the control socket {daemon.control_socket}: "
                             "permission denied (it is root's only)\n")

    # A second daemon with the same socket refuses to start and leaves the first alone.
    second = floodd(cfg, "second")
    assert second.proc is not None and second.proc.wait(timeout=20) == 1
    assert "error: cannot start: another floodd is already running" in second.log()
    assert "stopped;" not in second.log()
    assert daemon.request("status")["pid"] == daemon.pid
    assert daemon.stop() == 0
    assert "Traceback" not in daemon.log()


def test_missing_interface_fails_the_start_cleanly(dns_lab: Any, floodd: Start,
                                                  tmp_path: Path) -> None:
    daemon = floodd(config(tmp_path), args=("-i", "nosuch0"))
    assert daemon.proc is not None and daemon.proc.wait(timeout=20) == 1
    log = daemon.log()
    assert re.search(r"error: cannot start: cannot capture on interface nosuch0: ", log), log
    assert "Traceback" not in log
    assert daemon.notify.with_key("READY") == []
    assert not os.path.exists(daemon.control_socket)


def test_status_without_a_daemon_is_one_line(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    proc = subprocess.run([*FLOODD, "status", "-c", str(cfg)], capture_output=True, text=True,
                          timeout=30, check=False)
    assert proc.returncode == 1  # could not be done: nothing runs
    assert proc.stdout == ""
    assert proc.stderr == (f"floodd: floodd is not running (no daemon on "
                           f"{tmp_path / 'control.sock'})\n")


# --- safety --------------------------------------------------------------------------------
def test_whitelisted_flooder_is_never_banned(dns_lab: Any, floodd: Start,
                                             tmp_path: Path) -> None:
    for source in (FLOODER, "198.51.100.8"):
        dns_lab.add_client_address(source)
    daemon = floodd(config(tmp_path, whitelist=["127.0.0.0/8", f"{FLOODER}/32"]))
    daemon.wait_ready()
    floods = [flood(dns_lab, tmp_path, FLOODER, seconds=1.5, qps=3000),
              flood(dns_lab, tmp_path, "198.51.100.8", seconds=1.5, qps=3000)]
    daemon.wait_log(rf"warning: not banning {FLOODER}/32 \(whitelisted by {FLOODER}/32\): "
                    r"rule query-flood")
    daemon.wait_log(r"ban 198\.51\.100\.8/32 \(UDP only\) for 30 s")
    finish(*floods)
    assert set(nft_elements(dns_lab)) == {"198.51.100.8"}
    assert bans_logged(daemon.log()) == ["198.51.100.8/32"]
    assert dns_lab.dig("www.lab.example", source=FLOODER)
    assert daemon.stop() == 0


def test_max_bans_is_never_exceeded(dns_lab: Any, floodd: Start, tmp_path: Path) -> None:
    sources = [f"198.51.100.{i}" for i in (7, 8, 9, 10)]
    for source in sources:
        dns_lab.add_client_address(source)
    daemon = floodd(config(tmp_path, firewall={"max_bans": 2}))
    daemon.wait_ready()
    floods = [flood(dns_lab, tmp_path, s, seconds=2, qps=1500) for s in sources]
    daemon.wait_log(r"warning: max_bans \(2\) reached: \d+ more sources over a threshold "
                    r"are not banned")
    finish(*floods)
    assert len(nft_elements(dns_lab)) == 2
    assert len(bans_logged(daemon.log())) == 2
    assert daemon.request("status")["bans"] == 2
    assert daemon.stop() == 0


def test_dry_run_bans_nothing_in_the_kernel(dns_lab: Any, floodd: Start,
                                            tmp_path: Path) -> None:
    dns_lab.add_client_address(FLOODER)
    cfg = config(tmp_path)
    daemon = floodd(cfg, args=("--dry-run",))
    daemon.wait_ready()
    dnsperf = flood(dns_lab, tmp_path, FLOODER, seconds=1)
    daemon.wait_log(rf"dry run: would ban {FLOODER}/32 \(UDP only\) for 30 s \(query-flood\)")
    daemon.wait_log(rf"notice: ban {FLOODER}/32 \(UDP only\) for 30 s: rule query-flood")
    finish(dnsperf)
    assert nft_table(dns_lab) is None
    assert dns_lab.dig("www.lab.example", source=FLOODER)
    status = floodd_cli(dns_lab, cfg, "status")
    assert "firewall backend dry-run (dry run: nothing is changed), dry run)" in status.stdout
    bans = json.loads(floodd_cli(dns_lab, cfg, "bans", "--json").stdout)
    assert [b["source"] for b in bans] == [f"{FLOODER}/32"]
    assert daemon.stop() == 0
    assert nft_table(dns_lab) is None
