"""floodd.detect.capture: capture files (pcap and pcapng), the BPF filter, and a live capture
in the lab (BIND and its clients in two network namespaces made by the test)."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import dpkt
import pcapy
import pytest

from lab import load, synth
from lab.netns import Lab
from floodd.detect.bpf import BPF_MAXINSNS, attached
from floodd.detect.capture import LiveCapture, OfflineCapture, build_filter, sent_by_host
from floodd.config import CaptureConfig
from floodd.errors import FlooddError
from floodd.detect.parse import F_FRAGMENT, F_VERIFIED, Record
from floodd.scope import UDP_ONLY, WHOLE, Scope, Target

from test_parse import PCAPS
ROOT = os.geteuid() == 0
CLIENT = "198.51.100.7"
SERVER = "192.0.2.1"


def read_all(capture: OfflineCapture) -> list[Record]:
    records: list[Record] = []
    while (batch := capture.read(0.0)) is not None:
        records += batch.records
    capture.close()
    return records


def write_pcapng(path: Path, frames: list[tuple[float, bytes]], linktype: int) -> None:
    """A minimal pcapng file: section header, one interface, enhanced packet blocks."""

    def block(kind: int, body: bytes) -> bytes:
        body += b"\x00" * (-len(body) % 4)
        size = len(body) + 12
        return struct.pack("<II", kind, size) + body + struct.pack("<I", size)

    out = block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1))
    out += block(1, struct.pack("<HHI", linktype, 0, 65535))
    for ts, frame in frames:
        micros = round(ts * 1e6)
        out += block(6, struct.pack("<IIIII", 0, micros >> 32, micros & 0xFFFFFFFF,
                                    len(frame), len(frame)) + frame)
    path.write_bytes(out)


def test_offline_pcap() -> None:
    capture = OfflineCapture(str(PCAPS / "dnsjit-dns.pcap"), batch_size=10)
    assert capture.linktype == 1 and capture.progress < 0.01
    records = read_all(capture)
    assert len(records) == 41 and capture.progress == 1.0
    assert capture.stats().received == 133
    assert capture.read(0.0) is None


def test_offline_pcapng_matches_pcap(tmp_path: Path) -> None:
    with open(PCAPS / "dnscap-frags.pcap", "rb") as f:
        reader = dpkt.pcap.Reader(f)
        linktype = reader.datalink()
        frames = [(ts, bytes(buf)) for ts, buf in reader]
    path = tmp_path / "frags.pcapng"
    write_pcapng(path, frames, linktype)
    from_pcapng = read_all(OfflineCapture(str(path)))
    from_pcap = read_all(OfflineCapture(str(PCAPS / "dnscap-frags.pcap")))
    assert len(from_pcapng) == 41 and all(r[4] == F_FRAGMENT for r in from_pcapng)
    assert from_pcapng == from_pcap


def test_offline_progress_and_ports(tmp_path: Path) -> None:
    path = tmp_path / "q.pcap"
    query = synth.dns_query("example.com", "A")
    synth.write_pcap(str(path), [(float(i), synth.udp_frame(CLIENT, SERVER, query, 4000 + i,
                                                            5300 + i % 2))
                                 for i in range(100)])
    capture = OfflineCapture(str(path), ports=(5301,), protocols=("udp",), batch_size=10)
    seen = []
    while (batch := capture.read(0.0)) is not None:
        seen.append((len(batch.records), batch.ignored, capture.progress))
    capture.close()
    assert sum(n for n, _, _ in seen) == 50 and sum(i for _, i, _ in seen) == 50
    progress = [p for _, _, p in seen]
    assert progress == sorted(progress) and progress[-1] == 1.0 and 0.4 < progress[4] < 0.6


@pytest.mark.parametrize("content,message", [
    (None, "cannot read capture {}: No such file or directory"),
    (b"", "cannot read capture {}: not a pcap or pcapng file"),
    (b"# DNS packet captures\n" * 20, "cannot read capture {}: not a pcap or pcapng file"),
])
def test_offline_errors(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "x.pcap"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(FlooddError) as err:
        OfflineCapture(str(path))
    assert str(err.value) == message.format(path)


def test_offline_directory(tmp_path: Path) -> None:
    with pytest.raises(FlooddError, match=f"^cannot read capture {tmp_path}: is a directory$"):
        OfflineCapture(str(tmp_path))


def test_offline_unsupported_link_type(tmp_path: Path) -> None:
    path = tmp_path / "wifi.pcap"
    synth.write_pcap(str(path), [(0.0, bytes(40))], linktype=105)
    with pytest.raises(FlooddError, match=r"^cannot read capture .*: unsupported link type 105"):
        OfflineCapture(str(path))


def test_offline_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "cut.pcap"
    path.write_bytes((PCAPS / "dnsjit-dns.pcap").read_bytes()[:20000])
    capture = OfflineCapture(str(path), batch_size=10)
    with pytest.raises(FlooddError, match=r"^cannot read capture .*: truncated dump file"):
        read_all(capture)


# The BPF filter.  Frames are built from an IP packet, whether the server sent it, and
# VLAN tags; on Ethernet the server's frames leave from its MAC address (synth's
# DST_MAC: the client's frames go to it), which stands for "sent by this host".

Q = synth.dns_query("example.com", "A")
CLIENT6, SERVER6 = "2001:db8::7", "2001:db8::53"
SYN, ACK = synth.TCP_SYN, synth.TCP_ACK
SENT_ETHERNET = f"ether src {synth.DST_MAC.hex(':')}"
Packet = tuple[bytes, bool, tuple[int, ...]]  # IP packet, sent by the server, VLAN tags


def frame(case: Packet, linktype: int = 1) -> bytes:
    packet, sent, vlan = case
    if linktype != 1:
        return synth.link_frame(packet, linktype, outgoing=sent)
    built = synth.link_frame(packet, vlan=vlan)
    return built[6:12] + built[:6] + built[12:] if sent else built


def syn_ack(sport: int = 53, flags: int = SYN | ACK, v6: bool = False) -> bytes:
    """A segment of the server from ``sport`` to a client's port."""
    server, client = (SERVER6, CLIENT6) if v6 else (SERVER, CLIENT)
    return synth.tcp_segment(server, client, b"", sport, 4000, seq=99, ack=1, flags=flags)


