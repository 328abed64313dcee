"""Two network namespaces joined by a veth pair, with a real BIND in the server one.

Addresses come from the documentation ranges only: the server is 192.0.2.53 and
2001:db8::53; clients live in 198.51.100.0/24, 203.0.113.0/24 and 2001:db8:1::/64
(and 198.18.0.0/15 for spoofed floods).  Neither namespace has a default route.
The server reaches 198.18.0.0/15 through the client namespace's GATEWAY_V4, which
drops what it gets (it does not forward): replies to spoofed sources die there,
and the server never resolves a spoofed address on the link (a flood from
thousands of sources would fill its neighbour table and stall every reply).
Everything is removed on exit, also when the body raises.
"""

from __future__ import annotations

import ctypes

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from types import TracebackType
from typing import Any, Callable, TypeVar

SERVER_V4 = "192.0.2.53"
SERVER_V6 = "2001:db8::53"
GATEWAY_V4 = "198.51.100.254"  # a client address: the server's next hop to 198.18.0.0/15
ZONE = "lab.example"

_NAMED_CONF = """\
options {{
    directory "{dir}";
    pid-file "{dir}/named.pid";
    listen-on port 53 {{ {v4}; }};
    listen-on-v6 port 53 {{ {v6}; }};
    recursion no;
    allow-query {{ any; }};
    dnssec-validation no;
    rate-limit {{ responses-per-second 0; }};
    max-udp-size 4096;
}};
logging {{ channel null_ch {{ null; }}; category default {{ null_ch; }}; category lame-servers {{ null_ch; }}; }};
zone "{zone}" {{ type primary; file "{dir}/{zone}.zone"; }};
"""

_ZONE_FILE = """\
$TTL 300
@   IN SOA ns.{zone}. hostmaster.{zone}. 1 3600 600 86400 300
@   IN NS  ns.{zone}.
ns  IN A   {v4}
www IN A   192.0.2.80
www IN AAAA 2001:db8::80
@   IN TXT "floodd lab"
"""


