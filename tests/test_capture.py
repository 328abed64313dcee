"""floodd.detect.capture: capture files (pcap and pcapng), the BPF filter, and a live capture
on a veth pair between two network namespaces made by the test."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import dpkt
import pcapy
import pytest

from lab import synth
from floodd.detect.capture import LiveCapture, OfflineCapture, build_filter
from floodd.config import CaptureConfig
from floodd.errors import FlooddError
from floodd.detect.parse import F_FRAGMENT, Record

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


# The BPF filter.

Q = synth.dns_query("example.com", "A")


def v4_frags() -> list[bytes]:
    return [synth.link_frame(p)
            for p in synth.fragments(synth.udp_datagram(CLIENT, SERVER, Q, 4000), 16)]


def v6_frags() -> list[bytes]:
    packet = synth.udp_datagram("2001:db8::7", "2001:db8::53", Q, 4000)
    return [synth.link_frame(p) for p in synth.fragments(packet, 16)]


MATCH = {
    "udp query": synth.udp_frame(CLIENT, SERVER, Q, 4000),
    "udp query, VLAN": synth.udp_frame(CLIENT, SERVER, Q, 4000, vlan=(11,)),
    "udp query, QinQ": synth.udp_frame(CLIENT, SERVER, Q, 4000, vlan=(100, 11)),
    "udp query, IPv6": synth.link_frame(synth.udp_datagram("2001:db8::7", "2001:db8::53",
                                                           Q, 4000)),
    "tcp SYN": synth.link_frame(synth.tcp_segment(CLIENT, SERVER, b"", 4000,
                                                  flags=synth.TCP_SYN)),
    "first IPv4 fragment": v4_frags()[0],
    "last IPv4 fragment": v4_frags()[-1],
    "last IPv4 fragment, VLAN": synth.link_frame(
        synth.fragments(synth.udp_datagram(CLIENT, SERVER, Q, 4000), 16)[-1], vlan=(11,)),
    "first IPv6 fragment": v6_frags()[0],
    "last IPv6 fragment": v6_frags()[-1],
}
NO_MATCH = {
    "udp response": synth.udp_frame(SERVER, CLIENT, Q, 53, 4000),
    "other port": synth.udp_frame(CLIENT, SERVER, Q, 4000, 5353),
    "ARP": bytes(12) + b"\x08\x06" + bytes(28),
    "ICMP fragment": synth.link_frame(synth.fragments(
        synth.ip_packet(CLIENT, SERVER, 1, bytes(40)), 16)[-1]),
}


def test_build_filter_matches() -> None:
    program = pcapy.compile(1, 65535, build_filter((53,), ("udp", "tcp")), 1, 0)
    for name, frame in MATCH.items():
        assert program.filter(frame), name
    for name, frame in NO_MATCH.items():
        assert not program.filter(frame), name


def test_build_filter_ports_protocols_extra() -> None:
    expr = build_filter((53, 5353), ("udp",), "src net 198.51.100.0/24")
    program = pcapy.compile(1, 65535, expr, 1, 0)
    assert program.filter(synth.udp_frame(CLIENT, SERVER, Q, 4000, 5353))
    assert not program.filter(synth.udp_frame("203.0.113.9", SERVER, Q, 4000, 53))
    assert not program.filter(MATCH["tcp SYN"])
    tagged = synth.udp_frame(CLIENT, SERVER, Q, 4000, 53, vlan=(11,))
    assert program.filter(tagged)
    assert not program.filter(synth.udp_frame("203.0.113.9", SERVER, Q, 4000, 53, vlan=(11,)))


@pytest.mark.parametrize("linktype", [12, 113, 228, 229, 276])
def test_build_filter_compiles_without_vlan(linktype: int) -> None:
    pcapy.compile(linktype, 512, build_filter((53,), ("udp", "tcp"), "not src host 192.0.2.9",
                                              vlan=False), 1, 0)


def test_build_filter_needs_ports_and_protocols() -> None:
    with pytest.raises(FlooddError):
        build_filter((), ("udp",))
    with pytest.raises(FlooddError):
        build_filter((53,), ())


# Live capture (root only).

needs_root = pytest.mark.skipif(not ROOT, reason="live capture needs root")


@needs_root
def test_live_errors() -> None:
    with pytest.raises(FlooddError, match="^cannot capture on interface nosuchif0: "):
        LiveCapture("nosuchif0", CaptureConfig())
    with pytest.raises(FlooddError, match="^bad capture filter .*syntax error"):
        LiveCapture("lo", CaptureConfig(bpf_filter="port ("))


CHILD = r"""
import json, socket, sys, time
from floodd.detect.capture import LiveCapture
from floodd.config import CaptureConfig