V4_FRAGS = synth.fragments(synth.udp_datagram(CLIENT, SERVER, Q, 4000), 16)
V6_FRAGS = synth.fragments(synth.udp_datagram(CLIENT6, SERVER6, Q, 4000), 16)
OWN_QUERY = synth.udp_datagram(SERVER, CLIENT, Q, 4000, 53)  # this host asking another

MATCH: dict[str, Packet] = {
    "udp query": (synth.udp_datagram(CLIENT, SERVER, Q, 4000), False, ()),
    "udp query, VLAN": (synth.udp_datagram(CLIENT, SERVER, Q, 4000), False, (11,)),
    "udp query, QinQ": (synth.udp_datagram(CLIENT, SERVER, Q, 4000), False, (100, 11)),
    "udp query, IPv6": (synth.udp_datagram(CLIENT6, SERVER6, Q, 4000), False, ()),
    "tcp SYN": (synth.tcp_segment(CLIENT, SERVER, b"", 4000, flags=SYN), False, ()),
    "first IPv4 fragment": (V4_FRAGS[0], False, ()),
    "last IPv4 fragment": (V4_FRAGS[-1], False, ()),
    "last IPv4 fragment, VLAN": (V4_FRAGS[-1], False, (11,)),
    "first IPv6 fragment": (V6_FRAGS[0], False, ()),
    "last IPv6 fragment": (V6_FRAGS[-1], False, ()),
    "SYN-ACK sent": (syn_ack(), True, ()),
    "SYN-ACK sent, VLAN": (syn_ack(), True, (11,)),
    "SYN-ACK sent, QinQ": (syn_ack(), True, (100, 11)),
    "SYN-ACK sent, IPv6": (syn_ack(v6=True), True, ()),
    "SYN-ACK sent, ECN": (syn_ack(flags=SYN | ACK | 0x40), True, ()),
}
NO_MATCH: dict[str, Packet] = {
    "udp response": (synth.udp_datagram(SERVER, CLIENT, Q, 53, 4000), False, ()),
    "udp response sent": (synth.udp_datagram(SERVER, CLIENT, Q, 53, 4000), True, ()),
    "other port": (synth.udp_datagram(CLIENT, SERVER, Q, 4000, 5353), False, ()),
    "ICMP fragment": (synth.fragments(synth.ip_packet(CLIENT, SERVER, 1, bytes(40)), 16)[-1],
                      False, ()),
    "own query sent": (OWN_QUERY, True, ()),
    "own query sent, VLAN": (OWN_QUERY, True, (11,)),
    "own query sent, IPv6": (synth.udp_datagram(SERVER6, CLIENT6, Q, 4000, 53), True, ()),
    "own query fragment sent": (synth.fragments(OWN_QUERY, 16)[-1], True, ()),
    "own TCP SYN sent": (synth.tcp_segment(SERVER, CLIENT, b"", 4000, 53, flags=SYN), True,
                         ()),
    "SYN-ACK received": (syn_ack(), False, ()),
    "SYN-ACK received, IPv6": (syn_ack(v6=True), False, ()),
    "SYN-ACK sent from port 5353": (syn_ack(5353), True, ()),
    "SYN sent from port 53": (syn_ack(flags=SYN), True, ()),
    "ACK sent from port 53": (syn_ack(flags=ACK), True, ()),
    "ACK sent from port 53, IPv6": (syn_ack(flags=ACK, v6=True), True, ()),
    "data sent from port 53": (syn_ack(flags=ACK | synth.TCP_PSH), True, ()),
}
ARP = bytes(12) + b"\x08\x06" + bytes(28)


