"""floodd.detect.parse: real captures against an independent dpkt count, hand-built frames,
and property tests (random bytes, truncations, a reference DNS question walker)."""

from __future__ import annotations

import hashlib
import re
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import dpkt
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from lab import synth
from floodd.detect.capture import OfflineCapture
from floodd.errors import FlooddError
from floodd.detect.parse import (
    F_EXTRA,
    F_FRAGMENT,
    F_MALFORMED,
    F_VERIFIED,
    FLOW_TIMEOUT,
    FRAGMENT_TIMEOUT,
    MAX_DATAGRAMS,
    MAX_FLOWS,
    MAX_HANDSHAKES,
    VERIFY_WINDOW,
    MAX_QUESTIONS,
    Batch,
    Parser,
    Records,
    Record,
)
from floodd.qtypes import qtype_code, qtype_name

PCAPS = Path(__file__).parent / "data" / "pcaps"  # vendored: see its SOURCES.md
EXPECTED = yaml.safe_load((Path(__file__).parent / "data" / "parse_pcaps.yaml").read_text())

CLIENT = "198.51.100.7"
SERVER = "192.0.2.1"
CLIENT6 = "2001:db8::7"
SERVER6 = "2001:db8::53"
CLIENT_PACKED = bytes([198, 51, 100, 7])
ETH, RAW, SLL, RAW_FILE, IPV4, IPV6, SLL2 = 1, 12, 113, 101, 228, 229, 276


def parse(frames: Iterable[bytes], linktype: int = ETH, **kw: Any) -> Batch:
    """Frames one second apart through a fresh parser, then its flush."""
    parser = Parser(linktype, **kw)
    batch = parser.parse_frames((float(i), f) for i, f in enumerate(frames))
    rest = parser.flush()
    return Batch([*batch.records, *rest.records], batch.frames, batch.ignored)


def one(frame: bytes, linktype: int = ETH, **kw: Any) -> Record:
    batch = parse([frame], linktype, **kw)
    assert len(batch.records) == 1, batch
    return batch.records[0]


def query(qname: str = "www.example.com", qtype: int | str = "A", txid: int = 7) -> bytes:
    return synth.dns_query(qname, qtype, txid)


def udp4(payload: bytes, sport: int = 40000, dport: int = 53) -> bytes:
    return synth.udp_datagram(CLIENT, SERVER, payload, sport, dport)


def read_file(path: Path, batch_size: int = 7) -> tuple[list[Record], int, int]:
    """All records of a capture through OfflineCapture (small batches: state crosses them)."""
    capture = OfflineCapture(str(path), batch_size=batch_size)
    records: list[Record] = []
    frames = ignored = 0
    while (batch := capture.read(0.0)) is not None:
        records += batch.records
        frames += batch.frames
        ignored += batch.ignored
    capture.close()
    return records, frames, ignored


# ---------------------------------------------------------------------------
# An independent reference: dpkt for the headers, its own reassembly and its own
# walk of the question (same rules as SOURCES.md: queries are QR=0 messages to a
# DNS port; a compression pointer must point before the run it ends), and its own
# record of TCP handshakes (a SYN-ACK from the DNS port, then the client's ACK of
# its sequence number + 1).


def reference_qtype(msg: bytes) -> int | None:
    """The first question's type, or None when the message is not a well-formed query."""
    if len(msg) < 12:
        return None
    flags, qdcount = struct.unpack_from("!HH", msg, 2)
    if flags & 0x8000 or qdcount == 0:
        return None
    pos = floor = 12
    name_len = 1
    resume = None
    while pos < len(msg):
        kind = msg[pos] & 0xC0
        if kind == 0xC0:
            if pos + 2 > len(msg):
                return None
            target = struct.unpack_from("!H", msg, pos)[0] & 0x3FFF
            if target >= floor:
                return None
            resume = pos + 2 if resume is None else resume
            pos = floor = target
        elif kind:
            return None
        elif msg[pos] == 0:
            end = pos + 1 if resume is None else resume
            return struct.unpack_from("!H", msg, end)[0] if end + 4 <= len(msg) else None
        else:
            name_len += msg[pos] + 1
            pos += msg[pos] + 1
            if name_len > 255 or pos > len(msg):
                return None
    return None


@dataclass
class Reference:
    packets: Counter[bytes] = field(default_factory=Counter)  # per source
    qtypes: Counter[str] = field(default_factory=Counter)
    malformed: int = 0
    fragments: int = 0
    hops: Counter[int] = field(default_factory=Counter)  # a reassembled one: its first fragment's
    verified: int = 0  # client segments of connections whose handshake completed

    def message(self, msg: bytes) -> None:
        qtype = reference_qtype(msg)
        if qtype is None:
            self.malformed += 1
        else:
            self.qtypes[qtype_name(qtype)] += 1


