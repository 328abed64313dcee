"""The kernel's own first response: per source and hop value, a rate meter in nftables that
drops a flood the moment it runs far over a per-source rule's rate (``fast_drop``).

floodd's decision needs the capture, the counting and a commit between a threshold
crossing and the kernel's drop: milliseconds on a quiet box, more when the flood itself
takes the CPU.  A flood far over a rule's rate can be told in the kernel alone, so the
kernel drops it at once, and floodd's own ban (whose scope the trust decision chose)
follows and takes over.  The ruleset, in a table of its own (``inet floodd_fast``) so
that listing floodd's bans never reads the meters, which a forged random-source flood
fills; IPv6 has the same with ``6``, ``ip6 saddr`` and ``ip6 hoplimit``::

    table inet floodd_fast {
        set spare4 { type ipv4_addr; flags interval; auto-merge; }     # never dropped
        set meter4 { typeof ip saddr . ip ttl; size 65536; flags dynamic, timeout;
                     timeout 1s; }                                       # one per rule
        set over4 { typeof ip saddr . ip ttl; size 10000; flags dynamic, timeout;
                    timeout 10s; }                                       # dropped now
        set dropped4 { typeof ip saddr . ip ttl; size 20000; flags dynamic, timeout;
                       timeout 10s; counter; }                           # what was dropped
        chain input {
            type filter hook input priority filter + 5; policy accept;
            ip saddr @spare4 return
            meta nfproto ipv4 udp dport 53 update @meter4 { ip saddr . ip ttl limit rate
                over 5000/second burst 5000 packets } update @over4 { ip saddr . ip ttl }
            udp dport 53 ip saddr . ip ttl @over4 update @dropped4 { ip saddr . ip ttl }
            udp dport 53 ip saddr . ip ttl @over4 drop
        }
    }

The chain comes after floodd's bans (nftables' ``inet floodd`` at priority filter - 10,
iptables' INPUT at filter): a banned source's packets are dropped, and counted, by its
ban, and the meters see only what no ban drops.

Each meter element is a token bucket of ``burst`` packets refilled at ``rate``, for one
source address and hop value; a packet finding it empty is over, and puts (or keeps) the
pair in ``over4`` for ``hold`` seconds: from then until ``hold`` after the pair last ran
over the rate, its UDP queries are dropped.  ``dropped4`` counts them per pair, once
each (a set's counter counts every update and every match, so the meter rule must not
update the counted set), and is what :meth:`KernelFastDrop.dropped` reads.

Why it never drops what the rule would not ban.  For a rule of ``threshold`` packets in
``window`` seconds the meter has ``burst = threshold`` and ``rate >= factor * threshold
/ window`` with ``factor >= 1``.  A bucket runs empty only when some interval of length
``d`` brought more than ``burst + rate * d`` packets; if ``d <= window`` that is more than
the threshold within one window; if longer, the interval splits into ``ceil(d / window)
<= 1 + d / window`` windows holding more than ``threshold * (1 + d / window)`` packets
together, so one of them holds more than the threshold.  Either way the rule's own count
goes over: the kernel acts only on floods the rule would ban, and only those far over its
rate (``factor`` times).  Its reach is bounded: UDP to the DNS ports only (TCP, whose
sources completed a handshake, is never touched), one source and one hop value per pair
(a forged flood hides the real client only if it also arrives with the client's own TTL),
at most ``max_sources`` pairs at once (``over4`` is full: no more are added), ``hold``
seconds after the flood stops running over the rate; the spare sets hold the whitelist,
this host's addresses and loopback.

An idle meter element outlives its bucket's refill (``burst / rate`` seconds) by at most a
second, so a forged random-source flood fills ``meter4`` with elements that soon go; a
real flood keeps its own element alive with every packet.  When the meter is full, a new
pair is not metered (the rule does not match): floodd's own decision still sees it.
"""

from __future__ import annotations

import ipaddress
import json
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from floodd.config import MATCH_ALL, Config, FastDropConfig, Network, Rule
from floodd.enforce.firewall.nftables import delete_table, element, nft, port_match
from floodd.errors import Failure

TABLE = "floodd_fast"
_FAMILY = {4: ("ip", "ip ttl", "ipv4_addr"), 6: ("ip6", "ip6 hoplimit", "ipv6_addr")}
# nft's rate units, in seconds, the shortest first.
_UNITS = (("second", 1), ("minute", 60), ("hour", 3600), ("day", 86400))
PRECISE = 100  # a rate is given in the shortest unit in which it is at least this


@dataclass(frozen=True)
class Meter:
    """One per-source rule's meter: ``rate`` packets per ``unit``, a bucket of ``burst``."""

    rule: str
    rate: int
    unit: str
    burst: int
    timeout: int  # seconds an idle element lives: its bucket is full again by then

    @property
    def per_second(self) -> float:
        return self.rate / dict(_UNITS)[self.unit]


@dataclass(frozen=True)
class FastDropped:
    """A (source, hop value) pair the kernel dropped in the last ``hold`` seconds."""

    network: Network  # a /32 or /128
    hop: int  # IPv4 TTL / IPv6 hop limit
    packets: int  # dropped since the pair first ran over
    bytes: int
    idle: float  # seconds since its last dropped packet (at most hold)


def meter_rules(config: Config) -> list[Rule]:
    """The rules a fast drop can stand in for: per source, every query, banning, without a
    rotating-source guard (the kernel cannot count every source together)."""
    return [r for r in config.rules if r.aggregate == "source" and r.match == MATCH_ALL
            and r.action == "ban" and r.total_threshold is None]


