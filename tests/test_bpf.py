"""floodd.detect.bpf: the filter clauses for banned sources (checked on frames with libpcap's
own BPF interpreter, with and without VLAN tags), the sampling prefix, and the socket
calls (on UDP sockets over loopback: the kernel runs a socket's classic program the same
way on any socket)."""

from __future__ import annotations

import ipaddress
import socket
import struct

import pcapy
import pytest

from lab import synth
from floodd.detect.bpf import (
    BPF_MAXINSNS,
    DROP_ALL,
    FilterTooLarge,
    attach,
    attached,
    excluding,
    exclusion,
    sampled,
)
from floodd.detect.capture import build_filter
from floodd.errors import FlooddError
from floodd.scope import UDP_ONLY, WHOLE, Scope, Target

SERVER, SERVER6 = "192.0.2.53", "2001:db8::53"
Q = synth.dns_query("www.lab.example", "A")
SENT = f"ether src {synth.DST_MAC.hex(':')}"


def target(network: str, scope: Scope = WHOLE) -> Target:
    return Target(ipaddress.ip_network(network), scope)


def test_exclusion_expressions() -> None:
    assert exclusion(target("198.18.0.1/32")) == "ip src host 198.18.0.1"
    assert exclusion(target("203.0.113.0/24", UDP_ONLY)) \
        == "ip src net 203.0.113.0/24 and ip[9] == 17"
    assert exclusion(target("2001:db8:1::/64", Scope(True, None, (63, 64)))) \
        == "ip6 src net 2001:db8:1::/64 and ip6[6] == 17 and ip6[7] != 63 and ip6[7] != 64"
    assert exclusion(target("198.18.0.1/32", Scope(True, 255))) is None  # qtype bans stay
    assert excluding([target("198.18.0.1/32", Scope(True, 255))]) == ""
    assert excluding([target("198.18.0.1/32"), target("2001:db8::7/128", UDP_ONLY)]) \
        == "not ((ip src host 198.18.0.1) or (ip6 src host 2001:db8::7 and ip6 proto 17))"


def udp(source: str, ttl: int = 64) -> bytes:
    return synth.udp_datagram(source, SERVER6 if ":" in source else SERVER, Q, 4000, ttl=ttl)


def tcp(source: str) -> bytes:
    return synth.tcp_segment(source, SERVER6 if ":" in source else SERVER, b"", 4000,
                             flags=synth.TCP_SYN)


BANS = [target("198.18.0.1/32"), target("198.18.0.2/32", UDP_ONLY),
        target("198.18.0.3/32", Scope(True, None, (64,))), target("203.0.113.0/24"),
        target("2001:db8:1::1/128"), target("2001:db8:2::/64", Scope(True, None, (60, 64))),
        target("198.18.0.4/32", Scope(True, 28))]
# IP packet -> whether a capture leaving out BANS still passes it.
CASES = {
    "whole source, UDP": (udp("198.18.0.1"), False),
    "whole source, TCP": (tcp("198.18.0.1"), False),
    "whole source, fragment": (synth.fragments(udp("198.18.0.1"), 16)[-1], False),
    "UDP only, UDP": (udp("198.18.0.2"), False),
    "UDP only, fragment": (synth.fragments(udp("198.18.0.2"), 16)[-1], False),
    "UDP only, TCP": (tcp("198.18.0.2"), True),
    "hops, other TTL": (udp("198.18.0.3", ttl=50), False),
    "hops, usual TTL": (udp("198.18.0.3", ttl=64), True),
    "hops, fragment at another TTL": (synth.fragments(udp("198.18.0.3", ttl=50), 16)[0],
                                      True),
    "hops, TCP": (tcp("198.18.0.3"), True),
    "prefix": (udp("203.0.113.77"), False),
    "outside the prefix": (udp("203.0.114.77"), True),
    "IPv6 whole source": (udp("2001:db8:1::1"), False),
    "IPv6 whole source, fragment": (synth.fragments(udp("2001:db8:1::1"), 16)[-1], False),
    "IPv6 neighbour": (udp("2001:db8:1::2"), True),
    "IPv6 hops, other hop limit": (udp("2001:db8:2::9", ttl=50), False),
    "IPv6 hops, usual hop limits": (udp("2001:db8:2::9", ttl=60), True),
    "IPv6 hops, the other usual one": (udp("2001:db8:2::9", ttl=64), True),
    "IPv6 hops, TCP": (tcp("2001:db8:2::9"), True),
    "qtype ban: not left out": (udp("198.18.0.4"), True),
    "another source": (udp("198.51.100.7"), True),
}