def reference_count(path: Path, port: int = 53) -> Reference:
    ref = Reference()
    pieces: dict[tuple[bytes, bytes, int, int], dict[int, bytes]] = {}
    totals: dict[tuple[bytes, bytes, int, int], int] = {}
    first_hops: dict[tuple[bytes, bytes, int, int], int] = {}
    streams: dict[tuple[bytes, bytes, int, int], list[Any]] = {}  # [next seq, bytes]
    syn_acks: dict[tuple[bytes, bytes, int, int], int] = {}  # client's direction -> ack
    verified: set[tuple[bytes, bytes, int, int]] = set()
    syn, ack, rst = dpkt.tcp.TH_SYN, dpkt.tcp.TH_ACK, dpkt.tcp.TH_RST

    def transport(proto: int, src: bytes, dst: bytes, l4: bytes, fragment: bool,
                  hop: int) -> None:
        if proto not in (6, 17) or len(l4) < 4:
            return
        sport, dport = struct.unpack_from("!HH", l4)
        if proto == 6 and sport == port:
            tcp = dpkt.tcp.TCP(l4)
            if tcp.flags & (syn | ack | rst) == syn | ack:
                syn_acks[(dst, src, dport, sport)] = (tcp.seq + 1) & 0xFFFFFFFF
                return
        if dport != port:
            return
        ref.packets[src] += 1
        ref.fragments += fragment
        ref.hops[hop] += 1
        if proto == 17:
            ref.message(l4[8:])
            return
        tcp = dpkt.tcp.TCP(l4)
        key = (src, dst, sport, dport)
        if not tcp.flags & syn and (key in verified or (
                tcp.flags & (ack | rst) == ack and syn_acks.get(key) == tcp.ack)):
            verified.add(key)
            ref.verified += 1
        if tcp.flags & dpkt.tcp.TH_SYN:
            streams[key] = [(tcp.seq + 1) & 0xFFFFFFFF, b""]
        stream = streams.get(key)
        if stream is None or not tcp.data:
            return
        skip = (stream[0] - tcp.seq) & 0xFFFFFFFF
        if skip >= len(tcp.data):
            return
        stream[1] += tcp.data[skip:]
        stream[0] = (stream[0] + len(tcp.data) - skip) & 0xFFFFFFFF
        buf = stream[1]
        while len(buf) >= 2 and len(buf) >= 2 + struct.unpack_from("!H", buf)[0]:
            size = struct.unpack_from("!H", buf)[0]
            ref.message(buf[2:2 + size])
            buf = buf[2 + size:]
        stream[1] = buf

    with open(path, "rb") as f:
        reader = dpkt.pcap.Reader(f)
        linktype = reader.datalink()
        for _, buf in reader:
            if linktype == ETH:
                eth = dpkt.ethernet.Ethernet(buf)
                if not isinstance(eth.data, (dpkt.ip.IP, dpkt.ip6.IP6)):
                    continue
                raw = buf[14 + 4 * len(getattr(eth, "vlan_tags", [])):]
            else:
                raw = buf
            if raw[0] >> 4 == 4:
                ip = dpkt.ip.IP(raw)
                payload = raw[ip.hl * 4:ip.len]
                offset = ip.offset * 8  # dpkt gives it in 8-byte units
                if not ip.mf and not offset:
                    transport(ip.p, ip.src, ip.dst, payload, False, ip.ttl)
                    continue
                key = (ip.src, ip.dst, ip.id, ip.p)
                pieces.setdefault(key, {})[offset] = payload
                if not offset:
                    first_hops[key] = ip.ttl
                if not ip.mf:
                    totals[key] = offset + len(payload)
                if key in totals:
                    whole = b"".join(p for _, p in sorted(pieces[key].items()))
                    if len(whole) == totals[key]:
                        del pieces[key], totals[key]
                        transport(ip.p, ip.src, ip.dst, whole, True, first_hops.pop(key))
            else:
                ip6 = dpkt.ip6.IP6(raw)
                l4 = ip6.data
                if isinstance(l4, (dpkt.udp.UDP, dpkt.tcp.TCP)):
                    transport(ip6.nxt, ip6.src, ip6.dst, bytes(l4), False, ip6.hlim)
    return ref


@pytest.mark.parametrize("case", EXPECTED, ids=lambda c: c["file"])
def test_shared_capture(case: dict[str, Any]) -> None:
    records, frames, ignored = read_file(PCAPS / case["file"])
    assert frames == case["frames"]
    packets = [r for r in records if not r[4] & F_EXTRA]
    qtypes = Counter(qtype_name(r[3]) for r in records if r[3] >= 0)
    assert qtypes == Counter(case["qtypes"])
    assert sum(1 for r in records if r[4] & F_MALFORMED) == case["malformed"]
    assert len({r[1] for r in records}) == case["sources"]
    assert sum(1 for r in packets if r[4] & F_FRAGMENT) == case["fragments"]
    assert all(r[3] == -1 for r in records if r[4] & F_MALFORMED)
    assert Counter(r[5] for r in packets) == Counter(case["hops"])
    assert sum(1 for r in packets if r[4] & F_VERIFIED) == case["verified"]

    ref = reference_count(PCAPS / case["file"])
    assert Counter(r[1] for r in packets) == ref.packets
    assert qtypes == ref.qtypes
    assert sum(1 for r in records if r[4] & F_MALFORMED) == ref.malformed
    assert sum(1 for r in packets if r[4] & F_FRAGMENT) == ref.fragments
    assert Counter(r[5] for r in packets) == ref.hops
    assert sum(1 for r in packets if r[4] & F_VERIFIED) == ref.verified
    assert ignored <= frames - len(packets)


def test_shared_captures_all_listed() -> None:
    assert {c["file"] for c in EXPECTED} == {p.name for p in PCAPS.glob("*.pcap")}


def test_vendored_captures_match_their_sources() -> None:
    """Every capture SOURCES.md lists is here, byte for byte: a missing one fails, never skips."""
    listed = re.findall(r"^\| (\S+\.pcap) \| `([0-9a-f]{64})` \|$",
                        (PCAPS / "SOURCES.md").read_text(), flags=re.M)
    assert len(listed) == len(EXPECTED)
    for name, sha256 in listed:
        assert hashlib.sha256((PCAPS / name).read_bytes()).hexdigest() == sha256, name


def test_tcp_capture_segments_and_queries() -> None:
    path = PCAPS / "dnscap-dnso1tcp.pcap"
    records, _, _ = read_file(path, batch_size=1)
    assert {r[2] for r in records} == {6}
    assert len(records) == 87  # every client segment to port 53, SYN and ACKs included
    queries = Counter(qtype_name(r[3]) for r in records if r[3] >= 0)
    assert queries.total() == 41 and queries == reference_count(path).qtypes


def test_batch_size_does_not_change_the_result() -> None:
    for name in ("dnscap-frags.pcap", "dnscap-dnso1tcp.pcap", "dnsjit-dns.pcap"):
        assert read_file(PCAPS / name, 1)[0] == read_file(PCAPS / name, 4096)[0]


# ---------------------------------------------------------------------------
# Hand-built frames.


def test_udp_ipv4_ethernet_query() -> None:
    rec = one(synth.link_frame(udp4(query("www.example.com", "AAAA"))))
    assert rec == (0.0, CLIENT_PACKED, 17, 28, 0, 64)


@pytest.mark.parametrize("qtype", ["ANY", "TYPE65399", "A", "HTTPS"])
def test_qtype_names(qtype: str) -> None:
    rec = one(synth.link_frame(udp4(query(qtype=qtype))))
    assert qtype_name(rec[3]) == qtype
    assert rec[3] == qtype_code(qtype)


def test_any_is_255() -> None:
    assert one(synth.link_frame(udp4(query(qtype="ANY"))))[3] == 255


