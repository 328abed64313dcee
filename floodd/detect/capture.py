"""Capture stage: packets from a live interface or a capture file, parsed into batches.

Both sources hand out :class:`floodd.detect.parse.Batch` objects.  A live capture is
nonblocking and waits on its file descriptor with the caller's timeout: libpcap's
own read timeout can block forever on an idle Linux interface.  Its kernel filter
(:func:`build_filter`) passes the queries arriving at the host and, of the frames
it sends, only the TCP SYN-ACKs from the DNS ports, which the parser needs to see
TCP clients complete their handshakes (``F_VERIFIED``); on a link where the filter
cannot tell the host's frames apart (:func:`sent_by_host`: not Ethernet or Linux
cooked, or no MAC address), it takes the incoming direction only, without
SYN-ACKs, so no record there is verified.  A live capture stamps its
records with ``time.monotonic()`` at the read (the kernel's frame timestamps follow
the wall clock, which can step); a file's records carry the capture's own
timestamps.

A live capture can leave banned sources out (:meth:`LiveCapture.exclude`) and keep 1
in n packets (:meth:`LiveCapture.sample`), both in the kernel's program for its
socket (:mod:`floodd.detect.bpf`).  The new program replaces the old one at once, and
it is never run over what the old one already passed: packets already in the ring
are read as they are.  libpcap's own ``setfilter`` on a live socket would refilter,
in userland, every ring block filled before the change; the capture calls it only
once, when it opens, and has libpcap compile later filters on a second socket of the
same interface, which keeps nothing.  A batch's packets were
all kept at one rate, :attr:`LiveCapture.weight`: after a change of the rate, the
packets still in the ring, stamped by the kernel before the change, are handed out
apart.
"""

from __future__ import annotations

import fcntl
import os
import select
import socket
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Iterable, Protocol, Sequence

import pcapy

from floodd.config import CaptureConfig
from floodd.errors import Failure, FlooddError
from floodd.scope import Target
from floodd.detect.bpf import (
    BPF_MAXINSNS,
    DROP_ALL,
    SAMPLE_PREFIX,
    FilterTooLarge,
    Instruction,
    attach,
    attached,
    excluding,
    power_of_two,
    sampled,
)
from floodd.detect.parse import (
    LINKTYPE_ETHERNET,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_LINUX_SLL2,
    Batch,
    Parser,
)

# libpcap's buffering timeout (the kernel hands over a ring block holding packets when it
# is this old): bounds how long a query waits to be counted.  Waits are done with select().
READ_TIMEOUT_MS = 10
# The kernel hands a ring block over when it is full or this old: a packet the old
# program kept is in the ring by then.
_RETIRED = 2 * READ_TIMEOUT_MS / 1000
_META = struct.Struct("IIII")  # next_batch()'s per-frame record: sec, usec, offset, caplen
# pcapy.compile's length times the growth seen so far estimates libpcap's for a socket;
# a filter is compiled for the socket only when this much under the kernel's limit.
_ESTIMATE_MARGIN = 1.1


@dataclass(frozen=True)
class CaptureStats:
    received: int  # packets the capture received (offline: frames read)
    dropped: int  # dropped by the kernel: the capture did not keep up
    if_dropped: int  # dropped by the interface or its driver


class PacketSource(Protocol):
    linktype: int

    def read(self, timeout: float) -> Batch | None:
        """The next batch, waiting at most ``timeout`` seconds for one; an empty batch
        on timeout (live), None at the end of a file (offline)."""

    def stats(self) -> CaptureStats:
        ...

    def close(self) -> None:
        ...


