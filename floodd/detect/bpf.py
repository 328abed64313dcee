"""Kernel capture filters: banned sources left out, 1 in n packets kept, and the socket
calls that read and replace a capture socket's classic BPF program.

A ban drops a source's queries in netfilter, after libpcap has copied them; the
capture filter can leave out exactly what a ban drops anyway (:func:`exclusion`), so
a banned flood costs floodd nothing (its size is read from the ban's counter).

Sampling keeps a packet when the kernel's per-packet random number has its low bits
zero (:func:`sampled`): a prefix before the capture's own program, which the kernel
runs in the same pass.  libpcap compiles a program for a live socket differently from
:func:`pcapy.compile` (on Linux it reads VLAN tags from the packet's metadata, and a
cooked capture's header from ancillary loads), so the program a prefix goes in front
of is the one libpcap attached to a socket of the same interface, read back with
:func:`attached`.
"""

from __future__ import annotations

import ctypes
import errno
import os
from typing import Iterable, Sequence

from floodd.errors import Failure
from floodd.scope import Target

BPF_MAXINSNS = 4096  # the kernel refuses a classic program longer than this

# struct sock_filter (linux/filter.h): code (u16), jt (u8), jf (u8), k (u32).
Instruction = tuple[int, int, int, int]

_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS: A = the 32-bit word at k
_ALU_AND_K = 0x54  # BPF_ALU | BPF_AND | BPF_K: A &= k
_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K: A == k ? skip jt : skip jf
_RET_K = 0x06  # BPF_RET | BPF_K: keep k bytes of the packet (0: drop it)
# Ancillary loads are at negative offsets: SKF_AD_OFF (-0x1000) + SKF_AD_RANDOM (56),
# a fresh pseudo-random u32 for each packet.
_SKF_AD_RANDOM = (-0x1000 + 56) & 0xFFFFFFFF
SAMPLE_PREFIX = 4  # instructions :func:`sampled` puts in front of a program
DROP_ALL: list[Instruction] = [(_RET_K, 0, 0, 0)]  # a program that keeps nothing

_SOL_SOCKET = 1
_SO_ATTACH_FILTER = 26  # also SO_GET_FILTER


def exclusion(target: Target) -> str | None:
    """A libpcap filter expression for the packets a ban of ``target`` drops among those
    a capture passes, or None for a ban of one query type (it drops a part of a source's
    UDP the filter does not look at).

    A whole-source ban drops the source's queries over every protocol the capture
    watches (the firewall drops the capture's protocols to its ports, or everything with
    firewall scope ``all``), and its IPv4/IPv6 fragments, which reach the firewall
    reassembled; a UDP-only ban its UDP (fragments too); a ban sparing hop values its
    unfragmented UDP at the other values (the firewall reads a reassembled datagram's
    hop value from one of its fragments, so fragments stay counted)."""
    network, scope = target
    if scope.qtype is not None:
        return None
    v4 = network.version == 4
    ip = "ip" if v4 else "ip6"
    single = network.prefixlen == network.max_prefixlen
    clause = f"{ip} src host {network.network_address}" if single else f"{ip} src net {network}"
    if scope.except_hops:
        # ip[9]: IPv4 protocol; ip[6:2] & 0x3fff: fragment offset and more-fragments
        # flag; ip[8]: TTL.  ip6[6]: next header (UDP only right after the fixed
        # header, so no fragment); ip6[7]: hop limit.
        hop = "ip[8]" if v4 else "ip6[7]"
        udp = "ip[9] == 17 and ip[6:2] & 0x3fff == 0" if v4 else "ip6[6] == 17"
        spared = " and ".join(f"{hop} != {h}" for h in scope.except_hops)
        clause += f" and {udp} and {spared}"
    elif scope.udp_only:
        clause += " and ip[9] == 17" if v4 else " and ip6 proto 17"
    return clause


def excluding(targets: Iterable[Target]) -> str:
    """An expression passing everything but what :func:`exclusion` gives for the
    targets (qtype bans skipped); empty without any."""
    clauses = [c for c in map(exclusion, targets) if c is not None]
    return "not (" + " or ".join(f"({c})" for c in clauses) + ")" if clauses else ""


def sampled(program: Sequence[Instruction], n: int) -> list[Instruction]:
    """``program`` run on 1 in ``n`` packets (a power of two), the others dropped."""
    if n == 1:
        return list(program)
    # A = random; A &= n - 1; A == 0 ? go on (A is 0 again, as a program starts) : drop.
    return [(_LD_W_ABS, 0, 0, _SKF_AD_RANDOM), (_ALU_AND_K, 0, 0, n - 1),
            (_JEQ_K, 1, 0, 0), (_RET_K, 0, 0, 0), *program]


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


_libc = ctypes.CDLL(None, use_errno=True)


class FilterTooLarge(Failure):
    """The kernel has no room for the program on this socket."""


def _fail(what: str) -> Failure:
    code = ctypes.get_errno()
    return Failure(f"cannot {what} the capture filter: {os.strerror(code)}")


def attach(fd: int, program: Sequence[Instruction]) -> None:
    """Replace the filter of the packet socket ``fd`` by ``program`` (the kernel swaps it
    at once: each packet runs the old program or the new one).

    FilterTooLarge when it is longer than the kernel takes, or when the socket's option
    memory (``net.core.optmem_max``) has no room for it: the kernel charges the new
    program before it frees the old one."""
    if not 0 < len(program) <= BPF_MAXINSNS:
        raise FilterTooLarge(f"cannot set the capture filter: {len(program)} instructions "
                             f"(the kernel takes 1 to {BPF_MAXINSNS})")
    insns = (_SockFilter * len(program))(*(_SockFilter(*i) for i in program))
    fprog = _SockFprog(len(program), insns)
    if _libc.setsockopt(fd, _SOL_SOCKET, _SO_ATTACH_FILTER, ctypes.byref(fprog),
                        ctypes.sizeof(fprog)) != 0:
        if ctypes.get_errno() == errno.ENOMEM:
            raise FilterTooLarge("cannot set the capture filter: no room in the socket's "
                                 "option memory (net.core.optmem_max)")
        raise _fail("set")


def attached(fd: int) -> list[Instruction]:
    """The classic BPF program on the socket ``fd`` (empty: none)."""
    # SO_GET_FILTER takes and returns its length in instructions, not bytes.
    count = ctypes.c_uint(BPF_MAXINSNS)
    insns = (_SockFilter * BPF_MAXINSNS)()
    if _libc.getsockopt(fd, _SOL_SOCKET, _SO_ATTACH_FILTER, insns, ctypes.byref(count)) != 0:
        raise _fail("read")
    return [(i.code, i.jt, i.jf, i.k) for i in insns[:count.value]]


def power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


