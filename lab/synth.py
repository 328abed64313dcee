"""DNS query frames and captures built from scratch, with correct checksums.

Used by the tests, the benchmarks and the lab demo.  Addresses are strings
("192.0.2.1", "2001:db8::1"); IPv4 or IPv6 follows from them.
"""

from __future__ import annotations

import ipaddress
import random
import struct
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

from floodd.detect.parse import (
    LINKTYPE_ETHERNET,
    LINKTYPE_IPV4,
    LINKTYPE_IPV6,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_LINUX_SLL2,
    LINKTYPE_RAW,
    LINKTYPE_RAW_FILE,
    TCP,
    UDP,
)
from floodd.qtypes import qtype_code

TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_PSH = 0x08
TCP_ACK = 0x10

CLASS_IN = 1
SRC_MAC = bytes.fromhex("020000000001")
DST_MAC = bytes.fromhex("020000000002")
TPID_8021Q = 0x8100
TPID_8021AD = 0x88A8
PACKET_HOST = 0
PACKET_OUTGOING = 4
ARPHRD_ETHER = 1

# Flood captures: spoofed sources from the benchmarking range, one server.
FLOOD_NETWORK = ipaddress.IPv4Network("198.18.0.0/15")
FLOOD_SERVER = "192.0.2.53"
FLOOD_NAMES = ("www.example.com", "example.com", "mail.example.net", "ns1.example.org",
               "a.very.long.name.under.example.com", "7.2.0.192.in-addr.arpa")
# (query type, share in thousandths): mostly A/AAAA, some ANY, one unknown type.
FLOOD_QTYPES = (("A", 550), ("AAAA", 250), ("ANY", 50), ("MX", 50), ("TXT", 50),
                ("PTR", 30), ("TYPE65399", 20))

_PCAP_HEADER = struct.Struct("<IHHiIII")
_PCAP_RECORD = struct.Struct("<IIII")
PCAP_MAGIC = 0xA1B2C3D4


def encode_name(name: str) -> bytes:
    """``"www.example.com"`` -> wire format, ending in the root label."""
    out = bytearray()
    for label in name.strip(".").split("."):
        if label:
            raw = label.encode("ascii")
            if len(raw) > 63:
                raise ValueError(f"label longer than 63 bytes: {label!r}")
            out += bytes((len(raw),)) + raw
    return bytes(out) + b"\x00"


def dns_query(qname: str, qtype: int | str, txid: int = 0, *, rd: bool = True) -> bytes:
    """A DNS query message with one question of class IN."""
    code = qtype_code(qtype) if isinstance(qtype, str) else qtype
    header = struct.pack("!HHHHHH", txid, 0x0100 if rd else 0, 1, 0, 0, 0)
    return header + encode_name(qname) + struct.pack("!HH", code, CLASS_IN)


