"""nftables backend: bans are elements of sets in floodd's own table ``inet floodd``.

The ruleset floodd owns (nothing else is ever touched), shown for IPv4; IPv6 has the same
sets and chain with ``6`` for ``4``, ``ip6 saddr`` and ``ip6 hoplimit``::

    table inet floodd {
        # whole sources (the protocols of the firewall scope)
        set ban4 { type ipv4_addr; flags timeout; counter; }                 # addresses
        set ban4net { type ipv4_addr; flags interval, timeout; counter; }    # prefixes
        # UDP only
        set udp4 { type ipv4_addr; flags timeout; counter; }
        set udp4net { type ipv4_addr; flags interval, timeout; counter; }
        # UDP at the hop values (TTL) not spared, one element per dropped range:
        # { 203.0.113.10 . 0-63, 203.0.113.10 . 65-255 } spares TTL 64
        set hop4 { typeof ip saddr . ip ttl; flags interval, timeout; counter; }
        # UDP queries of one type: { 203.0.113.10 . 0-255 . 0x0000ff0001 } (root, ANY, IN)
        set qtype4 { typeof ip saddr . ip ttl . @th,160,40; flags interval, timeout; counter; }
        # networks with a qtype ban: a packet from one goes through chain qtype4
        set qgate4 { type ipv4_addr; flags timeout; }
        set qgate4net { type ipv4_addr; flags interval, timeout; }
        chain input {
            type filter hook input priority filter - 10; policy accept;
            meta l4proto { tcp, udp } th dport 53 ip saddr @ban4 drop      # scope dns
            ... the same for ban6, ban4net, ban6net
            udp dport 53 ip saddr @udp4 drop
            ... udp6, udp4net, udp6net
            udp dport 53 ip saddr . ip ttl @hop4 drop
            ... hop6
            udp dport 53 ip saddr @qgate4 jump qtype4
            ... qgate6, qgate4net, qgate6net
        }
        chain qtype4 {   # one rule per question-name wire length L = 1..255
            ip saddr . ip ttl . @th,160,40 @qtype4 drop        # L = 1: the root name
            ip saddr . ip ttl . @th,168,40 @qtype4 drop        # L = 2
            ... @th,8*(19+L),40 up to L = 255
        }
    }

With firewall scope ``all`` the rules match no port: ``ip saddr @ban4 drop``, and the UDP
ones ``meta l4proto udp ip saddr @udp4 drop``.  A ban's set follows from its scope
(:func:`set_of`).  Each element carries its own kernel timeout (the ban's expiry: the
kernel alone ends a ban even if floodd is gone), its own counter of dropped packets, and a
comment holding the rule, times and scope, so the kernel is the only record of a ban:
``floodd since=1700000000 expires=1700000600 scope=udp,except=64 rule=query-flood``.

A qtype match reads the question at a fixed offset: it starts 20 bytes into the UDP header
(8 bytes of UDP, 12 of DNS header), so for a name of wire length L byte 19+L is its root
label (0), the two bytes after it the qtype and the next two the class; these 40 bits
(root, qtype, class IN) are the element's last field.  Every rule of the chain looks the
same elements up, each at its own length's offset, so one element drops that qtype for
names of any length.  The class is part of the match because three bytes alone also
match past the question: an EDNS OPT record with N < 256 bytes of options reads
``00 00 N`` (the end of its TTL, its length), and a DNS cookie makes N 12 (PTR) or 28
(AAAA), so a PTR or AAAA ban would drop cookie-carrying queries of every type (measured
with dig); the two bytes after that length are option data, never ``00 01`` for a cookie
option (its code is 10).  Queries of a class other than IN pass a qtype ban.  The gate keeps the
255 lookups off every other source's queries; a gate element's timeout is the longest
qtype ban of its network (plus a minute).  Gates are never deleted (they drop nothing; an
unneeded one costs only CPU until it times out), except a prefix gate inside a new wider
one, which the interval set would refuse beside it, and a gate given a later end, which
is deleted and added again: ``add element`` of an element already there leaves its comment
and counter as they are, and renews its timeout only on recent kernels (6.18 does).

Sets and their costs (nft 1.0.6): addresses and prefixes live in separate sets because
interval sets delete elements in quadratic time (removing 9,000 of 10,000 took 13.5 s,
against 0.03 s from a plain set; 9,000 from a concatenated set such as hop4, 1.85 s), so
the common bans, whole sources and UDP only of single addresses, are hash sets; hop and
qtype bans, of an address or a prefix, are concatenated interval sets (unbanning 1,000
hop bans, 2,000 elements, took 0.34 s).  The address rules come first, so an address
banned inside a banned prefix keeps counting its own packets and keeps its own expiry; a
packet several bans match counts in the first in rule order.

An interval set refuses overlapping elements, so :func:`plan_commit` resolves overlaps
before anything reaches nft, among the bans of one set (and, in qtype4, of one qtype;
the hop ranges of two hop bans always overlap: each spares at most 8 of 256 values):

* a new ban covered by a ban in place (a wider or equal network, a scope dropping at
  least as much) is skipped (missing from the commit's ``added``);
* a new ban replaces the bans it overlaps otherwise, taking over their counters: those of
  networks inside its own, and one of the same network whose scope does not cover it (a
  hop ban with other spared values: the newer wins);
* a new ban inside a wider network's ban whose scope does not cover it is skipped too:
  the wider network's ban wins.

A hop or qtype ban is several elements with the same comment (one per dropped hop range);
listing merges them into one ban, counters summed, and reads its scope from the set and
the keys: the spared hop values are those no element covers.  Deleting a ban deletes all
its elements.

Every change is one ``nft -f -`` transaction fed on stdin (the text syntax: nft 1.0.6's JSON
input ignores element counters, which a replaced ban must carry over), planned against a
:class:`Mirror` of the table: the last listing, changed by each commit since, with when the
kernel's timeouts end each element.  The first commit lists the table, as does one that
would delete or rely on an element whose timeout may just have fired, or carry counters
read more than :data:`COUNTERS_FRESH` seconds ago; a transaction nft refuses (the table was
changed by someone else) is planned again against a listing and tried once more.
Replacing an element (a new expiry or rule) is a delete and an add in the same transaction.
Reading is one ``nft -j list table inet floodd``.  Every ``nft`` runs with floodd's command
timeout.

Large changes cost the kernel, not nft: removing an element from a concatenated interval
set (hop, qtype) takes time in proportion to the set's size, so replacing 3,000 hop bans
(6,000 elements deleted and added again) took 4.2 s of system time with nft 1.0.6 on Linux
6.18, one statement or 6,000 alike; adding them took 0.08 s, whole-source bans 0.3 s.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from floodd.command import CommandTimeout, run
from floodd.errors import Failure, FlooddError
from floodd.enforce.firewall.comment import UNKNOWN_RULE, ban_comment, parse_ban_comment
from floodd.enforce.firewall.base import Ban, Buffered, Committed, InstalledBan, Network
from floodd.scope import MAX_EXCEPT_HOPS, UDP_ONLY, WHOLE, Scope, Target

FAMILIES = (4, 6)
_IP = {4: "ip", 6: "ip6"}
_HOP = {4: "ip ttl", 6: "ip6 hoplimit"}
_ADDR = {4: "ipv4_addr", 6: "ipv6_addr"}
# The sets a drop rule of the input chain looks up, in rule order.
DROP_SETS = ("ban4", "ban6", "ban4net", "ban6net", "udp4", "udp6", "udp4net", "udp6net",
             "hop4", "hop6")
# Every set holding bans -> what its bans drop (ban: whole sources, udp: UDP only, hop:
# UDP at some hop values, qtype: UDP queries of one type) and its IP version.
BAN_SETS = {f"{kind}{version}{suffix}": (kind, version)
            for kind, suffixes in (("ban", ("", "net")), ("udp", ("", "net")),
                                   ("hop", ("",)), ("qtype", ("",)))
            for suffix in suffixes for version in FAMILIES}
# The gate sets and the chain each one leads to.
GATES = {"qgate4": "qtype4", "qgate6": "qtype6", "qgate4net": "qtype4",
         "qgate6net": "qtype6"}
QTYPE_CHAINS = ("qtype4", "qtype6")
CHAIN = "input"
RULE_COMMENT = "floodd: drop banned sources"
GATE_COMMENT = "floodd: banned query types"
QUESTION_OFFSET = 20  # bytes from the UDP header to a query's question
QTYPE_BITS = 40  # what a qtype element's last field holds: root label (0), qtype, class IN
CLASS_IN = 1
MAX_NAME = 255  # longest question name in wire form (RFC 1035 2.3.4)
GATE_MARGIN = 60.0  # seconds a gate outlives the qtype bans it leads to
ALL_HOPS = (0, 255)
_TABLE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,31}$")


def name_offset(length: int) -> int:
    """The bit offset in the UDP header of the root label of a question name of wire
    length ``length`` (the qtype follows it)."""
    return 8 * (QUESTION_OFFSET - 1 + length)


def _wanted_rules() -> frozenset[str]:
    """What :attr:`TableState.rules` holds when every rule of floodd's is in place."""
    rules = {f"{CHAIN}: drop @{name}" for name in DROP_SETS}
    rules |= {f"{CHAIN}: @{gate} jump {chain}" for gate, chain in GATES.items()}
    rules |= {f"{chain}: drop @{chain} at {name_offset(length)}"
              for chain in QTYPE_CHAINS for length in range(1, MAX_NAME + 1)}
    return frozenset(rules)