@pytest.mark.parametrize("linktype,vlan", [
    (ETH, ()), (ETH, (11,)), (ETH, (100, 11)), (ETH, (7, 8, 9)),
    (SLL, ()), (SLL2, ()), (RAW, ()), (RAW_FILE, ()), (IPV4, ()),
])
def test_link_types_ipv4(linktype: int, vlan: tuple[int, ...]) -> None:
    frame = synth.link_frame(udp4(query(qtype="MX")), linktype, vlan=vlan)
    assert one(frame, linktype)[1:] == (CLIENT_PACKED, 17, 15, 0, 64)


@pytest.mark.parametrize("linktype,vlan", [
    (ETH, ()), (ETH, (11,)), (ETH, (100, 11)), (SLL, ()), (SLL2, ()), (RAW, ()),
    (RAW_FILE, ()), (IPV6, ()),
])
def test_link_types_ipv6(linktype: int, vlan: tuple[int, ...]) -> None:
    packet = synth.udp_datagram(CLIENT6, SERVER6, query(qtype="AAAA"), 40000)
    rec = one(synth.link_frame(packet, linktype, vlan=vlan), linktype)
    assert rec[1] == bytes.fromhex("20010db8000000000000000000000007")
    assert rec[3] == 28 and rec[4] == 0


@pytest.mark.parametrize("ext", [(0,), (60,), (43,), (0, 43, 60)])
def test_ipv6_extension_headers(ext: tuple[int, ...]) -> None:
    packet = synth.udp_datagram(CLIENT6, SERVER6, query(qtype="ANY"), 40000, ext=ext)
    assert one(synth.link_frame(packet))[3:] == (255, 0, 64)


def test_outgoing_cooked_frames_are_ignored() -> None:
    for linktype in (SLL, SLL2):
        frame = synth.link_frame(udp4(query()), linktype, outgoing=True)
        batch = parse([frame], linktype)
        assert (batch.records, batch.ignored) == ([], 1)


def test_ipv4_with_options() -> None:
    packet = bytearray(udp4(query(qtype="TXT")))
    packet[0] = 0x46
    struct.pack_into("!H", packet, 2, len(packet) + 4)
    packet[20:20] = b"\x01\x01\x01\x00"  # NOP NOP NOP EOL
    assert one(synth.link_frame(bytes(packet)))[3] == 16


def test_responses_and_other_ports_are_ignored() -> None:
    response = bytearray(query())
    response[2] |= 0x80
    frames = [
        synth.link_frame(synth.udp_datagram(SERVER, CLIENT, bytes(response), 53, 40000)),
        synth.link_frame(udp4(query(), dport=5353)),
        synth.link_frame(synth.tcp_segment(SERVER, CLIENT, b"", 5353, 40000,
                                           flags=synth.TCP_SYN | synth.TCP_ACK)),
        bytes(12) + b"\x08\x06" + bytes(28),  # ARP
        synth.link_frame(synth.ip_packet(CLIENT, SERVER, 1, b"\x08\x00" + bytes(30))),
    ]
    batch = parse(frames)
    assert (batch.records, batch.frames, batch.ignored) == ([], 5, 5)


def test_response_to_port_53_counts_as_malformed() -> None:
    response = bytearray(query())
    response[2] |= 0x80
    rec = one(synth.link_frame(synth.udp_datagram(SERVER, CLIENT, bytes(response), 53, 53)))
    assert rec[1] == bytes([192, 0, 2, 1]) and rec[3:] == (-1, F_MALFORMED, 64)


def header(flags: int = 0x0100, qdcount: int = 1) -> bytes:
    return struct.pack("!HHHHHH", 9, flags, qdcount, 0, 0, 0)


QT_A = b"\x00\x01\x00\x01"


@pytest.mark.parametrize("payload", [
    b"",
    header()[:11],
    header(qdcount=0) + b"\x00" + QT_A,
    header() + b"\x03www",  # name runs off the end
    header() + b"\x03www\x00\x00\x01",  # question without its class
    header() + b"\xc0\x0c" + QT_A,  # pointer to itself
    header() + b"\xc0\x0e\xc0\x0c" + QT_A,  # forward pointer, then a loop
    header() + b"\x01a\xc0\x0c" + QT_A,  # loop through a label
    header() + b"\x01a\xc0\x0d" + QT_A,  # into its own run
    header() + b"\x41" + bytes(5) + QT_A,  # reserved label type 0x40
    header() + b"\x81" + bytes(5) + QT_A,  # reserved label type 0x80
    header() + b"\xc0",  # pointer cut in half
    header() + b"\x3f" + b"a" * 63 + b"\x3f" + b"a" * 63 + b"\x3f" + b"a" * 63
    + b"\x3f" + b"a" * 63 + b"\x00" + QT_A,  # 257-byte name
], ids=lambda p: p[12:20].hex() or f"len{len(p)}")
def test_malformed_queries(payload: bytes) -> None:
    rec = one(synth.link_frame(udp4(payload)))
    assert rec[1:] == (CLIENT_PACKED, 17, -1, F_MALFORMED, 64)
    assert one(synth.link_frame(udp4(payload), vlan=(3,))) == rec


def test_longest_name_is_well_formed() -> None:
    name = b"\x3f" + b"a" * 63 + b"\x3f" + b"a" * 63 + b"\x3f" + b"a" * 63 + b"\x3d" + b"a" * 61
    assert len(name + b"\x00") == 255
    rec = one(synth.link_frame(udp4(header() + name + b"\x00" + QT_A)))
    assert rec[3:] == (1, 0, 64)


def test_backward_pointer_is_followed() -> None:
    # The header's first bytes (query id 0x0000) read as the root label.
    payload = struct.pack("!HHHHHH", 0, 0x0100, 1, 0, 0, 0) + b"\x03www\xc0\x00" + QT_A
    assert one(synth.link_frame(udp4(payload)))[3:] == (1, 0, 64)


def test_ip_length_bounds_the_payload() -> None:
    # The IP datagram ends inside the name; the bytes after it in the frame do not count.
    packet = bytearray(udp4(query()))
    struct.pack_into("!H", packet, 2, 20 + 8 + 12 + 5)
    assert one(synth.link_frame(bytes(packet)))[3:] == (-1, F_MALFORMED, 64)
    # Ethernet padding after a whole datagram is harmless.
    assert one(synth.link_frame(udp4(query())) + bytes(20))[4] == 0


def test_truncated_frames() -> None:
    frame = synth.link_frame(udp4(query()))
    cut_inside_dns = parse([frame[:14 + 20 + 8 + 15]])
    assert cut_inside_dns.records[0][3:] == (-1, F_MALFORMED, 64)
    port_unreadable = parse([frame[:14 + 20 + 3]])
    assert (port_unreadable.records, port_unreadable.ignored) == ([], 1)
    source_unreadable = parse([frame[:14 + 15]])
    assert (source_unreadable.records, source_unreadable.ignored) == ([], 1)


