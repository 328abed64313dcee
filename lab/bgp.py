"""A real BGP session for tests of what ``floodd exabgp`` announces: BIRD 2 as the upstream
router, ExaBGP as floodd's speaker, each in a lab namespace with files of its own.

``Bird(workdir, ns, router_id, local, neighbor, peer_as, local_as)`` writes a
configuration with a ``flow4``/``flow6`` table (``flowtab4``, ``flowtab6``) and a BGP
protocol ``upstream`` importing FlowSpec and unicast routes from the neighbor, starts
``bird -f`` (foreground: the pid is BIRD's) with a control socket of its own, and reads
the tables back with ``birdc``.  BIRD listens (passive); ExaBGP connects.

``ExaBGP(workdir, ns, config)`` starts Debian's ``exabgp`` 4.2 (as root, log to a file,
no CLI pipes) on a configuration text, typically one from :func:`exabgp_config` whose API
process is ``floodd exabgp``.  When ExaBGP stops, its API process gets end of input.

Both are stopped by pid (SIGTERM, SIGKILL after 10 s) and their directories removed.

    with Bird(tmp_path, lab.client_ns, ...) as bird, ExaBGP(tmp_path, lab.server_ns,
                                                            config) as exa:
        bird.wait_established()
        routes = bird.flow_routes()  # [FlowSpec(...)]
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from lab.netns import Lab, Started, stop_process

PROTOCOL = "upstream"  # the name of BIRD's BGP protocol

_BIRD_CONF = """\
router id {router_id};
log "{dir}/bird.log" all;
flow4 table flowtab4;
flow6 table flowtab6;
protocol device {{ }}
protocol bgp {protocol} {{
    local {local} as {local_as};
    neighbor {neighbor} as {peer_as};
    multihop;
    passive;
    hold time 30;
    ipv4 {{ import all; export none; }};
    flow4 {{ table flowtab4; import all; export none; }};
    flow6 {{ table flowtab6; import all; export none; }};
}}
"""

_EXABGP_CONF = """\
process floodd {{
    run {command};
    encoder text;
}}
neighbor {neighbor} {{
    router-id {router_id};
    local-address {local};
    local-as {local_as};
    peer-as {peer_as};
    family {{ ipv4 unicast; ipv4 flow; ipv6 flow; }}
    api {{ processes [ floodd ]; }}
}}
"""


def available() -> bool:
    return all(shutil.which(t) for t in ("bird", "birdc", "exabgp"))


def exabgp_config(command: list[str], local: str, neighbor: str, local_as: int,
                  peer_as: int) -> str:
    """An ExaBGP configuration: one neighbor, IPv4 unicast and FlowSpec, and ``command``
    (an argv without spaces inside its words) as the API process ``floodd``."""
    if any(not word or re.search(r"[\s;{}]", word) for word in command):
        raise ValueError(f"ExaBGP's run cannot carry {command!r}")
    return _EXABGP_CONF.format(command=" ".join(command), neighbor=neighbor, local=local,
                               router_id=local, local_as=local_as, peer_as=peer_as)


@dataclass(frozen=True)
class FlowSpec:
    """One route of a BIRD flow table, as ``show route ... all`` prints it."""

    match: str  # e.g. "dst 192.0.2.53/32; src 198.51.100.7/32; proto 17; dport 53;"
    ext_community: str  # e.g. "(generic, 0x80060000, 0x0)": traffic-rate 0, discard

    def part(self, key: str) -> str | None:
        """One component of the match (``src``, ``dst``, ``proto``, ``dport``...)."""
        m = re.search(rf"(?:^|; ){re.escape(key)} ([^;]+);", self.match)
        return m.group(1) if m else None

    @property
    def discards(self) -> bool:
        """traffic-rate 0 (RFC 8955 7.3: extended community 0x8006, rate 0.0)."""
        return "0x80060000, 0x0)" in self.ext_community


class _Process(Started):
    """A daemon in a namespace, in a directory of its own, stopped by its pid."""

    name = "process"

    def __init__(self, workdir: Path, ns: str) -> None:
        self.ns = ns
        self.dir = Path(tempfile.mkdtemp(prefix=f"{self.name}-", dir=workdir))
        self._proc: subprocess.Popen[bytes] | None = None
        self._out: IO[bytes] | None = None

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _argv(self) -> list[str]:
        raise NotImplementedError

    def _env(self) -> list[str]:
        return []

    def start(self) -> Any:
        self._out = open(self.dir / "output.log", "ab")
        # ip netns exec execs the command: the pid started is the daemon's.
        self._proc = subprocess.Popen([*Lab.exec_argv(self.ns), *self._env(), *self._argv()],
                                      stdin=subprocess.DEVNULL, stdout=self._out,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def stop(self) -> None:
        """SIGTERM to the daemon's pid, SIGKILL after 10 s.  Safe to call again."""
        if self._proc is not None:
            stop_process(self._proc, 10)
        if self._out is not None:
            self._out.close()
            self._out = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def output(self) -> str:
        path = self.dir / "output.log"
        return path.read_text(errors="replace") if path.exists() else ""