WANTED_SETS = frozenset([*DROP_SETS, *GATES, *QTYPE_CHAINS])
WANTED_RULES = _wanted_rules()


@dataclass(frozen=True)
class SetBan:
    """One ban as the kernel holds it: the set it is in and its elements' keys, spelled
    as nft takes them (what deleting it deletes)."""

    ban: InstalledBan
    set: str
    keys: tuple[str, ...]
    # Seconds until the last of its elements times out (``ban.remaining``: the first);
    # None when one has no timeout.
    lasts: float | None = field(default=None, compare=False)


@dataclass(frozen=True)
class TableState:
    """What ``nft -j list table inet floodd`` showed (``exists`` False: no table)."""

    exists: bool
    sets: frozenset[str]
    # What floodd's rules there do: "input: drop @ban4", "input: @qgate4 jump qtype4",
    # "qtype4: drop @qtype4 at 160" (the bit offset of the root label it reads).
    rules: frozenset[str]
    kernel_bans: tuple[SetBan, ...]
    # gate element -> unix time its timeout ends (whole seconds, rounded down)
    gates: Mapping[Network, float] = field(default_factory=dict)

    @property
    def bans(self) -> tuple[InstalledBan, ...]:
        return tuple(kb.ban for kb in self.kernel_bans)

    @property
    def complete(self) -> bool:
        return self.exists and WANTED_SETS <= self.sets and WANTED_RULES <= self.rules


