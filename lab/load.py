"""Load for the lab (floods and legitimate clients) and the meters that read what it did.

Generators, each bounded in packets and in time:

* :class:`Dnsperf`: the real ``dnsperf`` from one source address of the client
  namespace, at a fixed rate or as fast as it goes, for ``duration`` seconds.  Used
  for flooders (IPv4 or IPv6) and for legitimate clients, whose answer rate it reports.
* :class:`Replay`: ``tcpreplay`` of a generated capture on the client end of the veth,
  at a fixed packet rate or top speed.  The frames (:func:`rotating_any_frames`,
  :func:`spoofed_frames`, :func:`malformed_frames`, :func:`query_frames`) carry the
  server veth's MAC address, so the server's kernel takes them as its own traffic;
  replies to spoofed sources are routed into the client namespace and die there.
  A source outside 198.18.0.0/15 must be an address of the client namespace
  (:func:`add_address`): the server resolves it on the link, and BIND's replies to
  an address no one answers for pile up until BIND stops answering anyone.

Meters: :func:`kernel_bans` (what the kernel firewall holds, read with ``nft``),
:class:`BanWatcher` (when each ban first appeared there), :class:`ReplyCounter` (the
replies a spoofed flood got out of the server), :func:`cpu_seconds` and :func:`rss_kib`
(from ``/proc``); and :class:`FlooddProcess`, ``floodd run`` in the server namespace with
its control socket, configured by :func:`lab_config`.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Self, Sequence

import yaml

from lab import synth
from floodd.config import load_config
from floodd.service.control import request
from floodd.errors import FlooddError
from lab.netns import Lab, Started

# What a legitimate client asks: names of the lab zone, the everyday query types.
LEGIT_QUERIES = ("www.lab.example A", "www.lab.example AAAA", "lab.example TXT",
                 "ns.lab.example A", "lab.example SOA")
SPOOF_NETWORK = ipaddress.IPv4Network("198.18.0.0/15")
# dnsperf: many queries outstanding and a short timeout keep a banned flooder sending
# instead of stalling on its unanswered queries.
OUTSTANDING = 10_000
QUERY_TIMEOUT = 1
FLOODD_TABLE = "floodd"  # floodd's nftables table (inet family)

# dnsperf's closing statistics.
_DNSPERF_FIELDS = {
    "sent": re.compile(r"Queries sent:\s+(\d+)"),
    "completed": re.compile(r"Queries completed:\s+(\d+)"),
    "lost": re.compile(r"Queries lost:\s+(\d+)"),
    "runtime": re.compile(r"Run time \(s\):\s+([\d.]+)"),
    "qps": re.compile(r"Queries per second:\s+([\d.]+)"),
}
# dnsperf -S N: "<unix time>: <responses per second over the interval>"
_DNSPERF_INTERVAL = re.compile(r"^(\d+\.\d+): ([\d.]+)$", re.MULTILINE)
# tcpreplay: "Actual: 1000 packets (75000 bytes) sent in 0.20 seconds"
_TCPREPLAY_ACTUAL = re.compile(r"Actual: (\d+) packets \((\d+) bytes\) sent in ([\d.]+) seconds")


# --- dnsperf ---------------------------------------------------------------------------
@dataclass(frozen=True)
class DnsperfReport:
    sent: int
    completed: int  # answered within the timeout
    lost: int
    runtime: float
    qps: float  # answered queries per second
    intervals: tuple[tuple[float, float], ...] = ()  # (unix time, answers/s) with -S

    @property
    def answered(self) -> float:
        """Fraction of the queries sent that were answered (1.0 when none was sent)."""
        return self.completed / self.sent if self.sent else 1.0


def parse_intervals(text: str) -> tuple[tuple[float, float], ...]:
    """The per-interval lines that ``dnsperf -S`` printed so far."""
    return tuple((float(t), float(q)) for t, q in _DNSPERF_INTERVAL.findall(text))


def parse_dnsperf(text: str) -> DnsperfReport:
    """dnsperf's output -> its final statistics; ValueError when they are missing."""
    found: dict[str, str] = {}
    for key, pattern in _DNSPERF_FIELDS.items():
        m = pattern.search(text)
        if m is None:
            raise ValueError(f"dnsperf printed no {key!r} figure")
        found[key] = m.group(1)
    return DnsperfReport(int(found["sent"]), int(found["completed"]), int(found["lost"]),
                         float(found["runtime"]), float(found["qps"]), parse_intervals(text))


