"""The ipset sets holding the iptables backend's whole-source and UDP-only bans.

Eight sets, named after floodd's chain (``FLOODD`` -> ``floodd-...``), each created with
``timeout 0 counters comment`` (entries carry their own timeout, a counter of the packets
they matched, and a comment)::

    floodd-ban4     hash:ip  family inet     whole sources, one address each
    floodd-ban4net  hash:net family inet     whole sources, prefixes
    floodd-udp4     hash:ip  family inet     UDP only
    floodd-udp4net  hash:net family inet
    floodd-ban6 ... floodd-udp6net           the same for family inet6

iptables matches each set with one rule (``-m set --match-set NAME src``), so a packet
costs a hash lookup per set whatever the number of bans.  An entry's comment is the ban
comment every backend writes (:mod:`floodd.enforce.firewall.comment`); its scope is the
set's.  Its timeout is the time left until the ban's expiry, rounded up to whole seconds:
the kernel ends the ban even if floodd is gone.  ipset's longest timeout is 2,147,483 s
(24.8 days); a longer ban, or one without an end, gets timeout 0 (none), and floodd
unbans it at its expiry.  A /0 cannot be an entry of a hash:net set: such a ban is not
taken.

Changes are one ``ipset -exist restore`` batch fed on stdin: ``add`` of an entry already
there replaces its timeout and comment and keeps its counters unless the line gives
them; ``del`` of one that is not there is no error.  Reading is one ``ipset restore``
of ``save NAME`` lines, whose output is ``ipset save``'s format::

    add floodd-ban4 198.51.100.7 timeout 599 packets 25 bytes 1550 comment "floodd since=..."

(``timeout`` is the time left, whole seconds, rounded down; a /32 or /128 of a hash:net
set is shown without its length).  Comments cannot hold ``"``, which the ban comment
never has (it percent-encodes it).  A failed batch stops at its first refused line;
the lines before it may be applied.
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass
from typing import Iterable

from floodd.command import run
from floodd.errors import Failure
from floodd.enforce.firewall.base import Ban, InstalledBan, Network
from floodd.enforce.firewall.comment import UNKNOWN_RULE, ban_comment, parse_ban_comment
from floodd.scope import UDP_ONLY, WHOLE, Scope, Target

MAX_TIMEOUT = 2_147_483  # seconds: ipset refuses longer timeouts
MAX_ENTRIES = 1_048_576  # per set (floodd's firewall.max_bans is at most 1,000,000)
VERSIONS = (4, 6)
_FAMILY = {4: "inet", 6: "inet6"}
_KINDS = {"ban": WHOLE, "udp": UDP_ONLY}  # set kind -> the scope of its bans
_SAVED = re.compile(r'^add (\S+) (\S+)((?: (?:timeout|packets|bytes) \d+)*)'
                    r'(?: comment "([^"]*)")?$')
_NUMBERS = re.compile(r" (timeout|packets|bytes) (\d+)")
_ERROR = re.compile(r"^ipset v[\d.]+: (?:Error in line (\d+): )?")


@dataclass(frozen=True)
class BanSet:
    """One of floodd's sets: what its bans drop, their IP version, prefixes or not."""

    name: str
    scope: Scope
    version: int
    prefixes: bool

    @property
    def create(self) -> str:
        """Its ``create`` line (restore format)."""
        kind = "hash:net" if self.prefixes else "hash:ip"
        return (f"create {self.name} {kind} family {_FAMILY[self.version]} "
                f"maxelem {MAX_ENTRIES} timeout 0 counters comment")

    def entry(self, network: Network) -> str:
        return str(network) if self.prefixes else str(network.network_address)


def set_scope(scope: Scope) -> bool:
    """Whether bans of ``scope`` live in a set (whole source, UDP only); the others are
    rules of their own."""
    return scope in (WHOLE, UDP_ONLY)