class Lab:
    """Server and client namespaces; see the module docstring for addresses."""

    server_v4 = SERVER_V4
    server_v6 = SERVER_V6
    zone = ZONE

    def __init__(self, name: str = "fl") -> None:
        tag = f"{name}{os.getpid() % 100000}x{int(time.monotonic() * 1000) % 1000}"
        self.server_ns = f"{tag}s"
        self.client_ns = f"{tag}c"
        self.server_if = f"{tag}S"[:15]
        self.client_if = f"{tag}C"[:15]
        self._named: subprocess.Popen[bytes] | None = None
        self._dir: str | None = None
        self._procs: list[subprocess.Popen[Any]] = []

    # --- lifecycle ---------------------------------------------------------------
    def __enter__(self) -> Lab:
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _create(self) -> None:
        _ip("netns", "add", self.server_ns)
        _ip("netns", "add", self.client_ns)
        _ip("link", "add", self.server_if, "type", "veth", "peer", "name", self.client_if)
        _ip("link", "set", self.server_if, "netns", self.server_ns)
        _ip("link", "set", self.client_if, "netns", self.client_ns)
        for ns, ifname in ((self.server_ns, self.server_if), (self.client_ns, self.client_if)):
            # No duplicate address detection: IPv6 addresses are usable at once.
            self.run(ns, ["sysctl", "-qw", f"net.ipv6.conf.{ifname}.accept_dad=0"])
            self.run(ns, ["ip", "link", "set", "lo", "up"])
            self.run(ns, ["ip", "link", "set", ifname, "up"])
        self.run(self.server_ns, ["ip", "addr", "add", f"{SERVER_V4}/24", "dev", self.server_if])
        self.run(self.server_ns, ["ip", "-6", "addr", "add", f"{SERVER_V6}/64", "dev",
                                  self.server_if, "nodad"])
        # Routes to the client ranges point at the veth (no default route anywhere).
        for net in ("198.51.100.0/24", "203.0.113.0/24"):
            self.run(self.server_ns, ["ip", "route", "add", net, "dev", self.server_if])
        self.add_client_address(GATEWAY_V4)
        self.run(self.server_ns, ["ip", "route", "add", "198.18.0.0/15", "via", GATEWAY_V4,
                                  "dev", self.server_if])
        self.run(self.server_ns, ["ip", "-6", "route", "add", "2001:db8:1::/64", "dev",
                                  self.server_if])
        self.run(self.client_ns, ["ip", "route", "add", "192.0.2.0/24", "dev", self.client_if])
        self.run(self.client_ns, ["ip", "-6", "route", "add", "2001:db8::/64", "dev",
                                  self.client_if])

    def close(self) -> None:
        for proc in [*self._procs, *([self._named] if self._named else [])]:
            stop_process(proc)
        self._procs.clear()
        self._named = None
        for ns in (self.server_ns, self.client_ns):
            subprocess.run(["ip", "netns", "del", ns], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, check=False)
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    # --- running things inside -------------------------------------------------
    @staticmethod
    def exec_argv(ns: str) -> list[str]:
        return ["ip", "netns", "exec", ns]

    def run(self, ns: str, argv: list[str], check: bool = True,
            **kw: Any) -> subprocess.CompletedProcess[Any]:
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        kw.setdefault("timeout", 60)
        proc = subprocess.run(self.exec_argv(ns) + argv, check=False, **kw)
        if check and proc.returncode != 0:
            err = proc.stderr.decode(errors="replace") if isinstance(proc.stderr, bytes) else proc.stderr
            raise RuntimeError(f"{' '.join(argv)} in {ns} failed ({proc.returncode}): {err}")
        return proc

    def popen(self, ns: str, argv: list[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start a process in a namespace; it is stopped by close() if still running."""
        proc: subprocess.Popen[Any] = subprocess.Popen(self.exec_argv(ns) + argv, **kw)
        self._procs.append(proc)
        return proc

    def add_client_address(self, address: str) -> None:
        if ":" in address:
            self.run(self.client_ns, ["ip", "-6", "addr", "add", f"{address}/64", "dev",
                                      self.client_if, "nodad"])
        else:
            self.run(self.client_ns, ["ip", "addr", "add", f"{address}/32", "dev",
                                      self.client_if])

    # --- the DNS server --------------------------------------------------------
    def start_bind(self, timeout: float = 10.0) -> None:
        """Start a real named in the server namespace and wait until it answers."""
        # named drops privileges; its files must be owned by root and readable.
        self._dir = tempfile.mkdtemp(prefix="floodd-lab-")
        os.chmod(self._dir, 0o755)
        conf = os.path.join(self._dir, "named.conf")
        with open(conf, "w") as f:
            f.write(_NAMED_CONF.format(dir=self._dir, v4=SERVER_V4, v6=SERVER_V6, zone=ZONE))
        with open(os.path.join(self._dir, f"{ZONE}.zone"), "w") as f:
            f.write(_ZONE_FILE.format(zone=ZONE, v4=SERVER_V4))
        self._named = subprocess.Popen(
            self.exec_argv(self.server_ns) + ["named", "-g", "-n", "1", "-c", conf],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        probe = GATEWAY_V4
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._named.poll() is not None:
                raise RuntimeError(f"named exited with status {self._named.returncode}")
            if self.dig(f"www.{ZONE}", source=probe, timeout=0.5):
                return
            time.sleep(0.1)
        raise RuntimeError("named did not answer in time")

    @property
    def named_pid(self) -> int | None:
        return self._named.pid if self._named else None

    def dig(self, name: str, source: str, server: str | None = None, qtype: str = "A",
            timeout: float = 1.0, tcp: bool | None = None) -> bool:
        """Ask the server from ``source`` in the client namespace; True when answered.

        ``tcp`` names the transport (True: TCP, a handshake no forger can make; False:
        UDP); None leaves it to dig, which asks ANY queries over TCP (9.18)."""
        if server is None:
            server = SERVER_V6 if ":" in source else SERVER_V4
        transport = [] if tcp is None else ["+tcp" if tcp else "+notcp"]
        proc = self.run(self.client_ns,
                        ["dig", "+tries=1", f"+timeout={max(1, round(timeout))}", "+short",
                         *transport, f"@{server}", "-b", source, name, qtype],
                        check=False, timeout=timeout + 10)
        return proc.returncode == 0


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE, timeout=30)


class Started:
    """A process a test started (``_proc``, set by its ``start``): its pid and whether
    it still runs."""

    _proc: subprocess.Popen[Any] | None = None

    @property
    def pid(self) -> int:
        assert self._proc is not None, "start() first"
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None


def stop_process(proc: subprocess.Popen[Any], timeout: float = 5.0) -> None:
    """SIGTERM to ``proc`` (its process group when it leads one), SIGKILL after
    ``timeout`` seconds; nothing when it has ended."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM) if _own_group(proc) else proc.terminate()
        proc.wait(timeout=timeout)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        proc.kill()
        proc.wait(timeout=5)


def _own_group(proc: subprocess.Popen[Any]) -> bool:
    try:
        return os.getpgid(proc.pid) == proc.pid
    except ProcessLookupError:
        return False


CLONE_NEWNET = 0x40000000  # setns(2): join a network namespace


T = TypeVar("T")


def enter_netns(ns: str) -> None:
    """Move the calling thread into network namespace ``ns`` (ip netns's /run/netns/NS):
    sockets it opens, and processes it starts, live there; other threads stay."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {ns}: {os.strerror(err)}")
    finally:
        os.close(fd)


def in_netns(ns: str, call: Callable[[], T], timeout: float = 5.0) -> T:
    """``call()`` run in a thread that joined network namespace ``ns`` (ip netns's
    /run/netns/NS): sockets it opens live there.  Only that thread moves."""
    result: list[T] = []
    error: list[BaseException] = []

    def body() -> None:
        enter_netns(ns)
        try:
            result.append(call())
        except BaseException as exc:  # handed to the caller's thread
            error.append(exc)

    thread = threading.Thread(target=body, name=f"netns-{ns}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise RuntimeError(f"no answer within {timeout:g} s in namespace {ns}")
    if error:
        raise error[0]
    return result[0]