def build_filter(ports: Iterable[int], protocols: Iterable[str], extra: str = "", *,
                 vlan: bool = True, sent: str | None = None) -> str:
    """A BPF filter passing queries to the DNS ports over the protocols, and the
    IPv4/IPv6 fragments that may belong to them, with ``extra`` and-ed to those.

    ``sent`` is a test for the frames this host sent (:func:`sent_by_host`): given
    it, those never pass as queries (this host's own queries to a DNS port), and
    with TCP the SYN-ACKs they carry from the DNS ports pass too; without it the
    capture must take the incoming direction only.  ``vlan`` repeats the test for
    frames with one or two 802.1Q/802.1ad tags (Ethernet only)."""
    port_list = sorted(set(ports))
    protos = [p for p in ("udp", "tcp") if p in {q.lower() for q in protocols}]
    if not port_list or not protos:
        raise FlooddError("capture needs at least one port and one protocol")
    numbers = {"udp": 17, "tcp": 6}
    dst = " or ".join(f"dst port {p}" for p in port_list)
    l4 = " or ".join(protos)
    ip_proto = " or ".join(f"ip[9] == {numbers[p]}" for p in protos)
    ip6_proto = " or ".join(f"ip6[40] == {numbers[p]}" for p in protos)
    # Non-first IPv4 fragments carry no ports; an IPv6 fragment header is checked
    # only right after the fixed header.
    core = (f"(({l4}) and ({dst})) or (({ip_proto}) and ip[6:2] & 0x1fff != 0)"
            f" or (ip6[6] == 44 and ({ip6_proto}))")
    if extra.strip():
        core = f"({core}) and ({extra})"
    if sent is not None:
        core = f"not ({sent}) and ({core})"
        if "tcp" in protos:
            src = " or ".join(f"src port {p}" for p in port_list)
            # SYN and ACK set: tcp[] reads IPv4 only; over IPv6 the flags are byte 13
            # of a TCP header right after the fixed one (ip6[6] == 6), ip6[53].
            syn_ack = ("tcp[tcpflags] & (tcp-syn|tcp-ack) == (tcp-syn|tcp-ack)"
                       " or (ip6[6] == 6 and ip6[53] & 0x12 == 0x12)")
            core = f"({core}) or (({sent}) and tcp and ({src}) and ({syn_ack}))"
    # Each "vlan" moves the offsets of everything after it in the expression by one
    # tag: untagged, then one tag, then two (QinQ).
    return f"{core} or (vlan and ({core} or (vlan and ({core}))))" if vlan else core


SIOCGIFHWADDR = 0x8927  # Linux ioctl: an interface's hardware address (struct ifreq)


def sent_by_host(linktype: int, interface: str) -> str | None:
    """A BPF test for the frames this host sent on ``interface``, or None.

    A Linux cooked capture has the direction in its header.  On Ethernet the
    interface's own MAC address as the source (read once, here) stands for it:
    libpcap's ``outbound`` and ``inbound`` read the kernel's direction, which
    only the kernel can, and libpcap runs a new filter in userland too over the
    first ring block after setting it, where such a filter rejects every packet
    (up to the read timeout's worth of queries would be lost).  None for other
    link types, and for an interface without an address of its own (loopback's
    is all zeros, and every frame there carries it).
    """
    if linktype in (LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2):
        return "outbound"
    if linktype != LINKTYPE_ETHERNET:
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            ifreq = fcntl.ioctl(sock, SIOCGIFHWADDR, struct.pack("40s", interface.encode()))
        except OSError:
            return None
    mac = ifreq[18:24]  # struct ifreq (40 bytes): 16-byte name, sockaddr (family, data)
    return f"ether src {mac.hex(':')}" if any(mac) else None


def _error_text(exc: BaseException) -> str:
    return str(exc).strip().rstrip(".") or type(exc).__name__


_ACTIVATE_ERRORS = {
    -4: "not activated", -5: "no such device", -6: "monitor mode not supported",
    -7: "the interface is not up", -8: "permission denied (capturing needs root or "
    "CAP_NET_RAW)", -9: "the interface is not up", -11: "promiscuous mode not permitted",
}


