"""nftables backend: bans are elements of sets in floodd's own table ``inet floodd``.

The ruleset floodd owns (nothing else is ever touched)::

    table inet floodd {
        set ban4 { type ipv4_addr; flags timeout; counter; }              # addresses
        set ban6 { type ipv6_addr; flags timeout; counter; }
        set ban4net { type ipv4_addr; flags interval, timeout; counter; } # prefixes
        set ban6net { type ipv6_addr; flags interval, timeout; counter; }
        chain input {
            type filter hook input priority filter - 10; policy accept;
            meta l4proto { tcp, udp } th dport 53 ip saddr @ban4 drop      # scope dns
            ... the same for ban6, ban4net, ban6net
        }
    }

With scope ``all`` the rules are plain ``ip saddr @ban4 drop``.  Each element carries its own
kernel timeout (the ban's expiry: the kernel alone ends a ban even if floodd is gone), its own
counter of dropped packets, and a comment holding the rule and times, so the kernel is the
only record of a ban: ``floodd since=1700000000 expires=1700000600 rule=query-flood``.

Addresses and prefixes live in separate sets because nft 1.0.6 deletes elements of an
interval set in quadratic time (removing 9,000 of 10,000 took 13.5 s, against 0.03 s from a
plain set).  Prefix bans are few; 1,000 deletions from a 1,000-prefix set took 0.15 s.  The
address rules come first, so an address banned inside a banned prefix keeps counting its own
packets and keeps its own expiry.  An interval set refuses overlapping elements, so
:func:`plan_commit` resolves prefix overlaps before anything reaches nft: a prefix inside an
already banned prefix is skipped, and a prefix ban replaces the prefixes it contains, taking
over their counters.

Every change is one ``nft -f -`` transaction fed on stdin (the text syntax: nft 1.0.6's JSON
input ignores element counters, which a replaced ban must carry over), planned against a
listing taken just before it (an element's counter and a prefix's overlaps must be read from
the kernel).  Replacing an element (a new expiry or rule) is a delete and an add in the same
transaction.  Reading is one ``nft -j list table inet floodd``.  Every ``nft`` runs with
floodd's command timeout.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
import shutil
import time
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from floodd.command import CommandTimeout, run
from floodd.errors import Failure, FlooddError
from floodd.enforce.firewall.comment import ban_comment, parse_ban_comment
from floodd.enforce.firewall.base import Ban, Buffered, Committed, InstalledBan, Network

# (IP version, is a prefix) -> set name; the order is the order of the drop rules
SETS = {(4, False): "ban4", (6, False): "ban6", (4, True): "ban4net", (6, True): "ban6net"}
CHAIN = "input"
RULE_COMMENT = "floodd: drop banned sources"
UNKNOWN_RULE = "(unknown)"
_TABLE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,31}$")


@dataclass(frozen=True)
class TableState:
    """What ``nft -j list table inet floodd`` showed (``exists`` False: no table)."""

    exists: bool
    sets: frozenset[str]
    drop_rules: frozenset[str]  # sets that a rule of the input chain drops packets from
    bans: tuple[InstalledBan, ...]

    @property
    def complete(self) -> bool:
        wanted = set(SETS.values())
        return self.exists and wanted <= self.sets and wanted <= self.drop_rules


ABSENT = TableState(False, frozenset(), frozenset(), ())


def parse_table(data: Mapping[str, Any], table: str, now: float) -> TableState:
    """Parse the JSON of ``nft -j list table inet TABLE`` (libnftables-json(5)).

    Elements are ``{"elem": {"val": ADDR | {"prefix": {"addr", "len"}}, "timeout": s,
    "expires": s, "comment": str, "counter": {"packets", "bytes"}}}``; ``timeout`` and
    ``expires`` are whole seconds (``expires``, the time left, is the ``remaining`` of the
    ban).  An element without floodd's comment (added by hand) is reported with rule
    ``(unknown)`` and times from its timeout.
    """
    sets: set[str] = set()
    drops: set[str] = set()
    bans: list[InstalledBan] = []
    exists = False
    for obj in data.get("nftables", ()):
        if "table" in obj and obj["table"].get("name") == table:
            exists = True
        elif "set" in obj and obj["set"].get("table") == table:
            s = obj["set"]
            sets.add(s["name"])
            if s["name"] in SETS.values():
                bans.extend(b for e in s.get("elem", ())
                            if (b := _parse_elem(e, now)) is not None)
        elif "rule" in obj and obj["rule"].get("table") == table \
                and obj["rule"].get("chain") == CHAIN:
            exprs = obj["rule"].get("expr", ())
            if any("drop" in e for e in exprs):
                for e in exprs:
                    right = e.get("match", {}).get("right")
                    if isinstance(right, str) and right.startswith("@"):
                        drops.add(right[1:])
    return TableState(exists, frozenset(sets), frozenset(drops), tuple(bans))


def _parse_elem(item: Any, now: float) -> InstalledBan | None:
    elem = item.get("elem", item) if isinstance(item, dict) else {"val": item}
    val = elem.get("val")
    if isinstance(val, str):
        network: Network = ipaddress.ip_network(val)
    elif isinstance(val, dict) and "prefix" in val:
        network = ipaddress.ip_network(f"{val['prefix']['addr']}/{val['prefix']['len']}")
    else:
        return None  # floodd only writes addresses and prefixes
    counter = elem.get("counter") or {}
    remaining = float(elem["expires"]) if "expires" in elem else None
    parsed = parse_ban_comment(elem.get("comment", ""))
    if parsed is not None:
        rule, since, expires = parsed
    else:
        timeout = elem.get("timeout")
        expires = now + elem["expires"] if "expires" in elem else math.inf
        since = now - (timeout - elem.get("expires", 0)) if timeout is not None else now
        rule = UNKNOWN_RULE
    return InstalledBan(network, rule, since, expires,
                        int(counter.get("packets", 0)), int(counter.get("bytes", 0)), remaining)


@dataclass(frozen=True)
class Transaction:
    """One transaction: elements to delete, then elements to add (with carried counters)."""

    delete: tuple[Network, ...]
    add: tuple[tuple[Ban, int, int], ...]  # ban, packets, bytes to start its counter at

    def committed(self) -> Committed:
        """What the kernel holds differently once the transaction is applied."""
        added = tuple(ban for ban, _, _ in self.add)
        readded = {ban.network for ban in added}
        return Committed(added, tuple(n for n in self.delete if n not in readded))


def set_of(network: Network) -> str:
    """The set a ban of ``network`` lives in."""
    return SETS[network.version, network.prefixlen < network.max_prefixlen]


def element(network: Network) -> str:
    """nft's spelling: a plain address for a /32 or /128 (nft reads ``/32`` as a prefix)."""
    if network.prefixlen == network.max_prefixlen:
        return str(network.network_address)
    return str(network)