def test_build_filter_matches() -> None:
    program = pcapy.compile(1, 65535, build_filter((53,), ("udp", "tcp"), sent=SENT_ETHERNET),
                            1, 0)
    for name, case in MATCH.items():
        assert program.filter(frame(case)), name
    for name, case in NO_MATCH.items():
        assert not program.filter(frame(case)), name
    assert not program.filter(ARP)


@pytest.mark.parametrize("linktype", [113, 276])
def test_build_filter_matches_cooked(linktype: int) -> None:
    """The cooked header's packet type says what this host sent (tags: Ethernet only)."""
    program = pcapy.compile(linktype, 65535, build_filter((53,), ("udp", "tcp"), vlan=False,
                                                          sent="outbound"), 1, 0)
    untagged = [(name, case, True) for name, case in MATCH.items() if not case[2]]
    untagged += [(name, case, False) for name, case in NO_MATCH.items() if not case[2]]
    for name, case, passes in untagged:
        assert bool(program.filter(frame(case, linktype))) == passes, name


def test_build_filter_without_a_sent_test_passes_queries_only() -> None:
    """The capture then takes the incoming direction only: no SYN-ACK can pass."""
    program = pcapy.compile(1, 65535, build_filter((53,), ("udp", "tcp")), 1, 0)
    for name, case in MATCH.items():
        assert bool(program.filter(frame(case))) != case[1], name


def test_build_filter_ports_protocols_extra() -> None:
    expr = build_filter((53, 5353), ("udp",), "src net 198.51.100.0/24", sent=SENT_ETHERNET)
    program = pcapy.compile(1, 65535, expr, 1, 0)
    assert program.filter(synth.udp_frame(CLIENT, SERVER, Q, 4000, 5353))
    assert not program.filter(synth.udp_frame("203.0.113.9", SERVER, Q, 4000, 53))
    assert not program.filter(frame(MATCH["tcp SYN"]))
    assert not program.filter(frame(MATCH["SYN-ACK sent"]))  # TCP is not watched
    tagged = synth.udp_frame(CLIENT, SERVER, Q, 4000, 53, vlan=(11,))
    assert program.filter(tagged)
    assert not program.filter(synth.udp_frame("203.0.113.9", SERVER, Q, 4000, 53, vlan=(11,)))
    # The extra filter narrows the queries, not the SYN-ACKs (their source is the server).
    program = pcapy.compile(1, 65535, build_filter((53, 5353), ("tcp",), "src net "
                                                   "198.51.100.0/24", sent=SENT_ETHERNET), 1, 0)
    assert program.filter(frame(MATCH["SYN-ACK sent"]))
    assert program.filter(frame((syn_ack(5353), True, ())))
    assert not program.filter(frame(MATCH["udp query"]))