ABSENT = TableState(False, frozenset(), frozenset(), ())


def set_of(target: Target) -> str:
    """The set a ban of ``target`` lives in."""
    network, scope = target
    version = network.version
    if scope.qtype is not None:
        return f"qtype{version}"
    if scope.except_hops:
        return f"hop{version}"
    kind = "udp" if scope.udp_only else "ban"
    return f"{kind}{version}net" if _is_prefix(network) else f"{kind}{version}"


def element(network: Network) -> str:
    """nft's spelling: a plain address for a /32 or /128 (nft reads ``/32`` as a prefix)."""
    if network.prefixlen == network.max_prefixlen:
        return str(network.network_address)
    return str(network)


def port_match(ports: Iterable[int]) -> str:
    """nft's spelling of a port match's right side: ``53`` or ``{ 53, 853 }``."""
    unique = sorted(set(ports))
    return str(unique[0]) if len(unique) == 1 else "{ " + ", ".join(map(str, unique)) + " }"


def delete_table(table: str) -> str:
    """The ``nft -f`` lines deleting table ``inet TABLE``; adding it first makes the delete
    succeed when it does not exist."""
    return f"add table inet {table}\ndelete table inet {table}\n"


def _span(low: int, high: int) -> str:
    return str(low) if low == high else f"{low}-{high}"


def _qtype_field(qtype: int) -> str:
    """The bits at the root label: 0, then the qtype, then class IN."""
    return f"0x{qtype << 16 | CLASS_IN:0{QTYPE_BITS // 4}x}"


def element_keys(target: Target) -> tuple[str, ...]:
    """The keys of the elements a ban of ``target`` is made of (one per dropped hop range
    in hop and qtype sets)."""
    network, scope = target
    if scope.qtype is None and not scope.except_hops:
        return (element(network),)
    tail = "" if scope.qtype is None else f" . {_qtype_field(scope.qtype)}"
    return tuple(f"{element(network)} . {_span(low, high)}{tail}"
                 for low, high in scope.hops_dropped())


def _is_prefix(network: Network) -> bool:
    return network.prefixlen < network.max_prefixlen


def _inside(inner: Network, outer: Network) -> bool:
    """Whether ``inner`` lies within ``outer`` (or is it)."""
    shift = outer.max_prefixlen - outer.prefixlen
    return (inner.version == outer.version and inner.prefixlen >= outer.prefixlen
            and int(inner.network_address) >> shift == int(outer.network_address) >> shift)


# --- reading the kernel ---------------------------------------------------------------
def parse_table(data: Mapping[str, Any], table: str, now: float) -> TableState:
    """Parse the JSON of ``nft -j list table inet TABLE`` (libnftables-json(5)).

    Elements are ``{"elem": {"val": KEY, "timeout": s, "expires": s, "comment": str,
    "counter": {"packets", "bytes"}}}``; KEY is an address, ``{"prefix": {"addr", "len"}}``
    or, in hop and qtype sets, ``{"concat": [ADDR-OR-PREFIX, HOP, QTYPE]}`` with HOP a
    number or ``{"range": [lo, hi]}`` and QTYPE the number of :data:`QTYPE_BITS` bits
    (qtype sets only).
    ``timeout`` and ``expires`` are whole seconds (``expires``, the time left, is the
    ``remaining`` of the ban).  A ban's scope comes from its set and keys; an element
    without floodd's comment (added by hand), or whose comment names another scope, is
    reported with rule ``(unknown)`` and times from its timeout.  Keys floodd cannot
    express as a ban (more than 8 spared hop values, a field that is not a qtype) are
    left out.
    """
    sets: set[str] = set()
    rules: set[str] = set()
    bans: list[SetBan] = []
    gates: dict[Network, float] = {}
    exists = False
    for obj in data.get("nftables", ()):
        if "table" in obj and obj["table"].get("name") == table:
            exists = True
        elif "set" in obj and obj["set"].get("table") == table:
            s = obj["set"]
            name = s["name"]
            sets.add(name)
            items = [i.get("elem", i) if isinstance(i, dict) else {"val": i}
                     for i in s.get("elem", ())]
            if name in GATES:
                for elem in items:
                    network = _network(elem.get("val"))
                    if network is not None:
                        gates[network] = now + elem.get("expires", math.inf)
            elif name in BAN_SETS:
                bans.extend(_parse_set(name, items, now))
        elif "rule" in obj and obj["rule"].get("table") == table:
            what = _rule_does(obj["rule"].get("chain", ""), obj["rule"].get("expr", ()))
            if what is not None:
                rules.add(what)
    return TableState(exists, frozenset(sets), frozenset(rules), tuple(bans), gates)