def plan_commit(pending: Mapping[Network, Ban | None],
                installed: Iterable[InstalledBan]) -> Transaction:
    """Turn buffered changes (``None``: unban) into a transaction the sets accept."""
    current = {b.network: b for b in installed}
    delete: dict[Network, None] = {}  # a dict keeps the order
    remaining = set(current)
    for net, ban in pending.items():
        if ban is None and net in current:
            delete[net] = None
            remaining.discard(net)
    adds: list[tuple[Ban, int, int]] = []
    prefix_lens: dict[int, set[int]] = {4: set(), 6: set()}
    for net in remaining:
        if net.prefixlen < net.max_prefixlen:
            prefix_lens[net.version].add(net.prefixlen)
    # widest first: a prefix is in `remaining` before any prefix it contains is looked at,
    # so everything _replaced() finds is already in the kernel
    for ban in sorted((b for b in pending.values() if b is not None),
                      key=lambda b: (b.network.version, b.network.prefixlen)):
        net = ban.network
        if _covered(net, remaining, prefix_lens[net.version]):
            continue
        packets = bytes_ = 0
        for old in _replaced(net, remaining):
            remaining.discard(old)
            delete[old] = None
            packets += current[old].packets
            bytes_ += current[old].bytes
        remaining.add(net)
        if net.prefixlen < net.max_prefixlen:
            prefix_lens[net.version].add(net.prefixlen)
        adds.append((ban, packets, bytes_))
    return Transaction(tuple(delete), tuple(adds))


def _covered(net: Network, remaining: set[Network], prefix_lens: set[int]) -> bool:
    """Whether a new prefix lies inside a banned prefix (the interval set would refuse it)."""
    if net.prefixlen == net.max_prefixlen:
        return False  # addresses are in their own set: no overlap to refuse
    return any(net.supernet(new_prefix=length) in remaining
               for length in prefix_lens if length < net.prefixlen)


def _replaced(net: Network, remaining: set[Network]) -> list[Network]:
    """Elements a ban of ``net`` replaces: ``net`` itself and, for a prefix, the banned
    prefixes inside it."""
    if net.prefixlen == net.max_prefixlen:
        return [net] if net in remaining else []
    shift = net.max_prefixlen - net.prefixlen
    base = int(net.network_address) >> shift
    return [n for n in remaining
            if n.version == net.version and net.prefixlen <= n.prefixlen < n.max_prefixlen
            and int(n.network_address) >> shift == base]


