"""Parse stage: libpcap frames -> one small record per DNS packet, keyed by its source.

A record is a tuple::

    (ts, src, proto, qtype, flags, hop)

held in a batch as columns (:class:`Records`: a list per field, the tuples built only
when read one by one), so that the per-packet path allocates nothing but the source
and the question's bytes, and the next stage reads whole columns in C.

``ts`` the capture time (float seconds: the frame's timestamp, or the clock a
live capture passes to :meth:`Parser.parse_batch`), ``src`` the packed source
address (4 bytes IPv4, 16 bytes IPv6), ``proto`` 17 (UDP) or 6 (TCP), ``qtype``
the type of the first question or -1 when there is none, ``flags`` a
combination of the ``F_*`` bits, ``hop`` the packet's IPv4 TTL or IPv6 hop limit
as it arrived (malformed records too).  A datagram reassembled from fragments, or
given up, carries the hop of its first fragment: the one at offset 0, which holds
the transport header (of several copies, the latest).

Counting rules:

* Only packets *to* one of the DNS ports are counted; everything else (responses
  leaving the server, ARP, other ports) is ``ignored``.  Frames a Linux cooked
  capture marks as sent by this host (its own queries among them) are ignored
  too, except the server's TCP SYN-ACKs (see the handshakes below).
* A packet to a DNS port that is not a well-formed query start is ``F_MALFORMED``
  with qtype -1: payload shorter than the 12-byte header, qdcount 0, a question
  name that runs off the end or is longer than 255 bytes, a reserved label type,
  a compression pointer that does not point strictly before the run of labels it
  ends (so no loop can form), a question without its type and class.  A
  *response* (QR=1) arriving at a DNS port is counted for its source as malformed
  as well: it is not a query, and a response flood aimed at the server's port is
  an attack too.
* The DNS payload ends where the IP datagram ends (the UDP length field is not
  trusted).  A frame cut before the destination port can be read is ignored; one
  cut later is a malformed record for its source.
* IP fragments (IPv4 and the IPv6 fragment header) are reassembled with bounded
  state; a datagram gives one record, ``F_FRAGMENT``, when its last piece
  arrives.  Datagrams to a DNS port that never complete (evicted, timed out,
  :meth:`Parser.flush`) give one ``F_FRAGMENT | F_MALFORMED`` record stamped with
  the capture time they were given up.  Fragments whose datagram is still unknown
  are neither records nor ignored.
* TCP: every segment to a DNS port is one record (SYN, ACK and data alike).  Each
  direction of a connection that was seen from its SYN is reassembled in order;
  a segment carries the qtype of the first DNS message it completes, and each
  further message it completes adds a record flagged ``F_EXTRA``.  So the records
  without ``F_EXTRA`` are exactly the packets, and the qtypes of all records are
  exactly the queries.  Segments of a connection whose SYN was not seen, or after
  out-of-order data (which ends the reassembly of that direction), have qtype -1.
* TCP handshakes (RFC 9293 3.5): a SYN-ACK from a DNS port is the server's answer
  to a client's SYN, its sequence number the server's initial one, s (random, RFC
  6528).  A segment of the client that acknowledges s + 1 (ACK set, no SYN or
  RST) completes the handshake: only a client that received the SYN-ACK knows s,
  so a forged source cannot.  That segment and every later one of the connection
  (client to server, sequence number within ``VERIFY_WINDOW`` of the client's
  stream seen so far) carry ``F_VERIFIED``, until the connection is silent for
  ``FLOW_TIMEOUT`` or a new handshake on the same addresses and ports completes.
  A SYN-ACK gives no record and is not ``ignored`` either: it counts in
  ``frames`` only.  Where a Linux cooked capture marks the direction, only
  SYN-ACKs sent by this host count; links without it (Ethernet, raw IP) take any
  SYN-ACK from a DNS port as the server's (a live capture's kernel filter passes
  only those this host sent: :func:`floodd.detect.capture.sent_by_host`).
  Handshakes awaiting the client (``MAX_HANDSHAKES``) and verified connections
  (``MAX_FLOWS``) are bounded apart: a flood of forged SYNs, each answered by a
  SYN-ACK, pushes out pending handshakes only, never a verified connection.
"""

from __future__ import annotations

import struct
from array import array
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import compress, repeat
from operator import add, lt, mul
from typing import Callable, Iterable, TypeVar, overload

from floodd.errors import FlooddError

F_MALFORMED = 1  # not a well-formed DNS query start
F_FRAGMENT = 2  # came from an IP fragment (reassembled or not)
F_EXTRA = 4  # a further DNS message completed by the same TCP segment: not a packet
F_VERIFIED = 8  # a TCP segment of a connection whose handshake the capture saw complete

Record = tuple[float, bytes, int, int, int, int]  # ts, src, proto, qtype, flags, hop
_FlowKey = tuple[bytes, bytes, int, int]  # source, destination, source port, destination port
_Append = Callable[[Record], None]

LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 12  # DLT_RAW as libpcap reports it on Linux
LINKTYPE_RAW_FILE = 101  # LINKTYPE_RAW as written in capture files
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276

LINKTYPE_NAMES = {
    LINKTYPE_ETHERNET: "Ethernet",
    LINKTYPE_RAW: "raw IP",
    LINKTYPE_RAW_FILE: "raw IP",
    LINKTYPE_LINUX_SLL: "Linux cooked (SLL)",
    LINKTYPE_IPV4: "raw IPv4",
    LINKTYPE_IPV6: "raw IPv6",
    LINKTYPE_LINUX_SLL2: "Linux cooked v2 (SLL2)",
}