def write_queries(path: Path, queries: Iterable[str] = LEGIT_QUERIES) -> Path:
    """A dnsperf data file: one ``name TYPE`` a line (replaced whole: a dnsperf already
    reading the old file keeps reading it)."""
    part = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    part.write_text("".join(f"{q}\n" for q in queries))
    os.replace(part, path)
    return path


def _legit_queries(workdir: Path) -> Path:
    path = workdir / "legit-queries.txt"
    return path if path.exists() else write_queries(path)


class Dnsperf(Started):
    """dnsperf from ``source`` (an address it adds to the client namespace) asking
    :data:`LEGIT_QUERIES` in turn, with ``clients`` sockets; ``rate`` None sends as fast
    as :data:`OUTSTANDING` lets it; ``interval`` prints answers/s every so many seconds
    (:meth:`intervals`); ``server`` the address asked (default: the lab's BIND)."""

    def __init__(self, lab: Lab, source: str, workdir: Path, *, duration: float,
                 rate: float | None = None, clients: int = 1,
                 interval: int | None = None, server: str | None = None) -> None:
        if duration <= 0:
            raise ValueError("dnsperf needs a positive duration")
        self.lab = lab
        self.source = source
        self.duration = duration
        if server is None:
            server = lab.server_v6 if ":" in source else lab.server_v4
        tag = source.replace(":", "_")
        self.output = workdir / f"dnsperf-{tag}-{time.monotonic_ns()}.out"
        argv = ["dnsperf", "-s", server, "-a", source, "-d", str(_legit_queries(workdir)),
                "-l", f"{duration:g}", "-q", str(OUTSTANDING), "-t", str(QUERY_TIMEOUT),
                "-c", str(clients)]
        if rate is not None:
            argv += ["-Q", str(max(1, round(rate)))]
        if interval is not None:
            # stdbuf: the per-interval lines reach the file as they are printed.
            argv = ["stdbuf", "-oL", *argv, "-S", str(interval)]
        self.argv = argv
        self.started = 0.0  # unix time dnsperf was started (just before its first query)
        self._proc: subprocess.Popen[bytes] | None = None
        self._out: IO[bytes] | None = None

    def start(self) -> Dnsperf:
        add_address(self.lab, self.source)
        self._out = open(self.output, "wb")
        self.started = time.time()
        self._proc = self.lab.popen(self.lab.client_ns, self.argv, stdout=self._out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def intervals(self) -> tuple[tuple[float, float], ...]:
        """The ``-S`` lines so far: (unix time, answers per second)."""
        try:
            return parse_intervals(self.output.read_text(errors="replace"))
        except FileNotFoundError:
            return ()

    def wait(self) -> DnsperfReport:
        """Wait for the end (at most the duration plus the timeout and a margin)."""
        assert self._proc is not None, "start() first"
        try:
            self._proc.wait(timeout=self.duration + 15)
        except subprocess.TimeoutExpired:
            self.stop()
            raise RuntimeError(f"dnsperf from {self.source} did not stop in time") from None
        finally:
            self._close()
        text = self.output.read_text(errors="replace")
        try:
            return parse_dnsperf(text)
        except ValueError as exc:
            raise RuntimeError(f"dnsperf from {self.source} failed "
                               f"(status {self._proc.returncode}): {exc}: {text[-500:]}") from None

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGINT)
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait(timeout=5)
        self._close()

    def _close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None


def add_address(lab: Lab, address: str) -> None:
    """Give the client namespace ``address`` unless it already has it."""
    ns, ifname = lab.client_ns, lab.client_if
    shown = lab.run(ns, ["ip", "-j", "addr", "show", "dev", ifname], text=True).stdout
    have = {a.get("local") for iface in json.loads(shown) for a in iface.get("addr_info", ())}
    if str(ipaddress.ip_address(address)) not in have:
        lab.add_client_address(address)


# --- frames ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Wire:
    """The two ends of the lab's veth: frames go from ``client_mac`` to ``server_mac``."""

    server_mac: bytes
    client_mac: bytes


def link_address(lab: Lab, ns: str, ifname: str) -> bytes:
    """An interface's MAC address, from ``ip -j link show``."""
    shown = json.loads(lab.run(ns, ["ip", "-j", "link", "show", "dev", ifname], text=True).stdout)
    return bytes.fromhex(shown[0]["address"].replace(":", ""))


