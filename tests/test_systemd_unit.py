"""systemd/floodd.service: systemd's own checks (verify, the offline security score), the
settings floodd relies on, and agreement with floodd's defaults."""

from __future__ import annotations

import functools
import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from daemon_helpers import Floodd, daemon_config, finish, flood, nft_elements, write_config
from floodd.config import DaemonConfig, parse_duration

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "floodd.service"
INSTALLED_FLOODD = "/usr/local/bin/floodd"
MAX_EXPOSURE = 3.0

needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="needs systemd-analyze")


def settings(text: str) -> dict[str, list[str]]:
    """``Section.Key`` -> every value given, in order (keys may repeat)."""
    out: dict[str, list[str]] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


UNIT_SETTINGS = settings(UNIT.read_text())


def one(key: str) -> str:
    values = UNIT_SETTINGS[key]
    assert len(values) == 1, (key, values)
    return values[0]


def test_notify_watchdog_reload_restart() -> None:
    assert one("Service.Type") == "notify"
    assert one("Service.NotifyAccess") == "main"
    watchdog = parse_duration(one("Service.WatchdogSec"))
    # floodd pings at most once per tick: leave room for three ticks of the default.
    assert watchdog >= 3 * DaemonConfig().tick
    assert re.fullmatch(r"/bin/kill -HUP \$MAINPID", one("Service.ExecReload"))
    assert one("Service.Restart") == "on-failure"
    assert parse_duration(one("Service.TimeoutStopSec")) >= 5
    assert one("Service.ExecStart").endswith("floodd run -c /etc/floodd/floodd.yaml")


def test_directories_match_floodd_defaults() -> None:
    defaults = DaemonConfig()
    runtime = one("Service.RuntimeDirectory")
    assert Path(defaults.control_socket).parent == Path("/run") / runtime
    assert Path(defaults.state_dir) == Path("/var/lib") / one("Service.StateDirectory")
    assert one("Service.RuntimeDirectoryMode") == "0700"


def test_only_the_capabilities_and_sockets_floodd_needs() -> None:
    assert set(one("Service.CapabilityBoundingSet").split()) == {"CAP_NET_ADMIN", "CAP_NET_RAW"}
    families = set(one("Service.RestrictAddressFamilies").split())
    # control and journal sockets, nft and ip (netlink), the capture (packet sockets)
    assert {"AF_UNIX", "AF_NETLINK", "AF_PACKET"} <= families
    assert one("Service.NoNewPrivileges") == "yes"
    assert one("Service.ProtectSystem") == "strict"


@pytest.fixture
def runnable_unit(tmp_path: Path) -> Path:
    """A copy of the unit whose commands name this environment's floodd."""
    floodd = Path(sys.executable).parent / "floodd"
    if not floodd.exists():
        pytest.skip(f"no floodd script beside {sys.executable}")
    copy = tmp_path / UNIT.name
    copy.write_text(UNIT.read_text().replace(INSTALLED_FLOODD, str(floodd)))
    return copy


@needs_analyze
def test_systemd_analyze_verify(runnable_unit: Path) -> None:
    proc = subprocess.run(["systemd-analyze", "verify", str(runnable_unit)],
                          capture_output=True, text=True, timeout=60, check=False)
    about_floodd = [line for line in (proc.stdout + proc.stderr).splitlines()
                    if "floodd" in line]
    assert proc.returncode == 0 and about_floodd == [], proc.stdout + proc.stderr


@needs_analyze
def test_security_exposure() -> None:
    proc = subprocess.run(["systemd-analyze", "security", "--offline=true", str(UNIT)],
                          capture_output=True, text=True, timeout=60, check=False)
    m = re.search(r"Overall exposure level for floodd\.service: (\d+\.\d+) (\w+)", proc.stdout)
    assert m is not None, proc.stdout + proc.stderr
    assert float(m.group(1)) <= MAX_EXPOSURE, proc.stdout


@functools.cache
def syscall_group(name: str) -> frozenset[str]:
    """The system calls of a ``@group``, nested groups expanded (systemd's own tables)."""
    proc = subprocess.run(["systemd-analyze", "syscall-filter", name], capture_output=True,
                          text=True, timeout=60, check=True)
    calls: set[str] = set()
    for line in proc.stdout.splitlines()[1:]:
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        calls |= syscall_group(entry) if entry.startswith("@") else {entry}
    return frozenset(calls)


def allowed_syscalls(filters: list[str]) -> set[str]:
    """What ``SystemCallFilter=`` lines allow: the first is an allow list, ``~`` ones deny."""
    allowed: set[str] = set()
    for value in filters:
        deny = value.startswith("~")
        for entry in value.lstrip("~").split():
            calls = syscall_group(entry) if entry.startswith("@") else {entry}
            allowed = allowed - calls if deny else allowed | calls
    return allowed


# strace -f lines: "PID name(args) = result", "PID name(args <unfinished ...>"
_CALL = re.compile(r"^\d+\s+(\w+)\((.*)")


@needs_analyze
@pytest.mark.skipif(shutil.which("strace") is None or shutil.which("setpriv") is None
                    or shutil.which("dnsperf") is None, reason="needs strace, setpriv, dnsperf")
