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
"""

from __future__ import annotations

import fcntl
import os
import select
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any, Iterable, Protocol

import pcapy

from floodd.config import CaptureConfig
from floodd.errors import FlooddError
from floodd.detect.parse import (
    LINKTYPE_ETHERNET,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_LINUX_SLL2,
    Batch,
    Parser,
)

READ_TIMEOUT_MS = 50  # libpcap's buffering timeout; waits are done with select()


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
    host sends there (see the module docstring)."""

    def __init__(self, interface: str, config: CaptureConfig) -> None:
        self.interface = interface
        self._batch_size = config.batch_size
        pcap = self._open(interface, config)
        try:
            self.linktype: int = pcap.datalink()
            try:
                self._parser = Parser(self.linktype, config.ports, config.protocols)
            except FlooddError as exc:
                raise FlooddError(f"cannot capture on interface {interface}: {exc}") from None
            sent = sent_by_host(self.linktype, interface)
            expr = build_filter(config.ports, config.protocols, config.bpf_filter,
                                vlan=self.linktype == LINKTYPE_ETHERNET, sent=sent)
            try:
                pcap.setfilter(expr)
            except pcapy.PcapError as exc:
                raise FlooddError(f"bad capture filter {expr!r}: {_error_text(exc)}") from None
            try:
                if sent is None:  # the filter cannot tell this host's frames apart
                    pcap.setdirection(pcapy.PCAP_D_IN)
                pcap.setnonblock(1)
                self._fd: int = pcap.getfd()
            except pcapy.PcapError as exc:
                raise FlooddError(f"cannot capture on interface {interface}: "
                                  f"{_error_text(exc)}") from None
        except BaseException:
            pcap.close()
            raise
        self._pcap = pcap

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
        # libpcap may hold packets already read from the kernel: try before waiting.
        data, meta = self._pcap.next_batch(self._batch_size)
        if not meta:
            ready, _, _ = select.select([self._fd], [], [], max(timeout, 0.0))
            if not ready:
                return Batch([], 0, 0)
            data, meta = self._pcap.next_batch(self._batch_size)
        return self._parser.parse_batch(data, meta, time.monotonic())

    def stats(self) -> CaptureStats:
        received, dropped, if_dropped = self._pcap.stats()
        return CaptureStats(received, dropped, if_dropped)

    def close(self) -> None:
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