def lab_wire(lab: Lab) -> Wire:
    return Wire(link_address(lab, lab.server_ns, lab.server_if),
                link_address(lab, lab.client_ns, lab.client_if))


def ethernet(wire: Wire, packet: bytes) -> bytes:
    """An IP packet in an Ethernet frame from the client veth to the server veth."""
    return wire.server_mac + wire.client_mac + synth.link_frame(packet)[12:]


def query_frames(wire: Wire, source: str, count: int, *, qname: str = "www.lab.example",
                 qtype: str = "A", server: str | None = None) -> list[bytes]:
    """``count`` queries from one source to ``server`` (default: the lab's BIND; source
    port and query id vary)."""
    if server is None:
        server = Lab.server_v6 if ":" in source else Lab.server_v4
    return [ethernet(wire, synth.udp_datagram(source, server,
                                              synth.dns_query(qname, qtype, i & 0xFFFF),
                                              1024 + i % 64000))
            for i in range(count)]


def spoofed_sources(count: int, *, seed: int = 0) -> list[str]:
    """``count`` distinct addresses of 198.18.0.0/15 in random order."""
    size = SPOOF_NETWORK.num_addresses
    if not 0 < count <= size:
        raise ValueError(f"{SPOOF_NETWORK} has {size} addresses, not {count}")
    base = int(SPOOF_NETWORK.network_address)
    picked = random.Random(seed).sample(range(size), count)
    return [str(ipaddress.IPv4Address(base + i)) for i in picked]


def spoofed_frames(wire: Wire, count: int, *, seed: int = 0, server: str = Lab.server_v4,
                   qname: str = "www.lab.example") -> list[bytes]:
    """One A query from each of ``count`` distinct spoofed sources of 198.18.0.0/15 (a
    forged random-source flood: looped, no source can be singled out; the replies go to
    the lab's gateway and die there)."""
    payload = synth.dns_query(qname, "A", 0)
    return [ethernet(wire, synth.udp_datagram(src, server, payload, 1024 + i % 64000))
            for i, src in enumerate(spoofed_sources(count, seed=seed))]


def rotating_any_frames(wire: Wire, sources: int, per_source: int, *,
                        seed: int = 1) -> list[bytes]:
    """ANY queries from ``sources`` spoofed addresses, ``per_source`` each, in rounds:
    every source sends one before any sends its next, so each source's queries are
    spread over the whole replay."""
    addresses = spoofed_sources(sources, seed=seed)
    payloads = [synth.dns_query("lab.example", "ANY", r) for r in range(per_source)]
    return [ethernet(wire, synth.udp_datagram(src, Lab.server_v4, payloads[r],
                                              2000 + r * 7 + i % 50000))
            for r in range(per_source) for i, src in enumerate(addresses)]


def _header(qid: int, flags: int, qd: int) -> bytes:
    return qid.to_bytes(2, "big") + flags.to_bytes(2, "big") + qd.to_bytes(2, "big") + bytes(6)


# Payloads to port 53 that are not well-formed queries: each a way a DNS parser can
# loop, read past the end or be fooled.
MALFORMED_PAYLOADS: tuple[tuple[str, bytes], ...] = (
    ("empty", b""),
    ("short header", b"\x12\x34\x01"),
    ("no question", _header(1, 0x0100, 0)),
    ("pointer to itself", _header(2, 0x0100, 1) + b"\xc0\x0c\x00\x01\x00\x01"),
    ("pointer loop", _header(3, 0x0100, 1) + b"\x01a\xc0\x0c\x00\x01\x00\x01"),
    ("forward pointer", _header(4, 0x0100, 1) + b"\xc0\x20\x00\x01\x00\x01" + bytes(40)),
    ("label past the end", _header(5, 0x0100, 1) + b"\x3fabc"),
    ("reserved label type", _header(6, 0x0100, 1) + b"\x41abc\x00\x00\x01\x00\x01"),
    ("name over 255 bytes", _header(7, 0x0100, 1) + b"\x3f" + b"a" * 63
     + (b"\x3f" + b"b" * 63) * 4 + b"\x00\x00\x01\x00\x01"),
    ("no type and class", _header(8, 0x0100, 1) + b"\x03www\x00"),
    ("response", _header(9, 0x8180, 1) + synth.encode_name("lab.example") + b"\x00\x01\x00\x01"),
    ("cut pointer", _header(10, 0x0100, 1) + b"\xc0"),
)


