"""Upstream drops (pure): which BGP routes ``floodd exabgp`` has ExaBGP announce, right now.

When the inbound traffic nears the link's capacity, bans on this host no longer help: the
flood fills the link before it arrives.  :class:`Upstream` is told, at each poll, the
inbound rate of the capture interfaces and floodd's bans with their kernel drop counters,
and answers the set of routes that should be announced:

* a FlowSpec rule (RFC 8955) per heaviest banned source and destination of this server,
  UDP to the DNS ports, ``discard`` or ``rate-limit``, once the traffic has stayed over
  ``trigger`` of a capacity for ``sustain`` seconds;
* optionally (``blackhole: true`` only) the destination blackhole of RFC 7999 for
  ``blackhole_address``, when the traffic is still over the trigger ``blackhole_after``
  seconds after the FlowSpec rules went out.

Everything is withdrawn when the traffic has stayed under the trigger for ``hold``
seconds.  Only whole-UDP bans are announced: a FlowSpec rule drops every UDP packet from
the source to the DNS ports, real ones included (UDP sources can be forged), so it may
drop no more than the ban already drops in this host's kernel; a ban of one query type,
or one that spares the source's usual TTL, never goes upstream.  Whitelisted and own
networks never go upstream, whatever floodd bans.  A source whose ban ends (expiry,
unban) is withdrawn at the next poll.  When floodd does not answer, the routes stay
``hold`` seconds, then go.

The clock is passed in (``now``, in seconds of a monotonic clock).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any, Sequence

from floodd.config import Network, UpstreamConfig
from floodd.decide.safety import protected_reason

BLACKHOLE_COMMUNITY = "65535:666"  # RFC 7999 BLACKHOLE


# --- what is measured ---------------------------------------------------------------------
@dataclass(frozen=True)
class LinkCounters:
    """The interfaces' inbound counters at one instant (sums over the interfaces)."""

    at: float
    rx_bytes: int
    rx_packets: int


@dataclass(frozen=True)
class LinkRate:
    bits_per_second: float
    packets_per_second: float


def link_rate(before: LinkCounters, after: LinkCounters) -> LinkRate | None:
    """The inbound rate between two readings; None when it cannot be told (no time
    between them, or a counter went back: an interface was recreated)."""
    seconds = after.at - before.at
    grown_bytes = after.rx_bytes - before.rx_bytes
    grown_packets = after.rx_packets - before.rx_packets
    if seconds <= 0 or grown_bytes < 0 or grown_packets < 0:
        return None
    return LinkRate(8 * grown_bytes / seconds, grown_packets / seconds)


@dataclass(frozen=True)
class BannedSource:
    """One of floodd's bans as the control socket lists it."""

    network: Network
    packets: int  # the kernel's drop counter
    whole_udp: bool  # the ban drops all the source's UDP (no query type, no hop spared)


def banned_sources(bans: Any) -> list[BannedSource]:
    """The ``bans`` list of the control socket's ``bans`` reply (see
    floodd.enforce.firewall.base.Ban.as_json: ``source``, ``packets``, ``scope`` with
    ``qtype`` and ``except_hops``); ValueError if it is not that."""
    if not isinstance(bans, list):
        raise ValueError("the bans are not a list")
    out = []
    for ban in bans:
        try:
            network = ipaddress.ip_network(ban["source"])
            packets = ban["packets"]
            scope = ban["scope"]
            whole = scope["qtype"] is None and not scope["except_hops"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"a ban floodd listed is unreadable: {str(ban)[:80]}") from None
        if isinstance(packets, bool) or not isinstance(packets, int) or packets < 0:
            raise ValueError(f"a ban floodd listed has no packet count: {str(ban)[:80]}")
        out.append(BannedSource(network, packets, whole))
    return out


# --- what is announced --------------------------------------------------------------------
@dataclass(frozen=True)
class FlowRoute:
    """A FlowSpec rule: UDP from ``source`` to ``destination`` on ``ports``, dropped
    (``rate`` 0) or limited to ``rate`` bytes/s (RFC 8955 traffic-rate is in bytes)."""

    source: Network
    destination: Network
    ports: tuple[int, ...]
    rate: int = 0

    def text(self) -> str:
        """The route in ExaBGP's text API, after ``announce`` or ``withdraw``."""
        ports = " ".join(f"={p}" for p in self.ports)
        if len(self.ports) > 1:
            ports = f"[ {ports} ]"
        protocol = "protocol" if self.source.version == 4 else "next-header"
        action = f"rate-limit {self.rate}" if self.rate else "discard"
        return (f"flow route source {self.source} destination {self.destination} "
                f"{protocol} udp destination-port {ports} {action}")