class Bird(_Process):
    """BIRD 2 peering with one neighbor (see the module docstring)."""

    name = "bird"

    def __init__(self, workdir: Path, ns: str, router_id: str, local: str, neighbor: str,
                 local_as: int, peer_as: int) -> None:
        super().__init__(workdir, ns)
        self.socket = self.dir / "bird.ctl"
        (self.dir / "bird.conf").write_text(_BIRD_CONF.format(
            router_id=router_id, dir=self.dir, protocol=PROTOCOL, local=local,
            local_as=local_as, neighbor=neighbor, peer_as=peer_as))

    def _argv(self) -> list[str]:
        return ["bird", "-f", "-c", str(self.dir / "bird.conf"), "-s", str(self.socket),
                "-P", str(self.dir / "bird.pid")]

    def start(self, timeout: float = 10.0) -> Bird:
        super().start()
        deadline = time.monotonic() + timeout
        while not self.socket.exists() or self.birdc("show status").returncode != 0:
            if not self.running:
                raise RuntimeError(f"bird exited: {self.output()[-800:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"bird did not answer within {timeout:g} s")
            time.sleep(0.05)
        return self

    def birdc(self, command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*Lab.exec_argv(self.ns), "birdc", "-s", str(self.socket),
                               *command.split()], capture_output=True, text=True,
                              timeout=20, check=False)

    def show(self, command: str) -> str:
        proc = self.birdc(command)
        if proc.returncode != 0:
            raise RuntimeError(f"birdc {command} failed: {proc.stderr or proc.stdout}")
        return proc.stdout

    def established(self) -> bool:
        return "Established" in self.show(f"show protocols {PROTOCOL}")

    def wait_established(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.established():
            if time.monotonic() > deadline:
                raise AssertionError(f"no BGP session within {timeout:g} s:\n"
                                     f"{self.show(f'show protocols all {PROTOCOL}')}")
            time.sleep(0.05)

    def flow_routes(self, table: str = "flowtab4") -> list[FlowSpec]:
        """The routes of a flow table (``birdc show route table T all``)."""
        return parse_flow_routes(self.show(f"show route table {table} all"))

    def blackholes(self) -> list[str]:
        """The IPv4 unicast prefixes learned with the BLACKHOLE community (65535,666)."""
        return parse_blackholes(self.show("show route table master4 all"))


def parse_flow_routes(text: str) -> list[FlowSpec]:
    """``flow4 { MATCH }  [...]`` lines, each with the ``BGP.ext_community:`` line after."""
    routes: list[FlowSpec] = []
    match: str | None = None
    for line in text.splitlines():
        m = re.match(r"^flow[46] \{ (.*) \}", line)
        if m:
            if match is not None:
                routes.append(FlowSpec(match, ""))
            match = m.group(1).strip()
            continue
        m = re.match(r"^\s+BGP\.ext_community: (.*)$", line)
        if m and match is not None:
            routes.append(FlowSpec(match, m.group(1).strip()))
            match = None
    if match is not None:
        routes.append(FlowSpec(match, ""))
    return routes


def parse_blackholes(text: str) -> list[str]:
    prefixes: list[str] = []
    current: str | None = None
    for line in text.splitlines():
        m = re.match(r"^(\d[\d.]*/\d+)\s", line)
        if m:
            current = m.group(1)
        elif current and re.match(r"^\s+BGP\.community:.*\(65535,666\)", line):
            prefixes.append(current)
    return prefixes


class ExaBGP(_Process):
    """ExaBGP 4.2 on a configuration text (see the module docstring)."""

    name = "exabgp"

    def __init__(self, workdir: Path, ns: str, config: str) -> None:
        super().__init__(workdir, ns)
        (self.dir / "exabgp.conf").write_text(config)

    def _env(self) -> list[str]:
        return ["env", "exabgp.daemon.user=root", f"exabgp.log.destination={self.log_path}",
                "exabgp.api.cli=false"]

    def _argv(self) -> list[str]:
        return ["exabgp", str(self.dir / "exabgp.conf")]

    @property
    def log_path(self) -> Path:
        return self.dir / "exabgp.log"

    def start(self) -> ExaBGP:
        super().start()
        return self

    def log(self) -> str:
        """ExaBGP's log, the API process's stderr included."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text + self.output()