def _rule_does(chain: str, exprs: Sequence[Any]) -> str | None:
    """What one rule does, in the words of :data:`WANTED_RULES`; None for anything else."""
    looked_up = offset = verdict = None
    for e in exprs:
        match = e.get("match", {})
        right = match.get("right")
        if isinstance(right, str) and right.startswith("@"):
            looked_up = right
            left = match.get("left")
            fields = left.get("concat", ()) if isinstance(left, dict) else ()
            raw = [f["payload"] for f in fields if "base" in f.get("payload", {})]
            if raw and raw[0].get("base") == "th" and raw[0].get("len") == QTYPE_BITS:
                offset = raw[0].get("offset")
        if "drop" in e:
            verdict = "drop"
        elif "jump" in e:
            verdict = f"jump {e['jump'].get('target')}"
    if looked_up is None or verdict is None:
        return None
    if verdict == "drop":
        return f"{chain}: drop {looked_up}" + ("" if offset is None else f" at {offset}")
    return f"{chain}: {looked_up} {verdict}"


def _network(val: Any) -> Network | None:
    if isinstance(val, str):
        return ipaddress.ip_network(val)
    if isinstance(val, dict) and "prefix" in val:
        return ipaddress.ip_network(f"{val['prefix']['addr']}/{val['prefix']['len']}")
    return None


def _range(val: Any) -> tuple[int, int] | None:
    if isinstance(val, int):
        return val, val
    if isinstance(val, dict) and isinstance(val.get("range"), list):
        low, high = val["range"]
        if isinstance(low, int) and isinstance(high, int):
            return low, high
    return None


# (network, qtype) -> [(element, dropped hop range, key)]
_Grouped = dict[tuple[Network, int | None], list[tuple[dict[str, Any], tuple[int, int], str]]]


def _parse_set(name: str, items: list[dict[str, Any]], now: float) -> list[SetBan]:
    """The bans of one of floodd's drop sets: one per element, or per network (and qtype)
    in hop and qtype sets, whose elements are merged."""
    kind = BAN_SETS[name][0]
    want = {"hop": 2, "qtype": 3}.get(kind, 1)  # fields of a key
    groups: _Grouped = {}
    for elem in items:
        val = elem.get("val")
        parts = val["concat"] if isinstance(val, dict) and "concat" in val else [val]
        if len(parts) != want:
            continue
        network = _network(parts[0])
        hops = _range(parts[1]) if want > 1 else ALL_HOPS
        qfield = _range(parts[2]) if want > 2 else None
        if network is None or hops is None or (want > 2 and (
                qfield is None or qfield[0] != qfield[1] or qfield[0] >> 32
                or qfield[0] & 0xFFFF != CLASS_IN)):
            continue  # not a key floodd writes
        qtype = qfield[0] >> 16 if qfield is not None else None
        key = element(network)
        if want > 1:
            key += f" . {_span(*hops)}"
        if qtype is not None:
            key += f" . {_qtype_field(qtype)}"
        groups.setdefault((network, qtype), []).append((elem, hops, key))
    bans = []
    for (network, qtype), found in groups.items():
        if kind == "ban":
            scope = WHOLE
        elif kind == "udp":
            scope = UDP_ONLY
        else:
            spared = _spared([span for _, span, _ in found])
            if spared is None:
                continue
            scope = Scope(True, qtype, spared)
        elems = [e for e, _, _ in found]
        lasts = max(float(e.get("expires", math.inf)) for e in elems)
        bans.append(SetBan(_installed(network, scope, elems, now), name,
                           tuple(k for _, _, k in found), None if math.isinf(lasts) else lasts))
    return bans


def _spared(dropped: list[tuple[int, int]]) -> tuple[int, ...] | None:
    """The hop values no range of ``dropped`` covers; None when more than a ban spares."""
    spared: list[int] = []
    start = 0
    for low, high in sorted(dropped):
        spared.extend(range(start, low))
        start = max(start, high + 1)
        if len(spared) > MAX_EXCEPT_HOPS:
            return None
    spared.extend(range(start, 256))
    return tuple(spared) if len(spared) <= MAX_EXCEPT_HOPS else None


def _installed(network: Network, scope: Scope, elems: list[dict[str, Any]],
               now: float) -> InstalledBan:
    """One ban from its elements: counters summed; rule and times from their comment
    when they all carry the same one of floodd's naming this scope."""
    packets = sum(int((e.get("counter") or {}).get("packets", 0)) for e in elems)
    bytes_ = sum(int((e.get("counter") or {}).get("bytes", 0)) for e in elems)
    first = min(elems, key=lambda e: float(e.get("expires", math.inf)))
    remaining = float(first["expires"]) if "expires" in first else None
    comments = {e.get("comment", "") for e in elems}
    parsed = parse_ban_comment(comments.pop()) if len(comments) == 1 else None
    if parsed is not None and parsed[3] == scope:
        rule, since, expires, _ = parsed
    else:
        timeout = first.get("timeout")
        expires = now + first["expires"] if "expires" in first else math.inf
        since = now - (timeout - first.get("expires", 0)) if timeout is not None else now
        rule = UNKNOWN_RULE
    return InstalledBan(network, rule, since, expires, packets, bytes_, remaining, scope)