@pytest.mark.parametrize("linktype,sent", [(12, None), (113, "outbound"), (228, None),
                                           (229, None), (276, "outbound")])
def test_build_filter_compiles_without_vlan(linktype: int, sent: str | None) -> None:
    pcapy.compile(linktype, 512, build_filter((53,), ("udp", "tcp"), "not src host 192.0.2.9",
                                              vlan=False, sent=sent), 1, 0)


def test_build_filter_needs_ports_and_protocols() -> None:
    with pytest.raises(FlooddError):
        build_filter((), ("udp",))
    with pytest.raises(FlooddError):
        build_filter((53,), ())


def test_sent_by_host() -> None:
    assert sent_by_host(113, "any") == sent_by_host(276, "any") == "outbound"
    assert sent_by_host(12, "tun0") is None  # raw IP: nothing in the frame tells
    assert sent_by_host(1, "lo") is None  # its address is all zeros, on every frame
    assert sent_by_host(1, "nosuchif0") is None


# Live capture (root only), in the lab: BIND in the server namespace, clients in the
# other, on both ends of a veth pair.

needs_root = pytest.mark.skipif(not ROOT, reason="live capture needs root")


@needs_root
def test_live_errors() -> None:
    with pytest.raises(FlooddError, match="^cannot capture on interface nosuchif0: "):
        LiveCapture("nosuchif0", CaptureConfig())
    with pytest.raises(FlooddError, match="^bad capture filter .*syntax error"):
        LiveCapture("lo", CaptureConfig(bpf_filter="port ("))


# Captures until a line arrives on stdin, then a little longer: the kernel hands
# packets over in blocks, retired at the latest after libpcap's timeout.
CHILD = r"""
import json, select, socket, sys, time
from floodd.detect.capture import LiveCapture, sent_by_host
from floodd.config import CaptureConfig

cap = LiveCapture(sys.argv[1], CaptureConfig(batch_size=64))
started = time.monotonic()
idle = cap.read(0.4)
print(json.dumps({"linktype": cap.linktype, "sent": sent_by_host(cap.linktype, sys.argv[1]),
                  "idle_seconds": time.monotonic() - started,
                  "idle_records": len(idle.records)}), flush=True)
records = []
frames = ignored = 0
deadline = time.monotonic() + 60
stop = deadline
while time.monotonic() < min(stop, deadline):
    batch = cap.read(0.1)
    records += batch.records
    frames += batch.frames
    ignored += batch.ignored
    if stop == deadline and select.select([sys.stdin], [], [], 0)[0]:
        stop = time.monotonic() + 0.5
stats = cap.stats()
family = {4: socket.AF_INET, 16: socket.AF_INET6}
read_until = time.monotonic()
print(json.dumps({
    "monotonic": all(started <= r[0] <= read_until for r in records),
    "records": [[socket.inet_ntop(family[len(r[1])], r[1]), *r[2:]] for r in records],
    "frames": frames, "ignored": ignored,
    "received": stats.received, "dropped": stats.dropped}), flush=True)
cap.close()
"""

SENDER = r"""
import socket, sys
from lab.synth import dns_query
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 0))
for qtype in ("A", "AAAA", "ANY", "TYPE65399"):
    s.sendto(dns_query("example.com", qtype, 1), (sys.argv[2], 53))
"""