UDP = 17
TCP = 6

ETH_IPV4 = 0x0800
ETH_IPV6 = 0x86DD
VLAN_TPIDS = frozenset((0x8100, 0x88A8, 0x9100))
PACKET_OUTGOING = 4  # sll_pkttype of a frame sent by this host

# IPv6 extension headers skipped on the way to UDP/TCP (the fragment header, 44,
# is handled on its own): hop-by-hop, routing, destination options, AH,
# mobility, HIP, shim6.
IPV6_EXT = frozenset((0, 43, 60, 51, 135, 139, 140))
IPV6_FRAGMENT = 44
IPV6_AH = 51

MAX_NAME = 255
# A question that is not malformed lies within the first 12 + 255 + 2 + 4 bytes of
# a message (labels, then a root label or one pointer, then type and class), so a
# TCP message's head of this size decides its qtype and malformedness.
DNS_HEAD = 288

# Fragment reassembly bounds.
MAX_DATAGRAMS = 4096
MAX_FRAGMENTS = 128  # per datagram (a 64 KB datagram over a 1500-byte MTU needs 45)
MAX_FRAGMENT_BYTES = 8 << 20  # all pending datagrams together
FRAGMENT_TIMEOUT = 30.0

# TCP reassembly bounds (per direction of a connection, a flow).
MAX_FLOWS = 4096
FLOW_TIMEOUT = 120.0
MAX_EXTRA = 64  # F_EXTRA records for one segment; further messages are still skipped
MAX_HANDSHAKES = 4096  # SYN-ACKs awaiting the client's ACK
# A verified connection's client segments carry F_VERIFIED while their sequence
# number lies this close to the client's stream seen so far (either side: behind
# for a retransmission, ahead for segments the capture missed).  A client has far
# less than this in flight; a forger who guessed the ports must also guess this.
VERIFY_WINDOW = 1 << 20
_SEQ = 0xFFFFFFFF  # sequence numbers are modulo 2**32

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_META = struct.Struct("IIII")  # pcapy-ng next_batch(): sec, usec, offset, caplen (native)
_TCP = struct.Struct("!HHIIBB")  # sport, dport, seq, ack, data offset, flags

TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_ACK = 0x10

_MALFORMED: tuple[int, int] = (-1, F_MALFORMED)
MAX_QUESTIONS = 4096  # question tails whose qtype a parser remembers (see parse_batch)
_MISS = -2  # not a qtype, nor -1


class Records(Sequence[Record]):
    """A batch's records held as columns, one list per field: the per-packet path reads
    a column at a time (``src``, ``qtype``, ``hop``, ``flags``) and never builds a tuple
    per record.  As a sequence it is the records, ``(ts, src, proto, qtype, flags,
    hop)`` tuples built on demand, and equal to any sequence of the same tuples.

    ``flags`` None: every record has flags 0; ``proto`` None: every record is UDP.
    Times: ``times``, a list or a function computing it when first read (a capture
    file's batch: its frames' timestamps cost nothing until read), or None: every
    record at ``time`` (a live capture stamps one clock reading per batch).
    """

    __slots__ = ("src", "qtype", "hop", "flags", "proto", "time", "_times")

    def __init__(self, src: list[bytes], qtype: list[int], hop: list[int],
                 flags: list[int] | None = None, proto: list[int] | None = None,
                 times: list[float] | Callable[[], list[float]] | None = None,
                 time: float = 0.0) -> None:
        self.src = src
        self.qtype = qtype
        self.hop = hop
        self.flags = flags
        self.proto = proto
        self.time = time
        self._times = times

    @classmethod
    def of(cls, records: Iterable[Record]) -> Records:
        """The columns of ``records`` (tuples); ``records`` itself if already columns."""
        if isinstance(records, Records):
            return records
        rows = list(records)
        if not rows:
            return cls([], [], [])
        ts, src, proto, qtype, flags, hop = map(list, zip(*rows))
        return cls(src, qtype, hop, flags if any(flags) else None,
                   None if proto.count(UDP) == len(proto) else proto, ts)

    @property
    def times(self) -> list[float]:
        """Every record's capture time."""
        times = self._times
        if times is None:
            return [self.time] * len(self.src)
        if not isinstance(times, list):
            times = self._times = times()
        return times

    def first_time(self) -> float:
        """The capture time of the first record (``time`` if there is none)."""
        times = self._times
        if times is None or not self.src:
            return self.time
        if isinstance(times, _Stamper):  # not computed yet: only the first one's
            return times.first()
        return self.times[0]

    def last_time(self) -> float:
        """The capture time of the last record (``time`` if there is none)."""
        times = self._times
        if times is None or not self.src:
            return self.time
        if isinstance(times, _Stamper):  # not computed yet: only the last one's
            return times.last()
        return self.times[-1]

    def __len__(self) -> int:
        return len(self.src)

    @overload
    def __getitem__(self, index: int) -> Record: ...

    @overload
    def __getitem__(self, index: slice) -> Records: ...

    def __getitem__(self, index: int | slice) -> Record | Records:
        if isinstance(index, slice):
            flags, proto = self.flags, self.proto
            times = self.times[index] if self._times is not None else None
            return Records(self.src[index], self.qtype[index], self.hop[index],
                           flags[index] if flags is not None else None,
                           proto[index] if proto is not None else None, times, self.time)
        return (self.times[index] if self._times is not None else self.time, self.src[index],
                self.proto[index] if self.proto is not None else UDP, self.qtype[index],
                self.flags[index] if self.flags is not None else 0, self.hop[index])

    def __iter__(self) -> Iterator[Record]:
        n = len(self.src)
        return zip(self.times if self._times is not None else repeat(self.time, n), self.src,
                   self.proto if self.proto is not None else repeat(UDP, n), self.qtype,
                   self.flags if self.flags is not None else repeat(0, n), self.hop)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(self) == len(other) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Records({list(self)!r})"