def test_ports_and_protocols() -> None:
    frames = [synth.link_frame(udp4(query(), dport=53)),
              synth.link_frame(udp4(query(qtype="AAAA"), dport=5353)),
              synth.link_frame(synth.tcp_segment(CLIENT, SERVER, b"", 40000, 5353,
                                                 flags=synth.TCP_SYN))]
    batch = parse(frames, ports=(5353,), protocols=("udp",))
    assert [r[3] for r in batch.records] == [28] and batch.ignored == 2
    batch = parse(frames, ports=(53, 5353), protocols=("UDP", "tcp"))
    assert [r[3] for r in batch.records] == [1, 28, -1]


def test_unknown_link_type() -> None:
    with pytest.raises(FlooddError, match="unsupported link type 105"):
        Parser(105)


# Fragments.


def test_a_live_clock_stamps_records_and_runs_the_reassembly_timeouts() -> None:
    # A live capture passes its monotonic clock: the frames' wall-clock stamps, here
    # stepping an hour back then forward, neither expire nor keep pending fragments.
    first, *rest = synth.fragments(udp4(query(qtype="ANY")), 16)
    parser = Parser(ETH)
    assert parser.parse_frames([(5000.0, synth.link_frame(first))], now=100.0).records == []
    other = synth.link_frame(udp4(query(), dport=9))
    assert parser.parse_frames([(1400.0, other)], now=101.0).records == []
    assert parser.parse_frames([(8600.0, other)], now=102.0).records == []
    done = parser.parse_frames([(8601.0, synth.link_frame(p)) for p in rest], now=103.0)
    assert done.records == [(103.0, CLIENT_PACKED, 17, 255, F_FRAGMENT, 64)]
    parser.parse_frames([(5000.0, synth.link_frame(first))], now=104.0)
    late = parser.parse_frames([(5001.0, other)], now=104.0 + FRAGMENT_TIMEOUT)
    assert late.records == [(104.0 + FRAGMENT_TIMEOUT, CLIENT_PACKED, 17, -1,
                             F_FRAGMENT | F_MALFORMED, 64)]


def test_ipv4_fragments_out_of_order() -> None:
    pieces = synth.fragments(udp4(query(qtype="ANY")), 8)
    assert len(pieces) > 4
    batch = parse(synth.link_frame(p) for p in reversed(pieces))
    assert batch.records == [(float(len(pieces) - 1), CLIENT_PACKED, 17, 255, F_FRAGMENT, 64)]
    assert batch.ignored == 0


def test_ipv6_fragments_with_extension_header() -> None:
    packet = synth.udp_datagram(CLIENT6, SERVER6, query(qtype="TXT"), 40000, ext=(60,))
    batch = parse(synth.link_frame(p) for p in synth.fragments(packet, 16, ident=99))
    assert [(r[3], r[4]) for r in batch.records] == [(16, F_FRAGMENT)]


def test_fragments_of_other_datagrams_are_ignored() -> None:
    response = synth.udp_datagram(SERVER, CLIENT, query(), 53, 40000)
    icmp = synth.ip_packet(CLIENT, SERVER, 1, b"\x08\x00" + bytes(60), ident=5)
    frames = [synth.link_frame(p) for p in synth.fragments(response, 8)]
    frames += [synth.link_frame(p) for p in synth.fragments(icmp, 16, ident=5)]
    batch = parse(frames)
    assert (batch.records, batch.ignored) == ([], len(frames))


def test_incomplete_fragments_flushed_and_timed_out() -> None:
    first, *_ = synth.fragments(udp4(query()), 16)
    assert parse([synth.link_frame(first)]).records == [
        (0.0, CLIENT_PACKED, 17, -1, F_FRAGMENT | F_MALFORMED, 64)]
    parser = Parser(ETH)
    later = synth.link_frame(udp4(query(), dport=9))
    batch = parser.parse_frames([(10.0, synth.link_frame(first)),
                                 (10.0 + FRAGMENT_TIMEOUT, later)])
    assert batch.records == [(10.0 + FRAGMENT_TIMEOUT, CLIENT_PACKED, 17, -1,
                              F_FRAGMENT | F_MALFORMED, 64)]
    assert parser.flush().records == []
    # Only a non-first fragment seen: its ports are unknown, nothing to count.
    assert parse([synth.link_frame(synth.fragments(udp4(query()), 16)[1])]).records == []


def test_fragment_state_is_bounded() -> None:
    parser = Parser(ETH)
    frames = [(0.0, synth.link_frame(synth.fragments(udp4(query()), 16, ident=i)[0]))
              for i in range(MAX_DATAGRAMS + 3)]
    batch = parser.parse_frames(frames)
    assert len(batch.records) == 3
    assert all(r[4] == F_FRAGMENT | F_MALFORMED for r in batch.records)
    assert len(parser.flush().records) == MAX_DATAGRAMS


# TCP.


def tcp_frames(segments: list[tuple[bytes, int, int]], sport: int = 40001) -> list[bytes]:
    """(payload, sequence number, flags) -> Ethernet frames from the client."""
    return [synth.link_frame(synth.tcp_segment(CLIENT, SERVER, data, sport, 53, seq=seq,
                                               flags=flags))
            for data, seq, flags in segments]


ACK = synth.TCP_ACK
PSH = synth.TCP_ACK | synth.TCP_PSH


def framed(msg: bytes) -> bytes:
    return struct.pack("!H", len(msg)) + msg


def test_tcp_stream() -> None:
    isn = 0xFFFFFFF0  # the sequence numbers wrap around
    a, aaaa, any_ = framed(query(qtype="A")), framed(query(qtype="AAAA")), framed(query(qtype=255))
    s = (isn + 1) & 0xFFFFFFFF
    segments = [
        (b"", isn, synth.TCP_SYN),
        (a[:2], s, PSH),  # the length prefix on its own
        (a[2:], s + 2, PSH),
        (a[2:], s + 2, PSH),  # a retransmission: no new message
        (aaaa + any_, s + len(a), PSH),  # two messages in one segment
        (b"", s + len(a) + len(aaaa) + len(any_), ACK),
        (b"", s + len(a) + len(aaaa) + len(any_), synth.TCP_FIN | ACK),
    ]
    batch = parse(tcp_frames([(d, q & 0xFFFFFFFF, f) for d, q, f in segments]))
    got = [(r[3], r[4]) for r in batch.records]
    assert got == [(-1, 0), (-1, 0), (1, 0), (-1, 0), (28, 0), (255, F_EXTRA), (-1, 0),
                   (-1, 0)]
    assert batch.ignored == 0