def render_commit(plan: Transaction, table: str, now: float) -> str:
    """The ``nft -f`` script for a plan (empty when there is nothing to do)."""
    gone: dict[str, list[str]] = {}
    for net in plan.delete:
        gone.setdefault(set_of(net), []).append(element(net))
    new: dict[str, list[str]] = {}
    for ban, packets, bytes_ in plan.add:
        timeout_ms = max(1000, round((ban.expires - now) * 1000))
        counter = f" counter packets {packets} bytes {bytes_}" if packets or bytes_ else ""
        new.setdefault(set_of(ban.network), []).append(
            f'{element(ban.network)}{counter} timeout {timeout_ms}ms '
            f'comment "{ban_comment(ban)}"')
    lines = [f"delete element inet {table} {name} {{ {', '.join(elems)} }}"
             for name, elems in gone.items()]
    lines += [f"add element inet {table} {name} {{ {', '.join(elems)} }}"
              for name, elems in new.items()]
    return "\n".join(lines) + "\n" if lines else ""


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
        super().__init__()

    def configure(self, ports: Sequence[int], protocols: Sequence[str]) -> None:
        if self.scope == "dns" and (not ports or not protocols):
            raise FlooddError("firewall scope dns needs at least one port and protocol")
        self.ports = tuple(ports)
        self.protocols = tuple(protocols)

    def _match(self) -> str:
        if self.scope == "all":
            return ""
        protos = sorted(set(self.protocols))
        ports = sorted(set(self.ports))
        proto = protos[0] if len(protos) == 1 else "{ " + ", ".join(protos) + " }"
        port = str(ports[0]) if len(ports) == 1 else "{ " + ", ".join(map(str, ports)) + " }"
        return f"meta l4proto {proto} th dport {port} "

    def setup_script(self) -> str:
        t = self.table
        match = self._match()
        lines = [f"add table inet {t}"]
        for (version, prefix), name in SETS.items():
            flags = "interval, timeout" if prefix else "timeout"
            lines.append(f"add set inet {t} {name} "
                         f"{{ type ipv{version}_addr; flags {flags}; counter; }}")
        lines += [
            f"add chain inet {t} {CHAIN} "
            "{ type filter hook input priority filter - 10; policy accept; }",
            # the rules follow the configuration: replaced in the same transaction
            f"flush chain inet {t} {CHAIN}",
        ]
        for (version, _), name in SETS.items():
            ip = "ip" if version == 4 else "ip6"
            lines.append(f'add rule inet {t} {CHAIN} {match}{ip} saddr @{name} drop '
                         f'comment "{RULE_COMMENT}"')
        return "\n".join(lines) + "\n"

    def setup(self) -> None:
        _nft(["-f", "-"], self.setup_script())

    def commit(self) -> Committed:
        """One listing (to plan against what the kernel holds), then one transaction;
        retried once on a fresh listing if nft refuses it.

        A retry covers the race with the kernel: an element whose timeout fires between the
        listing and the transaction makes its delete fail.  An nft that hangs is not tried
        again.  A prefix inside a banned prefix is not added (see :func:`plan_commit`): it
        is missing from the result's ``added``.
        """
        pending = self._take()
        if not pending:
            return Committed((), ())
        try:
            return self._apply(pending)
        except CommandTimeout:
            raise
        except FlooddError:
            return self._apply(pending)

    def _apply(self, pending: Mapping[Network, Ban | None]) -> Committed:
        state = self.state()
        if not state.exists:
            raise Failure(f"nftables table inet {self.table} does not exist "
                              "(the firewall is not set up)")
        plan = plan_commit(pending, state.bans)
        script = render_commit(plan, self.table, time.time())
        if script:
            _nft(["-f", "-"], script)
        return plan.committed()

    def state(self) -> TableState:
        """Table, sets, drop rules and bans in one ``nft -j list table`` call."""
        proc = _nft(["-j", "list", "table", "inet", self.table], missing_ok=True)
        if proc is None:
            return ABSENT
        try:
            data = json.loads(proc)
        except json.JSONDecodeError:
            raise Failure("nft -j list table printed something that is not JSON") from None
        return parse_table(data, self.table, time.time())

    def list(self) -> list[InstalledBan]:
        return list(self.state().bans)

    def present(self) -> bool:
        return self.state().complete

    def teardown(self) -> None:
        # adding the table first makes the delete succeed when it does not exist
        _nft(["-f", "-"], f"add table inet {self.table}\ndelete table inet {self.table}\n")


def _nft(args: list[str], script: str | None = None, missing_ok: bool = False) -> str | None:
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