@dataclass(frozen=True, slots=True)
class Batch:
    records: Sequence[Record]  # Records from the parser; any sequence of tuples will do
    frames: int  # frames examined
    # Frames that are neither queries to the DNS ports nor the server's SYN-ACKs.
    ignored: int


def question(buf: bytes, dns: int, end: int) -> tuple[int, int]:
    """(qtype, flags) of the DNS message at ``buf[dns:end]``: flags 0 or F_MALFORMED."""
    if dns + 12 > end:
        return _MALFORMED
    if buf[dns + 2] & 0x80 or not (buf[dns + 4] or buf[dns + 5]):
        return _MALFORMED  # a response, or no question
    p = seg = dns + 12
    after = -1  # where the question continues after the first pointer
    length = 1  # wire length of the name, root label included
    while True:
        if p >= end:
            return _MALFORMED
        n = buf[p]
        if n == 0:
            break
        if n < 0x40:
            length += n + 1
            if length > MAX_NAME or p + 1 + n > end:
                return _MALFORMED
            p += n + 1
        elif n >= 0xC0 and p + 1 < end:
            target = dns + (((n & 0x3F) << 8) | buf[p + 1])
            if after < 0:
                after = p + 2
            # Strictly before the start of the run being read: no loop can form.
            if target >= seg:
                return _MALFORMED
            p = seg = target
        else:
            return _MALFORMED  # reserved label type 0x40/0x80, or a cut pointer
    qend = p + 1 if after < 0 else after
    if qend + 4 > end:
        return _MALFORMED
    return (buf[qend] << 8) | buf[qend + 1], 0


def _skip_ipv6_ext(nh: int, buf: bytes, p: int, end: int) -> tuple[int, int]:
    """Skip IPv6 extension headers (not the fragment header): (next header, offset).

    Next header -1 when an extension header is cut off.
    """
    while nh in IPV6_EXT:
        if p + 8 > end:
            return -1, p
        size = (buf[p + 1] + 2) * 4 if nh == IPV6_AH else (buf[p + 1] + 1) * 8
        nh = buf[p]
        p += size
    return nh, p


_Field = tuple[int, str, tuple[object, ...]]  # offset, struct code, accepted values
_ABSENT: _Field = (-1, "0s", (b"",))  # read as b"", which is always accepted
_NEVER: _Field = (-1, "0s", ())  # a link type without the IPv4 fast path


class _Link:
    """A link type's UDP/IPv4 fast path.

    ``hot`` reads at once the link-layer fields to check, the IPv4 header at ``ip``
    assumed 20 bytes long, UDP and the DNS header: (a, b, head, total length, fragment
    field, TTL, protocol, source, destination port, DNS flags, qdcount).  ``head`` is the
    version/IHL byte, with the link field right before the IP header when there is one
    (the EtherType): one comparison checks both.  ``a`` and ``b`` are the other link
    fields (``b`` after ``a`` in the frame), b"" where absent.
    """

    def __init__(self, ip: int, a: _Field = _ABSENT, b: _Field = _ABSENT,
                 before: _Field = _ABSENT) -> None:
        fmt = "!"
        pos = 0
        for offset, code, _ in (a, b):
            if offset < 0:
                fmt += code
            else:
                fmt += f"{offset - pos}x{code}"
                pos = offset + struct.calcsize("!" + code)
        start = ip if before[0] < 0 else before[0]
        head = ip - start + 1
        self.hot = struct.Struct(f"{fmt}{start - pos}x{head}sxH2xHBB2x4s4x2xH4x2xHH")
        self.a_ok = frozenset(a[2])
        self.b_ok = frozenset(b[2])
        self.a_free = a is _ABSENT  # no field to check
        self.b_free = b is _ABSENT
        prefixes = [struct.pack("!" + before[1], v) for v in before[2]] if before[0] >= 0 \
            else [b""]
        self.head_ok = frozenset(v + b"\x45" for v in prefixes)
        self.ip = ip
        self.name_off = ip + 20 + 8 + 12


_NOT_OUTGOING = (0, 1, 2, 3)  # sll_pkttype: host, broadcast, multicast, other host
_RAW = _Link(0)
_LINKS = {
    LINKTYPE_ETHERNET: _Link(14, before=(12, "H", (ETH_IPV4,))),
    LINKTYPE_LINUX_SLL: _Link(16, (0, "H", _NOT_OUTGOING), before=(14, "H", (ETH_IPV4,))),
    LINKTYPE_LINUX_SLL2: _Link(20, (0, "H", (ETH_IPV4,)), (10, "B", _NOT_OUTGOING)),
    LINKTYPE_RAW: _RAW,
    LINKTYPE_RAW_FILE: _RAW,
    LINKTYPE_IPV4: _RAW,
    LINKTYPE_IPV6: _Link(0, _NEVER),
}