cap = LiveCapture(sys.argv[1], CaptureConfig(batch_size=64))
started = time.monotonic()
idle = cap.read(0.4)
print(json.dumps({"linktype": cap.linktype, "idle_seconds": time.monotonic() - started,
                  "idle_records": len(idle.records)}), flush=True)
want = int(sys.argv[2])
records = []
deadline = time.monotonic() + 10
while len(records) < want and time.monotonic() < deadline:
    records += cap.read(0.2).records
stats = cap.stats()
family = {4: socket.AF_INET, 16: socket.AF_INET6}
read_until = time.monotonic()
print(json.dumps({
    "monotonic": all(started <= r[0] <= read_until for r in records),
    "records": [[socket.inet_ntop(family[len(r[1])], r[1]), r[2], r[3], r[4]]
                for r in records],
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


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=20)


@pytest.fixture
def lab() -> Iterator[tuple[str, str, str]]:
    """Namespaces srv (192.0.2.1 on its veth) and cli (198.51.100.7), no default route."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2 is not installed")
    tag = f"{os.getpid() % 100000}"
    srv, cli, veth_srv, veth_cli = f"fdsrv{tag}", f"fdcli{tag}", f"fds{tag}", f"fdc{tag}"
    try:
        run("ip", "netns", "add", srv)
        run("ip", "netns", "add", cli)
        run("ip", "link", "add", veth_srv, "type", "veth", "peer", "name", veth_cli)
        run("ip", "link", "set", veth_srv, "netns", srv)
        run("ip", "link", "set", veth_cli, "netns", cli)
        for ns, dev, addr, peer in ((srv, veth_srv, SERVER, "198.51.100.0/24"),
                                    (cli, veth_cli, CLIENT, "192.0.2.0/24")):
            run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            run("ip", "-n", ns, "link", "set", dev, "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")
            run("ip", "-n", ns, "route", "add", peer, "dev", dev)
        yield srv, cli, veth_srv
    finally:
        for ns in (srv, cli):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


@needs_root
def test_live_capture_in_namespaces(lab: tuple[str, str, str]) -> None:
    srv, cli, veth_srv = lab
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    child = subprocess.Popen(["ip", "netns", "exec", srv, sys.executable, "-c", CHILD,
                              veth_srv, "6"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env)
    try:
        assert child.stdout is not None
        first = json.loads(child.stdout.readline() or "null")
        assert first is not None, child.stderr.read() if child.stderr else ""
        assert first["linktype"] == 1 and first["idle_records"] == 0
        assert 0.3 <= first["idle_seconds"] < 1.5  # read() honours its timeout when idle
        subprocess.run(["ip", "netns", "exec", cli, sys.executable, "-c", SENDER, CLIENT,
                        SERVER], check=True, env=env, timeout=20)
        if shutil.which("dig"):
            for extra in ("+notcp", "+tcp"):
                subprocess.run(["ip", "netns", "exec", cli, "dig", extra, "+tries=1",
                                "+timeout=1", "-b", CLIENT, f"@{SERVER}", "example.org", "MX"],
                               capture_output=True, timeout=20)
        out, err = child.communicate(timeout=20)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    result = json.loads(out)
    got = [tuple(r) for r in result["records"]]
    assert all(r[0] == CLIENT for r in got), got
    udp = sorted(r[2] for r in got if r[1] == 17)
    want = [1, 28, 255, 65399] + ([15] if shutil.which("dig") else [])
    assert udp == sorted(want), got
    if shutil.which("dig"):
        assert (CLIENT, 6, -1, 0) in got  # the TCP SYN of dig +tcp, refused
    assert result["received"] >= len(got) and result["dropped"] == 0
    assert result["monotonic"]  # stamped with the monotonic clock at the read, not the wall