# --- planning a transaction -----------------------------------------------------------
@dataclass(frozen=True)
class Transaction:
    """One transaction: bans and gates to delete, then to add (bans with carried
    counters; gates with the unix time their timeout ends)."""

    delete: tuple[SetBan, ...]
    add: tuple[tuple[Ban, int, int], ...]  # ban, packets, bytes to start its counter at
    gate_delete: tuple[Network, ...] = ()
    gate_add: tuple[tuple[Network, float], ...] = ()
    # What else the plan took from the bans it was given: those a new ban was skipped for
    # (they cover it), and those deleted whose counters new bans carry on.
    kept: tuple[SetBan, ...] = ()
    carried: tuple[SetBan, ...] = ()

    def committed(self) -> Committed:
        """What the kernel holds differently once the transaction is applied."""
        added = tuple(ban for ban, _, _ in self.add)
        readded = {ban.target for ban in added}
        removed = dict.fromkeys(kb.ban.target for kb in self.delete)
        return Committed(added, tuple(t for t in removed if t not in readded))


@dataclass(eq=False)  # slots are told apart by identity
class _Slot:
    """A ban in the plan: in the kernel (``kernel``) or to be added (``ban``)."""

    target: Target
    expires: float
    kernel: SetBan | None = None
    ban: Ban | None = None
    packets: int = 0
    bytes: int = 0


class _Plan:
    """The bans of the kernel as the transaction changes them, indexed for overlaps:
    by overlap group (a set; in qtype sets, a set and qtype) and network."""

    def __init__(self, installed: Iterable[SetBan]) -> None:
        self.groups: dict[tuple[str, int | None], dict[Network, _Slot]] = {}
        self.lengths: dict[tuple[str, int | None], set[int]] = {}  # prefix lengths there
        self.by_target: dict[Target, list[_Slot]] = {}
        self.delete: list[SetBan] = []
        self.adds: dict[Target, _Slot] = {}
        self.kept: list[SetBan] = []
        self.carried: list[SetBan] = []
        for kb in installed:
            ib = kb.ban
            self._put((kb.set, ib.scope.qtype),
                      _Slot(ib.target, ib.expires, kb, None, ib.packets, ib.bytes))

    def _put(self, group: tuple[str, int | None], slot: _Slot) -> None:
        # A network has one slot per group (two would overlap); one added by hand beside
        # another is still deleted with its target.
        self.groups.setdefault(group, {})[slot.target.network] = slot
        self.lengths.setdefault(group, set()).add(slot.target.network.prefixlen)
        self.by_target.setdefault(slot.target, []).append(slot)

    def drop(self, slot: _Slot) -> None:
        """Take a slot out: its elements deleted, or its planned add given up."""
        group = self.groups.get(self._group(slot), {})
        if group.get(slot.target.network) is slot:
            del group[slot.target.network]
        self.by_target[slot.target].remove(slot)
        if slot.kernel is not None:
            self.delete.append(slot.kernel)
        elif self.adds.get(slot.target) is slot:
            del self.adds[slot.target]

    def _group(self, slot: _Slot) -> tuple[str, int | None]:
        name = slot.kernel.set if slot.kernel is not None else set_of(slot.target)
        return name, slot.target.scope.qtype

    def remove(self, target: Target) -> None:
        for slot in list(self.by_target.get(target, ())):
            self.drop(slot)

    def place(self, ban: Ban) -> None:
        """Add ``ban`` unless a ban in place covers it (see the module docstring)."""
        group = (set_of(ban.target), ban.scope.qtype)
        members = self.groups.get(group, {})
        net = ban.network
        wider = [members[sup] for length in self.lengths.get(group, ())
                 if length <= net.prefixlen
                 and (sup := net.supernet(new_prefix=length)) in members]
        covering = [s for s in wider if s.target != ban.target
                    and (s.target.network != net or s.target.scope.covers(ban.scope))]
        if covering:
            self.kept += [s.kernel for s in covering if s.kernel is not None]
            return
        inside = [s for n, s in members.items() if n != net and _inside(n, net)] \
            if _is_prefix(net) else []
        slot = _Slot(ban.target, ban.expires, None, ban)
        for old in [*wider, *inside, *self.by_target.get(ban.target, ())]:
            if old in self.by_target.get(old.target, ()):
                slot.packets += old.packets
                slot.bytes += old.bytes
                if old.kernel is not None:
                    self.carried.append(old.kernel)
                self.drop(old)
        self._put(group, slot)
        self.adds[ban.target] = slot

    def gates(self, installed: Mapping[Network, float]) -> tuple[list[Network],
                                                                 list[tuple[Network, float]]]:
        """Gate elements to delete and to add, so that every qtype ban's network is gated
        until the ban ends; a gate given a later end is deleted and added again."""
        needed: dict[Network, float] = {}
        for (name, _), members in self.groups.items():
            if name in QTYPE_CHAINS:
                for net, slot in members.items():
                    needed[net] = max(needed.get(net, -math.inf), slot.expires)
        adds = {net: ends + GATE_MARGIN for net, ends in needed.items()
                if not _is_prefix(net) and installed.get(net, -math.inf) < ends}
        live = {net: ends for net, ends in installed.items() if _is_prefix(net)}
        deletes = []
        for net, ends in sorted(((n, e) for n, e in needed.items() if _is_prefix(n)),
                                key=lambda item: (item[0].version, item[0].prefixlen)):
            wider = next((g for g in live if _inside(net, g)), None)
            if wider is not None:
                if live[wider] < ends:
                    live[wider] = adds[wider] = ends + GATE_MARGIN
                continue
            # widest first: a gate inside this one is never one added by this plan
            inside = [g for g in live if _inside(g, net)]
            deletes += inside
            live[net] = adds[net] = max([ends + GATE_MARGIN, *(live.pop(g) for g in inside)])
        deletes += [net for net in adds if net in installed]
        return deletes, list(adds.items())


