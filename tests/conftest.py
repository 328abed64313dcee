"""Shared fixtures: lab namespaces with BIND, running code inside a namespace, the floodd
command line as a real process, and the firewall backends this host can run."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import pytest

from daemon_helpers import journald_running
from lab.netns import enter_netns

T = TypeVar("T")


# The test command (scripts/test.sh) sets this: there, where everything is installed, a
# skipped test means a missing fixture or tool, and the run fails instead of passing.
NO_SKIPS = os.environ.get("FLOODD_TEST_NO_SKIPS") == "1"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter is not None else 0
    if NO_SKIPS and skipped and exitstatus == 0:
        print(f"\ntest: {skipped} tests skipped; the test command runs every test",
              file=sys.stderr)
        session.exitstatus = 1


LAB_TOOLS = ("ip", "named", "dig")
# What the load scenarios need besides: the firewall and the load generators.
LOAD_TOOLS = (*LAB_TOOLS, "nft", "dnsperf", "tcpreplay", "stdbuf")


def lab_problem(tools: tuple[str, ...] = LAB_TOOLS) -> str | None:
    """Why a lab with ``tools`` cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, firewall)"
    missing = [t for t in tools if shutil.which(t) is None]
    return f"needs {', '.join(missing)}" if missing else None


def backend_problem(name: str) -> str | None:
    """Why the firewall backend ``name`` cannot run on this host (None: it can)."""
    if name == "nftables":
        return None if shutil.which("nft") else "needs nft"
    if name == "iptables":
        if importlib.util.find_spec("floodd.enforce.firewall.iptables") is None:
            return "floodd.enforce.firewall.iptables is not there"
        from floodd.enforce.firewall import legacy_iptables_problem
        return legacy_iptables_problem()
    return None


KERNEL_BACKENDS = [pytest.param(name, id=name) for name in ("nftables", "iptables")]


@pytest.fixture(params=KERNEL_BACKENDS)
def backend_name(request: pytest.FixtureRequest) -> str:
    """Each firewall backend that changes the kernel, skipped where it cannot run."""
    name: str = request.param
    problem = backend_problem(name)
    if problem:
        pytest.skip(f"{name} backend: {problem}")
    return name


@pytest.fixture
def lab() -> Iterator[Any]:
    """Server and client namespaces (lab.netns.Lab), removed even on failure."""
    problem = lab_problem()
    if problem:
        pytest.skip(problem)
    from lab.netns import Lab

    with Lab("ft") as the_lab:
        yield the_lab


@pytest.fixture
def dns_lab(lab: Any) -> Any:
    """The lab with BIND answering in the server namespace."""
    lab.start_bind()
    return lab


class InNamespace:
    """Runs calls in a thread that entered a network namespace.

    setns(CLONE_NEWNET) changes only the calling thread, and processes that thread starts
    inherit it: sockets, libiptc and ``nft`` all act inside the namespace.
    """

    def __init__(self, ns: str) -> None:
        self._pool = ThreadPoolExecutor(1, initializer=enter_netns, initargs=(ns,))

    def __call__(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        return self._pool.submit(fn, *args, **kw).result(timeout=60)

    def close(self) -> None:
        self._pool.shutdown()


@pytest.fixture
def in_server(lab: Any) -> Iterator[InNamespace]:
    """``in_server(fn, *args)``: call ``fn`` inside the lab's server namespace."""
    runner = InNamespace(lab.server_ns)
    yield runner
    runner.close()


@pytest.fixture
def in_client(lab: Any) -> Iterator[InNamespace]:
    runner = InNamespace(lab.client_ns)
    yield runner
    runner.close()


def dns_query(name: str, qid: int) -> bytes:
    """A DNS query for ``name`` type A (RFC 1035 wire format)."""
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", 1, 1)


def _send_udp(source: str, server: str, count: int) -> None:
    family = socket.AF_INET6 if ":" in source else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        for i in range(count):
            sock.sendto(dns_query("www.lab.example", i), (server, 53))


@pytest.fixture
def send_queries(lab: Any, in_client: InNamespace) -> Callable[[str, int], None]:
    """``send_queries(source, n)``: exactly ``n`` UDP DNS queries from ``source`` (a client
    address already added) to the lab server, nothing else."""
    def send(source: str, count: int) -> None:
        server = lab.server_v6 if ":" in source else lab.server_v4
        in_client(_send_udp, source, server, count)
    return send


@pytest.fixture
def floodd_cli(lab: Any, tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """``floodd_cli(*args, backend=None)``: ``floodd ARGS`` as a real process in the server
    namespace, with a config whose control socket no daemon listens on."""
    config = tmp_path / "floodd.yaml"
    config.write_text(f"daemon:\n  control_socket: {tmp_path / 'control.sock'}\n"
                      f"  state_dir: {tmp_path}\n")

    def run(*args: str, backend: str | None = None) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "floodd", *args, "-c", str(config)]
        if backend is not None:
            argv += ["--backend", backend]
        proc: subprocess.CompletedProcess[str] = lab.run(lab.server_ns, argv, check=False,
                                                         text=True)
        return proc
    return run


def _wait_for(predicate: Callable[[], bool], timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


@pytest.fixture
def wait_for() -> Callable[..., bool]:
    """``wait_for(predicate, timeout=3.0)``: poll every 50 ms; whether it came true."""
    return _wait_for


@pytest.fixture
def journald() -> Iterator[None]:
    """journald's socket exists: the host's journald, or one started here and stopped after."""
    with journald_running() as there:
        if not there:
            pytest.skip("systemd-journald cannot run here")
        yield
