"""``floodd run`` as a real process in a lab namespace, and the means to watch it: a
stand-in for systemd's notify socket, journald started by hand, the nftables sets read
back with ``nft``, dnsperf floods from chosen client addresses."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Callable, Iterator

import yaml

from floodd.service.control import request

FLOODD = [sys.executable, "-m", "floodd"]
JOURNALD = "/lib/systemd/systemd-journald"
JOURNAL_SOCKET = "/run/systemd/journal/socket"
# Directories systemd-journald creates when it starts by hand, parents first (removed
# again if it did).
JOURNAL_DIRS = ("/run/systemd", "/run/systemd/journal", "/run/log", "/run/log/journal")
QUERY_NAME = "www.lab.example"
# syslog priorities as journald stores them -> floodd's names for them
LEVELS = {"3": "error", "4": "warning", "5": "notice", "6": "info", "7": "debug"}


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.05,
               what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something true (returned); AssertionError after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


# --- configuration ------------------------------------------------------------------------
def daemon_config(run_dir: Path, **sections: Any) -> dict[str, Any]:
    """A configuration for tests: fast ticks and rescans, one all-queries rule (1000 packets
    in 2 s), nftables; ``sections`` update the matching top-level mappings, ``rules`` and
    ``whitelist`` replace them."""
    data: dict[str, Any] = {
        "rate_table": {"window": 10, "bucket": 1},
        "whitelist": ["127.0.0.0/8"],
        "rules": [{"name": "query-flood", "match": "all", "threshold": 1000, "window": 2,
                   "ban_time": 30}],
        "firewall": {"backend": "nftables", "rescan_interval": 1, "stale_after": 1},
        "daemon": {"tick": 0.25, "summary_interval": 3600,
                   "control_socket": str(run_dir / "control.sock"),
                   "state_dir": str(run_dir / "state")},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


def write_config(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# --- systemd's side of the notify protocol ------------------------------------------------
class NotifySocket:
    """A bound unix datagram socket recording every message as (arrival time, fields).

    ``on_ready(fields)`` runs in the receiving thread as soon as a READY=1 arrives, before
    the message is recorded: it sees the world as it was when the daemon said ready, and
    whoever waits for READY=1 finds what it saw.
    """

    def __init__(self, path: Path, on_ready: Callable[[dict[str, str]], None] | None = None
                 ) -> None:
        self.path = str(path)
        self.on_ready = on_ready
        self.messages: list[tuple[float, dict[str, str]]] = []
        self.errors: list[BaseException] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.path)
        self._sock.settimeout(0.1)
        self._closing = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._closing:
            try:
                data = self._sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            arrived = time.monotonic()
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
            if fields.get("READY") == "1" and self.on_ready is not None:
                try:
                    self.on_ready(fields)
                except BaseException as exc:  # reported by the test, not lost in a thread
                    self.errors.append(exc)
            with self._lock:  # visible only after on_ready has seen the world
                self.messages.append((arrived, fields))

    def snapshot(self) -> list[tuple[float, dict[str, str]]]:
        with self._lock:
            return list(self.messages)

    def with_key(self, key: str, value: str | None = None,
                 since: float = 0.0) -> list[tuple[float, dict[str, str]]]:
        return [(t, m) for t, m in self.snapshot()
                if key in m and (value is None or m[key] == value) and t >= since]

    def wait_for(self, key: str, value: str | None = None, since: float = 0.0,
                 timeout: float = 10.0) -> tuple[float, dict[str, str]]:
        found = wait_until(lambda: self.with_key(key, value, since), timeout,
                           what=f"notify message {key}={value or '*'}")
        first: tuple[float, dict[str, str]] = found[0]
        return first

    def close(self) -> None:
        self._closing = True
        self._sock.close()
        self._thread.join(timeout=2)
        try:
            os.unlink(self.path)
        except OSError:
            pass


# --- the daemon ---------------------------------------------------------------------------
class Floodd:
    """``floodd run -c CONFIG -i <server veth>`` in the lab's server namespace, told to
    notify a :class:`NotifySocket` of its own (``NAME.notify`` beside the config).

    ``ip netns exec`` execs the command, so the process's pid is the daemon's, unless a
    ``wrapper`` command (e.g. strace) runs it as a child.  ``env`` adds to (or replaces) its
    environment, e.g. a ``PATH`` with a faulty ``nft`` first.  Its stderr goes to
    ``NAME.log``; :meth:`log` also reads the journal when the daemon wrote there.
    """

    def __init__(self, lab: Any, config: Path, name: str = "floodd", args: tuple[str, ...] = (),
                 watchdog_usec: int | None = None,
                 on_ready: Callable[[dict[str, str]], None] | None = None,
                 wrapper: tuple[str, ...] = (), env: dict[str, str] | None = None) -> None:
        self.lab = lab
        self.config = config
        self.args = args
        self.wrapper = wrapper
        self.log_path = config.parent / f"{name}.log"
        self.notify = NotifySocket(config.parent / f"{name}.notify", on_ready)
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        self.env["NOTIFY_SOCKET"] = self.notify.path
        if watchdog_usec is not None:
            self.env["WATCHDOG_USEC"] = str(watchdog_usec)
        self.env.update(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.journal = False
        settings = yaml.safe_load(config.read_text())
        self.control_socket: str = settings["daemon"]["control_socket"]

    @property
    def pid(self) -> int:
        """The daemon's pid: the process started, or its descendant running Python."""
        assert self.proc is not None
        pid = self.proc.pid
        while self.wrapper and _argv(pid)[:1] != [sys.executable]:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                pid = int(f.read().split()[0])
        return pid

    def start(self) -> Floodd:
        self.journal = os.path.exists(JOURNAL_SOCKET)
        self.started_at = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = self.lab.popen(
                self.lab.server_ns,
                [*self.wrapper, *FLOODD, "run", "-c", str(self.config), "-i",
                 self.lab.server_if, *self.args],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=self.env)
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float = 20.0) -> float:
        """Until READY=1 (firewall set up, captures running); when it arrived."""
        def ready() -> float | None:
            found = self.notify.with_key("READY", "1", since=self.started_at)
            if found:
                return found[0][0]
            if not self.running():
                raise AssertionError(f"floodd exited with {self.returncode()} while "
                                     f"starting:\n{self.log()}")
            return None
        at: float = wait_until(ready, timeout, what="READY=1 from floodd")
        return at

    def request(self, cmd: str, **args: Any) -> dict[str, Any]:
        return request(self.control_socket, cmd, timeout=15, **args)

    def send(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Send ``signum`` and wait for the exit; the exit status."""
        self.send(signum)
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            if self.wrapper:
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except (OSError, ValueError, IndexError):
                    pass  # gone already, or never started
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.notify.close()

    def log(self) -> str:
        """stderr, then the journal entries rendered as floodd writes them to stderr
        (``floodd[PID] LEVEL: MESSAGE``)."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        if self.journal and self.proc is not None:
            text += "".join(f"floodd[{self.pid}] {LEVELS.get(e.get('PRIORITY', ''), '?')}: "
                            f"{e.get('MESSAGE', '')}\n" for e in self.journal_entries())
        return text

    def journal_entries(self) -> list[dict[str, Any]]:
        """This daemon's entries in the journal (``SYSLOG_IDENTIFIER=floodd``, its pid)."""
        proc = subprocess.run(["journalctl", "--no-pager", "-o", "json",
                               "SYSLOG_IDENTIFIER=floodd", f"_PID={self.pid}"],
                              capture_output=True, text=True, timeout=30, check=False)
        return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]

    def wait_log(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """The first match of the regular expression ``pattern`` in the log, waiting for it."""
        match: re.Match[str] = wait_until(lambda: re.search(pattern, self.log()), timeout,
                                          interval=0.1, what=f"log line matching {pattern!r}")
        return match


def _argv(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [arg.decode() for arg in f.read().split(b"\0") if arg]


def floodd_cli(lab: Any, config: Path, *args: str, prefix: tuple[str, ...] = (),
               timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """``floodd ARGS -c CONFIG`` as a process in the server namespace (``prefix`` goes
    before the interpreter, e.g. setpriv)."""
    proc: subprocess.CompletedProcess[str] = lab.run(
        lab.server_ns, [*prefix, *FLOODD, *args, "-c", str(config)], check=False, text=True,
        timeout=timeout)
    return proc


def capture_interfaces(pid: int) -> set[int]:
    """Interface indexes of the AF_PACKET sockets process ``pid`` holds open.

    ``/proc/PID/net/packet`` lists the packet sockets of the process's network namespace:
    ``sk RefCnt Type Proto Iface R Rmem User Inode``; the inode ties one to a descriptor.
    """
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        m = re.fullmatch(r"socket:\[(\d+)\]", target)
        if m:
            inodes.add(int(m.group(1)))
    with open(f"/proc/{pid}/net/packet") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    return {int(cols[4]) for cols in rows if int(cols[8]) in inodes}


def ifindex(lab: Any, ns: str, ifname: str) -> int:
    proc = lab.run(ns, ["cat", f"/sys/class/net/{ifname}/ifindex"], text=True)
    return int(proc.stdout)


# --- the firewall as nft shows it ----------------------------------------------------------
def nft_table(lab: Any) -> dict[str, Any] | None:
    """``nft -j list table inet floodd`` in the server namespace; None without the table."""
    proc = lab.run(lab.server_ns, ["nft", "-j", "list", "table", "inet", "floodd"],
                   check=False, text=True, timeout=20)
    if proc.returncode != 0:
        return None
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


def nft_elements(lab: Any, sets: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
    """The elements of floodd's drop sets (``sets``: only those), by address or prefix:
    its JSON (``counter``, ``expires``, ``timeout``, ``comment``) and ``set``.  A ban made
    of several elements (hop ranges) shows once, its counters summed; the gate sets of
    qtype bans are left out."""
    table = nft_table(lab)
    wanted = None if sets is None else set(sets)
    out: dict[str, dict[str, Any]] = {}
    for obj in (table or {}).get("nftables", ()):
        name = obj.get("set", {}).get("name", "")
        if name.startswith("qgate") or (wanted is not None and name not in wanted):
            continue
        for item in obj.get("set", {}).get("elem", ()):
            elem = item["elem"] if isinstance(item, dict) and "elem" in item else {"val": item}
            val = elem["val"]
            if isinstance(val, dict) and "concat" in val:
                val = val["concat"][0]
            if isinstance(val, dict):
                val = f"{val['prefix']['addr']}/{val['prefix']['len']}"
            if val in out and out[val]["set"] == name:
                seen = out[val].setdefault("counter", {"packets": 0, "bytes": 0})
                for k, v in elem.get("counter", {}).items():
                    seen[k] = seen.get(k, 0) + v
                continue
            out[val] = {**elem, "set": name}
    return out


def packets(elem: dict[str, Any] | None) -> int:
    """An element's dropped packets (0 for no element)."""
    count: int = (elem or {}).get("counter", {}).get("packets", 0)
    return count


# --- load ------------------------------------------------------------------------------------
def query_file(run_dir: Path) -> Path:
    path = run_dir / "queries.txt"
    if not path.exists():
        path.write_text(f"{QUERY_NAME} A\n{QUERY_NAME} AAAA\n")
    return path


def flood(lab: Any, run_dir: Path, source: str, seconds: float = 3, qps: int = 5000,
          ) -> subprocess.Popen[bytes]:
    """dnsperf from ``source`` (a client address already added) at ``qps`` for ``seconds``;
    bounded in time and rate.  The caller waits for it (:func:`finish`)."""
    proc: subprocess.Popen[bytes] = lab.popen(
        lab.client_ns,
        ["dnsperf", "-s", lab.server_v4, "-a", source, "-d", str(query_file(run_dir)),
         "-l", f"{seconds:g}", "-c", "4", "-Q", str(qps), "-q", "500", "-t", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc


def finish(*procs: subprocess.Popen[bytes], timeout: float = 30, now: bool = False) -> None:
    """Wait for floods to end (``now``: end them first)."""
    for proc in procs:
        if now:
            proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


# --- journald ----------------------------------------------------------------------------------
@contextlib.contextmanager
def journald_running() -> Iterator[bool]:
    """A journald to log to: the running one, or one started here and removed after.

    Gives whether journald is there.  A journald started here leaves its sockets behind
    when it stops; they and its volatile journal are removed, so that nothing logs into a
    dead socket afterwards.
    """
    if os.path.exists(JOURNAL_SOCKET):
        yield True
        return
    if not os.access(JOURNALD, os.X_OK) or shutil.which("journalctl") is None:
        yield False
        return
    created: list[str] = []
    for d in JOURNAL_DIRS:
        if not os.path.exists(d) and not any(d.startswith(p + "/") for p in created):
            created.append(d)
    proc = subprocess.Popen([JOURNALD], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until(lambda: proc.poll() is not None or _journal_answers(), 15,
                   what="systemd-journald's socket")
        yield proc.poll() is None
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        for d in created:
            shutil.rmtree(d, ignore_errors=True)


def _journal_answers() -> bool:
    if not os.path.exists(JOURNAL_SOCKET):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(JOURNAL_SOCKET)
        except OSError:
            return False
    return True