class _Datagram:
    """An IP datagram being reassembled from its fragments."""

    __slots__ = ("ts", "src", "proto", "v6", "parts", "size", "total", "dns", "transport",
                 "hop")

    def __init__(self, ts: float, src: bytes, proto: int, v6: bool) -> None:
        self.ts = ts  # capture time of its first fragment seen
        self.src = src
        self.hop = -1  # TTL / hop limit of the fragment at offset 0, once seen
        self.proto = proto  # IPv4 protocol, or the next header after the fragment header
        self.v6 = v6
        self.parts: dict[int, bytes] = {}  # fragment offset -> payload
        self.size = 0  # bytes held in parts
        self.total = -1  # payload length, known once the last fragment is seen
        self.dns: bool | None = None  # to a DNS port? None until the first fragment
        self.transport = proto  # UDP or TCP once the first fragment is seen

    def upper(self, payload: bytes) -> tuple[int, int]:
        """(transport protocol, its offset) in the payload from the datagram's start;
        protocol -1 when an IPv6 extension header is cut off."""
        if self.v6:
            return _skip_ipv6_ext(self.proto, payload, 0, len(payload))
        return self.proto, 0


class _Flow:
    """One direction of a TCP connection being reassembled (seen from its SYN)."""

    __slots__ = ("ts", "seq", "head", "skip", "pending")

    def __init__(self, ts: float, seq: int) -> None:
        self.ts = ts  # capture time of its last segment
        self.seq = seq  # next expected sequence number
        self.head = b""  # length prefix + head of the current message, up to DNS_HEAD
        self.skip = 0  # bytes of the current message still to come after its head
        self.pending: tuple[int, int] = _MALFORMED  # (qtype, flags) of the current message


class _Handshake:
    """A TCP connection from the server's SYN-ACK on, seen from the client's side."""

    __slots__ = ("ts", "ack", "seq")

    def __init__(self, ts: float, ack: int, seq: int) -> None:
        self.ts = ts  # capture time of its last segment
        self.ack = ack  # what the client acknowledges to complete it: the server's ISN + 1
        self.seq = seq  # the client's next sequence number, past its stream seen so far