def plan_commit(pending: Mapping[Target, Ban | None], installed: Iterable[SetBan],
                gates: Mapping[Network, float] | None = None) -> Transaction:
    """Turn buffered changes (``None``: unban) into a transaction the sets accept, against
    the bans and gate elements (-> the unix time each ends) in the kernel."""
    plan = _Plan(installed)
    for target, ban in pending.items():
        if ban is None:
            plan.remove(target)
    # widest first: a prefix is placed before any network it contains is looked at, so a
    # ban inside a new one of this batch is skipped like one inside a ban in the kernel
    for ban in sorted((b for b in pending.values() if b is not None),
                      key=lambda b: (b.network.version, b.network.prefixlen)):
        plan.place(ban)
    gate_delete, gate_add = plan.gates(gates or {})
    return Transaction(tuple(plan.delete),
                       tuple((s.ban, s.packets, s.bytes) for s in plan.adds.values()
                             if s.ban is not None),
                       tuple(gate_delete), tuple(gate_add), tuple(plan.kept),
                       tuple(plan.carried))


def _timeout_ms(ends: float, now: float) -> int | None:
    """The timeout in ms of an element that ends at unix time ``ends`` (None: never)."""
    if math.isinf(ends):
        return None  # a gate of a ban without a timeout (added by hand)
    return max(1000, round((ends - now) * 1000))


def _timeout(ends: float, now: float) -> str:
    ms = _timeout_ms(ends, now)
    return "" if ms is None else f" timeout {ms}ms"


def _gate_set(net: Network) -> str:
    return f"qgate{net.version}net" if _is_prefix(net) else f"qgate{net.version}"


def render_commit(plan: Transaction, table: str, now: float) -> str:
    """The ``nft -f`` script for a plan (empty when there is nothing to do)."""
    gone: dict[str, list[str]] = {}
    for kb in plan.delete:
        gone.setdefault(kb.set, []).extend(kb.keys)
    for net in plan.gate_delete:
        gone.setdefault(_gate_set(net), []).append(element(net))
    new: dict[str, list[str]] = {}
    for ban, packets, bytes_ in plan.add:
        comment = f'{_timeout(ban.expires, now)} comment "{ban_comment(ban)}"'
        for i, key in enumerate(element_keys(ban.target)):
            # the carried counter goes to the first element: listing sums them
            counter = f" counter packets {packets} bytes {bytes_}" \
                if i == 0 and (packets or bytes_) else ""
            new.setdefault(set_of(ban.target), []).append(f"{key}{counter}{comment}")
    for net, ends in plan.gate_add:
        new.setdefault(_gate_set(net), []).append(f"{element(net)}{_timeout(ends, now)}")
    lines = [f"delete element inet {table} {name} {{ {', '.join(elems)} }}"
             for name, elems in gone.items()]
    lines += [f"add element inet {table} {name} {{ {', '.join(elems)} }}"
              for name, elems in new.items()]
    return "\n".join(lines) + "\n" if lines else ""


# --- what the table holds -------------------------------------------------------------
# Seconds of doubt around the moment the kernel's timeout ends an element, beyond what the
# mirror can bound (the kernel's clock ticks; listings give whole seconds, rounded down).
DOUBT = 1.0
# Seconds a listing's counters are used to carry a replaced ban's counter on: a rescan
# lists just before it extends bans.  Older, the commit lists again (the packets dropped
# since would be lost).
COUNTERS_FRESH = 2.0


@dataclass(frozen=True)
class _Held:
    """An element (a ban, a gate) in the mirror and the window, on the monotonic clock,
    in which its kernel timeout ends it."""

    first: float  # it may be gone from here on
    gone: float  # it is gone from here on

    @staticmethod
    def within(first: float | None, last: float | None, started: float,
               finished: float) -> _Held:
        """Timeouts of ``first`` .. ``last`` seconds (None: none) seen or set by an nft
        run between ``started`` and ``finished``."""
        return _Held(math.inf if first is None else started + first - DOUBT,
                     math.inf if last is None else finished + last + 1 + DOUBT)


