"""What a ban drops: a source's traffic, narrowed to what its evidence proves.

UDP source addresses can be forged, so a ban never drops more than its evidence covers:

* ``udp_only``: only UDP (a TCP query needs a completed handshake, so UDP evidence says
  nothing about the source's TCP);
* ``qtype``: only UDP queries of that type (a rule about ANY drops ANY, not the source);
* ``except_hops``: packets that arrive with one of these IPv4 TTL / IPv6 hop-limit values
  pass: they are the source's usual ones, learned before the flood, and the flood came
  with others (a forger elsewhere on the network cannot match the real path length).

A ban is identified by its :class:`Target`, a network and a scope: one network may have
several bans of different scopes at once (an ANY-only ban and a ban of forged traffic
at other hop values), none covering another.

Text form (kernel comments, state): ``all`` | ``udp`` | ``udp,qtype=255`` |
``udp,except=63+64`` | ``udp,qtype=255,except=64``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, NamedTuple

from floodd.config import Network
from floodd.qtypes import qtype_name

MAX_EXCEPT_HOPS = 8  # usual hop values one ban lets through, at most
_TEXT_RE = re.compile(r"^(all|udp)(?:,qtype=(\d{1,5}))?(?:,except=(\d{1,3}(?:\+\d{1,3})*))?$")


@dataclass(frozen=True, order=True)
class Scope:
    """What of a source's traffic a ban drops (the default: all of it)."""

    udp_only: bool = False
    qtype: int | None = None  # only queries of this type (so UDP only)
    except_hops: tuple[int, ...] = ()  # sorted; packets with these hop values pass (UDP only)

    def __post_init__(self) -> None:
        if self.qtype is not None and not 0 <= self.qtype <= 0xFFFF:
            raise ValueError(f"qtype {self.qtype} is not 0..65535")
        hops = self.except_hops
        if any(not 0 <= h <= 255 for h in hops) or list(hops) != sorted(set(hops)) \
                or len(hops) > MAX_EXCEPT_HOPS:
            raise ValueError(f"hop values {hops} are not sorted distinct values 0..255 "
                             f"(at most {MAX_EXCEPT_HOPS})")
        if (self.qtype is not None or hops) and not self.udp_only:
            raise ValueError("a ban of one query type or of some hop values is UDP only")

    @property
    def whole_source(self) -> bool:
        """Whether the ban drops all of the source's queries over the protocols it names
        (no query type or hop value is spared): the offences that escalate."""
        return self.qtype is None and not self.except_hops

    def covers(self, other: Scope) -> bool:
        """Whether this scope drops everything ``other`` drops."""
        return ((not self.udp_only or other.udp_only)
                and (self.qtype is None or self.qtype == other.qtype)
                and set(self.except_hops) <= set(other.except_hops))

    def hops_dropped(self) -> list[tuple[int, int]]:
        """The hop values dropped, as inclusive ranges: [(0, 255)] without exceptions."""
        ranges = []
        start = 0
        for hop in self.except_hops:
            if hop > start:
                ranges.append((start, hop - 1))
            start = hop + 1
        if start <= 255:
            ranges.append((start, 255))
        return ranges

    def text(self) -> str:
        """The compact form written to the kernel (see the module docstring)."""
        parts = ["udp" if self.udp_only else "all"]
        if self.qtype is not None:
            parts.append(f"qtype={self.qtype}")
        if self.except_hops:
            parts.append("except=" + "+".join(map(str, self.except_hops)))
        return ",".join(parts)

    @classmethod
    def parse(cls, text: str) -> Scope:
        """The scope :meth:`text` wrote; ValueError for anything else."""
        m = _TEXT_RE.match(text)
        if m is None:
            raise ValueError(f"not a ban scope: {text!r}")
        hops = tuple(int(h) for h in m.group(3).split("+")) if m.group(3) else ()
        qtype = int(m.group(2)) if m.group(2) else None
        return cls(m.group(1) == "udp", qtype, hops)

    def describe(self) -> str:
        """For people: ``whole source``, ``UDP only``, ``UDP, ANY queries``,
        ``UDP, TTL/hop limit not 64``..."""
        if self == WHOLE:
            return "whole source"
        parts = ["UDP only" if self.whole_source else "UDP"]
        if self.qtype is not None:
            parts.append(f"{qtype_name(self.qtype)} queries")
        if self.except_hops:
            parts.append("TTL/hop limit not " + "/".join(map(str, self.except_hops)))
        return ", ".join(parts)

    def as_json(self) -> dict[str, Any]:
        return {"protocols": "udp" if self.udp_only else "all",
                "qtype": None if self.qtype is None else qtype_name(self.qtype),
                "except_hops": list(self.except_hops), "text": self.describe()}


WHOLE = Scope()
UDP_ONLY = Scope(udp_only=True)


class Target(NamedTuple):
    """What one ban is: a network (a /32 or /128 for an address) and what it drops."""

    network: Network
    scope: Scope

    def __str__(self) -> str:
        if self.scope == WHOLE:
            return str(self.network)
        return f"{self.network} ({self.scope.describe()})"