LIVE_CLIENT = "198.51.100.7"
LIVE_CLIENT6 = "2001:db8:1::7"
FORGED = "198.18.0.9"  # the server's SYN-ACK to it leaves, and dies in the client namespace
FORGED_HOP = 50


def _send_frames(ifname: str, frames: list[bytes]) -> None:
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
        sock.bind((ifname, 0))
        for data in frames:
            sock.send(data)


def forged_segment(flags: int, seq: int, ack: int = 0, data: bytes = b"") -> bytes:
    """A TCP segment claiming to come from FORGED, arriving with TTL FORGED_HOP."""
    tcp = synth.tcp_segment(FORGED, Lab.server_v4, data, 40404, seq=seq, ack=ack,
                            flags=flags)[20:]
    return synth.ip_packet(FORGED, Lab.server_v4, 6, tcp, ttl=FORGED_HOP)


def dig(lab: Lab, ns: str, *args: str) -> None:
    lab.run(ns, ["dig", "+tries=1", "+timeout=1", *args], check=False, timeout=20)


@needs_root
@pytest.mark.parametrize("on", ["veth", "any"])
def test_live_capture_in_namespaces(dns_lab: Lab, in_client: Any, wait_for: Any,
                                    on: str) -> None:
    """Queries over UDP and TCP (IPv4 and IPv6) from a real client: records stamped
    with the monotonic clock, each with its hop value; the TCP ones after the SYN are
    F_VERIFIED.  A forger's SYN gets the server's SYN-ACK, which it never sees: its
    segments are not verified.  This host's own queries are no records."""
    lab = dns_lab
    lab.add_client_address(LIVE_CLIENT)
    lab.add_client_address(LIVE_CLIENT6)
    interface = lab.server_if if on == "veth" else "any"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    child = lab.popen(lab.server_ns, [sys.executable, "-c", CHILD, interface],
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                      text=True, env=env)
    assert child.stdout is not None and child.stdin is not None
    first = json.loads(child.stdout.readline() or "null")
    assert first is not None, child.stderr.read() if child.stderr else ""
    assert 0.3 <= first["idle_seconds"] < 1.5  # read() honours its timeout when idle
    assert first["idle_records"] == 0
    if on == "veth":
        mac = load.link_address(lab, lab.server_ns, lab.server_if)
        assert (first["linktype"], first["sent"]) == (1, f"ether src {mac.hex(':')}")
    else:
        assert (first["linktype"], first["sent"]) == (113, "outbound")

    lab.run(lab.client_ns, [sys.executable, "-c", SENDER, LIVE_CLIENT, lab.server_v4], env=env)
    dig(lab, lab.client_ns, "+notcp", "-b", LIVE_CLIENT, f"@{lab.server_v4}", "lab.example",
        "MX")
    dig(lab, lab.client_ns, "+tcp", "-b", LIVE_CLIENT, f"@{lab.server_v4}", "lab.example",
        "MX")
    dig(lab, lab.client_ns, "+tcp", "-b", LIVE_CLIENT6, f"@{lab.server_v6}", "www.lab.example",
        "AAAA")
    wire = load.lab_wire(lab)
    in_client(_send_frames, lab.client_if,
              [load.ethernet(wire, forged_segment(SYN, 1000))])
    # The server answered with its SYN-ACK (the connection waits for the ACK); the
    # forger, who never sees it, guesses its number.
    assert wait_for(lambda: FORGED in lab.run(lab.server_ns, [
        "ss", "-Htn", "state", "syn-recv"], text=True).stdout)
    in_client(_send_frames, lab.client_if, [
        load.ethernet(wire, forged_segment(ACK, 1001, 1)),
        load.ethernet(wire, forged_segment(ACK | synth.TCP_PSH, 1001, 1,
                                           struct.pack("!H", len(Q)) + Q))])
    # This host's own queries, to a client address (nothing answers there).
    dig(lab, lab.server_ns, "+notcp", f"@{LIVE_CLIENT}", "example.org", "A")
    dig(lab, lab.server_ns, "+tcp", f"@{LIVE_CLIENT}", "example.org", "A")
    out, err = child.communicate("done\n", timeout=90)
    result = json.loads(out or "null")
    assert result is not None, err

    got = [tuple(r) for r in result["records"]]
    assert {r[0] for r in got} == {LIVE_CLIENT, LIVE_CLIENT6, FORGED}, got
    udp = [r for r in got if r[1] == 17]
    assert sorted(r[2] for r in udp) == [1, 15, 28, 255, 65399], got
    assert all(r[0] == LIVE_CLIENT and r[3:] == (0, 64) for r in udp), got
    for client, qtype in ((LIVE_CLIENT, 15), (LIVE_CLIENT6, 28)):
        tcp = [r for r in got if r[0] == client and r[1] == 6]
        assert tcp[0][2:] == (-1, 0, 64), got  # the SYN
        assert len(tcp) > 2 and all(r[3] == F_VERIFIED and r[4] == 64 for r in tcp[1:]), got
        assert qtype in [r[2] for r in tcp], got
    forged = [r for r in got if r[0] == FORGED]
    assert [r[3:] for r in forged] == [(0, FORGED_HOP)] * 3, got
    # The SYN-ACKs to both clients and the forger: not records, not ignored.
    syn_acks = result["frames"] - result["ignored"] - len(got)
    assert syn_acks >= 3, result
    assert result["received"] >= result["frames"] and result["dropped"] == 0
    assert result["monotonic"]  # stamped with the monotonic clock at the read, not the wall