class LiveCapture:
    """Packets arriving on one interface (``any``: all of them), and the SYN-ACKs this
    host sends there (see the module docstring).

    :meth:`exclude` and :meth:`sample` may be called from another thread than
    :meth:`read`."""

    def __init__(self, interface: str, config: CaptureConfig, exclude_max: int = 64) -> None:
        if isinstance(exclude_max, bool) or not isinstance(exclude_max, int) \
                or exclude_max < 0:
            raise FlooddError(f"capture exclusions {exclude_max!r}: expected a count, 0 or more")
        self.interface = interface
        self._config = config
        self._batch_size = config.batch_size
        self._exclude_max = exclude_max
        pcap = self._open(interface, config)
        try:
            self.linktype: int = pcap.datalink()
            try:
                self._parser = Parser(self.linktype, config.ports, config.protocols)
            except FlooddError as exc:
                raise FlooddError(f"cannot capture on interface {interface}: {exc}") from None
            self._sent = sent_by_host(self.linktype, interface)
            expr = self._filter(())
            try:
                pcap.setfilter(expr)
            except pcapy.PcapError as exc:
                raise FlooddError(f"bad capture filter {expr!r}: {_error_text(exc)}") from None
            try:
                if self._sent is None:  # the filter cannot tell this host's frames apart
                    pcap.setdirection(pcapy.PCAP_D_IN)
                pcap.setnonblock(1)
                self._fd: int = pcap.getfd()
            except pcapy.PcapError as exc:
                raise FlooddError(f"cannot capture on interface {interface}: "
                                  f"{_error_text(exc)}") from None
            # The plain filter as libpcap compiled it for this socket.
            self._plain: list[Instruction] = attached(self._fd)
        except BaseException:
            pcap.close()
            raise
        self._pcap = pcap
        # The kernel program is sampled(_program, _sampling); both change under _lock.
        self._lock = threading.Lock()
        self._program = self._plain
        self._sampling = 1
        # Changes of the rate whose old packets may still be in the ring: (wall clock
        # time right after the change, monotonic time, the rate before).
        self._shifts: deque[tuple[float, float, int]] = deque()
        self._held: tuple[bytes, bytes] | None = None  # the rest of a batch cut at a shift
        self._weight = 1
        self._requested: tuple[Target, ...] = ()
        self._applied = 0
        self._compiler: Any = None  # the socket later filters are compiled on
        # Length of libpcap's program for this socket over pcapy.compile's (no link
        # type's special handling), for estimates; the largest seen.
        compiled = len(pcapy.compile(self.linktype, config.snaplen, expr, 1, 0).get_bpf())
        self._growth = len(self._plain) / compiled

    def _filter(self, excluded: Sequence[Target]) -> str:
        extra = " and ".join(f"({e})" for e in (self._config.bpf_filter, excluding(excluded))
                             if e.strip())
        return build_filter(self._config.ports, self._config.protocols, extra,
                            vlan=self.linktype == LINKTYPE_ETHERNET, sent=self._sent)

    @staticmethod
    def _open(interface: str, config: CaptureConfig) -> Any:
        try:
            pcap: Any = pcapy.create(interface)
            pcap.set_snaplen(config.snaplen)
            pcap.set_timeout(READ_TIMEOUT_MS)
            pcap.set_buffer_size(config.buffer_size_mb << 20)
            status = pcap.activate()
        except pcapy.PcapError as exc:
            raise FlooddError(f"cannot capture on interface {interface}: "
                              f"{_error_text(exc)}") from None
        # libpcap reports some failures (PCAP_ERROR_NO_SUCH_DEVICE = -5,
        # PCAP_ERROR_PERM_DENIED = -8, ...) as a negative status, not an exception.
        if isinstance(status, int) and status < 0:
            reason = _ACTIVATE_ERRORS.get(status, f"libpcap error {status}")
            pcap.close()
            raise FlooddError(f"cannot capture on interface {interface}: {reason}")
        return pcap

    def read(self, timeout: float) -> Batch:
        """The next batch (see :attr:`weight`)."""
        if self._held is not None:
            data, meta = self._held
            self._held = None
        else:
            # libpcap may hold packets already read from the kernel: try before waiting.
            data, meta = self._pcap.next_batch(self._batch_size)
            if not meta:
                if self._shifts:
                    self._forget_shifts(time.monotonic())
                ready, _, _ = select.select([self._fd], [], [], max(timeout, 0.0))
                if not ready:
                    self._weight = self._sampling
                    return Batch([], 0, 0)
                data, meta = self._pcap.next_batch(self._batch_size)
        meta = self._cut(data, meta)
        return self._parser.parse_batch(data, meta, time.monotonic())

    def _cut(self, data: bytes, meta: bytes) -> bytes:
        """The part of a batch kept at one rate (:attr:`weight`); the rest is held."""
        with self._lock:
            while self._shifts:
                wall, _, before = self._shifts[0]
                for i, (sec, usec, _, _) in enumerate(_META.iter_unpack(meta)):
                    if sec + usec * 1e-6 >= wall:
                        break
                else:  # all of it kept at the old rate
                    self._weight = before
                    return meta
                if i:
                    self._weight = before
                    self._held = (data, meta[i * _META.size:])
                    return meta[:i * _META.size]
                self._shifts.popleft()  # a packet stamped after the change: the old are out
            self._weight = self._sampling
            return meta

    def _forget_shifts(self, now: float) -> None:
        """The ring is empty: rate changes older than a block's lifetime are over."""
        with self._lock:
            while self._shifts and now - self._shifts[0][1] > _RETIRED:
                self._shifts.popleft()

    @property
    def weight(self) -> int:
        """The rate the last batch :meth:`read` returned was kept at: each of its
        packets stands for this many (its records count this many times)."""
        return self._weight

    @property
    def sampling(self) -> int:
        """The capture keeps 1 in this many packets (1: all)."""
        return self._sampling

    def sample(self, n: int) -> None:
        """Keep 1 in ``n`` packets from now on, chosen at random by the kernel: a power of
        two up to ``capture.max_sampling``; 1 keeps them all."""
        top = self._config.max_sampling
        if isinstance(n, bool) or not isinstance(n, int) or not power_of_two(n) or n > top:
            raise FlooddError(f"capture sampling {n!r}: expected a power of two from 1 "
                              f"to {top}")
        with self._lock:
            if n == self._sampling:
                return
            if not self._install(self._program, n):
                self._requested, self._applied = (), 0  # exclusions lost: tried again
            self._shifts.append((time.time(), time.monotonic(), self._sampling))
            self._sampling = n

    def _install(self, program: list[Instruction], n: int) -> bool:
        """Put ``sampled(program, n)`` on the capture socket (under ``_lock``); when the
        kernel has no room for both the old and the new program, through the plain one
        (which passes more, never less).  False when the new one alone has no room
        either: the plain one, at rate n, stays on."""
        try:
            attach(self._fd, sampled(program, n))
        except FilterTooLarge:
            try:
                attach(self._fd, sampled(self._plain, n))
            except FilterTooLarge as exc:
                raise Failure(str(exc)) from None  # nothing changed
            self._program = self._plain
            try:
                attach(self._fd, sampled(program, n))
            except FilterTooLarge:
                return False
        self._program = program
        return True

    def exclude(self, targets: Sequence[Target]) -> int:
        """Leave out of the capture what the bans of ``targets`` drop anyway (see
        :func:`floodd.detect.bpf.exclusion`; bans of one query type are skipped): at
        most ``exclude_max`` of them, the first first (list the heaviest first), fewer
        when their program would be too long for the kernel.  How many were applied;
        the same list again changes nothing, an empty one restores the plain filter."""
        wanted: list[Target] = []
        for target in targets:
            if not isinstance(target, Target):
                raise FlooddError(f"cannot exclude {target!r} from the capture: not a ban")
            if target.scope.qtype is None and target not in wanted \
                    and len(wanted) < self._exclude_max:
                wanted.append(target)
        if tuple(wanted) == self._requested or (set(wanted) == set(self._requested)
                                                 and self._applied == len(wanted)):
            return self._applied
        applied = self._fit(wanted)
        self._requested = tuple(wanted)
        self._applied = applied
        return applied

    def _fit(self, wanted: list[Target]) -> int:
        """Install the program leaving out the most of ``wanted`` (from the first) that
        fits the kernel with room for sampling; how many that is."""
        limit = BPF_MAXINSNS - SAMPLE_PREFIX
        cfg = self._config

        def estimate(count: int) -> float:
            expr = self._filter(wanted[:count])
            return len(pcapy.compile(self.linktype, cfg.snaplen, expr, 1, 0).get_bpf()) \
                * self._growth

        def fits(count: int) -> bool:
            return estimate(count) * _ESTIMATE_MARGIN <= limit

        count = len(wanted)
        if count and not fits(count):
            low, high = 0, count  # low fits, high does not
            while high - low > 1:
                middle = (low + high) // 2
                low, high = (middle, high) if fits(middle) else (low, middle)
            count = low
        while count:
            program = self._compile(self._filter(wanted[:count]))
            if 0 < len(program) <= limit:
                with self._lock:
                    if self._install(program, self._sampling):
                        return count
            count = count * 3 // 4  # longer than estimated, or no room in the kernel
        with self._lock:
            self._install(self._plain, self._sampling)
        return 0

    def _compile(self, expr: str) -> list[Instruction]:
        """libpcap's program for ``expr`` on this interface (empty: too long for the
        kernel), compiled on a second socket that keeps nothing between compilations."""
        if self._compiler is None:
            self._compiler = self._open(self.interface, replace(self._config,
                                                                buffer_size_mb=1))
            attach(self._compiler.getfd(), DROP_ALL)
        generic = len(pcapy.compile(self.linktype, self._config.snaplen, expr, 1, 0).get_bpf())
        try:
            self._compiler.setfilter(expr)
        except pcapy.PcapError as exc:
            raise FlooddError(f"bad capture filter {expr!r}: {_error_text(exc)}") from None
        fd = self._compiler.getfd()
        program = attached(fd)
        attach(fd, DROP_ALL)
        if program:
            self._growth = max(self._growth, len(program) / generic)
        return program

    def stats(self) -> CaptureStats:
        received, dropped, if_dropped = self._pcap.stats()
        return CaptureStats(received, dropped, if_dropped)

    def close(self) -> None:
        if self._compiler is not None:
            self._compiler.close()
        self._pcap.close()