def malformed_frames(wire: Wire, source: str, count: int) -> list[bytes]:
    """``count`` malformed packets to port 53 from one source, cycling through
    :data:`MALFORMED_PAYLOADS`."""
    server = Lab.server_v6 if ":" in source else Lab.server_v4
    kinds = [p for _, p in MALFORMED_PAYLOADS]
    return [ethernet(wire, synth.udp_datagram(source, server, kinds[i % len(kinds)],
                                              3000 + i % 60000))
            for i in range(count)]


def interleave(*streams: Sequence[bytes]) -> list[bytes]:
    """The frames of all streams, each stream spread evenly over the result."""
    keyed = [((i + 0.5) / len(s), n, i) for n, s in enumerate(streams) for i in range(len(s))]
    keyed.sort()
    return [streams[n][i] for _, n, i in keyed]


def write_frames(path: Path, frames: Sequence[bytes]) -> Path:
    """A pcap of the frames, 10 µs apart (tcpreplay --pps or --topspeed paces them)."""
    synth.write_pcap(str(path), ((i / 100_000, f) for i, f in enumerate(frames)))
    return path


# --- tcpreplay -------------------------------------------------------------------------
@dataclass(frozen=True)
class ReplayReport:
    packets: int
    seconds: float

    @property
    def pps(self) -> float:
        return self.packets / self.seconds if self.seconds else 0.0


class Replay(Started):
    """tcpreplay of a capture on the client veth: at ``pps``, or top speed when None;
    ``loops`` times; stopped after ``duration`` seconds when given."""

    def __init__(self, lab: Lab, capture: Path, *, pps: float | None = None, loops: int = 1,
                 duration: float | None = None) -> None:
        argv = ["tcpreplay", "-i", lab.client_if, "--preload-pcap"]
        argv += ["--topspeed"] if pps is None else [f"--pps={pps:g}"]
        if loops > 1:
            argv.append(f"--loop={loops}")
        if duration is not None:
            argv.append(f"--duration={max(1, round(duration))}")
        self.argv = [*argv, str(capture)]
        self.lab = lab
        self.limit = duration if duration is not None else 600.0
        self.started = 0.0
        self._proc: subprocess.Popen[str] | None = None

    def start(self) -> Replay:
        self.started = time.time()
        self._proc = self.lab.popen(self.lab.client_ns, self.argv, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True)
        return self

    def wait(self) -> ReplayReport:
        assert self._proc is not None, "start() first"
        try:
            out, _ = self._proc.communicate(timeout=self.limit + 30)
        except subprocess.TimeoutExpired:
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.communicate(timeout=5)
            raise RuntimeError("tcpreplay did not stop in time") from None
        m = _TCPREPLAY_ACTUAL.search(out)
        if self._proc.returncode != 0 or m is None:
            raise RuntimeError(f"tcpreplay failed (status {self._proc.returncode}): {out[-500:]}")
        return ReplayReport(int(m.group(1)), float(m.group(3)))


# --- the kernel firewall ---------------------------------------------------------------
# floodd's nftables sets by what an element drops (floodd.enforce.firewall.nftables): the
# DNS traffic of an address or prefix; its UDP; its UDP at some TTL / hop-limit values
# (``saddr . ttl`` elements); its UDP queries of one type at some hop values (``saddr .
# ttl . @th,160,40``: the question's root label, qtype and class, 0x00 QQQQ 0001).  A
# gate set lists the networks with a qtype ban: it drops nothing itself.  Any other set
# is taken as dropping all.
UDP_SETS = frozenset({"udp4", "udp6", "udp4net", "udp6net"})
HOP_SETS = frozenset({"hop4", "hop6"})
QTYPE_SETS = frozenset({"qtype4", "qtype6"})
GATE_SETS = frozenset({"qgate4", "qgate6", "qgate4net", "qgate6net"})
ALL_HOPS = (0, 255)

_RULE_IN_COMMENT = re.compile(r"\brule=(.*)$")
_SCOPE_IN_COMMENT = re.compile(r"\bscope=(\S+)")


def _comment_rule(comment: str) -> str:
    m = _RULE_IN_COMMENT.search(comment)
    return m.group(1) if m else ""