# Leaving banned sources out and sampling, on a live capture of the lab's server veth
# (no BIND needed: the capture sees frames whatever answers them).  The capture lives
# in the server namespace (its sockets there), frames leave from the client's end.

def _paced(ifname: str, frames: list[bytes]) -> None:
    """Send ``frames`` a hundred at a time: a burst would overflow the veth's backlog."""
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
        sock.bind((ifname, 0))
        for i, data in enumerate(frames):
            sock.send(data)
            if i % 100 == 99:
                time.sleep(0.002)


def _drain(cap: LiveCapture) -> list[tuple[str, int]]:
    """(source, weight) of each record read until the capture has been idle a while."""
    family = {4: socket.AF_INET, 16: socket.AF_INET6}
    got: list[tuple[str, int]] = []
    idle = 0
    deadline = time.monotonic() + 20
    while idle < 4 and time.monotonic() < deadline:
        batch = cap.read(0.1)
        idle = 0 if batch.frames else idle + 1
        got += [(socket.inet_ntop(family[len(r[1])], r[1]), cap.weight) for r in batch.records]
    return got


class LabCapture:
    """A LiveCapture of the server veth, driven from the server namespace."""

    def __init__(self, lab: Lab, in_server: Any, in_client: Any, **kw: Any) -> None:
        self.lab, self.in_server, self.in_client = lab, in_server, in_client
        self.wire = load.lab_wire(lab)
        self.cap: LiveCapture = in_server(LiveCapture, lab.server_if,
                                          CaptureConfig(batch_size=256), **kw)

    def frame(self, packet: bytes, vlan: tuple[int, ...] = ()) -> bytes:
        return self.wire.server_mac + self.wire.client_mac + synth.link_frame(
            packet, vlan=vlan)[12:]

    def send(self, frames: list[bytes]) -> None:
        self.in_client(_paced, self.lab.client_if, frames)

    def exchange(self, frames: list[bytes]) -> tuple[int, list[tuple[str, int]]]:
        """Send ``frames``, read what comes: (packets the capture received, records)."""
        before = self.cap.stats().received
        self.send(frames)
        got = self.in_server(_drain, self.cap)
        return self.cap.stats().received - before, got

    def close(self) -> None:
        self.in_server(self.cap.close)


@pytest.fixture
def lab_capture(lab: Lab, in_server: Any, in_client: Any) -> Any:
    made: list[LabCapture] = []

    def make(**kw: Any) -> LabCapture:
        made.append(LabCapture(lab, in_server, in_client, **kw))
        return made[-1]
    yield make
    for capture in made:
        capture.close()