def test_tcp_large_message_and_malformed() -> None:
    big = query(qtype="TXT") + bytes(1500)  # trailing bytes beyond the question
    response = bytearray(query())
    response[2] |= 0x80
    stream = framed(big) + framed(bytes(response)) + framed(b"\x00\x01")
    segments = [(b"", 100, synth.TCP_SYN)]
    for i in range(0, len(stream), 500):
        segments.append((stream[i:i + 500], 101 + i, PSH))
    got = [(r[3], r[4]) for r in parse(tcp_frames(segments)).records]
    assert got == [(-1, 0), (-1, 0), (-1, 0), (-1, 0), (16, 0), (-1, F_MALFORMED | F_EXTRA),
                   (-1, F_MALFORMED | F_EXTRA)]


def test_tcp_without_syn_or_after_a_gap() -> None:
    msg = framed(query())
    no_syn = parse(tcp_frames([(msg, 1000, PSH)]))
    assert [(r[3], r[4]) for r in no_syn.records] == [(-1, 0)]
    gap = parse(tcp_frames([(b"", 1000, synth.TCP_SYN), (msg, 1100, PSH),
                            (msg, 1001, PSH)]))
    assert [r[3] for r in gap.records] == [-1, -1, -1]


def test_tcp_flows_are_separate() -> None:
    a, b = framed(query(qtype="A")), framed(query(qtype="MX"))
    frames = (tcp_frames([(b"", 0, synth.TCP_SYN)], 1) + tcp_frames([(b"", 50, synth.TCP_SYN)], 2)
              + tcp_frames([(a[:5], 1, PSH)], 1) + tcp_frames([(b, 51, PSH)], 2)
              + tcp_frames([(a[5:], 6, PSH)], 1))
    assert [r[3] for r in parse(frames).records] == [-1, -1, -1, 15, 1]


def test_truncated_tcp_header_is_malformed() -> None:
    frame = tcp_frames([(b"", 0, synth.TCP_SYN)])[0]
    assert one(frame[:14 + 20 + 10])[3:] == (-1, F_MALFORMED, 64)


# Hop values: the IPv4 TTL / IPv6 hop limit of each record.


def with_hop(packet: bytes, hop: int) -> bytes:
    """The IP packet with another TTL / hop limit (the parser checks no checksum)."""
    out = bytearray(packet)
    out[8 if packet[0] >> 4 == 4 else 7] = hop
    return bytes(out)


def hop_fragments(packet: bytes, first: int, others: int, *, reverse: bool = False
                  ) -> list[bytes]:
    """Ethernet frames of the packet's fragments: the first (offset 0) with hop
    ``first``, the others with ``others``; last to first with ``reverse``."""
    pieces = synth.fragments(packet, 16)
    frames = [synth.link_frame(with_hop(p, first if i == 0 else others))
              for i, p in enumerate(pieces)]
    return frames[::-1] if reverse else frames


V6_QUERY = synth.udp_datagram(CLIENT6, SERVER6, query(qtype="AAAA"), 40000)
V6_EXT_QUERY = synth.udp_datagram(CLIENT6, SERVER6, query(qtype="AAAA"), 40000, ext=(0, 60))
TWO_MESSAGES = framed(query(qtype="A")) + framed(query(qtype="MX"))

# (name, link type, frames, the hop of each record in order)
HOP_CASES: list[tuple[str, int, list[bytes], list[int]]] = [
    ("IPv4, fast path", ETH, [synth.link_frame(with_hop(udp4(query()), 50))], [50]),
    ("IPv4, VLAN: general path", ETH,
     [synth.link_frame(with_hop(udp4(query()), 50), vlan=(3,))], [50]),
    ("IPv4, cooked", SLL, [synth.link_frame(with_hop(udp4(query()), 0), SLL)], [0]),
    ("IPv4, raw", RAW, [with_hop(udp4(query()), 255)], [255]),
    ("IPv4, malformed", ETH, [synth.link_frame(with_hop(udp4(b"\x00\x01"), 200))], [200]),
    ("IPv6", ETH, [synth.link_frame(with_hop(V6_QUERY, 33))], [33]),
    ("IPv6, extension headers", ETH, [synth.link_frame(with_hop(V6_EXT_QUERY, 1))], [1]),
    ("IPv6, raw", IPV6, [with_hop(V6_QUERY, 128)], [128]),
    ("IPv4 fragments in order", ETH, hop_fragments(udp4(query()), 40, 41), [40]),
    ("IPv4 fragments, the first last", ETH,
     hop_fragments(udp4(query()), 40, 41, reverse=True), [40]),
    ("IPv4 datagram given up", ETH, hop_fragments(udp4(query()), 42, 43)[:1], [42]),
    ("IPv6 fragments, the first last", ETH,
     hop_fragments(V6_EXT_QUERY, 20, 21, reverse=True), [20]),
    ("TCP segments", ETH, [
        synth.link_frame(with_hop(synth.tcp_segment(CLIENT, SERVER, b"", 40001, seq=0,
                                                    flags=synth.TCP_SYN), 60)),
        synth.link_frame(with_hop(synth.tcp_segment(CLIENT, SERVER, TWO_MESSAGES, 40001,
                                                    seq=1), 61))], [60, 61, 61]),
    ("TCP header cut", ETH,
     [synth.link_frame(with_hop(synth.tcp_segment(CLIENT, SERVER, b"", 40001), 62))[:44]],
     [62]),
]


@pytest.mark.parametrize("linktype,frames,hops", [c[1:] for c in HOP_CASES],
                         ids=[c[0] for c in HOP_CASES])
def test_hop_values(linktype: int, frames: list[bytes], hops: list[int]) -> None:
    assert [r[5] for r in parse(frames, linktype).records] == hops


@pytest.mark.parametrize("hop", [0, 1, 64, 255])
def test_hop_fast_path_agrees_with_general_path(hop: int) -> None:
    packet = with_hop(udp4(query(qtype="TXT")), hop)
    fast = one(synth.link_frame(packet))
    assert fast[5] == hop
    assert one(synth.link_frame(packet, vlan=(9,))) == fast  # the general path
    assert one(synth.link_frame(packet, SLL), SLL) == fast  # the cooked fast path