class Parser:
    """Turns capture batches into records; keeps the fragment and TCP state between them."""

    def __init__(self, linktype: int, ports: Iterable[int] = (53,),
                 protocols: Iterable[str] = ("udp", "tcp")) -> None:
        link = _LINKS.get(linktype)
        if link is None:
            known = ", ".join(f"{name} ({code})" for code, name in sorted(LINKTYPE_NAMES.items()))
            raise FlooddError(f"unsupported link type {linktype} (supported: {known})")
        self.linktype = linktype
        self._link = link
        # Whether the link marks the frames this host sent; without it, any SYN-ACK
        # from a DNS port is taken as the server's.
        self._directed = linktype in (LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2)
        protos = {p.lower() for p in protocols}
        ports = frozenset(ports)
        self._udp_ports = ports if "udp" in protos else frozenset()
        self._tcp_ports = ports if "tcp" in protos else frozenset()
        transports = {UDP} if self._udp_ports else set()
        transports |= {TCP} if self._tcp_ports else set()
        # Fragments worth holding: the next header after an IPv6 fragment header
        # may be an extension header in front of UDP/TCP.
        self._fragment_protos = (frozenset(transports), frozenset(transports | IPV6_EXT))
        self._datagrams: dict[tuple[bytes, bytes, int, int], _Datagram] = {}
        self._fragment_bytes = 0
        self._flows: dict[_FlowKey, _Flow] = {}
        # Keyed by the client's direction, oldest (least recently seen) first.
        self._syn_acks: dict[_FlowKey, _Handshake] = {}  # awaiting the client's ACK
        self._verified: dict[_FlowKey, _Handshake] = {}
        self._now = 0.0  # capture time of the latest frame
        self._questions: dict[bytes, int] = {}  # question tail -> qtype (-1: malformed)

    def parse_batch(self, data: bytes, meta: bytes, now: float | None = None) -> Batch:
        """Parse a pcapy-ng ``next_batch()`` result: ``meta`` holds 16-byte records
        (sec, usec, offset, caplen) locating each frame in ``data``.

        Records are stamped, and the reassembly timeouts run, on the frames' own
        timestamps; or, given ``now``, on that (a live capture passes its monotonic
        clock, so that a step of the wall clock changes nothing).

        The fast path takes a query over UDP/IPv4 with a 20-byte header, not a
        fragment, in one step of Python per frame: its source, hop value and the bytes
        from its question to the end of the datagram (the *tail*).  The qtypes come
        after, one dict lookup per tail in C: a tail's qtype (or malformedness) is
        worked out once and remembered (``MAX_QUESTIONS``; a name with a compression
        pointer is not, it depends on the header).  A flood repeats its questions; one
        of new names each time (random subdomains) costs one walk of the name per
        packet, as every packet did before.  Every other frame goes the general way,
        which gives the same records; the records stay in frame order.
        """
        srcs: list[bytes] = []
        hops: list[int] = []
        tails: list[bytes] = []
        add_src, add_hop, add_tail = srcs.append, hops.append, tails.append
        general: list[Record] = []  # records of the general path
        placed: list[int] = []  # per general record: the fast records before it
        slow: list[int] = []  # per frame taken the general way: the fast records before it
        frame = self._frame
        link = self._link
        hot = link.hot.unpack_from
        hot_len = link.hot.size
        head_ok, a_ok, b_ok, a_free, b_free = (link.head_ok, link.a_ok, link.b_ok, link.a_free,
                                               link.b_free)
        ip_off = link.ip
        tail_off = link.name_off
        ports = self._udp_ports
        ignored = 0
        ts = self._now if now is None else now
        for sec, usec, off, caplen in _META.iter_unpack(meta):
            if caplen >= hot_len:
                a, b, head, totlen, frag, ttl, proto, src, dport, dflags, qd = hot(data, off)
                if (head in head_ok and proto == UDP and dport in ports and dflags < 0x8000
                        and qd and not frag & 0x3FFF and (a_free or a in a_ok)
                        and (b_free or b in b_ok)):
                    # A total length below 20 is not believed (the frame's end counts).
                    if ip_off + totlen < caplen and totlen >= 20:
                        if totlen < 24:  # the datagram ends before its destination port
                            slow.append(len(srcs))
                            ignored += 1
                            continue
                        end = off + ip_off + totlen
                    else:
                        end = off + caplen
                    add_src(src)
                    add_hop(ttl)
                    add_tail(data[off + tail_off:end])
                    continue
            if now is None:
                ts = sec + usec * 1e-6
            mark = len(general)
            slow.append(len(srcs))
            if frame(ts, data, off, off + caplen, general.append):
                ignored += 1
            if len(general) > mark:
                placed += [len(srcs)] * (len(general) - mark)
        if now is None and meta:
            sec, usec = _META.unpack_from(meta, len(meta) - 16)[:2]
            ts = sec + usec * 1e-6
        self._now = ts
        mark = len(general)
        self._expire(ts, general.append)
        placed += [len(srcs)] * (len(general) - mark)

        qtypes = self._qtypes(tails, data, meta, slow) if tails else []
        flags = None
        if qtypes and min(qtypes) < 0:  # malformed ones
            flags = list(map(mul, map(lt, qtypes, repeat(0)), repeat(F_MALFORMED)))
        proto = None
        if general:
            g_ts, g_src, g_proto, g_qtype, g_flags, g_hop = zip(*general)
            srcs = _splice(srcs, g_src, placed)
            hops = _splice(hops, g_hop, placed)
            qtypes = _splice(qtypes, g_qtype, placed)
            if flags is not None or any(g_flags):
                flags = _splice(flags or [0] * len(tails), g_flags, placed)
            if g_proto.count(UDP) < len(g_proto):
                proto = _splice([UDP] * len(tails), g_proto, placed)
        times: Callable[[], list[float]] | None = None
        if now is None:
            times = _Stamper(meta, slow, [r[0] for r in general], placed)
        return Batch(Records(srcs, qtypes, hops, flags, proto, times, ts), len(meta) // 16,
                     ignored)

    def _qtypes(self, tails: list[bytes], data: bytes, meta: bytes,
                slow: list[int]) -> list[int]:
        """The qtype (-1: malformed) of each fast-path record from its tail."""
        known = self._questions
        qtypes = list(map(known.get, tails, repeat(_MISS)))
        if min(qtypes) > _MISS:
            return qtypes
        offsets = None
        for i in compress(range(len(qtypes)), map((_MISS).__eq__, qtypes)):
            tail = tails[i]
            qtype = known.get(tail)
            if qtype is None:
                qtype = _tail_qtype(tail)
                if qtype is None:  # a compression pointer: read with the header
                    if offsets is None:
                        offsets = array("I", meta)[2::4]
                    off = offsets[i + bisect_right(slow, i)]  # the record's frame
                    dns = off + self._link.name_off - 12
                    qtype = question(data, dns, dns + 12 + len(tail))[0]
                else:
                    if len(known) >= MAX_QUESTIONS:
                        known.clear()
                    known[tail] = qtype
            qtypes[i] = qtype
        return qtypes

    def parse_frames(self, frames: Iterable[tuple[float, bytes]],
                     now: float | None = None) -> Batch:
        """Parse (timestamp, frame) pairs, e.g. frames built by hand (``now`` as for
        :meth:`parse_batch`)."""
        data = bytearray()
        meta = bytearray()
        for ts, frame in frames:
            sec = int(ts)
            meta += _META.pack(sec, round((ts - sec) * 1e6), len(data), len(frame))
            data += frame
        return self.parse_batch(bytes(data), bytes(meta), now)

    def flush(self) -> Batch:
        """Give up all pending state (end of a capture file): datagrams to a DNS port
        still missing fragments become malformed records."""
        records: list[Record] = []
        for key in list(self._datagrams):
            self._drop_datagram(key, self._now, records.append)
        self._flows.clear()
        self._syn_acks.clear()
        self._verified.clear()
        return Batch(records, 0, 0)

    # The general path.  Each step returns True when the frame is ignored.

    def _frame(self, ts: float, data: bytes, off: int, end: int,
               out: _Append) -> bool:
        lt = self.linktype
        outgoing = False
        if lt == LINKTYPE_ETHERNET:
            if off + 14 > end:
                return True
            et = (data[off + 12] << 8) | data[off + 13]
            p = off + 14
        elif lt == LINKTYPE_LINUX_SLL:
            if off + 16 > end:
                return True
            outgoing = (data[off] << 8 | data[off + 1]) == PACKET_OUTGOING
            et = (data[off + 14] << 8) | data[off + 15]
            p = off + 16
        elif lt == LINKTYPE_LINUX_SLL2:
            if off + 20 > end:
                return True
            outgoing = data[off + 10] == PACKET_OUTGOING
            et = (data[off] << 8) | data[off + 1]
            p = off + 20
        else:
            if off >= end:
                return True
            version = data[off] >> 4 if lt in (LINKTYPE_RAW, LINKTYPE_RAW_FILE) else (
                4 if lt == LINKTYPE_IPV4 else 6)
            et = ETH_IPV4 if version == 4 else ETH_IPV6 if version == 6 else 0
            p = off
        while et in VLAN_TPIDS and p + 4 <= end:
            et = (data[p + 2] << 8) | data[p + 3]
            p += 4
        if et == ETH_IPV4:
            return self._ipv4(ts, data, p, end, outgoing, out)
        if et == ETH_IPV6:
            return self._ipv6(ts, data, p, end, outgoing, out)
        return True

    def _ipv4(self, ts: float, data: bytes, ip: int, end: int, outgoing: bool,
              out: _Append) -> bool:
        if ip + 20 > end or data[ip] >> 4 != 4:
            return True
        ihl = (data[ip] & 0x0F) * 4
        totlen = (data[ip + 2] << 8) | data[ip + 3]
        if ihl < 20:
            return True
        if totlen >= ihl and ip + totlen < end:
            end = ip + totlen
        frag = (data[ip + 6] << 8) | data[ip + 7]
        hop = data[ip + 8]
        proto = data[ip + 9]
        src = data[ip + 12:ip + 16]
        dst = data[ip + 16:ip + 20]
        if frag & 0x3FFF:
            if outgoing:
                return True  # a SYN-ACK is never fragmented
            ident = (data[ip + 4] << 8) | data[ip + 5]
            return self._fragment(ts, src, dst, ident, proto, False, (frag & 0x1FFF) * 8,
                                  bool(frag & 0x2000), data[ip + ihl:end], hop, out)
        return self._transport(ts, src, dst, proto, data, ip + ihl, end, 0, hop, outgoing, out)

    def _ipv6(self, ts: float, data: bytes, ip: int, end: int, outgoing: bool,
              out: _Append) -> bool:
        if ip + 40 > end or data[ip] >> 4 != 6:
            return True
        plen = (data[ip + 4] << 8) | data[ip + 5]
        if plen and ip + 40 + plen < end:
            end = ip + 40 + plen
        hop = data[ip + 7]
        src = data[ip + 8:ip + 24]
        dst = data[ip + 24:ip + 40]
        nh, p = _skip_ipv6_ext(data[ip + 6], data, ip + 40, end)
        if nh != IPV6_FRAGMENT:
            return self._transport(ts, src, dst, nh, data, p, end, 0, hop, outgoing, out)
        if p + 8 > end:
            return True
        nh = data[p]
        offset = ((data[p + 2] << 8) | data[p + 3]) & 0xFFF8
        more = bool(data[p + 3] & 1)
        if not offset and not more:  # an atomic fragment: a whole datagram
            nh, p = _skip_ipv6_ext(nh, data, p + 8, end)
            return self._transport(ts, src, dst, nh, data, p, end, 0, hop, outgoing, out)
        if outgoing:
            return True  # a SYN-ACK is never fragmented
        ident = _U32.unpack_from(data, p + 4)[0]
        return self._fragment(ts, src, dst, ident, nh, True, offset, more, data[p + 8:end],
                              hop, out)

    def _transport(self, ts: float, src: bytes, dst: bytes, proto: int, data: bytes,
                   l4: int, end: int, flags: int, hop: int, outgoing: bool,
                   out: _Append) -> bool:
        if l4 + 4 > end:
            return True
        if (proto == TCP and (outgoing or not self._directed)
                and (data[l4] << 8 | data[l4 + 1]) in self._tcp_ports
                and self._syn_ack(ts, src, dst, data, l4, end)):
            return False
        if outgoing:
            return True
        dport = (data[l4 + 2] << 8) | data[l4 + 3]
        if proto == UDP and dport in self._udp_ports:
            qtype, f = question(data, l4 + 8, end)
            out((ts, src, UDP, qtype, f | flags, hop))
            return False
        if proto == TCP and dport in self._tcp_ports:
            self._tcp(ts, src, dst, data, l4, end, flags, hop, out)
            return False
        return True

    def _classify(self, dgram: _Datagram, payload: bytes) -> bool | None:
        """Whether a datagram goes to a DNS port, from its payload's start: sets and
        returns ``dns`` (None when too short to tell), sets ``transport``."""
        nh, p = dgram.upper(payload)
        if nh == UDP:
            ports = self._udp_ports
        elif nh == TCP:
            ports = self._tcp_ports
        else:
            dgram.dns = None if nh < 0 else False
            return dgram.dns
        dgram.transport = nh
        if p + 4 <= len(payload):
            dgram.dns = _U16.unpack_from(payload, p + 2)[0] in ports
        return dgram.dns

    def _fragment(self, ts: float, src: bytes, dst: bytes, ident: int, proto: int, v6: bool,
                  offset: int, more: bool, payload: bytes, hop: int, out: _Append) -> bool:
        if proto not in self._fragment_protos[v6]:
            return True
        key = (src, dst, ident, proto)
        dgram = self._datagrams.get(key)
        if dgram is None:
            self._expire(ts, out)
            while len(self._datagrams) >= MAX_DATAGRAMS:
                self._drop_datagram(next(iter(self._datagrams)), ts, out)
            dgram = self._datagrams[key] = _Datagram(ts, src, proto, v6)
        if dgram.dns is False:
            return True  # kept without its data, so that its other fragments are ignored
        if offset == 0:
            dgram.hop = hop
            if self._classify(dgram, payload) is False:
                self._fragment_bytes -= dgram.size
                dgram.parts.clear()
                dgram.size = 0
                return True
        if not more:
            dgram.total = offset + len(payload)
        if len(dgram.parts) >= MAX_FRAGMENTS:
            self._drop_datagram(key, ts, out)
            return False
        old = dgram.parts.get(offset)
        dgram.parts[offset] = payload
        grown = len(payload) - (len(old) if old is not None else 0)
        dgram.size += grown
        self._fragment_bytes += grown
        while self._fragment_bytes > MAX_FRAGMENT_BYTES and self._datagrams:
            self._drop_datagram(next(iter(self._datagrams)), ts, out)
        if key not in self._datagrams or dgram.total < 0 or dgram.size < dgram.total:
            return False
        whole = _reassemble(dgram.parts, dgram.total)
        if whole is None:
            return False
        del self._datagrams[key]
        self._fragment_bytes -= dgram.size
        nh, p = dgram.upper(whole)
        return self._transport(ts, src, dst, nh, whole, p, len(whole), F_FRAGMENT, dgram.hop,
                               False, out)

    def _drop_datagram(self, key: tuple[bytes, bytes, int, int], ts: float,
                       out: _Append) -> None:
        dgram = self._datagrams.pop(key)
        self._fragment_bytes -= dgram.size
        if dgram.dns:  # its first fragment was seen: dgram.hop is known
            out((ts, dgram.src, dgram.transport, -1, F_FRAGMENT | F_MALFORMED, dgram.hop))

    def _expire(self, now: float, out: _Append) -> None:
        """Give up datagrams, TCP flows and handshakes too old in capture time (oldest
        first)."""
        datagrams = self._datagrams
        while datagrams:
            key = next(iter(datagrams))
            if datagrams[key].ts > now - FRAGMENT_TIMEOUT:
                break
            self._drop_datagram(key, now, out)
        for table in (self._flows, self._syn_acks, self._verified):
            while table:
                fkey = next(iter(table))
                if table[fkey].ts > now - FLOW_TIMEOUT:
                    break
                del table[fkey]

    def _syn_ack(self, ts: float, src: bytes, dst: bytes, data: bytes, l4: int,
                 end: int) -> bool:
        """Note the server's SYN-ACK from a DNS port (``src`` the server): whether the
        segment is one."""
        if l4 + 20 > end:
            return False
        sport, dport, seq, ack, _, tcp_flags = _TCP.unpack_from(data, l4)
        if tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) != TCP_SYN | TCP_ACK:
            return False
        key = (dst, src, dport, sport)  # the client's direction
        pending = self._syn_acks
        pending.pop(key, None)  # re-inserted last: the dict stays in age order
        # It acknowledges the client's SYN: ``ack`` is the client's next sequence number.
        pending[key] = _Handshake(ts, (seq + 1) & _SEQ, ack)
        if len(pending) > MAX_HANDSHAKES:
            del pending[next(iter(pending))]
        return True

    def _verify(self, ts: float, key: _FlowKey, seq: int, ack: int, tcp_flags: int,
                length: int) -> int:
        """F_VERIFIED when a client segment (``length`` bytes of data) completes its
        connection's handshake or belongs to a verified connection, else 0."""
        if tcp_flags & TCP_SYN:
            return 0  # a connection (re)starting: its handshake is still to come
        verified = self._verified
        conn = self._syn_acks.get(key)
        if (conn is not None and tcp_flags & (TCP_ACK | TCP_RST) == TCP_ACK
                and ack == conn.ack):
            del self._syn_acks[key]
            # Replaces an earlier connection on the same ports (re-inserted last).
            verified.pop(key, None)
        else:
            conn = verified.get(key)
            if conn is None or (seq - conn.seq + VERIFY_WINDOW) & _SEQ >= 2 * VERIFY_WINDOW:
                return 0
            del verified[key]  # re-inserted last: the dict stays in LRU order
        conn.ts = ts
        after = (seq + length + (tcp_flags & TCP_FIN)) & _SEQ  # a FIN takes one number
        if (after - conn.seq) & _SEQ < VERIFY_WINDOW:
            conn.seq = after
        verified[key] = conn
        if len(verified) > MAX_FLOWS:
            del verified[next(iter(verified))]
        return F_VERIFIED

    def _tcp(self, ts: float, src: bytes, dst: bytes, data: bytes, l4: int, end: int,
             flags: int, hop: int, out: _Append) -> None:
        if l4 + 20 > end:
            out((ts, src, TCP, -1, flags | F_MALFORMED, hop))
            return
        sport, dport, seq, ack, doff, tcp_flags = _TCP.unpack_from(data, l4)
        doff = (doff >> 4) * 4
        if doff < 20 or l4 + doff > end:
            out((ts, src, TCP, -1, flags | F_MALFORMED, hop))
            return
        key = (src, dst, sport, dport)
        flags |= self._verify(ts, key, seq, ack, tcp_flags, end - l4 - doff)
        flows = self._flows
        flow = flows.pop(key, None)  # re-inserted last: the dict stays in LRU order
        if tcp_flags & TCP_SYN:
            flow = _Flow(ts, (seq + 1) & _SEQ)
            seq = flow.seq
        messages: list[tuple[int, int]] = []
        if flow is not None:
            flow.ts = ts
            ahead = (seq - flow.seq) & _SEQ
            if end > l4 + doff and ahead and ahead < 0x80000000:
                flow = None  # a gap: this direction can no longer be followed
            elif end > l4 + doff:
                behind = (0x100000000 - ahead) & _SEQ  # bytes already seen
                start = l4 + doff + behind
                if start < end:
                    messages = _feed(flow, data[start:end])
                    flow.seq = (flow.seq + end - start) & _SEQ
        if flow is not None and not tcp_flags & (TCP_FIN | TCP_RST):
            flows[key] = flow
            if len(flows) > MAX_FLOWS:
                del flows[next(iter(flows))]
        if not messages:
            out((ts, src, TCP, -1, flags, hop))
            return
        qtype, f = messages[0]
        out((ts, src, TCP, qtype, f | flags, hop))
        for qtype, f in messages[1:MAX_EXTRA + 1]:
            out((ts, src, TCP, qtype, f | flags | F_EXTRA, hop))