def _comment_scope(comment: str) -> str:
    """The scope a ban comment names; ``all`` when it names none (a whole-source ban)."""
    m = _SCOPE_IN_COMMENT.search(comment)
    return m.group(1) if m else "all"


def _covers(network: str, address: str) -> bool:
    """Whether ``network`` (an address, a prefix or a range ``a-b``) holds ``address``."""
    addr = ipaddress.ip_address(address)
    if "-" in network:
        low, high = (ipaddress.ip_address(a) for a in network.split("-"))
        return low.version == addr.version and int(low) <= int(addr) <= int(high)
    return addr in ipaddress.ip_network(network, strict=False)


@dataclass(frozen=True)
class KernelElement:
    """One element of one of floodd's nftables sets, as the kernel lists it."""

    set: str
    source: str  # an address, a prefix (198.51.100.0/24) or a range (a-b)
    hops: tuple[int, int] = ALL_HOPS  # the TTL / hop-limit values it matches, inclusive
    qtype: int | None = None  # the question type it matches (qtype sets)
    packets: int = 0  # dropped so far
    comment: str = ""

    @property
    def rule(self) -> str:
        return _comment_rule(self.comment)

    @property
    def scope(self) -> str:
        return _comment_scope(self.comment)

    def drops(self, address: str, *, hop: int, qtype: int, udp: bool = True) -> bool:
        """Whether this element drops a DNS query from ``address`` arriving with that
        TTL / hop limit, of that type, over UDP (else TCP)."""
        if self.set in GATE_SETS or not _covers(self.source, address):
            return False
        if self.set not in UDP_SETS | HOP_SETS | QTYPE_SETS:
            return True
        return udp and self.hops[0] <= hop <= self.hops[1] \
            and (self.qtype is None or self.qtype == qtype)


def _nft_network(val: Any) -> str:
    """An address, ``{"prefix": {"addr", "len"}}`` or ``{"range": [a, b]}`` as text."""
    if isinstance(val, dict) and "prefix" in val:
        return f"{val['prefix']['addr']}/{val['prefix']['len']}"
    if isinstance(val, dict) and "range" in val:
        return "-".join(str(v) for v in val["range"])
    return str(val)


def _nft_range(val: Any) -> tuple[int, int]:
    """An integer or ``{"range": [low, high]}`` as an inclusive range."""
    if isinstance(val, dict) and "range" in val:
        low, high = val["range"]
        return int(low), int(high)
    return int(val), int(val)


def parse_nft_elements(data: Any) -> list[KernelElement]:
    """Every set element of an ``nft -j list table`` listing (libnftables-json(5)): a plain
    value, or ``{"elem": {"val": V, "counter": {"packets", "bytes"}, "comment": ...}}``
    where V is an address, ``{"prefix": ...}``, ``{"range": ...}`` or, for concatenated
    keys, ``{"concat": [network, hop value or range, (payload)]}``."""
    out = []
    for obj in data.get("nftables", ()):
        found = obj.get("set", {})
        for item in found.get("elem", ()):
            elem = item["elem"] if isinstance(item, dict) and "elem" in item else {"val": item}
            val = elem["val"]
            hops, qtype = ALL_HOPS, None
            if isinstance(val, dict) and "concat" in val:
                parts = val["concat"]
                val = parts[0]
                if len(parts) > 1:
                    hops = _nft_range(parts[1])
                if len(parts) > 2:
                    # The root label (0), the qtype, the class (IN): 0x00 QQQQ 0001.
                    raw = parts[2]
                    qtype = (int(raw, 0) if isinstance(raw, str) else int(raw)) >> 16 & 0xFFFF
            out.append(KernelElement(found.get("name", ""), _nft_network(val), hops, qtype,
                                     int(elem.get("counter", {}).get("packets", 0)),
                                     elem.get("comment", "")))
    return out


@dataclass(frozen=True)
class KernelBan:
    """What the kernel holds against one source: all its elements (or rules) together."""

    source: str  # an address, or a prefix such as 198.51.100.0/24
    packets: int  # dropped so far
    rule: str  # from the comments ("" when none); several bans: "any-queries + query-flood"
    scope: str = "all"  # from the comments, as floodd.scope.Scope.text() writes it