# TCP handshakes.  A conversation between one client (port 40001) and the server's port
# 53, a segment per step, from the client ("c"), from the server ("s"; "s5353" from
# another port); the server's frames are marked sent by this host on the cooked link
# types, except "s-in" (a SYN-ACK the host received).

C_ISN = 7000
S_ISN = 0xFFFFFFF0  # the server's sequence numbers wrap around
NEW_C, NEW_S = C_ISN + 5_000_000, 12345  # a later connection on the same ports
Q_MX = framed(query(qtype="MX"))
RST = 0x04
STEPS: dict[str, tuple[str, int, int, int, bytes]] = {  # side, flags, seq, ack, data
    "syn": ("c", synth.TCP_SYN, C_ISN, 0, b""),
    "syn-ack": ("s", synth.TCP_SYN | ACK, S_ISN, C_ISN + 1, b""),
    "syn-ack-5353": ("s5353", synth.TCP_SYN | ACK, S_ISN, C_ISN + 1, b""),
    "syn-ack-in": ("s-in", synth.TCP_SYN | ACK, S_ISN, C_ISN + 1, b""),
    "ack": ("c", ACK, C_ISN + 1, S_ISN + 1, b""),
    "ack-isn": ("c", ACK, C_ISN + 1, S_ISN, b""),  # blind ACKs, wrong numbers
    "ack-isn+2": ("c", ACK, C_ISN + 1, S_ISN + 2, b""),
    "rst": ("c", RST | ACK, C_ISN + 1, S_ISN + 1, b""),
    "query": ("c", PSH, C_ISN + 1, S_ISN + 1, Q_MX),
    "fin": ("c", synth.TCP_FIN | ACK, C_ISN + 1 + len(Q_MX), S_ISN + 100, b""),
    "last-ack": ("c", ACK, C_ISN + 2 + len(Q_MX), S_ISN + 101, b""),
    # The ports guessed, the sequence number not.
    "far": ("c", PSH, C_ISN + 1 + 2 * VERIFY_WINDOW, S_ISN + 1, Q_MX),
    # Segments the capture missed before these: the window follows the stream.
    "ahead": ("c", ACK, C_ISN + 1 + VERIFY_WINDOW * 3 // 4, S_ISN + 1, b""),
    "further": ("c", ACK, C_ISN + 1 + VERIFY_WINDOW * 3 // 2, S_ISN + 1, b""),
    "new-syn": ("c", synth.TCP_SYN, NEW_C, 0, b""),
    "new-syn-ack": ("s", synth.TCP_SYN | ACK, NEW_S, NEW_C + 1, b""),
    "new-ack": ("c", ACK, NEW_C + 1, NEW_S + 1, b""),
}


def conversation(steps: str, linktype: int = ETH, v6: bool = False) -> list[bytes]:
    client, server = (CLIENT6, SERVER6) if v6 else (CLIENT, SERVER)
    frames = []
    for step in steps.split():
        side, flags, seq, ack, data = STEPS[step]
        if side == "c":
            packet = synth.tcp_segment(client, server, data, 40001, 53, seq=seq, ack=ack,
                                       flags=flags)
        else:
            packet = synth.tcp_segment(server, client, data, 5353 if side == "s5353" else 53,
                                       40001, seq=seq, ack=ack, flags=flags)
        frames.append(synth.link_frame(packet, linktype, outgoing=side in ("s", "s5353")))
    return frames


# (name, steps, per frame: "V" a verified record, "." an unverified one, "-" a SYN-ACK
# noted (no record, not ignored), "x" ignored)
HANDSHAKES = [
    ("complete", "syn syn-ack ack query fin last-ack", ".-VVVV"),
    ("completed by the query", "syn syn-ack query fin", ".-VV"),
    ("captured from the SYN-ACK on", "syn-ack ack query", "-VV"),
    ("blind ACKs with wrong numbers", "syn syn-ack ack-isn ack-isn+2", ".-.."),
    ("the client's ACK after blind ones", "syn syn-ack ack-isn+2 ack query", ".-.VV"),
    ("no SYN-ACK", "syn ack query fin", "...."),
    ("a SYN-ACK from another port", "syn syn-ack-5353 ack query", ".x.."),
    ("a RST completes nothing", "syn syn-ack rst", ".-."),
    ("a retransmission", "syn syn-ack ack query query", ".-VVV"),
    ("out of the window", "syn syn-ack ack far query", ".-V.V"),
    ("too far ahead", "syn syn-ack ack further", ".-V."),
    ("the window follows the stream", "syn syn-ack ack ahead further", ".-VVV"),
    ("a new connection on the same ports", "syn syn-ack ack new-syn new-ack", ".-V.."),
    ("its own handshake", "syn syn-ack ack new-syn new-syn-ack new-ack", ".-V.-V"),
]


@pytest.mark.parametrize("v6", [False, True], ids=["IPv4", "IPv6"])
@pytest.mark.parametrize("linktype", [ETH, SLL, SLL2, RAW])
@pytest.mark.parametrize("steps,outcome", [c[1:] for c in HANDSHAKES],
                         ids=[c[0] for c in HANDSHAKES])
def test_tcp_handshakes(steps: str, outcome: str, linktype: int, v6: bool) -> None:
    batch = parse(conversation(steps, linktype, v6), linktype)
    got = ["V" if r[4] & F_VERIFIED else "." for r in batch.records]
    assert got == [c for c in outcome if c in ".V"]
    assert (batch.frames, batch.ignored) == (len(outcome), outcome.count("x"))


@pytest.mark.parametrize("linktype", [SLL, SLL2])
def test_cooked_captures_take_only_the_syn_acks_this_host_sent(linktype: int) -> None:
    batch = parse(conversation("syn syn-ack-in ack query", linktype), linktype)
    assert [r[4] for r in batch.records] == [0, 0, 0] and batch.ignored == 1


@pytest.mark.parametrize("linktype", [SLL, SLL2])
def test_outgoing_frames_other_than_syn_acks_are_ignored(linktype: int) -> None:
    """This host's own queries, and its TCP segments from port 53 other than SYN-ACKs."""
    own = [synth.udp_datagram(SERVER, CLIENT, query(), 40000, 53),
           synth.tcp_segment(SERVER, CLIENT, b"", 40001, 53, flags=synth.TCP_SYN),
           synth.tcp_segment(SERVER, CLIENT, Q_MX, 40001, 53, flags=PSH),
           synth.tcp_segment(SERVER, CLIENT, b"", 53, 40001, flags=synth.TCP_SYN),
           synth.tcp_segment(SERVER, CLIENT, b"", 53, 40001, flags=RST | ACK),
           synth.tcp_segment(SERVER, CLIENT, b"", 53, 40001,
                             flags=synth.TCP_SYN | ACK | RST),
           synth.tcp_segment(SERVER, CLIENT, Q_MX, 53, 40001, flags=PSH),
           synth.tcp_segment(SERVER, CLIENT, b"", 53, 40001,
                             flags=synth.TCP_SYN | ACK)[:20 + 12],  # cut header
           *synth.fragments(synth.udp_datagram(SERVER, CLIENT, query(), 40000, 53), 16),
           synth.udp_datagram(SERVER6, CLIENT6, query(), 40000, 53)]
    frames = [synth.link_frame(p, linktype, outgoing=True) for p in own]
    batch = parse(frames, linktype)
    assert (batch.records, batch.frames, batch.ignored) == ([], len(frames), len(frames))
    # Received instead, the same queries are records.
    received = parse([synth.link_frame(p, linktype) for p in own[:3]], linktype)
    assert len(received.records) == 3


def syn_acks(ports: Iterable[int], client: str = CLIENT) -> list[bytes]:
    return [synth.link_frame(synth.tcp_segment(SERVER, client, b"", 53, port, seq=S_ISN,
                                               ack=C_ISN + 1, flags=synth.TCP_SYN | ACK))
            for port in ports]


def acks(ports: Iterable[int], seq: int = C_ISN + 1) -> list[bytes]:
    return [synth.link_frame(synth.tcp_segment(CLIENT, SERVER, b"", port, 53, seq=seq,
                                               ack=S_ISN + 1, flags=ACK))
            for port in ports]


def verified(parser: Parser, frames: list[bytes], ts: float = 1.0) -> list[bool]:
    return [bool(r[4] & F_VERIFIED) for r in parser.parse_frames(
        (ts, f) for f in frames).records]


def test_pending_handshakes_are_bounded() -> None:
    parser = Parser(ETH)
    parser.parse_frames((0.0, f) for f in syn_acks(range(1, MAX_HANDSHAKES + 2)))
    # The oldest was pushed out; the others are still awaited.
    assert verified(parser, acks([1, 2, MAX_HANDSHAKES + 1])) == [False, True, True]


def test_a_syn_ack_flood_does_not_push_out_verified_connections() -> None:
    parser = Parser(ETH)
    assert verified(parser, syn_acks([1]) + acks([1])) == [True]
    # The server answering MAX_HANDSHAKES + 1 forged SYNs from another address.
    flood = syn_acks(range(1, MAX_HANDSHAKES + 2), client="203.0.113.9")
    assert parser.parse_frames((1.0, f) for f in flood).records == []
    assert verified(parser, acks([1])) == [True]


def test_verified_connections_are_bounded() -> None:
    parser = Parser(ETH)
    ports = range(1, MAX_FLOWS + 2)
    frames = [f for port in ports for f in syn_acks([port]) + acks([port])]
    assert all(verified(parser, frames))
    assert verified(parser, acks([1, 2, MAX_FLOWS + 1])) == [False, True, True]


def test_handshakes_time_out_and_flush() -> None:
    other = synth.link_frame(udp4(query(), dport=9))
    parser = Parser(ETH)
    parser.parse_frames([(0.0, syn_acks([1])[0]), (0.0, syn_acks([2])[0])])
    assert verified(parser, acks([2]), ts=1.0) == [True]
    parser.parse_frames([(1.0 + FLOW_TIMEOUT, other)])
    assert verified(parser, acks([1, 2]), ts=2.0 + FLOW_TIMEOUT) == [False, False]
    parser.parse_frames([(3.0 + FLOW_TIMEOUT, syn_acks([3])[0])])
    parser.flush()
    assert verified(parser, acks([3]), ts=4.0 + FLOW_TIMEOUT) == [False]


# ---------------------------------------------------------------------------
# Properties.

LINKTYPES = [ETH, SLL, SLL2, RAW, RAW_FILE, IPV4, IPV6]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(LINKTYPES), st.lists(st.binary(max_size=120), max_size=8))
def test_random_bytes_never_raise(linktype: int, frames: list[bytes]) -> None:
    batch = parse(frames, linktype)
    assert batch.frames == len(frames)
    for ts, src, proto, qtype, flags, hop in batch.records:
        assert len(src) in (4, 16) and proto in (6, 17) and -1 <= qtype <= 0xFFFF
        assert flags & ~(F_MALFORMED | F_FRAGMENT | F_EXTRA | F_VERIFIED) == 0
        assert 0 <= hop <= 255


def valid_frames() -> list[tuple[int, bytes]]:
    v6 = synth.udp_datagram(CLIENT6, SERVER6, query(), 40000, ext=(0, 60))
    out = [(ETH, synth.link_frame(udp4(query()))),
           (ETH, synth.link_frame(udp4(query()), vlan=(1, 2))),
           (SLL, synth.link_frame(udp4(query()), SLL)),
           (SLL2, synth.link_frame(v6, SLL2)),
           (RAW, v6),
           (ETH, tcp_frames([(framed(query()), 0, PSH)])[0])]
    out += [(ETH, synth.link_frame(p)) for p in synth.fragments(udp4(query()), 16)]
    out += [(IPV6, p) for p in synth.fragments(v6, 16)]
    return out


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(valid_frames()), st.integers(0, 200), st.binary(max_size=4))
def test_truncations_never_raise(case: tuple[int, bytes], cut: int, junk: bytes) -> None:
    linktype, frame = case
    batch = parse([frame[:cut] + junk], linktype)
    assert len(batch.records) + batch.ignored <= 1