def _checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071)."""
    if len(data) % 2:
        data += b"\x00"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def _pseudo_header(src: str, dst: str, proto: int, length: int) -> bytes:
    s, d = _address(src), _address(dst)
    if s.version == 4:
        return s.packed + d.packed + struct.pack("!BBH", 0, proto, length)
    return s.packed + d.packed + struct.pack("!IxxxB", length, proto)


def ip_packet(src: str, dst: str, proto: int, payload: bytes, *, ident: int = 0,
              ttl: int = 64, ext: Sequence[int] = ()) -> bytes:
    """An IPv4 or IPv6 packet (``ttl``: the IPv4 TTL or IPv6 hop limit); ``ext`` (IPv6
    only) inserts empty extension headers of these types (0 hop-by-hop, 43 routing, 60
    destination options) before it."""
    s, d = _address(src), _address(dst)
    if s.version != d.version:
        raise ValueError(f"{src} and {dst} are not of the same IP version")
    if s.version == 4:
        if ext:
            raise ValueError("extension headers are for IPv6")
        header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, 0, ttl,
                             proto, 0, s.packed, d.packed)
        return header[:10] + struct.pack("!H", _checksum(header)) + header[12:] + payload
    body = payload
    nh = proto
    for ext_type in reversed(ext):
        # Routing: type 0 would be refused by hosts, type 4 (SRH) with no segments left.
        fill = b"\x04\x00" + b"\x00" * 4 if ext_type == 43 else b"\x01\x04" + b"\x00" * 4
        body = bytes((nh, 0)) + fill + body
        nh = ext_type
    return struct.pack("!IHBB16s16s", 0x60000000, len(body), nh, ttl, s.packed,
                       d.packed) + body


def udp_datagram(src: str, dst: str, payload: bytes, sport: int, dport: int = 53, *,
                 ident: int = 0, ttl: int = 64, ext: Sequence[int] = ()) -> bytes:
    """An IP packet carrying a UDP datagram, both checksums set; ``ttl`` is the IPv4 TTL
    or the IPv6 hop limit."""
    length = 8 + len(payload)
    udp = struct.pack("!HHHH", sport, dport, length, 0) + payload
    csum = _checksum(_pseudo_header(src, dst, UDP, length) + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", csum) + udp[8:]
    return ip_packet(src, dst, UDP, udp, ident=ident, ttl=ttl, ext=ext)


def tcp_segment(src: str, dst: str, payload: bytes, sport: int, dport: int = 53, *,
                seq: int = 0, ack: int = 0, flags: int = TCP_ACK | TCP_PSH,
                ident: int = 0) -> bytes:
    """An IP packet carrying a TCP segment (no options), both checksums set."""
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF,
                      5 << 4, flags, 65535, 0, 0) + payload
    csum = _checksum(_pseudo_header(src, dst, TCP, len(tcp)) + tcp)
    tcp = tcp[:16] + struct.pack("!H", csum) + tcp[18:]
    return ip_packet(src, dst, TCP, tcp, ident=ident)


def fragments(packet: bytes, size: int, ident: int = 0x1234) -> list[bytes]:
    """Split an IP packet into fragments of ``size`` payload bytes (a multiple of 8).

    IPv6 gets a fragment header right after the fixed header (every extension
    header is then part of the fragmentable payload)."""
    if size <= 0 or size % 8:
        raise ValueError("fragment size must be a positive multiple of 8")
    version = packet[0] >> 4
    if version == 4:
        ihl = (packet[0] & 0x0F) * 4
        header, payload = bytearray(packet[:ihl]), packet[ihl:]
    else:
        header, payload = bytearray(packet[:40]), packet[40:]
    out = []
    for offset in range(0, len(payload), size):
        chunk = payload[offset:offset + size]
        more = offset + size < len(payload)
        if version == 4:
            h = bytearray(header)
            struct.pack_into("!HHH", h, 2, len(h) + len(chunk), ident & 0xFFFF,
                             (offset // 8) | (0x2000 if more else 0))
            struct.pack_into("!H", h, 10, 0)
            struct.pack_into("!H", h, 10, _checksum(bytes(h)))
            out.append(bytes(h) + chunk)
        else:
            h = bytearray(header)
            nh = h[6]
            struct.pack_into("!H", h, 4, 8 + len(chunk))
            h[6] = 44
            frag = struct.pack("!BBHI", nh, 0, offset | (1 if more else 0), ident)
            out.append(bytes(h) + frag + chunk)
    return out


def link_frame(packet: bytes, linktype: int = LINKTYPE_ETHERNET, *,
               vlan: Sequence[int] = (), outgoing: bool = False) -> bytes:
    """Wrap an IP packet for a link type; ``vlan`` are 802.1Q tags, outermost first
    (two or more: QinQ, the outer ones 802.1ad); ``outgoing`` marks a Linux cooked
    frame as sent by this host."""
    ethertype = 0x0800 if packet[0] >> 4 == 4 else 0x86DD
    if vlan and linktype != LINKTYPE_ETHERNET:
        raise ValueError("VLAN tags are built for Ethernet frames only")
    pkttype = PACKET_OUTGOING if outgoing else PACKET_HOST
    if linktype == LINKTYPE_ETHERNET:
        tags = b""
        for i, vid in enumerate(vlan):
            tpid = TPID_8021AD if i < len(vlan) - 1 else TPID_8021Q
            tags += struct.pack("!HH", tpid, vid & 0x0FFF)
        return DST_MAC + SRC_MAC + tags + struct.pack("!H", ethertype) + packet
    if linktype == LINKTYPE_LINUX_SLL:
        return struct.pack("!HHH8sH", pkttype, ARPHRD_ETHER, 6, SRC_MAC, ethertype) + packet
    if linktype == LINKTYPE_LINUX_SLL2:
        return struct.pack("!HHIHBB8s", ethertype, 0, 2, ARPHRD_ETHER, pkttype, 6,
                           SRC_MAC) + packet
    if linktype in (LINKTYPE_RAW, LINKTYPE_RAW_FILE, LINKTYPE_IPV4, LINKTYPE_IPV6):
        return packet
    raise ValueError(f"cannot build frames for link type {linktype}")


def udp_frame(src: str, dst: str, payload: bytes, sport: int, dport: int = 53, *,
              linktype: int = LINKTYPE_ETHERNET, vlan: Sequence[int] = ()) -> bytes:
    """A UDP datagram in a frame of the given link type."""
    return link_frame(udp_datagram(src, dst, payload, sport, dport), linktype, vlan=vlan)


def write_pcap(path: str, frames: Iterable[tuple[float, bytes]],
               linktype: int = LINKTYPE_ETHERNET, snaplen: int = 65535) -> int:
    """Write (timestamp, frame) pairs as a classic microsecond pcap; the frame count."""
    record = _PCAP_RECORD.pack
    count = 0
    with open(path, "wb") as out:
        out.write(_PCAP_HEADER.pack(PCAP_MAGIC, 2, 4, 0, 0, snaplen, linktype))
        write = out.write
        for ts, frame in frames:
            sec = int(ts)
            usec = round((ts - sec) * 1e6)
            if usec >= 1_000_000:
                sec, usec = sec + 1, usec - 1_000_000
            kept = frame[:snaplen]
            write(record(sec, usec, len(kept), len(frame)))
            write(kept)
            count += 1
    return count


@dataclass(frozen=True)
class FloodCapture:
    """What :func:`generate_flood_capture` wrote, for checking a parse of it."""

    path: str
    packets: int
    per_source: dict[bytes, int]  # packed source address -> queries
    per_qtype: dict[int, int]
    heavy: tuple[bytes, ...]  # the heavy hitters' addresses


def _fold(total: int) -> int:
    total = (total & 0xFFFF) + (total >> 16)
    return (total & 0xFFFF) + (total >> 16)


def generate_flood_capture(path: str, packets: int, sources: int, *, heavy: int = 5,
                           heavy_share: float = 0.3, seed: int = 0, rate: float = 100_000.0,
                           linktype: int = LINKTYPE_ETHERNET,
                           start: float = 1_700_000_000.0) -> FloodCapture:
    """Write a capture of ``packets`` UDP/IPv4 DNS queries to one server from
    ``sources`` distinct addresses of 198.18.0.0/15 at ``rate`` packets/s.

    ``heavy`` of the sources send ``heavy_share`` of the packets between them;
    query types follow FLOOD_QTYPES.  Deterministic for a given seed.
    """
    if not 0 < sources <= FLOOD_NETWORK.num_addresses or not 0 <= heavy <= sources:
        raise ValueError("need 1 to 131072 sources, heavy hitters among them")
    rng = random.Random(seed)
    base = int(FLOOD_NETWORK.network_address)
    addresses = [base + i for i in rng.sample(range(FLOOD_NETWORK.num_addresses), sources)]
    packed = [struct.pack("!I", a) for a in addresses]
    server = ipaddress.IPv4Address(FLOOD_SERVER).packed

    # One frame per (name, qtype) with source, source port and query id zero; each
    # packet patches those in and adjusts both checksums by the words it adds.
    # Patched: IP checksum, source, destination, UDP ports, length, checksum, DNS id.
    mid = struct.Struct("!HI4sHHHHH")
    templates = []
    slots: list[int] = []
    for qtype_name, share in FLOOD_QTYPES:
        code = qtype_code(qtype_name)
        for name in FLOOD_NAMES:
            packet = udp_datagram("0.0.0.0", FLOOD_SERVER, dns_query(name, code), 0)
            frame = link_frame(packet, linktype)
            ip = len(frame) - len(packet)
            ip_sum = (~struct.unpack_from("!H", frame, ip + 10)[0]) & 0xFFFF
            udp_sum = (~struct.unpack_from("!H", frame, ip + 26)[0]) & 0xFFFF
            ulen = struct.unpack_from("!H", frame, ip + 24)[0]
            templates.append((frame[:ip + 10], frame[ip + 30:], ip_sum, udp_sum, ulen, code))
        slots += [len(templates) - len(FLOOD_NAMES) + i % len(FLOOD_NAMES)
                  for i in range(share)]

    per_source: Counter[bytes] = Counter()
    per_qtype: Counter[int] = Counter()

    def frames() -> Iterator[tuple[float, bytes]]:
        pack = mid.pack
        rand = rng.random
        bits = rng.getrandbits
        light = sources - heavy
        nslots = len(slots)
        for i in range(packets):
            r = rand()
            if heavy and (r < heavy_share or not light):
                k = int(r / heavy_share * heavy) if r < heavy_share else int(rand() * heavy)
            else:
                k = heavy + int(rand() * light)
            addr = addresses[k]
            head, tail, ip_sum, udp_sum, ulen, code = templates[slots[int(rand() * nslots)]]
            word = bits(32)
            sport = 1024 + (word >> 16) % 64512
            txid = word & 0xFFFF
            words = (addr >> 16) + (addr & 0xFFFF)
            ip_c = ~_fold(ip_sum + words) & 0xFFFF
            udp_c = ~_fold(udp_sum + words + sport + txid) & 0xFFFF or 0xFFFF
            per_source[packed[k]] += 1
            per_qtype[code] += 1
            yield start + i / rate, head + pack(ip_c, addr, server, sport, 53, ulen, udp_c,
                                                txid) + tail

    count = write_pcap(path, frames(), linktype)
    return FloodCapture(path, count, dict(per_source), dict(per_qtype),
                        tuple(packed[:heavy]))