class Mirror:
    """What floodd's table holds, as last listed and changed since by floodd's commits:
    each ban (its set and keys) and gate, with when the kernel ends it.

    The kernel ends elements by itself; an element the mirror has that may have timed out
    (its window has begun) is in doubt.  An element surely gone is left out of plans: it
    is neither deleted (nft refuses to delete an element that is not there, failing the
    whole transaction) nor taken to cover a new ban.  A plan that deletes one in doubt,
    or skips a ban for one, is made again against a listing.  Changes made by others
    (an operator's ``nft``) are seen at the next listing; until then a transaction they
    make wrong is refused by nft and planned again against a listing.
    """

    def __init__(self, state: TableState, started: float, finished: float,
                 wall: float) -> None:
        """The mirror of a listing run from ``started`` to ``finished`` (monotonic) and
        parsed at unix time ``wall``."""
        self.exists = state.exists
        self.counted = finished  # when the bans' counters were read
        self.bans = {(kb.set, kb.keys): (kb, _Held.within(kb.ban.remaining, kb.lasts,
                                                          started, finished))
                     for kb in state.kernel_bans}
        self.gates: dict[Network, tuple[float, _Held]] = {}
        for net, ends in state.gates.items():
            left = None if math.isinf(ends) else ends - wall
            self.gates[net] = (ends, _Held.within(left, left, started, finished))

    def plan(self, pending: Mapping[Target, Ban | None], now: float,
             listed: bool) -> Transaction | None:
        """The transaction of ``pending`` against the mirror at ``now`` (monotonic); None
        when it needs a listing first (``listed``: it was just listed)."""
        self.bans = {k: v for k, v in self.bans.items() if v[1].gone > now}
        self.gates = {k: v for k, v in self.gates.items() if v[1].gone > now}
        plan = plan_commit(pending, (kb for kb, _ in self.bans.values()),
                           {net: ends for net, (ends, _) in self.gates.items()})
        if listed:
            return plan
        doubt = [self.bans[kb.set, kb.keys][1] for kb in (*plan.delete, *plan.kept)]
        doubt += [self.gates[net][1] for net in plan.gate_delete if net in self.gates]
        if any(held.first <= now for held in doubt):
            return None
        if plan.carried and now - self.counted > COUNTERS_FRESH:
            return None
        return plan

    def applied(self, plan: Transaction, started: float, finished: float,
                wall: float) -> None:
        """``plan`` was committed by an nft run from ``started`` to ``finished``
        (monotonic), its timeouts reckoned from unix time ``wall``."""
        for kb in plan.delete:
            self.bans.pop((kb.set, kb.keys), None)
        for ban, packets, bytes_ in plan.add:
            kb = SetBan(InstalledBan(ban.network, ban.rule, ban.since, ban.expires, packets,
                                     bytes_, scope=ban.scope),
                        set_of(ban.target), element_keys(ban.target))
            left = _seconds(_timeout_ms(ban.expires, wall))
            self.bans[kb.set, kb.keys] = (kb, _Held.within(left, left, started, finished))
        for net in plan.gate_delete:
            self.gates.pop(net, None)
        for net, ends in plan.gate_add:
            left = _seconds(_timeout_ms(ends, wall))
            self.gates[net] = (ends, _Held.within(left, left, started, finished))


def _seconds(ms: int | None) -> float | None:
    return None if ms is None else ms / 1000