_mutations = st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=4)


def mutate(data: bytes, changes: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for pos, value in changes:
        if pos < len(out):
            out[pos] = value
    return bytes(out)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(valid_frames()), _mutations)
def test_mutations_never_raise(case: tuple[int, bytes], changes: list[tuple[int, int]]) -> None:
    linktype, frame = case
    batch = parse([mutate(frame, changes)], linktype)
    assert len(batch.records) + batch.ignored <= 1


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([udp4(query()), udp4(query(qtype="ANY") + bytes(3))]), _mutations,
       st.integers(20, 90))
def test_fast_path_agrees_with_general_path(packet: bytes, changes: list[tuple[int, int]],
                                            cut: int) -> None:
    ip = mutate(packet, changes)[:cut]
    fast = parse([synth.link_frame(ip)])
    general = parse([synth.link_frame(ip, vlan=(9,))])
    assert (fast.records, fast.ignored) == (general.records, general.ignored)


def test_truncations_of_a_query_are_records_once_the_port_is_seen() -> None:
    frame = synth.link_frame(udp4(query()))
    for cut in range(len(frame)):
        batch = parse([frame[:cut]])
        if cut < 14 + 20 + 4:
            assert (batch.records, batch.ignored) == ([], 1), cut
        else:
            assert [r[4] for r in batch.records] == [F_MALFORMED], cut
    assert parse([frame]).records[0][4] == 0