@pytest.mark.parametrize("vlan", [(), (11,), (100, 11)], ids=["untagged", "VLAN", "QinQ"])
def test_excluded_packets(vlan: tuple[int, ...]) -> None:
    """Exactly what the bans drop is left out, also behind VLAN tags (each tag moves the
    offsets: the filter repeats its test per tag)."""
    expr = build_filter((53,), ("udp", "tcp"), excluding(BANS), sent=SENT)
    program = pcapy.compile(1, 512, expr, 1, 0)
    plain = pcapy.compile(1, 512, build_filter((53,), ("udp", "tcp"), sent=SENT), 1, 0)
    for name, (packet, passes) in CASES.items():
        frame = synth.link_frame(packet, vlan=vlan)
        assert plain.filter(frame), name
        assert bool(program.filter(frame)) == passes, name
    # This host's SYN-ACK to a banned source still passes (the ban drops what arrives).
    syn_ack = synth.tcp_segment(SERVER, "198.18.0.1", b"", 53, 4000, seq=9, ack=1,
                                flags=synth.TCP_SYN | synth.TCP_ACK)
    frame = synth.link_frame(syn_ack, vlan=vlan)
    assert program.filter(frame[6:12] + frame[:6] + frame[12:])


@pytest.mark.parametrize("linktype", [113, 276])
def test_excluded_packets_cooked(linktype: int) -> None:
    expr = build_filter((53,), ("udp", "tcp"), excluding(BANS), vlan=False, sent="outbound")
    program = pcapy.compile(linktype, 512, expr, 1, 0)
    for name, (packet, passes) in CASES.items():
        assert bool(program.filter(synth.link_frame(packet, linktype))) == passes, name


def test_sampled_program() -> None:
    program = [(0x06, 0, 0, 512)]
    assert sampled(program, 1) == program
    prefix = sampled(program, 8)
    assert len(prefix) == 5 and prefix[-1] == program[0]
    assert prefix[:4] == [(0x20, 0, 0, 0xFFFFF038), (0x54, 0, 0, 7), (0x15, 1, 0, 0),
                          (0x06, 0, 0, 0)]


def _udp_pair() -> tuple[socket.socket, socket.socket]:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.setblocking(False)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    return rx, tx


def _sent_and_received(rx: socket.socket, tx: socket.socket, count: int) -> int:
    """Datagrams ``rx`` got of ``count`` sent, draining as it goes (bounded count)."""
    got = 0
    for i in range(count):
        tx.sendto(struct.pack("!I", i), rx.getsockname())
        if i % 50 == 49:
            got += _drain(rx)
    return got + _drain(rx)


def _drain(rx: socket.socket) -> int:
    got = 0
    while True:
        try:
            rx.recv(64)
        except BlockingIOError:
            return got
        got += 1


def test_attach_and_sample_on_a_socket() -> None:
    rx, tx = _udp_pair()
    with rx, tx:
        assert attached(rx.fileno()) == []
        keep = [(0x06, 0, 0, 0xFFFF)]
        attach(rx.fileno(), keep)
        assert attached(rx.fileno()) == keep
        assert _sent_and_received(rx, tx, 200) == 200
        attach(rx.fileno(), DROP_ALL)
        assert _sent_and_received(rx, tx, 100) == 0
        attach(rx.fileno(), sampled(keep, 4))
        assert attached(rx.fileno()) == sampled(keep, 4)
        got = _sent_and_received(rx, tx, 4000)
        assert 700 < got < 1300, got  # 1000 expected, standard deviation ~27


def test_attach_errors() -> None:
    rx, tx = _udp_pair()
    with rx, tx:
        with pytest.raises(FilterTooLarge, match=r"^cannot set the capture filter: 4097 "
                           r"instructions \(the kernel takes 1 to 4096\)$"):
            attach(rx.fileno(), [(0x06, 0, 0, 0)] * (BPF_MAXINSNS + 1))
        with pytest.raises(FilterTooLarge, match="^cannot set the capture filter: 0 instr"):
            attach(rx.fileno(), [])
        with pytest.raises(FlooddError, match="^cannot set the capture filter: Invalid "
                           "argument$"):
            attach(rx.fileno(), [(0x06, 0, 0, 0), (0x15, 5, 5, 0)])  # jumps out of it
    with pytest.raises(FlooddError, match="^cannot read the capture filter: Bad file "
                       "descriptor$"):
        attached(-1)