@dataclass(frozen=True)
class BlackholeRoute:
    """The RFC 7999 blackhole of one address: the peer drops everything sent to it."""

    address: Network

    def text(self) -> str:
        return f"route {self.address} next-hop self community [{BLACKHOLE_COMMUNITY}]"


Route = FlowRoute | BlackholeRoute


def announce(route: Route) -> str:
    return f"announce {route.text()}"


def withdraw(route: Route) -> str:
    return f"withdraw {route.text()}"


def ordered(routes: Sequence[Route] | frozenset[Route]) -> list[Route]:
    """Routes in a stable order (by their text): the order lines are written in."""
    return sorted(routes, key=lambda r: r.text())


@dataclass(frozen=True)
class Plan:
    routes: frozenset[Route]
    events: tuple[str, ...] = ()  # what changed, for the log (one line each)


# --- the decision -------------------------------------------------------------------------
@dataclass
class _State:
    flooding: bool = False
    over_since: float | None = None  # the traffic has been over the trigger since
    calm_since: float | None = None  # during a flood, under the trigger since
    lost_since: float | None = None  # floodd has not answered since
    sources: set[Network] = field(default_factory=set)  # announced
    blackhole: bool = False
    # The whole-UDP bans' drop counters at the last poll floodd answered (None: no poll yet)
    counters: dict[Network, int] | None = None
    refused: set[Network] = field(default_factory=set)  # protected sources logged once
    capped: bool = False  # "max_routes reached" logged in this flood