_token = st.one_of(
    st.binary(min_size=1, max_size=63).map(lambda b: bytes([len(b)]) + b),
    st.integers(1, 63).map(lambda n: bytes([n])),
    st.integers(0, 80).map(lambda t: struct.pack("!H", 0xC000 | t)),
    st.sampled_from([b"\x40", b"\x80", b"\xbf", b"\xc0"]),
    st.just(b"\x00"),
)


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.integers(0, 0xFFFF), st.integers(0, 0x7FFF)),
       st.sampled_from([1, 1, 1, 2, 0]), st.lists(_token, max_size=8), st.binary(max_size=6))
def test_question_walker_agrees_with_reference(flags: int, qdcount: int, tokens: list[bytes],
                                               tail: bytes) -> None:
    payload = struct.pack("!HHHHHH", 0, flags, qdcount, 0, 0, 0) + b"".join(tokens) + tail
    expected = reference_qtype(payload)
    fast = one(synth.link_frame(udp4(payload)))  # the UDP/IPv4 fast path
    general = one(synth.link_frame(udp4(payload), vlan=(5,)))  # the general path
    tcp = parse(tcp_frames([(b"", 0, synth.TCP_SYN), (framed(payload), 1, PSH)])).records[1]
    assert fast == general
    assert fast[3:] == tcp[3:]
    if expected is None:
        assert fast[3:5] == (-1, F_MALFORMED)
    else:
        assert fast[3] == expected and fast[4] == 0


# ---------------------------------------------------------------------------
# Records: columns, and the fast path's remembered questions.

def test_records_are_columns_in_frame_order_and_equal_to_their_tuples() -> None:
    v6 = synth.udp_datagram(CLIENT6, SERVER6, query(qtype="AAAA"), 40000)
    frames = [synth.link_frame(udp4(query())), synth.link_frame(v6),  # fast, general
              synth.link_frame(udp4(b"\x00" * 5)), tcp_frames([(framed(query()), 0, PSH)])[0],
              synth.link_frame(udp4(query(qtype="ANY")))]
    batch = Parser(ETH).parse_frames((10.0 + i, f) for i, f in enumerate(frames))
    records = batch.records
    assert isinstance(records, Records)
    v6_packed = bytes.fromhex("20010db8000000000000000000000007")
    expected = [(10.0, CLIENT_PACKED, 17, 1, 0, 64), (11.0, v6_packed, 17, 28, 0, 64),
                (12.0, CLIENT_PACKED, 17, -1, F_MALFORMED, 64),
                (13.0, CLIENT_PACKED, 6, -1, 0, 64), (14.0, CLIENT_PACKED, 17, 255, 0, 64)]
    assert records == expected and list(records) == expected
    assert records.qtype == [1, 28, -1, -1, 255] and records.flags == [0, 0, F_MALFORMED, 0, 0]
    assert records.proto == [17, 17, 17, 6, 17] and records.times == [10.0 + i for i in range(5)]
    assert records[1:3] == expected[1:3] and records[-1] == expected[-1]
    assert (records.first_time(), records.last_time()) == (10.0, 14.0)


def test_the_first_and_last_times_are_read_without_the_others() -> None:
    # Whichever path the first and last records took, and with frames that make none.
    fast = synth.link_frame(udp4(query()))
    general = synth.link_frame(synth.udp_datagram(CLIENT6, SERVER6, query(), 40000))
    ignored = synth.link_frame(udp4(query(), dport=5353))
    ends = ([], [general], [ignored], [general, ignored], [fast, ignored, ignored])
    for head in ends:
        for tail in ends:
            frames = head[::-1] + [fast, general, fast] + tail
            stamps = [20.0 + i * 0.25 for i in range(len(frames))]
            records = Parser(ETH).parse_frames(zip(stamps, frames)).records
            assert isinstance(records, Records)
            first, last = records.first_time(), records.last_time()
            assert first == records.times[0] == list(records)[0][0]
            assert last == records.times[-1] == list(records)[-1][0]


def test_plain_udp_records_have_no_flag_or_protocol_columns() -> None:
    frames = [synth.link_frame(udp4(query(qtype=t))) for t in ("A", "AAAA", "ANY")]
    live = Parser(ETH).parse_frames(((5000.0, f) for f in frames), now=7.5).records
    assert isinstance(live, Records)
    assert (live.flags, live.proto, live.time, live.times) == (None, None, 7.5, [7.5] * 3)
    assert Records.of(list(live)) == live and Records.of(live) is live
    assert Records.of([]) == [] and not Records.of([])


def test_question_tails_are_remembered_up_to_a_bound() -> None:
    parser = Parser(ETH)
    names = [f"n{i}.example.com" for i in range(MAX_QUESTIONS + 10)]
    batch = parser.parse_frames((0.0, synth.link_frame(udp4(query(n)))) for n in names)
    assert batch.records.qtype == [1] * len(names)  # type: ignore[attr-defined]
    assert 0 < len(parser._questions) <= MAX_QUESTIONS
    # A name with a compression pointer depends on what comes before it: not remembered,
    # read with its header (this one points into it, at the question count's bytes).
    pointer = query()[:12] + b"\x03www\xc0\x04" + b"\x00\x01\x00\x01"
    before = len(parser._questions)
    fast = parser.parse_frames([(1.0, synth.link_frame(udp4(pointer)))] * 2).records
    general = parse([synth.link_frame(udp4(pointer), vlan=(3,))] * 2).records
    assert [r[3:] for r in fast] == [r[3:] for r in general] == [(1, 0, 64)] * 2
    assert len(parser._questions) == before