class BanSets:
    """floodd's sets, named ``PREFIX-ban4`` ... (see the module docstring), and the
    ``ipset`` command that changes and reads them."""

    def __init__(self, prefix: str, ipset: str) -> None:
        self.ipset = ipset
        self.sets = tuple(BanSet(f"{prefix}-{kind}{version}{'net' if net else ''}", scope,
                                 version, net)
                          for version in VERSIONS for kind, scope in _KINDS.items()
                          for net in (False, True))
        self._by_name = {s.name: s for s in self.sets}

    def of(self, target: Target) -> BanSet:
        """The set a ban of ``target`` (of a set scope) lives in."""
        network, scope = target
        prefixes = network.prefixlen < network.max_prefixlen
        for s in self.sets:
            if (s.scope, s.version, s.prefixes) == (scope, network.version, prefixes):
                return s
        raise ValueError(f"no set holds bans of {target}")

    # --- batches (pure) ------------------------------------------------------------
    def changes(self, changes: Iterable[tuple[Target, Ban | None, tuple[int, int] | None]],
                now: float) -> tuple[str, list[Ban]]:
        """The restore batch for ``(target, ban or None to remove, counters to start the
        entry at or None to keep them)``, and the bans it adds (a /0 cannot be added)."""
        lines = []
        added = []
        for target, ban, counters in changes:
            s = self.of(target)
            entry = s.entry(target.network)
            if ban is None:
                lines.append(f"del {s.name} {entry}")
                continue
            if target.network.prefixlen == 0:
                continue
            line = f"add {s.name} {entry} timeout {timeout(ban.expires, now)}"
            if counters is not None:
                line += f" packets {counters[0]} bytes {counters[1]}"
            lines.append(f'{line} comment "{ban_comment(ban)}"')
            added.append(ban)
        return "".join(f"{line}\n" for line in lines), added

    def parse(self, saved: str, now: float) -> list[InstalledBan]:
        """The bans in ``ipset save`` output: entries of floodd's sets, others ignored."""
        bans = []
        for line in saved.splitlines():
            m = _SAVED.match(line)
            s = self._by_name.get(m.group(1)) if m else None
            if m is None or s is None:
                continue
            try:
                network = ipaddress.ip_network(m.group(2))
            except ValueError:
                continue
            if network.version != s.version:
                continue
            numbers = {k: int(v) for k, v in _NUMBERS.findall(m.group(3))}
            left = numbers.get("timeout", 0)
            remaining = float(left) if left else None
            parsed = parse_ban_comment(m.group(4)) if m.group(4) is not None else None
            if parsed is not None and parsed[3] == s.scope:
                rule, since, expires, _ = parsed
            else:
                rule, since = UNKNOWN_RULE, now
                expires = now + remaining if remaining is not None else math.inf
            bans.append(InstalledBan(network, rule, since, expires,
                                     numbers.get("packets", 0), numbers.get("bytes", 0),
                                     remaining, s.scope))
        return bans

    # --- the kernel ----------------------------------------------------------------
    def create(self) -> None:
        """Create the sets that are missing; Failure if one exists with other settings."""
        self._restore("".join(f"{s.create}\n" for s in self.sets), "create")

    def existing(self) -> set[str]:
        """Which of floodd's sets exist."""
        proc = run([self.ipset, "list", "-n"])
        if proc.returncode != 0:
            raise Failure(f"ipset list: {_message(proc.stderr, '')}")
        return {name for name in proc.stdout.split() if name in self._by_name}

    def destroy(self) -> None:
        """Destroy floodd's sets and every ban in them (none may be matched any more)."""
        names = self.existing()
        if names:
            self._restore("".join(f"destroy {s.name}\n" for s in self.sets
                                  if s.name in names), "destroy")

    def apply(self, batch: str) -> None:
        """Run a batch of :meth:`changes`."""
        if batch:
            self._restore(batch, "restore")

    def read(self, now: float) -> list[InstalledBan]:
        """Every ban in floodd's sets, with its counters and time left."""
        names = [s.name for s in self.sets]
        proc = run([self.ipset, "restore"], input="".join(f"save {n}\n" for n in names))
        if proc.returncode != 0:
            # A set is missing (never set up, or destroyed from outside): read the others.
            there = self.existing()
            proc = run([self.ipset, "restore"],
                       input="".join(f"save {n}\n" for n in names if n in there))
            if proc.returncode != 0:
                raise Failure(f"ipset save: {_message(proc.stderr, '')}")
        return self.parse(proc.stdout, now)

    def _restore(self, batch: str, action: str) -> None:
        proc = run([self.ipset, "-exist", "restore"], input=batch)
        if proc.returncode != 0:
            raise Failure(f"ipset {action}: {_message(proc.stderr, batch)}")


def timeout(expires: float, now: float) -> int:
    """An entry's timeout for a ban ending at unix time ``expires``: the seconds left,
    rounded up (at least 1), or 0 (none) beyond ipset's longest timeout."""
    if math.isinf(expires):
        return 0
    left = max(1, math.ceil(expires - now))
    return left if left <= MAX_TIMEOUT else 0


def _message(stderr: str, batch: str) -> str:
    """ipset's complaint in one line, with the start of the batch line it names
    (command, set, entry)."""
    lines = batch.splitlines()
    said = []
    for line in stderr.splitlines():
        m = _ERROR.match(line)
        text = line[m.end():].strip() if m else line.strip()
        if m and m.group(1) and 0 < int(m.group(1)) <= len(lines):
            text += f" ({' '.join(lines[int(m.group(1)) - 1].split()[:3])})"
        if text:
            said.append(text)
    return "; ".join(said) or "failed"