def _udp(source: str, count: int, ttl: int = 64) -> list[bytes]:
    server = Lab.server_v6 if ":" in source else Lab.server_v4
    return [synth.udp_datagram(source, server, synth.dns_query("www.lab.example", "A", i),
                               1024 + i, ttl=ttl) for i in range(count)]


def _syns(source: str, count: int) -> list[bytes]:
    return [synth.tcp_segment(source, Lab.server_v4, b"", 2000 + i, flags=SYN)
            for i in range(count)]


def _ban(network: str, scope: Scope = WHOLE) -> Target:
    return Target(ip_network(network), scope)


@needs_root
def test_live_exclude(lab_capture: Any) -> None:
    """Excluded bans' packets no longer reach the capture (the kernel's received count),
    exactly those the bans drop: a UDP-only ban's TCP and a ban's spared hop value still
    pass, a qtype ban is not excluded, and only ``exclude_max`` bans apply."""
    c = lab_capture(exclude_max=5)
    bans = [_ban("198.18.0.1/32"), _ban("198.18.0.2/32", UDP_ONLY),
            _ban("198.18.0.3/32", Scope(True, None, (64,))),
            _ban("198.18.0.5/32", Scope(True, 255)), _ban("203.0.113.0/24"),
            _ban("2001:db8:1::1/128"), _ban("198.18.0.6/32")]
    left_out = [*_udp("198.18.0.1", 10), *_syns("198.18.0.1", 3), *_udp("198.18.0.2", 10),
                *_udp("198.18.0.3", 10, ttl=50), *_udp("203.0.113.9", 10),
                *_udp("2001:db8:1::1", 10)]
    passing = [*_syns("198.18.0.2", 3), *_udp("198.18.0.3", 10, ttl=64),
               *_udp("198.18.0.5", 4), *_udp("198.18.0.6", 4), *_udp("198.51.100.7", 10),
               *_udp("2001:db8:1::2", 4)]
    tagged_out = [c.frame(p, (11,)) for p in _udp("198.18.0.1", 3)]
    tagged_in = [c.frame(p, (11,)) for p in _udp("198.51.100.7", 3)]
    frames = [c.frame(p) for p in left_out + passing] + tagged_out + tagged_in
    assert c.in_server(c.cap.exclude, bans) == 5
    program = attached(c.cap._fd)
    assert c.in_server(c.cap.exclude, list(bans)) == 5  # the same again: nothing changes
    assert attached(c.cap._fd) == program
    received, got = c.exchange(frames)
    assert received == len(passing) + len(tagged_in) == len(got), Counter(got)
    assert Counter(s for s, _ in got) == Counter(
        {"198.18.0.2": 3, "198.18.0.3": 10, "198.18.0.5": 4, "198.18.0.6": 4,
         "198.51.100.7": 13, "2001:db8:1::2": 4})
    assert c.in_server(c.cap.exclude, []) == 0  # the plain filter again
    received, got = c.exchange(frames)
    assert received == len(frames) == len(got)


@needs_root
def test_live_exclude_keeps_what_the_ring_holds(lab_capture: Any) -> None:
    """A new filter is not run over packets already in the ring: the excluded source's
    queries that arrived before are still read, and nothing else is lost."""
    c = lab_capture()
    banned, other = "198.18.0.1", "198.51.100.7"
    c.send([c.frame(p) for p in _udp(banned, 50) + _udp(other, 50)])
    time.sleep(0.1)  # through the kernel's filter, not read
    c.in_server(c.cap.exclude, [_ban(f"{banned}/32")])
    received, got = c.exchange([c.frame(p) for p in _udp(banned, 50) + _udp(other, 50)])
    assert Counter(s for s, _ in got) == {banned: 50, other: 100}
    assert received == 50  # since the change: the other source's only