# --- the backend ----------------------------------------------------------------------
class NftablesBackend(Buffered):
    """floodd's bans in the nftables table ``inet TABLE`` (see the module docstring)."""

    name = "nftables"

    def __init__(self, ports: Sequence[int], protocols: Sequence[str], scope: str = "dns",
                 table: str = "floodd") -> None:
        if not _TABLE_RE.match(table):
            raise FlooddError(f"nftables table name {table!r} is not a valid identifier")
        if scope not in ("dns", "all"):
            raise FlooddError(f"firewall scope {scope!r}: expected dns or all")
        self.scope = scope
        self.table = table
        self.configure(ports, protocols)
        # What the table holds, planned against without listing it (None: unknown,
        # the next commit lists it).
        self._mirror: Mirror | None = None
        super().__init__()

    def configure(self, ports: Sequence[int], protocols: Sequence[str]) -> None:
        if self.scope == "dns" and (not ports or not protocols):
            raise FlooddError("firewall scope dns needs at least one port and protocol")
        self.ports = tuple(ports)
        self.protocols = tuple(protocols)

    def _match(self, udp_only: bool) -> str:
        """What a drop rule matches before the source: the scope's ports and protocols
        (UDP only for the UDP-only sets, whatever the configured protocols)."""
        port = port_match(self.ports)
        if udp_only:
            return "meta l4proto udp " if self.scope == "all" else f"udp dport {port} "
        if self.scope == "all":
            return ""
        protos = sorted(set(self.protocols))
        proto = protos[0] if len(protos) == 1 else "{ " + ", ".join(protos) + " }"
        return f"meta l4proto {proto} th dport {port} "

    def setup_script(self) -> str:
        t = self.table
        lines = [f"add table inet {t}"]
        for version in FAMILIES:
            ip, hop, addr = _IP[version], _HOP[version], _ADDR[version]
            for kind in ("ban", "udp"):
                lines += [f"add set inet {t} {kind}{version} "
                          f"{{ type {addr}; flags timeout; counter; }}",
                          f"add set inet {t} {kind}{version}net "
                          f"{{ type {addr}; flags interval, timeout; counter; }}"]
            lines += [
                f"add set inet {t} hop{version} "
                f"{{ typeof {ip} saddr . {hop}; flags interval, timeout; counter; }}",
                f"add set inet {t} qtype{version} {{ typeof {ip} saddr . {hop} . "
                f"@th,{name_offset(1)},{QTYPE_BITS}; flags interval, timeout; counter; }}",
                f"add set inet {t} qgate{version} {{ type {addr}; flags timeout; }}",
                f"add set inet {t} qgate{version}net "
                f"{{ type {addr}; flags interval, timeout; }}",
                f"add chain inet {t} qtype{version}",
            ]
        lines += [
            f"add chain inet {t} {CHAIN} "
            "{ type filter hook input priority filter - 10; policy accept; }",
            # the rules follow the configuration: replaced in the same transaction
            f"flush chain inet {t} {CHAIN}",
        ]
        for chain in QTYPE_CHAINS:
            version = BAN_SETS[chain][1]
            lines.append(f"flush chain inet {t} {chain}")
            lines += [f"add rule inet {t} {chain} {_IP[version]} saddr . {_HOP[version]} . "
                      f"@th,{name_offset(length)},{QTYPE_BITS} @{chain} drop"
                      for length in range(1, MAX_NAME + 1)]
        for name in DROP_SETS:
            kind, version = BAN_SETS[name]
            key = f"{_IP[version]} saddr" + (f" . {_HOP[version]}" if kind == "hop" else "")
            lines.append(f"add rule inet {t} {CHAIN} {self._match(kind != 'ban')}"
                         f'{key} @{name} drop comment "{RULE_COMMENT}"')
        for gate, chain in GATES.items():
            lines.append(f"add rule inet {t} {CHAIN} {self._match(True)}"
                         f"{_IP[BAN_SETS[chain][1]]} saddr @{gate} jump {chain} "
                         f'comment "{GATE_COMMENT}"')
        return "\n".join(lines) + "\n"

    def setup(self) -> None:
        nft(["-f", "-"], self.setup_script())
        if self._mirror is not None and not self._mirror.exists:
            self._mirror = None  # a new table: the next commit lists it

    def commit(self) -> Committed:
        """One transaction, planned against the mirror of the table; the first commit,
        and one the mirror cannot plan for sure, list the table first.  If nft refuses
        the transaction, it is planned again against a listing and tried once more.

        A retry covers what the mirror cannot know: a ban or gate removed by someone else,
        or an element whose timeout fired just before the transaction, makes its delete
        fail.  An nft that hangs is not tried again (and the table is listed before the
        next commit).  A ban covered by one in place is not added (see
        :func:`plan_commit`): it is missing from the result's ``added``.
        """
        pending = self._take()
        if not pending:
            return Committed((), ())
        try:
            try:
                return self._apply(pending, self._mirror is None)
            except CommandTimeout:
                raise
            except FlooddError:
                return self._apply(pending, True)
        except CommandTimeout:
            self._mirror = None  # the transaction may or may not have been applied
            raise

    def _apply(self, pending: Mapping[Target, Ban | None], list_first: bool) -> Committed:
        if list_first:
            self.state()
        mirror = self._mirror
        if mirror is None or not mirror.exists:
            raise Failure(f"nftables table inet {self.table} does not exist "
                          "(the firewall is not set up)")
        plan = mirror.plan(pending, time.monotonic(), list_first)
        if plan is None:
            return self._apply(pending, True)
        wall = time.time()
        script = render_commit(plan, self.table, wall)
        if script:
            started = time.monotonic()
            nft(["-f", "-"], script)
            mirror.applied(plan, started, time.monotonic(), wall)
        return plan.committed()

    def state(self) -> TableState:
        """Table, sets, rules, bans and gates in one ``nft -j list table`` call (the
        mirror becomes what it shows)."""
        self._mirror = None
        started = time.monotonic()
        proc = nft(["-j", "list", "table", "inet", self.table], missing_ok=True)
        finished = time.monotonic()
        wall = time.time()
        if proc is None:
            state = ABSENT
        else:
            try:
                data = json.loads(proc)
            except json.JSONDecodeError:
                raise Failure("nft -j list table printed something that is not "
                              "JSON") from None
            state = parse_table(data, self.table, wall)
        self._mirror = Mirror(state, started, finished, wall)
        return state

    def survey(self) -> list[InstalledBan] | None:
        state = self.state()
        return list(state.bans) if state.complete else None

    def list(self) -> list[InstalledBan]:
        return list(self.state().bans)

    def teardown(self) -> None:
        self._mirror = None
        nft(["-f", "-"], delete_table(self.table))


def nft(args: list[str], script: str | None = None, missing_ok: bool = False) -> str | None:
    """Run ``nft ARGS`` (``script`` on stdin); its stdout.

    With ``missing_ok``, a table that does not exist gives None instead of an error.
    """
    nft = shutil.which("nft")
    if nft is None:
        raise FlooddError("nft not found: install nftables or choose another firewall.backend")
    proc = run([nft, *args], input=script)
    if proc.returncode == 0:
        return proc.stdout
    err = next((ln for ln in proc.stderr.splitlines() if ln.startswith("Error:")),
               proc.stderr.strip().splitlines()[0] if proc.stderr.strip() else "")
    if missing_ok and "No such file or directory" in err:
        return None
    hint = " (floodd needs root or CAP_NET_ADMIN)" if "Operation not permitted" in err else ""
    raise Failure(f"nft {' '.join(args[:2])} failed: {err[:200] or proc.returncode}{hint}")