def merge_bans(parts: Iterable[tuple[str, int, str]]) -> dict[str, KernelBan]:
    """(source, packets, comment) of elements or rules -> one :class:`KernelBan` per source:
    packets summed, the distinct rules and scopes in listing order."""
    found: dict[str, tuple[int, list[str], list[str]]] = {}
    for source, count, comment in parts:
        total, rules, scopes = found.get(source, (0, [], []))
        for values, value in ((rules, _comment_rule(comment)), (scopes, _comment_scope(comment))):
            if value not in values:
                values.append(value)
        found[source] = (total + count, rules, scopes)
    return {source: KernelBan(source, total, " + ".join(rules), " + ".join(scopes))
            for source, (total, rules, scopes) in found.items()}


def parse_nft_bans(data: Any) -> dict[str, KernelBan]:
    """The bans of an ``nft -j list table`` listing, one per source (gate sets left out)."""
    return merge_bans((e.source, e.packets, e.comment) for e in parse_nft_elements(data)
                      if e.set not in GATE_SETS)


def _nft_listing(lab: Lab) -> Any:
    """``nft -j list table inet floodd`` in the server namespace; None without the table."""
    proc = lab.run(lab.server_ns, ["nft", "-j", "list", "table", "inet", FLOODD_TABLE],
                   check=False, text=True)
    if proc.returncode != 0:
        if "No such file" in proc.stderr:
            return None
        raise RuntimeError(f"nft list table inet {FLOODD_TABLE}: {proc.stderr.strip()}")
    return json.loads(proc.stdout)


def kernel_elements(lab: Lab) -> list[KernelElement]:
    """The elements of the server namespace's ``inet floodd`` sets, read from the kernel
    with nft; empty when the table does not exist."""
    listing = _nft_listing(lab)
    return [] if listing is None else parse_nft_elements(listing)


def kernel_bans(lab: Lab) -> dict[str, KernelBan]:
    """The bans in the server namespace's ``inet floodd`` table, read from the kernel with
    nft; empty when the table does not exist."""
    listing = _nft_listing(lab)
    return {} if listing is None else parse_nft_bans(listing)


@dataclass(frozen=True)
class IptablesBan:
    """One rule of floodd's iptables chain (floodd.enforce.firewall.iptables), as
    ``iptables-legacy-save -c`` prints it."""

    source: str  # as in KernelBan: an address (no /32, /128) or a prefix
    udp_only: bool  # -p udp
    except_hops: tuple[int, ...]  # -m ttl ! --ttl-eq H / -m hl ! --hl-eq H
    qtype: int | None  # -m string --hex-string "|00 QQQQ 0001|": root label, qtype, IN
    packets: int
    comment: str

    def drops(self, address: str, *, hop: int, qtype: int, udp: bool = True) -> bool:
        """As :meth:`KernelElement.drops`."""
        if not _covers(self.source, address):
            return False
        return (udp or not self.udp_only) and hop not in self.except_hops \
            and (self.qtype is None or self.qtype == qtype)


_QUESTION_TAIL = re.compile(r"^00([0-9a-f]{4})0001$")


def parse_iptables_save(text: str, chain: str = "FLOODD") -> list[IptablesBan]:
    """The rules of ``chain`` in ``iptables-legacy-save -c`` output: lines such as
    ``[12:720] -A FLOODD -s 198.51.100.7/32 -p udp -m ttl ! --ttl-eq 64 -m comment
    --comment "floodd ..." -j DROP``."""
    out = []
    for line in text.splitlines():
        words = shlex.split(line)
        if len(words) < 3 or words[1:3] != ["-A", chain]:
            continue
        packets = int(words[0].strip("[]").split(":")[0])
        opts: dict[str, str] = {}
        hops: list[int] = []
        negated = False
        for word, value in zip(words[3:], words[4:] + [""]):
            if word == "!":
                negated = True
                continue
            if word in ("--ttl-eq", "--hl-eq"):
                if not negated:
                    raise ValueError(f"floodd writes no positive TTL match: {line}")
                hops.append(int(value))
            elif word.startswith("-"):
                opts[word] = value
            negated = False
        if "-s" not in opts:
            continue  # not a ban
        source = opts["-s"].removesuffix("/32").removesuffix("/128")
        qtype = None
        if "--hex-string" in opts:
            m = _QUESTION_TAIL.match(opts["--hex-string"].strip("|").replace(" ", "").lower())
            if m is None:
                raise ValueError(f"not a question match: {line}")
            qtype = int(m.group(1), 16)
        out.append(IptablesBan(source, opts.get("-p") == "udp", tuple(sorted(hops)), qtype,
                               packets, opts.get("--comment", "")))
    return out