def _feed(flow: _Flow, data: bytes) -> list[tuple[int, int]]:
    """Append in-order stream bytes; the (qtype, flags) of each DNS message
    completed, in order (RFC 1035 4.2.2: each message after a 2-byte length)."""
    done = []
    i = 0
    n = len(data)
    while i < n:
        if flow.skip:
            k = min(flow.skip, n - i)
            flow.skip -= k
            i += k
            if not flow.skip:
                done.append(flow.pending)
            continue
        head = flow.head
        if len(head) < 2:
            k = min(2 - len(head), n - i)
            head += data[i:i + k]
            i += k
            if len(head) < 2:
                flow.head = head
                break
        size = (head[0] << 8) | head[1]
        want = 2 + min(size, DNS_HEAD)
        k = min(want - len(head), n - i)
        head += data[i:i + k]
        i += k
        if len(head) < want:
            flow.head = head
            break
        flow.head = b""
        flow.pending = question(head, 2, want)
        flow.skip = size + 2 - want
        if not flow.skip:
            done.append(flow.pending)
    return done


def _reassemble(parts: dict[int, bytes], total: int) -> bytes | None:
    """The datagram payload from its fragments, or None while a hole remains."""
    pos = 0
    chunks = []
    for offset in sorted(parts):
        if offset > pos:
            return None
        chunk = parts[offset]
        if offset + len(chunk) > pos:
            chunks.append(chunk[pos - offset:])
            pos = offset + len(chunk)
    if pos < total:
        return None
    return b"".join(chunks)[:total]