@needs_root
def test_live_sampling(lab_capture: Any) -> None:
    """1 in 4 kept at random by the kernel, each record standing for 4; with exclusions
    in the same program; back to every packet at 1."""
    c = lab_capture()
    other, banned = "198.51.100.7", "198.18.0.1"
    c.in_server(c.cap.sample, 4)
    assert c.cap.sampling == 4
    received, got = c.exchange([c.frame(p) for p in _udp(other, 4000)])
    # 1,000 expected, standard deviation ~27.
    assert 700 < received < 1300 and len(got) == received, received
    assert {w for _, w in got} == {4}
    assert c.in_server(c.cap.exclude, [_ban(f"{banned}/32")]) == 1
    assert attached(c.cap._fd)[:2] == [(0x20, 0, 0, 0xFFFFF038), (0x54, 0, 0, 3)]
    received, got = c.exchange([c.frame(p) for p in _udp(banned, 2000) + _udp(other, 2000)])
    assert 300 < received < 700 and {s for s, _ in got} == {other}, received
    c.in_server(c.cap.sample, 1)
    received, got = c.exchange([c.frame(p) for p in _udp(banned, 200) + _udp(other, 200)])
    assert received == 200 and Counter(got) == {(other, 1): 200}


@needs_root
def test_live_sampling_change_weighs_the_backlog_apart(lab_capture: Any) -> None:
    """Packets kept before a change of the rate and read after it count at the old
    rate: a batch never mixes rates."""
    c = lab_capture()
    c.send([c.frame(p) for p in _udp("198.51.100.7", 300)])
    time.sleep(0.1)
    c.in_server(c.cap.sample, 4)
    c.send([c.frame(p) for p in _udp("198.51.100.8", 2000)])
    got = Counter(c.in_server(_drain, c.cap))
    assert got[("198.51.100.7", 1)] == 300 and set(got) <= {("198.51.100.7", 1),
                                                              ("198.51.100.8", 4)}
    assert 300 < got[("198.51.100.8", 4)] < 700, got


@needs_root
def test_live_exclude_within_the_kernel_limit(lab_capture: Any) -> None:
    """Too many bans for one program: the first ones (the heaviest) apply, the program
    fits the kernel, the rest of the bans still reach the capture."""
    c = lab_capture(exclude_max=600)
    bans = [_ban(f"198.18.{i // 200}.{i % 200 + 1}/32", [WHOLE, UDP_ONLY,
                                                         Scope(True, None, (64,))][i % 3])
            for i in range(600)]
    applied = c.in_server(c.cap.exclude, bans)
    assert 0 < applied < len(bans)
    assert len(attached(c.cap._fd)) <= BPF_MAXINSNS
    c.in_server(c.cap.sample, 2)  # sampling still fits
    c.in_server(c.cap.sample, 1)
    last, first_left = bans[applied - 1].network, bans[applied].network
    frames = [c.frame(p) for p in _udp(str(last.network_address), 20, ttl=50)
              + _udp(str(first_left.network_address), 20, ttl=50)]
    _, got = c.exchange(frames)
    assert Counter(s for s, _ in got) == {str(first_left.network_address): 20}


@needs_root
def test_live_exclude_and_sample_errors() -> None:
    with pytest.raises(FlooddError, match=r"^capture exclusions -1: expected a count, 0 or "
                       r"more$"):
        LiveCapture("lo", CaptureConfig(), exclude_max=-1)
    cap = LiveCapture("lo", CaptureConfig(max_sampling=64), exclude_max=0)
    try:
        for n in (0, 3, 128, True):
            with pytest.raises(FlooddError, match=rf"^capture sampling {n!r}: expected a "
                               r"power of two from 1 to 64$"):
                cap.sample(n)
        with pytest.raises(FlooddError, match=r"^cannot exclude '198.18.0.1' from the "
                           r"capture: not a ban$"):
            cap.exclude(["198.18.0.1"])  # type: ignore[list-item]
        assert cap.exclude([_ban("198.18.0.1/32")]) == 0  # exclusions off
        assert cap.sampling == 1 and cap.weight == 1
    finally:
        cap.close()