_IPSET_ENTRY = re.compile(r'^add floodd-(ban|udp)[46](?:net)? (\S+)(.*)$')


def parse_ipset_save(text: str) -> list[IptablesBan]:
    """The entries of floodd's ipset sets (floodd.enforce.firewall.ipset) in ``ipset save``
    output: lines such as ``add floodd-udp4 198.51.100.7 timeout 3599 packets 12 bytes
    720 comment "floodd ..."``, as the bans they stand for."""
    out = []
    for line in text.splitlines():
        m = _IPSET_ENTRY.match(line)
        if m is None:
            continue
        words = shlex.split(m.group(3))
        opts = dict(zip(words[::2], words[1::2]))
        source = m.group(2).removesuffix("/32").removesuffix("/128")
        out.append(IptablesBan(source, m.group(1) == "udp", (), None,
                               int(opts.get("packets", 0)), opts.get("comment", "")))
    return out


def iptables_rules(lab: Lab) -> list[IptablesBan]:
    """floodd's iptables and ip6tables bans in the server namespace: the rules of its chain
    (legacy tables, where floodd's iptables backend writes) and the entries of its ipset
    sets."""
    rules = []
    for tool in ("iptables-legacy-save", "ip6tables-legacy-save"):
        rules += parse_iptables_save(lab.run(lab.server_ns, [tool, "-c", "-t", "filter"],
                                             text=True).stdout)
    saved = lab.run(lab.server_ns, ["ipset", "save"], check=False, text=True)
    return rules + parse_ipset_save(saved.stdout)


def iptables_bans(lab: Lab) -> dict[str, KernelBan]:
    """As :func:`kernel_bans`, from floodd's iptables rules."""
    return merge_bans((r.source, r.packets, r.comment) for r in iptables_rules(lab))


def delete_table(lab: Lab) -> None:
    """Remove floodd's table from the server namespace (a clean ruleset)."""
    lab.run(lab.server_ns, ["nft", "delete", "table", "inet", FLOODD_TABLE], check=False)


class Poller:
    """Calls ``read`` every ``interval`` s in a thread (stopped after ``limit`` s) and
    hands each result to :meth:`take` (by default kept as (unix time, result) in
    ``samples``); a failure is kept as the last error, never raised."""

    def __init__(self, read: Callable[[], Any], interval: float, limit: float,
                 name: str = "poller") -> None:
        self.read = read
        self.interval = interval
        self.limit = limit
        self.samples: list[tuple[float, Any]] = []
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> Self:
        self._thread.start()
        return self

    def take(self, at: float, value: Any) -> None:
        self.samples.append((at, value))

    def _run(self) -> None:
        deadline = time.monotonic() + self.limit
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                value = self.read()
            except Exception as exc:  # a meter: what failed is reported, never raised
                self.error = str(exc)[:200]
            else:
                self.take(time.time(), value)
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)


class BanWatcher(Poller):
    """Polls :func:`kernel_bans` (or ``read``, e.g. :func:`iptables_bans`) in a thread: when
    each ban first appeared, how it last looked (``seen``: rule, dropped packets) and the
    most bans at once.  Stops by itself after ``limit`` seconds."""

    def __init__(self, lab: Lab, interval: float = 0.1, limit: float = 300.0,
                 read: Callable[[Lab], dict[str, KernelBan]] = kernel_bans) -> None:
        super().__init__(lambda: read(lab), interval, limit, "ban-watcher")
        self.lab = lab
        self.first_seen: dict[str, float] = {}
        self.seen: dict[str, KernelBan] = {}
        self.most = 0

    def take(self, at: float, value: Any) -> None:
        bans: dict[str, KernelBan] = value
        for source, ban in bans.items():
            self.first_seen.setdefault(source, at)
            self.seen[source] = ban
        self.most = max(self.most, len(bans))

    def wait_for(self, sources: Iterable[str], timeout: float) -> bool:
        """Whether all ``sources`` were seen banned within ``timeout`` seconds."""
        wanted = set(sources)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if wanted <= self.first_seen.keys():
                return True
            time.sleep(0.05)
        return wanted <= self.first_seen.keys()


