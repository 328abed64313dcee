"""The iptables firewall backend, driven through python-iptables (libiptc) and ipset.

What floodd keeps in the kernel, in the filter table of iptables and of ip6tables (IPv6:
the sets ``floodd-ban6`` ...)::

    INPUT   -p udp -m multiport --dports 53 -m comment --comment "floodd udp dports=53" -j FLOODD
            -p tcp -m multiport --dports 53 -m comment --comment "floodd tcp dports=53" -j FLOODD
    FLOODD  -m set --match-set floodd-ban4 src -m comment --comment "floodd set floodd-ban4" -j DROP
            -m set --match-set floodd-ban4net src ... -j DROP
            -p udp -m set --match-set floodd-udp4 src ... -j DROP
            -p udp -m set --match-set floodd-udp4net src ... -j DROP
            -s 203.0.113.10/32 -p udp -m ttl ! --ttl-eq 64 -m comment --comment
                "floodd since=... scope=udp,except=64 rule=query-flood" -j DROP
            -s 203.0.113.10/32 -p udp -m string --hex-string "|0000ff0001|" --algo bm
                --from 40 --to 339 -m comment --comment "floodd ... scope=udp,qtype=255 ..." -j DROP
            ... one rule per ban of some hop values or of one query type

The DNS match (protocols and ports) lives in the jump rules at the top of INPUT, so
neither a set rule nor a ban rule repeats it.  Scope ``all`` uses one jump without
protocol or port match (comment ``floodd all``).

Whole-source and UDP-only bans, the common ones, are entries of ipset sets
(:mod:`floodd.enforce.firewall.ipset`), each with its own kernel timeout, counter and ban
comment; four set rules per family at the top of the chain match them, one hash lookup
each however many bans there are (10,000 bans as rules cost 97% of BIND's throughput).
Address sets come before prefix sets, so an address banned inside a banned prefix counts
its own packets; a packet several bans match counts in the first.  ipset cannot match a
TTL / hop limit or a question, so the other scopes stay one rule per ban, their scope
made into matches:

* UDP: ``-p udp`` (the jump already limits it to the DNS ports under firewall scope
  ``dns``; under ``all`` it is all of the source's UDP);
* usual hop values that pass: one ``-m ttl ! --ttl-eq H`` per value (IPv6:
  ``-m hl ! --hl-eq H``);
* one query type: ``-m string --algo bm --hex-string |00 QQQQ 0001|``, the root label
  ending the question name, the type and class IN.  The search is kept to where the
  question can be: from its first byte in a query without IP options or IPv6 extension
  headers (IP header, 8 bytes of UDP, 12 of DNS header: offset 40 / 60) to the end of
  the longest name (255 bytes) and its type and class, allowing 40 bytes of options.

A rule ban carries the same comment as a set entry (rule name, start and expiry in whole
seconds, scope), so the kernel alone is the record of what is banned and a restarted
floodd adopts it.  Nothing expires a rule in the kernel: floodd unbans at expiry.

Reading back, a rule in FLOODD is a ban when it drops, its comment is a ban comment and
its matches are exactly what that comment's scope makes (protocol, hop values, question
pattern, no other match); any other rule there is the operator's and is left alone.
Whole-source and UDP-only ban rules (as older floodd versions wrote them) are read as
bans too; a change of one of them moves it into its set, with its counters.

A commit plans against a mirror of floodd's bans (where each one is: set entry or rule)
and of which families have floodd's chain, as last read or committed; it reads the
kernel only the first time.  Set changes are one ``ipset restore`` for both families;
libiptc is opened only for rule bans.  After a failed commit the next one reads again.

libiptc only knows the *legacy* xtables: on a host where ``iptables`` is the nf_tables
variant these rules are enforced, but only ``iptables-legacy -nvL`` shows them (the
sets are the same for both: ``ipset list`` shows them).

libiptc edits a copy of the whole table and its commit replaces the whole table in the
kernel.  python-iptables does not take the xtables lock, so floodd takes it itself
(``/run/xtables.lock`` or ``$XTABLES_LOCKFILE``, as iptables-legacy does) from reading
the table to committing it: a change iptables-legacy makes in between is never lost.

Speed: a python-iptables ``Rule`` costs ~0.2 ms to build and as much to read back, so
ban rules are made by patching the source, mask, comment and counters of a template
entry that python-iptables builds, one per scope in a commit, and read back by parsing
raw entries at the offsets of python-iptables' own ctypes structures: 1,000 hop or qtype
bans take about 0.01 s each way.  Set rules, a handful, are compared with ones
python-iptables builds (the set match holds the set's kernel index, which it looks up).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import ipaddress
import os
import re
import shutil
import struct
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Sequence

from floodd.errors import Failure, FlooddError
from floodd.enforce.firewall.base import Ban, Buffered, Committed, InstalledBan
from floodd.enforce.firewall.comment import ban_comment, parse_ban_comment
from floodd.enforce.firewall.ipset import BanSet, BanSets, set_scope
from floodd.scope import UDP_ONLY, WHOLE, Scope, Target

PROTOCOLS = ("udp", "tcp")
VERSIONS = (4, 6)
SCOPES = ("dns", "all")
MAX_PORTS = 15  # the multiport match's limit
LOCK_WAIT = 5.0  # seconds to wait for the xtables lock

_MARK = "floodd"
_TOOLS = {4: "iptables-legacy", 6: "ip6tables-legacy"}  # what shows the rules, for messages
# At most 23 characters: the sets are named after it ("floodd-udp4net", 31 at most).
_CHAIN_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,22}")
_SET_RULE = f"{_MARK} set "  # the comment of a set rule: "floodd set floodd-ban4"
# python-iptables formats libiptc's message, a bytes object, with %s: "b'...'".
_BYTES_REPR = re.compile(r"""\bb(['"])(.*?)\1""")
_COUNTERS = struct.Struct("=QQ")  # struct xt_counters: packets, bytes
_COMMENT_SIZE = 256  # struct xt_comment_info: char comment[256], NUL-terminated
_U16 = struct.Struct("=H")
# struct ipt_ttl_info / ip6t_hl_info: u8 mode, u8 value; mode 1 is "not equal"
# (IPT_TTL_NE, IP6T_HL_NE), what "! --ttl-eq" / "! --hl-eq" sets.
_HOP_NOT_EQUAL = 1
# struct xt_string_info up to its kernel-only part: u16 from_offset, u16 to_offset,
# char algo[16], char pattern[128], u8 patlen, then u8 flags (revision 1; revision 0:
# u8 invert), 0 for a plain case-sensitive match.
_STRING = struct.Struct("=HH16s128sBB")
_STRING_ALGO = "bm"
_QUESTION_PATTERN = 5  # bytes: root label 00, qtype (2), class IN 0001
_QUESTION_START = {4: 20 + 8 + 12, 6: 40 + 8 + 12}  # IP header, UDP header, DNS header
_OPTIONS_ROOM = 40  # IPv4 options (at most 40 bytes), or as much of IPv6 extension headers
# The longest question: a name of wire length 255 (its last byte the root label), then
# type and class.
_QUESTION_MAX = 255 + 4


@dataclass(frozen=True)
class _Family:
    """One address family: the byte layout of its entries and how its ban rules look.

    An entry is ``struct ipt_entry`` / ``struct ip6t_entry`` (``ip``: the addresses,
    protocol and their flags; target_offset, counters, ...), then its matches from
    ``entry_size`` on, each a ``struct xt_entry_match`` (u16 size, name, revision:
    ``match_header`` bytes) and its data, then the target at ``target_offset``.
    """

    version: int
    network_class: type[ipaddress.IPv4Network] | type[ipaddress.IPv6Network]
    address_size: int
    rule_class: Any
    ip: slice  # the entry's ip / ipv6 part
    src: int
    smsk: int
    target_offset: int
    counters: int
    entry_size: int
    match_header: int
    hop_match: str  # "ttl" / "hl"
    question: tuple[int, int]  # the string match's --from and --to
    # The ip part of a ban rule without and with -p udp, source and mask zero.
    ip_any: bytes = b""
    ip_udp: bytes = b""


class _NoSet(Failure):
    """One of floodd's sets is not there."""


@dataclass
class _Mirror:
    """What floodd last read or committed: where each ban is, which families have
    floodd's chain."""

    chains: set[int] = field(default_factory=set)
    in_sets: set[Target] = field(default_factory=set)
    in_rules: set[Target] = field(default_factory=set)


@dataclass(frozen=True)
class _Template:
    """A ban rule of one scope as python-iptables builds it, for patching."""

    raw: bytes  # source 0/0, comment "floodd", counters 0
    comment: int  # offset of the comment text


class IptablesBackend(Buffered):
    """floodd's chain in the legacy iptables and ip6tables filter tables."""

    name = "iptables"

    def __init__(self, ports: Sequence[int], protocols: Sequence[str], scope: str = "dns",
                 chain: str = "FLOODD") -> None:
        if scope not in SCOPES:
            raise FlooddError(f"firewall scope must be one of {', '.join(SCOPES)}, got {scope!r}")
        if not _CHAIN_NAME.fullmatch(chain):
            raise FlooddError(f"invalid iptables chain name {chain!r}")
        ipset = shutil.which("ipset")
        if ipset is None:
            raise FlooddError("firewall backend iptables: ipset not found (install ipset)")
        self._scope = scope
        self._chain = chain
        self.configure(ports, protocols)
        self._iptc = _import_iptc()
        self._layouts: dict[int, _Family] = {}
        self._sets = BanSets(chain.lower(), ipset)
        self._mirror: _Mirror | None = None  # None: read the kernel before a commit
        super().__init__()

    def configure(self, ports: Sequence[int], protocols: Sequence[str]) -> None:
        """The jump rules setup() installs: one per protocol matching the ports (scope
        ``dns``), or one for all traffic."""
        if self._scope == "dns":
            if not 1 <= len(ports) <= MAX_PORTS:
                raise FlooddError(f"iptables needs 1 to {MAX_PORTS} DNS ports, got {len(ports)}")
            if any(not 1 <= port <= 65535 for port in ports):
                raise FlooddError(f"invalid DNS port in {', '.join(map(str, ports))}")
            if not protocols or any(p not in PROTOCOLS for p in protocols):
                raise FlooddError(f"protocols must be among {', '.join(PROTOCOLS)}, "
                                  f"got {', '.join(protocols) or 'none'}")
            dports = ",".join(str(p) for p in ports)
            self._jumps: list[tuple[str | None, str]] = [
                (p, f"{_MARK} {p} dports={dports}") for p in dict.fromkeys(protocols)]
        else:
            self._jumps = [(None, f"{_MARK} all")]
        self._ports = tuple(ports)

    # --- the Backend interface ---------------------------------------------------
    def setup(self) -> None:
        self._sets.create()  # first: a set rule refers to its set
        for version in VERSIONS:
            with self._session(version, "setup") as (fam, table):
                if not table.is_chain(self._chain):
                    table.create_chain(self._chain)
                found = [*self._installed_jumps(fam, table)]
                if [comment for _, comment in found] != [c for _, c in self._jumps]:
                    for index, _ in reversed(found):
                        self._delete(table, "INPUT", index)
                    input_chain = self._iptc.Chain(table, "INPUT")
                    for protocol, comment in reversed(self._jumps):
                        input_chain.insert_rule(self._jump_rule(fam, protocol, comment), 0)
                wanted = self._set_rules(fam)
                rules = [*self._installed_set_rules(fam, table)]
                # At the top of the chain, in order: before any rule ban.
                if rules != [*enumerate(key for key, _ in wanted)]:
                    for index, _ in reversed(rules):
                        self._delete(table, self._chain, index)
                    for position, (_, raw) in enumerate(wanted):
                        table.insert_entry(self._chain, _buffer(raw), position)
                table.commit()  # libiptc commits nothing when nothing changed
        if self._mirror is not None:
            self._mirror.chains = set(VERSIONS)

    def commit(self) -> Committed:
        """One ``ipset restore`` for the set bans of both families, one table commit per
        family (IPv4, then IPv6) for rule bans.

        When a later step fails the earlier ones stay applied; either way nothing stays
        buffered, and the next commit reads the kernel first.
        """
        pending = self._take()
        if not pending:
            return Committed((), ())
        try:
            return self._commit(pending)
        except Exception:
            self._mirror = None
            raise

    def _commit(self, pending: dict[Target, Ban | None]) -> Committed:
        if self._mirror is None:
            self.list()
        mirror = self._mirror
        assert mirror is not None  # list() read it
        for version in VERSIONS:
            if version not in mirror.chains and any(
                    b is not None and t.network.version == version for t, b in pending.items()):
                raise Failure(f"{_TOOLS[version]} chain {self._chain} is missing "
                              "(removed from outside?): run setup first")
        removed: list[Target] = []
        carried: dict[Target, tuple[int, int]] = {}
        for version in VERSIONS:
            changes = {t: b for t, b in pending.items() if t.network.version == version
                       and (not set_scope(t.scope) or t in mirror.in_rules)}
            if not changes or version not in mirror.chains:
                continue
            with self._session(version, "commit") as (fam, table):
                gone, moved = self._apply(fam, table, changes)
                table.commit()
            removed += gone
            carried.update(moved)
            for target, ban in changes.items():
                if ban is None or set_scope(target.scope):
                    mirror.in_rules.discard(target)
                else:
                    mirror.in_rules.add(target)
        in_sets = {t: b for t, b in pending.items() if set_scope(t.scope)}
        batch, added_to_sets = self._sets.changes(
            ((t, b, carried.get(t)) for t, b in in_sets.items()), time.time())
        self._sets.apply(batch)
        from_rules = set(removed)
        for target, ban in in_sets.items():
            if ban is not None:
                continue
            if target in mirror.in_sets and target not in from_rules:
                removed.append(target)
            mirror.in_sets.discard(target)
        mirror.in_sets.update(b.target for b in added_to_sets)
        added = [b for t, b in pending.items() if b is not None and not set_scope(t.scope)]
        return Committed((*added, *added_to_sets), tuple(removed))

    def survey(self) -> list[InstalledBan] | None:
        return self.list() if self._present() else None

    def _present(self) -> bool:
        for version in VERSIONS:
            with self._session(version, "check") as (fam, table):
                if not table.is_chain(self._chain):
                    return False
                found = [comment for _, comment in self._installed_jumps(fam, table)]
                if found != [c for _, c in self._jumps]:
                    return False
                try:
                    wanted = [*enumerate(key for key, _ in self._set_rules(fam))]
                except _NoSet:
                    return False
                if [*self._installed_set_rules(fam, table)] != wanted:
                    return False
        return True

    def teardown(self) -> None:
        self._mirror = None
        for version in VERSIONS:
            with self._session(version, "teardown") as (fam, table):
                for index, _ in reversed([*self._installed_jumps(fam, table)]):
                    self._delete(table, "INPUT", index)
                if table.is_chain(self._chain):
                    table.flush_entries(self._chain)
                    table.delete_chain(self._chain)
                table.commit()
        self._sets.destroy()  # last: no rule may refer to a set destroyed
        self._mirror = _Mirror()

    def list(self) -> list[InstalledBan]:
        """The bans in floodd's sets (also while its chain is missing: the kernel still
        ends them) and those of the rules in its chain."""
        bans: dict[Target, InstalledBan] = {}
        mirror = _Mirror()

        def add(ban: InstalledBan) -> None:
            seen = bans.get(ban.target)
            bans[ban.target] = ban if seen is None else replace(
                seen, packets=seen.packets + ban.packets, bytes=seen.bytes + ban.bytes)

        for version in VERSIONS:
            with self._session(version, "list") as (fam, table):
                if not table.is_chain(self._chain):
                    continue
                mirror.chains.add(version)
                for _, ban in self._installed_bans(fam, table):
                    mirror.in_rules.add(ban.target)
                    add(ban)
        for ban in self._sets.read(time.time()):
            mirror.in_sets.add(ban.target)
            add(ban)
        self._mirror = mirror
        return [*bans.values()]

    # --- reading and changing one table ------------------------------------------
    @contextmanager
    def _session(self, version: int, action: str) -> Iterator[tuple[_Family, Any]]:
        """The family's layout and filter table, freshly read, under the xtables lock.

        Anything not committed when the block ends is dropped, and python-iptables'
        autocommit setting is restored.
        """
        try:
            with _xtables_lock():
                table_class = self._iptc.Table if version == 4 else self._iptc.Table6
                # Opening the table first turns a missing privilege into an error:
                # building a rule without it makes libxtables exit(1) the process.
                table = table_class(table_class.FILTER)
                if version not in self._layouts:
                    self._layouts[version] = _family(self._iptc, version)
                autocommit = table.autocommit
                table.autocommit = False
                try:
                    table.refresh()
                    yield self._layouts[version], table
                finally:
                    table.refresh()
                    table.autocommit = autocommit
        except (self._iptc.IPTCError, self._iptc.XTablesError, OSError) as exc:
            message = _BYTES_REPR.sub(r"\2", str(exc)).replace("\n", " ")
            raise Failure(f"{_TOOLS[version]} {action}: {message}") from exc

    def _apply(self, fam: _Family, table: Any, changes: dict[Target, Ban | None]
               ) -> tuple[Sequence[Target], dict[Target, tuple[int, int]]]:
        """Replace, delete and append ban rules; a replaced ban keeps its counters.  The
        rules of a ban that belongs in a set (see the module docstring) are deleted: a
        new ban of it goes to its set with their counters.  The targets whose rules are
        deleted and not replaced, and the counters of those moving to a set."""
        installed: dict[Target, list[tuple[int, InstalledBan]]] = {}
        for index, ban in self._installed_bans(fam, table):
            installed.setdefault(ban.target, []).append((index, ban))
        templates: dict[Scope, _Template] = {}  # only this commit's: scopes are many

        def entry(ban: Ban, packets: int, nbytes: int) -> ctypes.Array[ctypes.c_ubyte]:
            if ban.scope not in templates:
                templates[ban.scope] = _template(fam, ban.scope)
            return _entry(fam, templates[ban.scope], ban, packets, nbytes)

        deletes: list[int] = []
        gone: list[Target] = []
        moved: dict[Target, tuple[int, int]] = {}
        for target, new in changes.items():
            rules = installed.get(target, [])
            packets = sum(ban.packets for _, ban in rules)
            nbytes = sum(ban.bytes for _, ban in rules)
            if new is None or set_scope(target.scope):
                deletes += [index for index, _ in rules]
                if rules and new is None:
                    gone.append(target)
                elif rules:
                    moved[target] = (packets, nbytes)
            elif not rules:
                table.append_entry(self._chain, entry(new, 0, 0))
            else:
                table.replace_entry(self._chain, entry(new, packets, nbytes), rules[0][0])
                deletes += [index for index, _ in rules[1:]]
        # Appends went to the end and replacements kept their place: indexes still hold.
        for index in sorted(deletes, reverse=True):
            self._delete(table, self._chain, index)
        return gone, moved

    def _set_rules(self, fam: _Family) -> Sequence[tuple[_RuleKey, bytes]]:
        """The family's set rules, in order, as python-iptables builds them (_NoSet when
        a set is missing)."""
        rules = []
        for s in self._sets.sets:
            if s.version == fam.version:
                try:
                    raw = _set_rule(fam, s)
                except ValueError:  # python-iptables found no set of that name
                    raise _NoSet(f"ipset: set {s.name} is missing (removed from "
                                 "outside?): run setup") from None
                rules.append((_rule_key(fam, raw), raw))
        return rules

    def _installed_set_rules(self, fam: _Family, table: Any) -> Iterator[tuple[int, _RuleKey]]:
        """(position, what it matches) of the rules in floodd's chain with a set rule's
        comment."""
        for index, entry in enumerate(_entries(table, self._chain)):
            if table.get_target(entry) != b"DROP":
                continue
            raw = ctypes.string_at(ctypes.addressof(entry), entry.target_offset)
            comment = _comment(fam, raw)
            if comment is not None and comment.startswith(_SET_RULE):
                yield index, _rule_key(fam, raw)

    def _installed_bans(self, fam: _Family, table: Any) -> Iterator[tuple[int, InstalledBan]]:
        """(position, ban) of every rule in floodd's chain that is a ban (see the module
        docstring); other rules are the operator's."""
        for index, entry in enumerate(_entries(table, self._chain)):
            if table.get_target(entry) != b"DROP":
                continue
            ban = _parse_ban(fam, ctypes.string_at(ctypes.addressof(entry), entry.target_offset))
            if ban is not None:
                yield index, ban

    def _installed_jumps(self, fam: _Family, table: Any) -> Iterator[tuple[int, str]]:
        """(position, comment) of floodd's jump rules in INPUT."""
        target = self._chain.encode()
        for index, entry in enumerate(_entries(table, "INPUT")):
            if table.get_target(entry) != target:
                continue
            comment = _comment(fam, ctypes.string_at(ctypes.addressof(entry),
                                                     entry.target_offset))
            if comment is not None and comment.split(" ", 1)[0] == _MARK:
                yield index, comment

    def _jump_rule(self, fam: _Family, protocol: str | None, comment: str) -> Any:
        rule = fam.rule_class()
        if protocol is not None:
            rule.protocol = protocol
            rule.create_match("multiport").dports = ",".join(str(p) for p in self._ports)
        rule.create_match("comment").comment = comment
        rule.target = rule.create_target(self._chain)
        return rule

    def _delete(self, table: Any, chain: str, index: int) -> None:
        # python-iptables deletes only by matching a whole rule, a linear search per
        # rule; libiptc's delete by (0-based) position walks from the nearer chain end.
        if table._iptc.iptc_delete_num_entry(chain.encode(), index, table._handle) != 1:
            raise self._iptc.IPTCError(
                f"can't delete rule {index + 1} of chain {chain}: {table.strerror()}")


def _import_iptc() -> Any:
    # python-iptables loads libiptc and the xtables extensions when imported; any
    # failure there (library missing, unreadable) is the operator's to fix.
    try:
        import iptc
    except Exception as exc:
        raise FlooddError(f"python-iptables cannot be loaded: {exc}") from exc
    return iptc


def _family(iptc: Any, version: int) -> _Family:
    network_class: type[ipaddress.IPv4Network] | type[ipaddress.IPv6Network]
    if version == 4:
        entry, ip_field, ip = iptc.ip4tc.ipt_entry, iptc.ip4tc.ipt_entry.ip, iptc.ip4tc.ipt_ip
        rule_class, network_class, hop_match = iptc.Rule, ipaddress.IPv4Network, "ttl"
    else:
        entry, ip_field, ip = (iptc.ip6tc.ip6t_entry, iptc.ip6tc.ip6t_entry.ipv6,
                               iptc.ip6tc.ip6t_ip6)
        rule_class, network_class, hop_match = iptc.Rule6, ipaddress.IPv6Network, "hl"
    start = _QUESTION_START[version]
    fam = _Family(version=version, network_class=network_class,
                  address_size=4 if version == 4 else 16, rule_class=rule_class,
                  ip=slice(ip_field.offset, ip_field.offset + ctypes.sizeof(ip)),
                  src=ip_field.offset + ip.src.offset, smsk=ip_field.offset + ip.smsk.offset,
                  target_offset=entry.target_offset.offset, counters=entry.counters.offset,
                  entry_size=iptc.xtables.xt_align(ctypes.sizeof(entry)),
                  match_header=ctypes.sizeof(iptc.xtables.xt_entry_match),
                  hop_match=hop_match,
                  question=(start, start + _OPTIONS_ROOM + _QUESTION_MAX))
    fam = replace(fam, ip_any=_ip_part(fam, _template(fam, WHOLE).raw),
                  ip_udp=_ip_part(fam, _template(fam, UDP_ONLY).raw))
    # floodd reads the ttl/hl and string matches by the kernel's struct layouts (see
    # the constants above) while python-iptables picks their revisions: what it builds
    # must read back as what it was built from.
    probe = Ban(network_class(0), "", 0, 0, Scope(True, 0xABCD, (1, 254)))
    found = _parse_ban(fam, bytes(_entry(fam, _template(fam, probe.scope), probe, 0, 0)))
    if found is None or found.target != probe.target:
        raise Failure(f"{_TOOLS[version]}: python-iptables builds ban rules floodd cannot "
                      "read back (unknown ttl/hl or string match layout)")
    return fam


def _template(fam: _Family, scope: Scope) -> _Template:
    """A ban rule of ``scope`` built by python-iptables (matches in the order
    :func:`_parse_ban` reads them: hop values, question, comment)."""
    rule = fam.rule_class()
    if scope.udp_only:
        rule.protocol = "udp"
    for hop in scope.except_hops:
        setattr(rule.create_match(fam.hop_match), f"{fam.hop_match}_eq", f"!{hop}")
    if scope.qtype is not None:
        question = rule.create_match("string")
        question.algo = _STRING_ALGO
        question.hex_string = f"|00 {scope.qtype:04x} 0001|"
        # "from" is a Python keyword: python-iptables takes these two by name only.
        question.set_parameter("from", str(fam.question[0]))
        question.set_parameter("to", str(fam.question[1]))
    rule.create_match("comment").comment = _MARK
    rule.target = rule.create_target("DROP")
    raw = bytes(rule.rule)
    comment = _comment_offset(fam, raw)
    assert comment is not None  # the template's last match is its comment
    return _Template(raw, comment)


# A rule's ip part and its matches (name, data): what it matches, counters aside.
_RuleKey = tuple[bytes, tuple[tuple[bytes, bytes], ...]]


def _rule_key(fam: _Family, raw: bytes) -> _RuleKey:
    return raw[fam.ip], tuple(_matches(fam, raw))


def _set_rule(fam: _Family, banned: BanSet) -> bytes:
    """The rule dropping what the bans of a set drop: ``[-p udp] -m set --match-set
    NAME src -m comment --comment "floodd set NAME" -j DROP``."""
    rule = fam.rule_class()
    if banned.scope.udp_only:
        rule.protocol = "udp"
    rule.create_match("set").match_set = [banned.name, "src"]
    rule.create_match("comment").comment = f"{_SET_RULE}{banned.name}"
    rule.target = rule.create_target("DROP")
    return bytes(rule.rule)


def _buffer(raw: bytes) -> ctypes.Array[ctypes.c_ubyte]:
    """An entry for libiptc."""
    return (ctypes.c_ubyte * len(raw)).from_buffer(bytearray(raw))


@contextmanager
def _xtables_lock() -> Iterator[None]:
    """The lock iptables-legacy takes around every change (flock on its lock file)."""
    path = os.environ.get("XTABLES_LOCKFILE", "/run/xtables.lock")
    try:
        # Read-only is enough for flock, and opens an existing lock file even on a
        # read-only /run (the systemd unit creates it before its sandbox starts).
        fd = os.open(path, os.O_CREAT | os.O_RDONLY | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        hint = (" (it must exist before floodd starts: the systemd unit creates it with "
                "ExecStartPre=+/usr/bin/touch)" if exc.errno == errno.EROFS else "")
        raise Failure(f"cannot open the xtables lock {path}: {exc.strerror}{hint}"
                          ) from exc
    try:
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise Failure(f"another program holds the xtables lock {path} "
                                      f"(waited {LOCK_WAIT:g} s)") from None
                time.sleep(0.01)
        yield
    finally:
        os.close(fd)


def _entries(table: Any, chain: str) -> Iterator[Any]:
    """The chain's entries (ctypes views into libiptc's copy of the table), in order."""
    entry = table.first_rule(chain)
    while entry:
        yield entry
        entry = table.next_rule(entry)


def _matches(fam: _Family, raw: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(name, data) of each match of the entry, in order; a malformed one ends them
    with the name b"" (no match has it)."""
    offset = fam.entry_size
    end = _U16.unpack_from(raw, fam.target_offset)[0]
    while offset + fam.match_header <= end:
        size = _U16.unpack_from(raw, offset)[0]
        if size < fam.match_header or offset + size > end:
            yield b"", b""
            return
        yield (raw[offset + 2:offset + fam.match_header - 1].split(b"\0", 1)[0],
               raw[offset + fam.match_header:offset + size])
        offset += size


def _comment_offset(fam: _Family, raw: bytes) -> int | None:
    """Where the text of the entry's comment match starts, if it has one."""
    offset = fam.entry_size
    for name, data in _matches(fam, raw):
        if name == b"comment":
            return offset + fam.match_header
        offset += fam.match_header + len(data)
    return None


def _comment_text(data: bytes) -> str:
    return data[:_COMMENT_SIZE].split(b"\0", 1)[0].decode("utf-8", "replace")


def _comment(fam: _Family, raw: bytes) -> str | None:
    for name, data in _matches(fam, raw):
        if name == b"comment":
            return _comment_text(data)
    return None


def _question_type(fam: _Family, data: bytes) -> int | None:
    """The query type of a string match floodd wrote for a qtype ban, else None."""
    if len(data) < _STRING.size:
        return None
    start, end, algo, pattern, length, flags = _STRING.unpack_from(data)
    if (start, end) != fam.question or algo.rstrip(b"\0") != _STRING_ALGO.encode() \
            or flags != 0 or length != _QUESTION_PATTERN or pattern[0] != 0 \
            or pattern[3:5] != b"\0\1":
        return None
    return int.from_bytes(pattern[1:3], "big")


def _ip_part(fam: _Family, raw: bytes) -> bytes:
    """The entry's ip part with source and mask zeroed (the rest is the same in every
    ban rule of one protocol)."""
    part = bytearray(raw[fam.ip])
    zero = bytes(fam.address_size)
    for field in (fam.src, fam.smsk):
        start = field - fam.ip.start
        part[start:start + fam.address_size] = zero
    return bytes(part)


def _parse_ban(fam: _Family, raw: bytes) -> InstalledBan | None:
    """The ban of an entry in floodd's chain; None when it is not exactly a rule floodd
    writes for the scope its comment names."""
    comment: str | None = None
    hops: list[int] = []
    qtype: int | None = None
    hop_match = fam.hop_match.encode()
    for name, data in _matches(fam, raw):
        if name == b"comment" and comment is None:
            comment = _comment_text(data)
        elif name == hop_match and len(data) >= 2 and data[0] == _HOP_NOT_EQUAL:
            hops.append(data[1])
        elif name == b"string" and qtype is None:
            qtype = _question_type(fam, data)
            if qtype is None:
                return None
        else:
            return None
    parsed = parse_ban_comment(comment) if comment is not None else None
    if parsed is None:
        return None
    rule, since, expires, scope = parsed
    ip = _ip_part(fam, raw)
    if ip != (fam.ip_udp if scope.udp_only else fam.ip_any) \
            or (qtype, tuple(hops)) != (scope.qtype, scope.except_hops):
        return None
    size = fam.address_size
    address = int.from_bytes(raw[fam.src:fam.src + size], "big")
    mask = int.from_bytes(raw[fam.smsk:fam.smsk + size], "big")
    prefix = mask.bit_count()
    if mask != ((1 << prefix) - 1) << (size * 8 - prefix):
        return None
    packets, nbytes = _COUNTERS.unpack_from(raw, fam.counters)
    return InstalledBan(network=fam.network_class((address & mask, prefix)), rule=rule,
                        since=since, expires=expires, packets=packets, bytes=nbytes,
                        scope=scope)


def _entry(fam: _Family, template: _Template, ban: Ban, packets: int,
           nbytes: int) -> ctypes.Array[ctypes.c_ubyte]:
    """A ban rule for libiptc, with the given counters."""
    buf = bytearray(template.raw)
    address, mask = ban.network.network_address.packed, ban.network.netmask.packed
    buf[fam.src:fam.src + len(address)] = address
    buf[fam.smsk:fam.smsk + len(mask)] = mask
    comment = ban_comment(ban).encode()[:_COMMENT_SIZE - 1]
    buf[template.comment:template.comment + _COMMENT_SIZE] = comment.ljust(_COMMENT_SIZE, b"\0")
    _COUNTERS.pack_into(buf, fam.counters, packets, nbytes)
    return _buffer(bytes(buf))