def meters(config: Config) -> list[Meter]:
    """A meter per rule of :func:`meter_rules` (none when ``fast_drop.factor`` is 0)."""
    factor = config.fast_drop.factor
    if not factor:
        return []
    out = []
    for rule in meter_rules(config):
        per_second = factor * rule.threshold / rule.window
        # rounded up, in the shortest unit that keeps it within 1%: never below the rule's
        # rate times the factor (see the module docstring)
        unit, seconds = next(((u, s) for u, s in _UNITS if per_second * s >= PRECISE),
                             _UNITS[-1])
        rate = math.ceil(per_second * seconds - 1e-9)
        out.append(Meter(rule.name, rate, unit, rule.threshold,
                         math.ceil(rule.threshold / per_second) + 1))
    return out


def spare_script(spared: Iterable[Network], table: str = TABLE) -> str:
    """Replace the spare sets' elements with ``spared`` (one transaction)."""
    lines = []
    nets = list(spared)
    for version in (4, 6):
        lines.append(f"flush set inet {table} spare{version}")
        elems = [element(n) for n in nets if n.version == version]
        if elems:
            lines.append(f"add element inet {table} spare{version} {{ {', '.join(elems)} }}")
    return "\n".join(lines) + "\n"


def setup_script(meter_list: Sequence[Meter], settings: FastDropConfig, ports: Sequence[int],
                 spared: Iterable[Network], table: str = TABLE) -> str:
    """The whole table, replacing any there (one transaction: meters start empty)."""
    port = port_match(ports)
    hold = math.ceil(settings.hold)
    lines = [delete_table(table) + f"add table inet {table}"]
    rules = [f"add chain inet {table} input "
             "{ type filter hook input priority filter + 5; policy accept; }"]
    for version in (4, 6):
        ip, hop, addr = _FAMILY[version]
        key = f"{ip} saddr . {hop}"
        lines.append(f"add set inet {table} spare{version} "
                     f"{{ type {addr}; flags interval; auto-merge; }}")
        rules.append(f"add rule inet {table} input {ip} saddr @spare{version} return")
        for i, m in enumerate(meter_list):
            lines.append(f"add set inet {table} meter{version}_{i} {{ typeof {key}; "
                         f"size {settings.meter_size}; flags dynamic, timeout; "
                         f"timeout {m.timeout}s; }}")
            rules.append(f"add rule inet {table} input meta nfproto ipv{version} "
                         f"udp dport {port} update @meter{version}_{i} {{ {key} limit rate over "
                         f"{m.rate}/{m.unit} burst {m.burst} packets }} "
                         f'update @over{version} {{ {key} }} comment "{m.rule}"')
        lines += [f"add set inet {table} over{version} {{ typeof {key}; "
                  f"size {settings.max_sources}; flags dynamic, timeout; timeout {hold}s; }}",
                  f"add set inet {table} dropped{version} {{ typeof {key}; "
                  f"size {2 * settings.max_sources}; flags dynamic, timeout; "
                  f"timeout {hold}s; counter; }}"]
        rules += [f"add rule inet {table} input udp dport {port} {key} @over{version} "
                  f"update @dropped{version} {{ {key} }}",
                  f"add rule inet {table} input udp dport {port} {key} @over{version} drop"]
    return "\n".join(lines + rules) + "\n" + spare_script(spared, table)


def parse_dropped(data: Mapping[str, Any], hold: float) -> list[FastDropped]:
    """The pairs of one ``nft -j list set inet TABLE droppedN`` (libnftables-json(5)):
    elements ``{"elem": {"val": {"concat": [ADDRESS, HOP]}, "expires": s, "counter":
    {"packets", "bytes"}}}``; anything else is left out."""
    out = []
    for obj in data.get("nftables", ()):
        for item in obj.get("set", {}).get("elem", ()) if isinstance(obj, dict) else ():
            elem = item.get("elem", item) if isinstance(item, dict) else {}
            val = elem.get("val")
            parts = val.get("concat") if isinstance(val, dict) else None
            if not (isinstance(parts, list) and len(parts) == 2 and isinstance(parts[0], str)
                    and isinstance(parts[1], int)):
                continue
            try:
                network = ipaddress.ip_network(parts[0])
            except ValueError:
                continue
            counter = elem.get("counter") or {}
            expires = elem.get("expires", hold)
            out.append(FastDropped(network, parts[1], int(counter.get("packets", 0)),
                                   int(counter.get("bytes", 0)),
                                   max(0.0, hold - float(expires))))
    return out


class KernelFastDrop:
    """floodd's fast-drop table (see the module docstring): set up, spare, read, remove.
    Every change is one ``nft -f -`` transaction."""

    def __init__(self, settings: FastDropConfig, table: str = TABLE) -> None:
        self.settings = settings
        self.table = table

    def setup(self, meter_list: Sequence[Meter], ports: Sequence[int],
              spared: Iterable[Network]) -> None:
        nft(["-f", "-"], setup_script(meter_list, self.settings, ports, spared, self.table))

    def spare(self, spared: Iterable[Network]) -> None:
        nft(["-f", "-"], spare_script(spared, self.table))

    def dropped(self) -> list[FastDropped]:
        """The pairs dropped in the last ``hold`` seconds (one ``nft`` per IP version)."""
        out = []
        for version in (4, 6):
            text = nft(["-j", "list", "set", "inet", self.table, f"dropped{version}"])
            try:
                data = json.loads(text or "{}")
            except json.JSONDecodeError:
                raise Failure("nft -j list set printed something that is not JSON") from None
            out += parse_dropped(data, self.settings.hold)
        return out

    def teardown(self) -> None:
        nft(["-f", "-"], delete_table(self.table))