def test_floodd_works_inside_the_units_sandbox(dns_lab: Any, tmp_path: Path) -> None:
    """What systemd would enforce, reproduced without systemd: the unit's capability
    bounding set and no_new_privs (setpriv), then every system call, socket family and
    memory mapping of floodd and the programs it runs (strace -f) checked against the
    unit's SystemCallFilter, RestrictAddressFamilies and MemoryDenyWriteExecute."""
    caps = ",".join(f"+{c.removeprefix('CAP_').lower()}"
                    for c in one("Service.CapabilityBoundingSet").split())
    trace = tmp_path / "strace.out"
    dns_lab.add_client_address("198.51.100.7")
    cfg = write_config(tmp_path / "floodd.yaml", daemon_config(tmp_path))
    daemon = Floodd(dns_lab, cfg, wrapper=(
        "setpriv", f"--bounding-set=-all,{caps}", "--no-new-privs",
        "strace", "-f", "-qq", "-o", str(trace)))
    try:
        daemon.start()
        daemon.wait_ready(timeout=60)
        finish(flood(dns_lab, tmp_path, "198.51.100.7", seconds=2))
        daemon.wait_log(r"notice: ban 198\.51\.100\.7/32 \(UDP only\) for 30 s")
        assert "198.51.100.7" in nft_elements(dns_lab)
        assert daemon.request("bans")["bans"][0]["source"] == "198.51.100.7/32"
        daemon.send(signal.SIGHUP)
        daemon.wait_log(r"info: reloaded ")
        assert daemon.stop(timeout=30) == 0
    finally:
        daemon.close()
    assert "Traceback" not in daemon.log()

    calls: set[str] = set()
    families: set[str] = set()
    wx_maps: list[str] = []
    for line in trace.read_text().splitlines():
        m = _CALL.match(line)
        if m is None:
            continue
        name, args = m.groups()
        calls.add(name)
        if name == "socket":
            families.add(args.split(",")[0])
        if name in ("mmap", "mprotect", "pkey_mprotect") and \
                re.search(r"PROT_WRITE\|PROT_EXEC|PROT_EXEC\|PROT_WRITE", args):
            wx_maps.append(line)
    assert {"execve", "socket", "sendmsg"} <= calls  # the trace is real
    assert sorted(calls - allowed_syscalls(UNIT_SETTINGS["Service.SystemCallFilter"])) == []
    assert families <= set(one("Service.RestrictAddressFamilies").split()), families
    assert wx_maps == [], wx_maps[:3]


def _privileged_prestart() -> list[list[str]]:
    """The unit's ``ExecStartPre=+…`` commands: run as root before the sandbox is set up."""
    return [value[1:].split() for value in UNIT_SETTINGS.get("Service.ExecStartPre", [])
            if value.startswith("+")]


def _iptables_under_read_only_run(tmp_path: Path, prestart: list[list[str]]
                                  ) -> subprocess.CompletedProcess[str]:
    """``floodd ban`` and ``floodd bans`` with the iptables backend, as on a fresh boot
    under ProtectSystem=strict: in a mount and network namespace of their own, /run an
    empty tmpfs (nothing has created iptables' lock file yet), then ``prestart`` run as
    systemd would, then /run made read-only."""
    floodd = Path(sys.executable).parent / "floodd"
    cfg = write_config(tmp_path / "floodd.yaml", daemon_config(
        tmp_path, firewall={"backend": "iptables"}))
    steps = ["mount -t tmpfs -o mode=0755 tmpfs /run",
             *(" ".join(argv) for argv in prestart),
             "mount -o remount,ro /run",
             f"{floodd} ban 198.51.100.7 --for 60s --backend iptables -c {cfg}",
             f"{floodd} bans --json --backend iptables -c {cfg}"]
    return subprocess.run(["unshare", "--mount", "--net", "sh", "-ec", " && ".join(steps)],
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare")
def test_iptables_backend_works_with_the_units_read_only_run(tmp_path: Path) -> None:
    """ProtectSystem=strict leaves /run read-only, where iptables keeps its lock file: on a
    fresh boot floodd could not create it.  The unit creates it before the sandbox."""
    from conftest import backend_problem
    problem = backend_problem("iptables")
    assert problem is None, problem
    prestart = _privileged_prestart()
    assert ["/usr/bin/touch", "/run/xtables.lock"] in prestart

    proc = _iptables_under_read_only_run(tmp_path, prestart)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "banned 198.51.100.7 for 1m" in proc.stdout
    bans = json.loads(proc.stdout[proc.stdout.index("["):])
    assert [b["source"] for b in bans] == ["198.51.100.7/32"]

    # Without the unit's step, the one-line error says what is missing.
    proc = _iptables_under_read_only_run(tmp_path, [])
    assert proc.returncode != 0
    assert proc.stderr.strip() == ("floodd: cannot open the xtables lock /run/xtables.lock: "
                                   "Read-only file system (it must exist before floodd "
                                   "starts: the systemd unit creates it with "
                                   "ExecStartPre=+/usr/bin/touch)"), proc.stderr