class OfflineCapture:
    """Frames of a pcap or pcapng file, read in batches; the parser decides what counts."""

    def __init__(self, path: str, ports: Iterable[int] = (53,),
                 protocols: Iterable[str] = ("udp", "tcp"), batch_size: int = 4096) -> None:
        self.path = path
        self._batch_size = batch_size
        if os.path.isdir(path):
            raise FlooddError(f"cannot read capture {path}: is a directory")
        try:
            self._size = os.path.getsize(path)
        except OSError as exc:
            raise FlooddError(f"cannot read capture {path}: {exc.strerror or exc}") from None
        try:
            pcap: Any = pcapy.open_offline(path)
        except pcapy.PcapError as exc:
            text = _error_text(exc)
            if "unknown file format" in text or "truncated dump file" in text:
                text = "not a pcap or pcapng file"
            elif text.startswith(f"{path}: "):
                text = text[len(path) + 2:]
            raise FlooddError(f"cannot read capture {path}: {text}") from None
        self._pcap = pcap
        self.linktype: int = pcap.datalink()
        try:
            self._parser = Parser(self.linktype, ports, protocols)
        except FlooddError as exc:
            pcap.close()
            raise FlooddError(f"cannot read capture {path}: {exc}") from None
        self._frames = 0
        self._bytes = 24
        self._done = False

    @property
    def progress(self) -> float:
        """Fraction of the file read so far (estimated from the frame sizes), 0 to 1."""
        if self._done or not self._size:
            return 1.0
        return min(self._bytes / self._size, 1.0)

    def read(self, timeout: float = 0.0) -> Batch | None:
        """The next batch; the parser's pending state at the end; then None."""
        if self._done:
            return None
        try:
            data, meta = self._pcap.next_batch(self._batch_size)
        except pcapy.PcapError as exc:
            raise FlooddError(f"cannot read capture {self.path}: {_error_text(exc)}") from None
        if not meta:
            self._done = True
            return self._parser.flush()
        self._frames += len(meta) // 16
        self._bytes += len(data) + len(meta)
        return self._parser.parse_batch(data, meta)

    def stats(self) -> CaptureStats:
        return CaptureStats(self._frames, 0, 0)

    def close(self) -> None:
        self._pcap.close()