class ReplyCounter:
    """Counts the DNS replies the server sends to ``network`` (spoofed sources; None: any
    address) and, with ``ports``, to those destination ports only (the source ports of
    forged queries): an nftables counter in the client namespace, where those replies are
    routed and die.  What a flood got out of the server, whatever floodd thinks."""

    table = "floodd_lab"

    def __init__(self, lab: Lab, network: str | None = str(SPOOF_NETWORK), *,
                 ports: tuple[int, int] | None = None) -> None:
        self.lab = lab
        match = "meta l4proto udp udp sport 53"
        if network is not None:
            match += f" {'ip6' if ':' in network else 'ip'} daddr {network}"
        if ports is not None:
            match += f" udp dport {ports[0]}-{ports[1]}"
        self.script = (f"table inet {self.table} {{\n chain replies {{\n"
                       f"  type filter hook prerouting priority raw; policy accept;\n"
                       f"  {match} counter\n }}\n}}\n")

    def __enter__(self) -> ReplyCounter:
        self.lab.run(self.lab.client_ns, ["nft", "-f", "-"], input=self.script.encode())
        return self

    def __exit__(self, *exc: object) -> None:
        self.lab.run(self.lab.client_ns, ["nft", "delete", "table", "inet", self.table],
                     check=False)

    def packets(self) -> int:
        shown = self.lab.run(self.lab.client_ns,
                             ["nft", "-j", "list", "table", "inet", self.table], text=True)
        for obj in json.loads(shown.stdout)["nftables"]:
            for expr in obj.get("rule", {}).get("expr", ()):
                if "counter" in expr:
                    return int(expr["counter"]["packets"])
        raise RuntimeError(f"no counter in table inet {self.table}")


# --- processes -------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process (all its threads), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    # Fields after the command name, which is in parentheses and may hold spaces.
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    """Resident memory (VmRSS) of a process in KiB, from /proc/PID/status."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


# --- floodd ----------------------------------------------------------------------------
def lab_config(workdir: Path, rules: Sequence[dict[str, Any]], *,
               whitelist: Sequence[str] = ("127.0.0.0/8", "::1/128"),
               rate_table: dict[str, Any] | None = None,
               firewall: dict[str, Any] | None = None,
               daemon: dict[str, Any] | None = None,
               capture: dict[str, Any] | None = None,
               fast_drop: dict[str, Any] | None = None) -> Path:
    """Write a floodd configuration for the lab: control socket and state in ``workdir``,
    the nftables backend, the given rules and sections (merged over those defaults)."""
    config: dict[str, Any] = {
        "capture": {**(capture or {})},
        "rate_table": {"window": 10, "bucket": 1, **(rate_table or {})},
        "whitelist": list(whitelist),
        "rules": list(rules),
        "firewall": {"backend": "nftables", **(firewall or {})},
        "daemon": {"control_socket": str(workdir / "control.sock"),
                   "state_dir": str(workdir / "state"), **(daemon or {})},
        "fast_drop": {**(fast_drop or {})},
    }
    path = workdir / "floodd.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class FlooddProcess(Started):
    """``floodd run -c CONFIG -i <server veth>`` in the lab's server namespace."""

    def __init__(self, lab: Lab, config: Path, log: Path) -> None:
        self.lab = lab
        self.config = config
        self.log = log
        self.socket = load_config(str(config)).daemon.control_socket
        self.argv = [sys.executable, "-m", "floodd", "run", "-c", str(config),
                     "-i", lab.server_if]
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self, timeout: float = 20.0) -> FlooddProcess:
        """Start floodd and wait until its control socket answers."""
        self._log = open(self.log, "ab")
        self._proc = self.lab.popen(self.lab.server_ns, self.argv, stdout=self._log,
                                    stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"floodd exited with status {self._proc.returncode}: "
                                   f"{self.log_text()[-1000:]}")
            try:
                self.request("status", timeout=2.0)
                return self
            except FlooddError:
                time.sleep(0.1)
        raise RuntimeError(f"floodd did not answer on {self.socket} in {timeout:g} s")

    def request(self, cmd: str, timeout: float = 10.0, **args: Any) -> dict[str, Any]:
        """One control-socket request (``status``, ``top``, ``bans``...)."""
        return request(self.socket, cmd, timeout=timeout, **args)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> int | None:
        """SIGTERM, then the exit status (None if it had to be killed)."""
        status: int | None = None
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.send_signal(signal.SIGTERM)
            try:
                status = self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
        if self._log is not None:
            self._log.close()
            self._log = None
        return status
