"""The iptables firewall backend, driven through python-iptables (libiptc).

What floodd keeps in the kernel, in the filter table of iptables and of ip6tables::

    INPUT   -p udp -m multiport --dports 53 -m comment --comment "floodd udp dports=53" -j FLOODD
            -p tcp -m multiport --dports 53 -m comment --comment "floodd tcp dports=53" -j FLOODD
    FLOODD  -s 198.51.100.7/32 -m comment --comment
                "floodd since=1764000000 expires=1764000600 rule=query-flood" -j DROP
            ... one rule per ban

The DNS match (protocols and ports) lives in the jump rules at the top of INPUT, so a
ban is exactly one rule whatever the ports and protocols: N bans cost N rules, not one
per protocol each.  Scope ``all`` uses one jump without protocol or port match
(comment ``floodd all``).  The ban comment is the one the nftables backend gives its set
elements (rule name, start and expiry in whole seconds), so the kernel alone is the
record of what is banned and a restarted floodd adopts it.  Nothing expires a rule in
the kernel: floodd unbans at expiry.

libiptc only knows the *legacy* xtables: on a host where ``iptables`` is the nf_tables
variant these rules are enforced, but only ``iptables-legacy -nvL`` shows them.

libiptc edits a copy of the whole table and its commit replaces the whole table in the
kernel.  python-iptables does not take the xtables lock, so floodd takes it itself
(``/run/xtables.lock`` or ``$XTABLES_LOCKFILE``, as iptables-legacy does) from reading
the table to committing it: a change iptables-legacy makes in between is never lost.

Speed: a python-iptables ``Rule`` costs ~0.2 ms to build and as much to read back, so
10,000 bans took ~2 s each way.  Ban rules are therefore made by patching the source,
mask, comment and counters of one template entry that python-iptables builds, and read
back by parsing raw entries at the offsets of python-iptables' own ctypes structures:
adding, listing or removing 10,000 bans then takes about 0.1 s each.  The commit itself
(libiptc compiling the table, the kernel swapping it in) is ~25 ms of that.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import ipaddress
import os
import re
import struct
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Iterator, Sequence

from floodd.errors import Failure, FlooddError
from floodd.enforce.firewall.base import Ban, Buffered, Committed, InstalledBan, Network
from floodd.enforce.firewall.comment import ban_comment, parse_ban_comment

PROTOCOLS = ("udp", "tcp")
VERSIONS = (4, 6)
SCOPES = ("dns", "all")
MAX_PORTS = 15  # the multiport match's limit
LOCK_WAIT = 5.0  # seconds to wait for the xtables lock

_MARK = "floodd"
_TOOLS = {4: "iptables-legacy", 6: "ip6tables-legacy"}  # what shows the rules, for messages
_CHAIN_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,27}")
# python-iptables formats libiptc's message, a bytes object, with %s: "b'...'".
_BYTES_REPR = re.compile(r"""\bb(['"])(.*?)\1""")
_COUNTERS = struct.Struct("=QQ")  # struct xt_counters: packets, bytes
_COMMENT_SIZE = 256  # struct xt_comment_info: char comment[256], NUL-terminated
_U16 = struct.Struct("=H")


@dataclass(frozen=True)
class _Family:
    """One address family: the byte layout of its entries and its ban rule template.

    An entry is ``struct ipt_entry`` / ``struct ip6t_entry`` (source, source mask,
    target_offset, counters, ...), then its matches from ``entry_size`` on, each a
    ``struct xt_entry_match`` (u16 size, name, revision: ``match_header`` bytes) and
    its data, then the target at ``target_offset``.
    """

    version: int
    network_class: type[ipaddress.IPv4Network] | type[ipaddress.IPv6Network]
    address_size: int
    rule_class: Any
    src: int
    smsk: int
    target_offset: int
    counters: int
    entry_size: int
    match_header: int
    template: bytes  # a ban rule: source, comment, DROP
    comment: int  # offset of the comment text in an entry laid out like template


class IptablesBackend(Buffered):
    """floodd's chain in the legacy iptables and ip6tables filter tables."""

    name = "iptables"

    def __init__(self, ports: Sequence[int], protocols: Sequence[str], scope: str = "dns",
                 chain: str = "FLOODD") -> None:
        if scope not in SCOPES:
            raise FlooddError(f"firewall scope must be one of {', '.join(SCOPES)}, got {scope!r}")
        if not _CHAIN_NAME.fullmatch(chain):
            raise FlooddError(f"invalid iptables chain name {chain!r}")
        self._scope = scope
        self._chain = chain
        self.configure(ports, protocols)
        self._iptc = _import_iptc()
        self._layouts: dict[int, _Family] = {}
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
                table.commit()  # libiptc commits nothing when nothing changed

    def commit(self) -> Committed:
        """One table commit per address family (IPv4, then IPv6).

        When the IPv6 one fails the IPv4 one stays applied; either way nothing stays
        buffered.
        """
        pending = self._take()
        added: list[Ban] = []
        removed: list[Network] = []
        for version in VERSIONS:
            changes = {n: b for n, b in pending.items() if n.version == version}
            if not changes:
                continue
            with self._session(version, "commit") as (fam, table):
                if table.is_chain(self._chain):
                    gone = self._apply(fam, table, changes)
                    table.commit()
                elif any(changes.values()):
                    raise Failure(f"{_TOOLS[version]} chain {self._chain} is missing "
                                      "(removed from outside?): run setup first")
                else:
                    gone = ()
            added += [b for b in changes.values() if b is not None]
            removed += gone
        return Committed(tuple(added), tuple(removed))

    def present(self) -> bool:
        for version in VERSIONS:
            with self._session(version, "check") as (fam, table):
                if not table.is_chain(self._chain):
                    return False
                found = [comment for _, comment in self._installed_jumps(fam, table)]
                if found != [c for _, c in self._jumps]:
                    return False
        return True

    def teardown(self) -> None:
        for version in VERSIONS:
            with self._session(version, "teardown") as (fam, table):
                for index, _ in reversed([*self._installed_jumps(fam, table)]):
                    self._delete(table, "INPUT", index)
                if table.is_chain(self._chain):
                    table.flush_entries(self._chain)
                    table.delete_chain(self._chain)
                table.commit()

    def list(self) -> list[InstalledBan]:
        bans: dict[Network, InstalledBan] = {}
        for version in VERSIONS:
            with self._session(version, "list") as (fam, table):
                if not table.is_chain(self._chain):
                    continue
                for _, ban in self._installed_bans(fam, table):
                    seen = bans.get(ban.network)
                    bans[ban.network] = ban if seen is None else replace(
                        seen, packets=seen.packets + ban.packets, bytes=seen.bytes + ban.bytes)
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

    def _apply(self, fam: _Family, table: Any,
               changes: dict[Network, Ban | None]) -> Sequence[Network]:
        """Replace, delete and append ban rules; a replaced ban keeps its counters.
        The networks whose rules are deleted."""
        installed: dict[Network, list[tuple[int, InstalledBan]]] = {}
        for index, ban in self._installed_bans(fam, table):
            installed.setdefault(ban.network, []).append((index, ban))
        deletes: list[int] = []
        gone: list[Network] = []
        for network, new in changes.items():
            rules = installed.get(network, [])
            if new is None:
                deletes += [index for index, _ in rules]
                if rules:
                    gone.append(network)
            elif not rules:
                table.append_entry(self._chain, _entry(fam, new, 0, 0))
            else:
                packets = sum(ban.packets for _, ban in rules)
                nbytes = sum(ban.bytes for _, ban in rules)
                table.replace_entry(self._chain, _entry(fam, new, packets, nbytes), rules[0][0])
                deletes += [index for index, _ in rules[1:]]
        # Appends went to the end and replacements kept their place: indexes still hold.
        for index in sorted(deletes, reverse=True):
            self._delete(table, self._chain, index)
        return gone

    def _installed_bans(self, fam: _Family, table: Any) -> Iterator[tuple[int, InstalledBan]]:
        """(position, ban) of every rule in floodd's chain that carries a ban comment."""
        for index, entry in enumerate(_entries(table, self._chain)):
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
        rule_class, network_class = iptc.Rule, ipaddress.IPv4Network
    else:
        entry, ip_field, ip = (iptc.ip6tc.ip6t_entry, iptc.ip6tc.ip6t_entry.ipv6,
                               iptc.ip6tc.ip6t_ip6)
        rule_class, network_class = iptc.Rule6, ipaddress.IPv6Network
    rule = rule_class()
    rule.create_match("comment").comment = _MARK
    rule.target = rule.create_target("DROP")
    template = bytes(rule.rule)
    fam = _Family(version=version, network_class=network_class,
                  address_size=4 if version == 4 else 16, rule_class=rule_class,
                  src=ip_field.offset + ip.src.offset, smsk=ip_field.offset + ip.smsk.offset,
                  target_offset=entry.target_offset.offset, counters=entry.counters.offset,
                  entry_size=iptc.xtables.xt_align(ctypes.sizeof(entry)),
                  match_header=ctypes.sizeof(iptc.xtables.xt_entry_match),
                  template=template, comment=0)
    comment = _comment_offset(fam, template)
    assert comment is not None  # the template's one match is its comment
    return replace(fam, comment=comment)


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


def _comment_offset(fam: _Family, raw: bytes) -> int | None:
    """Where the text of the entry's comment match starts, if it has one."""
    offset = fam.entry_size
    end = _U16.unpack_from(raw, fam.target_offset)[0]
    while offset + fam.match_header <= end:
        size = _U16.unpack_from(raw, offset)[0]
        if raw[offset + 2:offset + fam.match_header - 1].split(b"\0", 1)[0] == b"comment":
            return offset + fam.match_header
        if size < fam.match_header:
            return None
        offset += size
    return None


def _comment(fam: _Family, raw: bytes) -> str | None:
    offset = _comment_offset(fam, raw)
    if offset is None:
        return None
    return raw[offset:offset + _COMMENT_SIZE].split(b"\0", 1)[0].decode("utf-8", "replace")


def _parse_ban(fam: _Family, raw: bytes) -> InstalledBan | None:
    comment = _comment(fam, raw)
    parsed = parse_ban_comment(comment) if comment is not None else None
    if parsed is None:
        return None
    size = fam.address_size
    address = int.from_bytes(raw[fam.src:fam.src + size], "big")
    mask = int.from_bytes(raw[fam.smsk:fam.smsk + size], "big")
    prefix = mask.bit_count()
    if mask != ((1 << prefix) - 1) << (size * 8 - prefix):
        return None
    packets, nbytes = _COUNTERS.unpack_from(raw, fam.counters)
    rule, since, expires = parsed
    return InstalledBan(network=fam.network_class((address & mask, prefix)), rule=rule,
                        since=since, expires=expires, packets=packets, bytes=nbytes)


def _entry(fam: _Family, ban: Ban, packets: int, nbytes: int) -> ctypes.Array[ctypes.c_ubyte]:
    """A ban rule for libiptc, with the given counters."""
    buf = bytearray(fam.template)
    address, mask = ban.network.network_address.packed, ban.network.netmask.packed
    buf[fam.src:fam.src + len(address)] = address
    buf[fam.smsk:fam.smsk + len(mask)] = mask
    comment = ban_comment(ban).encode()[:_COMMENT_SIZE - 1]
    buf[fam.comment:fam.comment + _COMMENT_SIZE] = comment.ljust(_COMMENT_SIZE, b"\0")
    _COUNTERS.pack_into(buf, fam.counters, packets, nbytes)
    return (ctypes.c_ubyte * len(buf)).from_buffer(buf)