def _tail_qtype(tail: bytes) -> int | None:
    """The qtype of the question at the start of ``tail`` (a query's bytes from its
    question to the end of its datagram), -1 if malformed (as :func:`question`), None
    if its name has a compression pointer (whose meaning depends on what comes before)."""
    p = 0
    end = len(tail)
    length = 1
    while True:
        if p >= end:
            return -1
        n = tail[p]
        if n == 0:
            break
        if n < 0x40:
            length += n + 1
            if length > MAX_NAME or p + 1 + n > end:
                return -1
            p += n + 1
        elif n >= 0xC0 and p + 1 < end:
            return None
        else:
            return -1
    if p + 5 > end:
        return -1
    return (tail[p + 1] << 8) | tail[p + 2]


T = TypeVar("T")


def _splice(fast: list[T], extra: Sequence[T], at: list[int]) -> list[T]:
    """``fast`` with each of ``extra`` inserted after the first ``at[i]`` of it (``at``
    nondecreasing): the records of both paths back in frame order."""
    out: list[T] = []
    start = 0
    for pos, value in zip(at, extra):
        if pos > start:
            out += fast[start:pos]
            start = pos
        out.append(value)
    out += fast[start:]
    return out


class _Stamper:
    """The records' capture times, computed when first read: the timestamps of the
    fast-path frames (every frame but the ``slow`` ones, see parse_batch), with those of
    the general path's records (``extra``) spliced in at ``at``."""

    __slots__ = ("meta", "slow", "extra", "at")

    def __init__(self, meta: bytes, slow: list[int], extra: list[float],
                 at: list[int]) -> None:
        self.meta, self.slow, self.extra, self.at = meta, slow, extra, at

    def __call__(self) -> list[float]:
        fields = array("I", self.meta)
        stamps = list(map(add, fields[0::4], map(mul, fields[1::4], repeat(1e-6))))
        slow = self.slow
        if slow:
            keep = [True] * len(stamps)
            for k, before in enumerate(slow):
                keep[before + k] = False
            stamps = list(compress(stamps, keep))
        return _splice(stamps, self.extra, self.at) if self.extra else stamps

    def first(self) -> float:
        """The first record's time (of a batch with records), without the others'."""
        if self.extra and self.at[0] == 0:  # a general record comes first
            return self.extra[0]
        return self._stamp(0)

    def last(self) -> float:
        """The last record's time (of a batch with records), without the others'."""
        fast = len(self.meta) // 16 - len(self.slow)  # the fast-path records
        if self.extra and self.at[-1] >= fast:  # a general record comes last
            return self.extra[-1]
        return self._stamp(fast - 1)

    def _stamp(self, record: int) -> float:
        """The time of the fast-path record ``record`` (its index among them)."""
        frame = record + bisect_right(self.slow, record)  # the frame it came in
        sec, usec = _META.unpack_from(self.meta, frame * 16)[:2]
        stamp: float = sec + usec * 1e-6  # as __call__ computes it
        return stamp
