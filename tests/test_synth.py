"""lab.synth: frames that dpkt and libpcap accept, with correct checksums."""

from __future__ import annotations

import struct
from collections import Counter
from pathlib import Path

import dpkt
import pytest

from lab import synth
from floodd.detect.capture import OfflineCapture
from floodd.detect.parse import LINKTYPE_LINUX_SLL


def internet_checksum_ok(data: bytes) -> bool:
    """A buffer that includes its own checksum sums to 0xFFFF (RFC 1071)."""
    data += b"\x00" * (len(data) % 2)
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total == 0xFFFF


def udp_checksums_ok(packet: bytes) -> bool:
    if packet[0] >> 4 == 4:
        ip = dpkt.ip.IP(packet)
        pseudo = ip.src + ip.dst + struct.pack("!BBH", 0, ip.p, len(packet) - 20)
        return internet_checksum_ok(packet[:20]) and internet_checksum_ok(pseudo + packet[20:])
    ip6 = dpkt.ip6.IP6(packet)
    l4 = bytes(packet[40:])
    pseudo = ip6.src + ip6.dst + struct.pack("!I3xB", len(l4), 17)
    return internet_checksum_ok(pseudo + l4)


def test_dns_query_decodes() -> None:
    msg = dpkt.dns.DNS(synth.dns_query("www.example.com", "AAAA", 0x1234))
    assert (msg.id, msg.qr, msg.rd, len(msg.qd)) == (0x1234, 0, 1, 1)
    assert (msg.qd[0].name, msg.qd[0].type, msg.qd[0].cls) == ("www.example.com", 28, 1)


def test_encode_name() -> None:
    assert synth.encode_name(".") == b"\x00"
    assert synth.encode_name("a.b.") == b"\x01a\x01b\x00"
    with pytest.raises(ValueError):
        synth.encode_name("x" * 64 + ".example")


@pytest.mark.parametrize("src,dst", [("198.51.100.7", "192.0.2.1"),
                                     ("2001:db8::7", "2001:db8::53")])
def test_udp_checksums(src: str, dst: str) -> None:
    for size in (0, 1, 33):
        packet = synth.udp_datagram(src, dst, bytes(range(size)), 40000)
        assert udp_checksums_ok(packet)


@pytest.mark.parametrize("src,dst", [("198.51.100.7", "192.0.2.1"),
                                     ("2001:db8::7", "2001:db8::53")])
def test_udp_datagram_ttl(src: str, dst: str) -> None:
    default = synth.udp_datagram(src, dst, b"q", 40000)
    forged = synth.udp_datagram(src, dst, b"q", 40000, ttl=50)
    if ":" in src:
        assert (dpkt.ip6.IP6(default).hlim, dpkt.ip6.IP6(forged).hlim) == (64, 50)
    else:
        assert (dpkt.ip.IP(default).ttl, dpkt.ip.IP(forged).ttl) == (64, 50)
    assert udp_checksums_ok(forged)

def test_tcp_segment_checksum() -> None:
    packet = synth.tcp_segment("198.51.100.7", "192.0.2.1", b"\x00\x05hello", 40000,
                               seq=2**32 - 1, flags=synth.TCP_PSH | synth.TCP_ACK)
    tcp = dpkt.ip.IP(packet).data
    assert isinstance(tcp, dpkt.tcp.TCP) and tcp.seq == 2**32 - 1
    pseudo = packet[12:20] + struct.pack("!BBH", 0, 6, len(packet) - 20)
    assert internet_checksum_ok(pseudo + packet[20:])


def test_fragments_reassemble() -> None:
    packet = synth.udp_datagram("198.51.100.7", "192.0.2.1", bytes(100), 40000)
    pieces = synth.fragments(packet, 24)
    assert len(pieces) == 5
    assert all(internet_checksum_ok(p[:20]) for p in pieces)
    assert b"".join(p[20:] for p in pieces) == packet[20:]
    with pytest.raises(ValueError):
        synth.fragments(packet, 12)


def test_link_frames() -> None:
    packet = synth.udp_datagram("198.51.100.7", "192.0.2.1", b"x", 1)
    eth = dpkt.ethernet.Ethernet(synth.link_frame(packet, vlan=(100, 11)))
    assert [t.id for t in eth.vlan_tags] == [100, 11] and isinstance(eth.data, dpkt.ip.IP)
    sll = dpkt.sll.SLL(synth.link_frame(packet, LINKTYPE_LINUX_SLL))
    assert isinstance(sll.data, dpkt.ip.IP)
    with pytest.raises(ValueError):
        synth.link_frame(packet, 105)


def test_flood_capture(tmp_path: Path) -> None:
    path = str(tmp_path / "flood.pcap")
    flood = synth.generate_flood_capture(path, 5000, 300, heavy=3, heavy_share=0.5, seed=4)
    again = synth.generate_flood_capture(str(tmp_path / "again.pcap"), 5000, 300, heavy=3,
                                         heavy_share=0.5, seed=4)
    assert Path(path).read_bytes() == Path(again.path).read_bytes()
    assert flood.packets == sum(flood.per_source.values()) == 5000
    assert len(flood.per_source) <= 300 and len(flood.heavy) == 3
    assert 2200 < sum(flood.per_source[h] for h in flood.heavy) < 2800
    assert all(addr[0] == 198 and addr[1] in (18, 19) for addr in flood.per_source)

    capture = OfflineCapture(path)
    sources: Counter[bytes] = Counter()
    qtypes: Counter[int] = Counter()
    while (batch := capture.read(0.0)) is not None:
        assert all(r[4] == 0 for r in batch.records)
        sources.update(r[1] for r in batch.records)
        qtypes.update(r[3] for r in batch.records)
    capture.close()
    assert sources == Counter(flood.per_source) and qtypes == Counter(flood.per_qtype)
    assert {255, 65399} <= set(qtypes)

    with open(path, "rb") as f:
        for i, (_, buf) in enumerate(dpkt.pcap.Reader(f)):
            assert udp_checksums_ok(buf[14:])
            if i == 200:
                break