class Upstream:
    """The routes to announce, from one poll to the next (see the module docstring)."""

    def __init__(self, config: UpstreamConfig, ports: Sequence[int],
                 destinations: Sequence[Network], whitelist: Sequence[Network],
                 own: Sequence[Network]) -> None:
        self.config = config
        self.ports = tuple(sorted(set(ports)))
        self.destinations = tuple(destinations)
        self.whitelist = tuple(whitelist)
        self.own = tuple(own)
        self.rate = config.rate // 8 if config.action == "rate-limit" else 0  # bytes/s
        self._s = _State()

    @property
    def flooding(self) -> bool:
        return self._s.flooding

    # --- one poll -----------------------------------------------------------------
    def step(self, now: float, rate: LinkRate | None,
             bans: Sequence[BannedSource] | None) -> Plan:
        """The routes after this poll.  ``rate``: the inbound rate since the last poll
        (None: not known, the flood state stays as it is); ``bans``: floodd's bans (None:
        floodd did not answer)."""
        events: list[str] = []
        if rate is not None:
            self._follow_rate(now, rate, events)
        if bans is None:
            self._floodd_lost(now, events)
        else:
            if self._s.lost_since is not None:
                events.append("floodd answers again")
            self._s.lost_since = None
            self._follow_bans(bans, events)
        self._follow_blackhole(now, events)
        return Plan(self.routes(), tuple(events))

    def _over(self, rate: LinkRate) -> bool:
        c = self.config
        return (rate.bits_per_second >= c.trigger * c.link_capacity
                or (c.packet_capacity > 0
                    and rate.packets_per_second >= c.trigger * c.packet_capacity))

    def _follow_rate(self, now: float, rate: LinkRate, events: list[str]) -> None:
        s, c = self._s, self.config
        shown = f"{_bits(rate.bits_per_second)}, {rate.packets_per_second:,.0f} packets/s"
        if self._over(rate):
            s.calm_since = None
            if s.over_since is None:
                s.over_since = now
            if not s.flooding and now - s.over_since >= c.sustain:
                s.flooding = True
                s.capped = False
                events.append(f"flood: {shown} inbound, over {c.trigger:.0%} of the link "
                              f"for {now - s.over_since:.1f} s")
            return
        s.over_since = None
        if not s.flooding:
            return
        if s.calm_since is None:
            s.calm_since = now
        elif now - s.calm_since >= c.hold:
            events.append(f"flood over: {shown} inbound, under {c.trigger:.0%} of the link "
                          f"for {now - s.calm_since:.0f} s")
            s.flooding = False
            s.calm_since = None
            s.sources.clear()
            s.blackhole = False

    def _floodd_lost(self, now: float, events: list[str]) -> None:
        s = self._s
        if s.lost_since is None:
            s.lost_since = now
            if s.sources:
                events.append(f"floodd does not answer: keeping {len(s.sources)} sources "
                              f"announced for {self.config.hold:g} s")
        elif s.sources and now - s.lost_since >= self.config.hold:
            events.append(f"floodd has not answered for {now - s.lost_since:.0f} s: "
                          f"withdrawing {len(s.sources)} sources")
            s.sources.clear()

    def _follow_bans(self, bans: Sequence[BannedSource], events: list[str]) -> None:
        s = self._s
        growth: dict[Network, int] = {}
        counters: dict[Network, int] = {}
        for ban in bans:
            if ban.whole_udp:
                counters[ban.network] = counters.get(ban.network, 0) + ban.packets
        for network, packets in counters.items():
            if s.counters is None:  # the first answer: what the counters hold is old
                growth[network] = 0
                continue
            before = s.counters.get(network, 0)
            # A counter that went back belongs to a ban made again: all of it is new.
            growth[network] = packets - before if packets >= before else packets
        s.counters = counters
        for network in [n for n in s.sources if n not in growth]:
            s.sources.discard(network)
            events.append(f"{network} is no longer banned (whole UDP): withdrawing it")
        if not s.flooding:
            return
        heaviest = sorted((n for n, g in growth.items() if g > 0 and n not in s.sources),
                          key=lambda n: (-growth[n], n.version, n))
        used = sum(len(self._destinations_for(n)) for n in s.sources)
        left_out = 0
        for network in heaviest:
            reason = protected_reason(network, self.whitelist, self.own)
            if reason is not None:
                if network not in s.refused:
                    s.refused.add(network)
                    events.append(f"not announcing {network}: {reason}")
                continue
            needed = len(self._destinations_for(network))
            if needed == 0:
                if network not in s.refused:
                    s.refused.add(network)
                    events.append(f"not announcing {network}: no IPv{network.version} "
                                  "destination (upstream.destinations)")
                continue
            if used + needed > self.config.max_routes:
                left_out += 1
                continue
            used += needed
            s.sources.add(network)
            events.append(f"announcing {network}: {growth[network]:,} packets dropped "
                          "since the last poll")
        if left_out and not s.capped:
            s.capped = True
            events.append(f"upstream.max_routes ({self.config.max_routes}) reached: "
                          f"{left_out} more banned sources not announced")

    def _follow_blackhole(self, now: float, events: list[str]) -> None:
        s, c = self._s, self.config
        if not c.blackhole or c.blackhole_address is None or s.blackhole or not s.flooding:
            return
        if s.over_since is not None and now - s.over_since >= c.sustain + c.blackhole_after:
            s.blackhole = True
            events.append(f"still over {c.trigger:.0%} of the link {c.blackhole_after:g} s "
                          f"after the FlowSpec rules: blackholing "
                          f"{c.blackhole_address.network_address} (community "
                          f"{BLACKHOLE_COMMUNITY})")

    # --- the answer ---------------------------------------------------------------
    def _destinations_for(self, source: Network) -> list[Network]:
        return [d for d in self.destinations if d.version == source.version]

    def routes(self) -> frozenset[Route]:
        out: set[Route] = {FlowRoute(source, destination, self.ports, self.rate)
                           for source in self._s.sources
                           for destination in self._destinations_for(source)}
        if self._s.blackhole and self.config.blackhole_address is not None:
            out.add(BlackholeRoute(self.config.blackhole_address))
        return frozenset(out)

    # --- across a restart -----------------------------------------------------------
    def snapshot(self, now: float) -> dict[str, Any]:
        """What a new feeder needs to announce the same set at once (plain data; times as
        ages at ``now``)."""
        s = self._s
        return {"flooding": s.flooding,
                "over_for": None if s.over_since is None else now - s.over_since,
                "calm_for": None if s.calm_since is None else now - s.calm_since,
                "sources": [str(n) for n in sorted(s.sources, key=lambda n: (n.version, n))],
                "blackhole": s.blackhole}

    def restore(self, data: Any, now: float, gap: float) -> list[str]:
        """Take up a :meth:`snapshot` written ``gap`` seconds ago (the time the feeder was
        away counts as calm); the events.  ValueError if ``data`` is not a snapshot."""
        try:
            flooding = data["flooding"]
            calm_for = data["calm_for"]
            sources = [ipaddress.ip_network(n) for n in data["sources"]]
            blackhole = data["blackhole"]
        except (KeyError, TypeError, ValueError):
            raise ValueError("not a snapshot of the upstream routes") from None
        if not isinstance(flooding, bool) or not isinstance(blackhole, bool) or \
                not (calm_for is None or isinstance(calm_for, (int, float))):
            raise ValueError("not a snapshot of the upstream routes")
        calm = max(0.0, float(calm_for or 0.0)) + max(0.0, gap)
        if not flooding or calm >= self.config.hold:
            return []
        s = self._s
        s.flooding = True
        s.calm_since = now - calm
        s.blackhole = blackhole and self.config.blackhole
        s.sources = {n for n in sources
                     if protected_reason(n, self.whitelist, self.own) is None}
        return [f"taking up the flood of {gap:.0f} s ago: {len(s.sources)} sources"
                + (" and the blackhole" if s.blackhole else "")]


def _bits(bits_per_second: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if bits_per_second >= size:
            return f"{bits_per_second / size:.1f} {unit}bit/s"
    return f"{bits_per_second:.0f} bit/s"
