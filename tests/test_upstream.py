"""Upstream drops: the pure decision (floodd.decide.upstream) on plain data with the clock
passed in, and the feeder's side of ExaBGP's text API (floodd.cli.exabgp.Feeder) on plain
pipes, with a stand-in control socket answering the bans."""

from __future__ import annotations

import io
import ipaddress
import json
import os
from pathlib import Path
from typing import Any, Iterator

import pytest

from floodd.config import UpstreamConfig, build_config
from floodd.decide.upstream import (BannedSource, BlackholeRoute, FlowRoute, LinkCounters,
                                    LinkRate, Upstream, announce, banned_sources, link_rate,
                                    withdraw)
from floodd.cli.exabgp import Feeder, interface_names, own_destinations, read_counters
from floodd.errors import FlooddError
from floodd.service.control import ControlServer, request

net = ipaddress.ip_network
SERVER = net("192.0.2.53/32")
SERVER6 = net("2001:db8::53/128")
FLOODER = net("198.51.100.7/32")
OTHER = net("203.0.113.8/32")
FLOOD = LinkRate(9e6, 10_000)  # over 80% of 10M
QUIET = LinkRate(1e5, 100)


def settings(**overrides: Any) -> UpstreamConfig:
    data = {"enabled": True, "link_capacity": "10M", "sustain": 3, "hold": 60,
            **overrides}
    return build_config({"upstream": data}).upstream


def planner(**overrides: Any) -> Upstream:
    return Upstream(settings(**overrides), [53], [SERVER, SERVER6],
                    whitelist=[net("127.0.0.0/8"), net("192.0.2.0/28")], own=[SERVER])


def ban(network: ipaddress.IPv4Network | ipaddress.IPv6Network, packets: int,
        whole_udp: bool = True) -> BannedSource:
    return BannedSource(network, packets, whole_udp)


def sources(up: Upstream) -> set[str]:
    return {str(r.source) for r in up.routes() if isinstance(r, FlowRoute)}


def flood_until_announced(up: Upstream, bans: list[list[BannedSource]]) -> float:
    """Over the trigger at 0, 1, 2, 3 s (sustain 3 s), the bans of each step; the time of
    the last step."""
    for t, step in enumerate(bans):
        up.step(float(t), FLOOD, step)
    return float(len(bans) - 1)


# --- measurements and routes ---------------------------------------------------------------
def test_link_rate_from_two_readings() -> None:
    rate = link_rate(LinkCounters(10.0, 1000, 10), LinkCounters(12.0, 251_000, 2010))
    assert rate == LinkRate(1_000_000.0, 1000.0)
    assert link_rate(LinkCounters(10.0, 1000, 10), LinkCounters(10.0, 2000, 20)) is None
    # an interface recreated: its counters start again
    assert link_rate(LinkCounters(10.0, 5000, 50), LinkCounters(11.0, 100, 1)) is None


def test_banned_sources_from_the_control_socket_reply() -> None:
    listed = [{"source": "198.51.100.7/32", "packets": 12, "rule": "query-flood",
               "scope": {"protocols": "udp", "qtype": None, "except_hops": []}},
              {"source": "203.0.113.0/24", "packets": 0, "rule": "any",
               "scope": {"protocols": "udp", "qtype": "ANY", "except_hops": []}},
              {"source": "203.0.113.9/32", "packets": 5, "rule": "query-flood",
               "scope": {"protocols": "udp", "qtype": None, "except_hops": [64]}}]
    assert banned_sources(listed) == [ban(FLOODER, 12), ban(net("203.0.113.0/24"), 0, False),
                                      ban(net("203.0.113.9/32"), 5, False)]
    for bad in ({"bans": []}, [{"source": "nonsense", "packets": 1, "scope": {}}],
                [{"source": "192.0.2.1/32", "packets": True,
                  "scope": {"qtype": None, "except_hops": []}}], [None]):
        with pytest.raises(ValueError):
            banned_sources(bad)


def test_route_lines_in_exabgp_text_api() -> None:
    v4 = FlowRoute(FLOODER, SERVER, (53,))
    assert announce(v4) == ("announce flow route source 198.51.100.7/32 destination "
                            "192.0.2.53/32 protocol udp destination-port =53 discard")
    assert withdraw(v4) == "withdraw" + announce(v4).removeprefix("announce")
    v6 = FlowRoute(net("2001:db8:1::7/128"), SERVER6, (53, 5353), rate=12_500)
    assert announce(v6) == ("announce flow route source 2001:db8:1::7/128 destination "
                            "2001:db8::53/128 next-header udp destination-port [ =53 =5353 ] "
                            "rate-limit 12500")
    assert announce(BlackholeRoute(SERVER)) == \
        "announce route 192.0.2.53/32 next-hop self community [65535:666]"


# --- the decision ------------------------------------------------------------------------------
def test_nothing_under_the_trigger_or_before_sustain() -> None:
    up = planner()
    for t in range(10):
        assert up.step(float(t), QUIET, [ban(FLOODER, 1000 * t)]).routes == frozenset()
    up.step(10.0, FLOOD, [ban(FLOODER, 10_000)])
    assert up.step(12.9, FLOOD, [ban(FLOODER, 20_000)]).routes == frozenset()
    plan = up.step(13.0, FLOOD, [ban(FLOODER, 30_000)])
    assert plan.routes == {FlowRoute(FLOODER, SERVER, (53,))}  # IPv4 source: IPv4 destination
    assert plan.events[0].startswith("flood: 9.0 Mbit/s, 10,000 packets/s inbound")
    assert "announcing 198.51.100.7/32: 10,000 packets dropped since the last poll" in plan.events


def test_the_packet_rate_is_a_trigger_too() -> None:
    up = planner(packet_capacity="100k")
    many_small = LinkRate(1e6, 90_000)
    for t in range(4):
        up.step(float(t), many_small, [ban(FLOODER, 100 * t)])
    assert sources(up) == {"198.51.100.7/32"}
    assert planner().step(0.0, many_small, []).routes == frozenset()


def test_only_growing_whole_udp_bans_of_unprotected_sources() -> None:
    up = planner()
    narrow = net("203.0.113.9/32")
    idle = net("203.0.113.10/32")
    whitelisted = net("192.0.2.7/32")
    wide = net("192.0.2.0/24")  # contains this host's address
    steps = [[ban(FLOODER, 100 * t), ban(narrow, 100 * t, whole_udp=False), ban(idle, 50),
              ban(whitelisted, 100 * t), ban(wide, 100 * t)] for t in range(4)]
    events: list[str] = []
    for t, step in enumerate(steps):
        events += up.step(float(t), FLOOD, step).events
    assert sources(up) == {"198.51.100.7/32"}
    assert "not announcing 192.0.2.7/32: whitelisted by 192.0.2.0/28" in events
    assert "not announcing 192.0.2.0/24: contains this host's address 192.0.2.53" in events
    # logged once, not at every poll
    events = list(up.step(4.0, FLOOD, [ban(whitelisted, 900)]).events)
    assert not any("192.0.2.7" in e and "not announcing" in e for e in events)


def test_the_first_answer_is_a_baseline_not_growth() -> None:
    """Counters that grew before the feeder started (an old ban) say nothing of now."""
    up = planner()
    old = net("203.0.113.20/32")
    for t in range(4):
        up.step(float(t), FLOOD, [ban(old, 50_000)] if t < 3 else [ban(old, 50_000),
                                                                    ban(FLOODER, 10)])
    assert sources(up) == {"198.51.100.7/32"}  # new since the last poll: all of it is new


def test_heaviest_first_up_to_max_routes() -> None:
    up = Upstream(settings(max_routes=3), [53], [SERVER, net("192.0.2.54/32")], [], [])
    light, heavy, heaviest = (net(f"198.51.100.{i}/32") for i in (1, 2, 3))
    plan = None
    for t in range(4):
        plan = up.step(float(t), FLOOD, [ban(light, 10 * t), ban(heavy, 100 * t),
                                         ban(heaviest, 1000 * t)])
    assert plan is not None
    # two destinations: each source takes two routes, and only one fits in 3
    assert sources(up) == {"198.51.100.3/32"} and len(plan.routes) == 2
    assert any("upstream.max_routes (3) reached: 2 more banned sources" in e
               for e in plan.events)


def test_a_ban_that_ends_is_withdrawn_at_once() -> None:
    up = planner()
    flood_until_announced(up, [[ban(FLOODER, 100 * t), ban(OTHER, 100 * t)] for t in range(4)])
    assert sources(up) == {"198.51.100.7/32", "203.0.113.8/32"}
    plan = up.step(4.0, FLOOD, [ban(OTHER, 500)])
    assert sources(up) == {"203.0.113.8/32"}
    assert "198.51.100.7/32 is no longer banned (whole UDP): withdrawing it" in plan.events
    # narrowed to one query type: no longer announced either
    up.step(5.0, FLOOD, [ban(OTHER, 600, whole_udp=False)])
    assert sources(up) == set()


def test_withdrawn_after_hold_under_the_trigger() -> None:
    up = planner(hold=60)
    t = flood_until_announced(up, [[ban(FLOODER, 100 * t)] for t in range(4)])
    up.step(t + 1, QUIET, [ban(FLOODER, 400)])
    assert up.step(t + 60, QUIET, [ban(FLOODER, 400)]).routes  # 59 s calm
    up.step(t + 61, FLOOD, [ban(FLOODER, 900)])  # back: the calm starts again
    assert up.step(t + 120, QUIET, [ban(FLOODER, 900)]).routes
    plan = up.step(t + 180, QUIET, [ban(FLOODER, 900)])
    assert plan.routes == frozenset() and not up.flooding
    assert plan.events == ("flood over: 100.0 kbit/s, 100 packets/s inbound, under 80% of "
                           "the link for 60 s",)


def test_rate_limit_announces_the_rate_in_bytes() -> None:
    up = planner(action="rate-limit", rate="1M")
    flood_until_announced(up, [[ban(FLOODER, 100 * t)] for t in range(4)])
    assert up.routes() == {FlowRoute(FLOODER, SERVER, (53,), rate=125_000)}


def test_floodd_not_answering_keeps_the_routes_for_hold() -> None:
    up = planner(hold=60)
    t = flood_until_announced(up, [[ban(FLOODER, 100 * t)] for t in range(4)])
    plan = up.step(t + 1, FLOOD, None)
    assert plan.events == ("floodd does not answer: keeping 1 sources announced for 60 s",)
    assert up.step(t + 60, FLOOD, None).routes
    plan = up.step(t + 61, FLOOD, None)
    assert plan.routes == frozenset()
    assert plan.events == ("floodd has not answered for 60 s: withdrawing 1 sources",)
    plan = up.step(t + 62, FLOOD, [ban(FLOODER, 1000)])  # back, still flooding
    assert plan.events[0] == "floodd answers again" and sources(up) == {"198.51.100.7/32"}


def test_an_unknown_rate_changes_nothing() -> None:
    up = planner()
    t = flood_until_announced(up, [[ban(FLOODER, 100 * t)] for t in range(4)])
    for i in range(1, 200):
        up.step(t + i, None, [ban(FLOODER, 400 + i)])
    assert up.flooding and sources(up) == {"198.51.100.7/32"}


def test_blackhole_only_when_configured_after_blackhole_after() -> None:
    never = planner(blackhole_address="192.0.2.53")
    on = planner(blackhole=True, blackhole_address="192.0.2.53", blackhole_after=10)
    for t in range(30):
        never.step(float(t), FLOOD, [ban(FLOODER, 100 * t)])
        plan = on.step(float(t), FLOOD, [ban(FLOODER, 100 * t)])
        blackholed = BlackholeRoute(SERVER) in plan.routes
        assert blackholed == (t >= 13), t  # sustain 3 s, then 10 s more
    assert not any(isinstance(r, BlackholeRoute) for r in never.routes())
    on.step(30.0, QUIET, [ban(FLOODER, 3000)])
    assert BlackholeRoute(SERVER) in on.step(89.0, QUIET, []).routes
    assert on.step(90.0, QUIET, []).routes == frozenset()


def test_snapshot_and_restore_announce_the_same_set() -> None:
    up = planner(blackhole=True, blackhole_address="192.0.2.53", blackhole_after=1)
    t = flood_until_announced(up, [[ban(FLOODER, 100 * t), ban(OTHER, 100 * t)]
                                   for t in range(6)])
    up.step(t + 1, QUIET, [ban(FLOODER, 700), ban(OTHER, 700)])
    snapshot = json.loads(json.dumps(up.snapshot(t + 11)))  # calm for 10 s
    again = planner(blackhole=True, blackhole_address="192.0.2.53")
    assert again.restore(snapshot, 500.0, gap=5) == \
        ["taking up the flood of 5 s ago: 2 sources and the blackhole"]
    assert again.routes() == up.routes()
    # the calm goes on counting: 10 s before, 5 s away, 45 s more make the hold
    assert again.step(544.9, QUIET, [ban(FLOODER, 700), ban(OTHER, 700)]).routes
    assert again.step(545.0, QUIET, [ban(FLOODER, 700), ban(OTHER, 700)]).routes == frozenset()

    late = planner()
    assert late.restore(snapshot, 0.0, gap=50) == [] and late.routes() == frozenset()
    guarded = Upstream(settings(), [53], [SERVER], whitelist=[net("203.0.113.0/24")], own=[])
    guarded.restore(snapshot, 0.0, gap=0)
    assert sources(guarded) == {"198.51.100.7/32"}
    for bad in (None, {}, {**snapshot, "sources": ["x"]}, {**snapshot, "flooding": "yes"}):
        with pytest.raises(ValueError):
            planner().restore(bad, 0.0, 0)


# --- the feeder's protocol on plain pipes ---------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Link:
    """Inbound counters growing by ``bits`` per second of the clock."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.bits = 9e6
        self.total = 0
        self.last = clock.now

    def __call__(self, now: float) -> LinkCounters:
        self.total += int(self.bits / 8 * (now - self.last))
        self.last = now
        return LinkCounters(now, self.total, self.total // 100)


class FakeFloodd:
    """A control socket answering ``bans`` with what the test sets."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.bans: list[dict[str, Any]] = []
        self.server = ControlServer(path, self.handle)
        self.server.start()

    def handle(self, body: Any) -> dict[str, Any]:
        assert body == {"cmd": "bans"}
        return {"ok": True, "bans": self.bans}

    def ban(self, source: str, packets: int) -> None:
        self.bans = [b for b in self.bans if b["source"] != source] + [
            {"source": source, "packets": packets, "rule": "query-flood",
             "scope": {"protocols": "udp", "qtype": None, "except_hops": []}}]


@pytest.fixture
def fake_floodd(tmp_path: Path) -> Iterator[FakeFloodd]:
    fake = FakeFloodd(str(tmp_path / "control.sock"))
    yield fake
    fake.server.close()


class Pipe:
    """The feeder's stdout: a real pipe, read back without blocking."""

    def __init__(self) -> None:
        read, write = os.pipe()
        os.set_blocking(read, False)
        self.reader = read
        self.writer = os.fdopen(write, "w")

    def lines(self) -> list[str]:
        try:
            return os.read(self.reader, 1 << 20).decode().splitlines()
        except BlockingIOError:
            return []

    def close(self) -> None:
        self.writer.close()
        os.close(self.reader)


@pytest.fixture
def stdout() -> Iterator[Pipe]:
    pipe = Pipe()
    yield pipe
    pipe.close()


def feeder(fake: FakeFloodd, out: io.TextIOBase | Any, clock: Clock, logged: list[str],
           state: Path | None, dry_run: bool = False, hold: float = 60) -> tuple[Feeder, Link]:
    link = Link(clock)
    up = planner(hold=hold, poll_interval=1)
    return Feeder(up, link, lambda: request(fake.path, "bans", timeout=2)["bans"], out,
                  log=logged.append, dry_run=dry_run,
                  state_path=None if state is None else str(state), clock=clock,
                  wall=lambda: clock.now + 1e9), link


def test_feeder_writes_lines_reads_acks_and_resends_the_set_on_start(
        fake_floodd: FakeFloodd, stdout: Pipe, tmp_path: Path) -> None:
    clock, logged = Clock(), []
    state = tmp_path / "state" / "upstream.json"
    first, _ = feeder(fake_floodd, stdout.writer, clock, logged, state)
    first.start()
    assert stdout.lines() == []
    for i in range(5):
        fake_floodd.ban("198.51.100.7/32", 1000 * i)
        first.poll()
        clock.now += 1
    line = ("announce flow route source 198.51.100.7/32 destination 192.0.2.53/32 "
            "protocol udp destination-port =53 discard")
    assert stdout.lines() == [line]
    assert first.take_input(b"do") and first.take_input(b"ne\n")  # a line in pieces
    assert not first.pending and not any("refused" in m for m in logged)

    # A new feeder (ExaBGP restarted) announces the set at once, before any poll.
    second, _ = feeder(fake_floodd, stdout.writer, clock, logged, state)
    second.start()
    assert stdout.lines() == [line]
    assert "taking up the flood of 1 s ago: 1 sources" in logged
    assert second.take_input(b"error\n")
    assert logged[-1] == f"ExaBGP refused: {line}"

    fake_floodd.bans = []  # unbanned: withdrawn at the next poll
    second.poll()
    assert stdout.lines() == ["withdraw" + line.removeprefix("announce")]
    assert json.loads(state.read_text())["upstream"]["sources"] == []
    assert not second.take_input(b"shutdown\n")
    assert not second.take_input(b"")


def test_feeder_keeps_the_routes_for_hold_when_floodd_is_gone(
        fake_floodd: FakeFloodd, stdout: Pipe) -> None:
    clock, logged = Clock(), []
    feed, _ = feeder(fake_floodd, stdout.writer, clock, logged, None, hold=10)
    feed.start()
    for i in range(5):
        fake_floodd.ban("198.51.100.7/32", 1000 * i)
        feed.poll()
        clock.now += 1
    assert len(stdout.lines()) == 1
    fake_floodd.server.close()
    feed.poll()
    assert logged[-2].startswith("no bans from floodd: floodd is not running")
    assert logged[-1] == "floodd does not answer: keeping 1 sources announced for 10 s"
    clock.now += 9
    feed.poll()
    assert stdout.lines() == []
    clock.now += 1
    feed.poll()
    assert [line.split()[0] for line in stdout.lines()] == ["withdraw"]


def test_feeder_dry_run_writes_nothing(fake_floodd: FakeFloodd, stdout: Pipe,
                                       tmp_path: Path) -> None:
    clock, logged = Clock(), []
    feed, _ = feeder(fake_floodd, stdout.writer, clock, logged, tmp_path / "upstream.json",
                     dry_run=True)
    feed.start()
    for i in range(5):
        fake_floodd.ban("198.51.100.7/32", 1000 * i)
        feed.poll()
        clock.now += 1
    assert stdout.lines() == []
    assert any(m.startswith("would send: announce flow route source 198.51.100.7/32")
               for m in logged)
    assert not (tmp_path / "upstream.json").exists()


def test_feeder_ends_with_status_0_when_stdin_ends(fake_floodd: FakeFloodd,
                                                   stdout: Pipe) -> None:
    clock, logged = Clock(), []
    feed, _ = feeder(fake_floodd, stdout.writer, clock, logged, None)
    read, write = os.pipe()
    os.write(write, b"done\n")
    os.close(write)
    try:
        assert feed.run(read, interval=3600) == 0
    finally:
        os.close(read)


def test_unreadable_counters_are_logged_once(fake_floodd: FakeFloodd, stdout: Pipe) -> None:
    clock, logged = Clock(), []
    feed, _ = feeder(fake_floodd, stdout.writer, clock, logged, None)

    def gone(now: float) -> LinkCounters:
        raise FileNotFoundError(2, "No such file or directory")
    feed.counters = gone
    feed.poll()
    feed.poll()
    assert [m for m in logged if "counters" in m] == \
        ["cannot read the inbound counters: [Errno 2] No such file or directory"]


# --- the interfaces and addresses ---------------------------------------------------------------
def test_interface_counters_from_sysfs(tmp_path: Path) -> None:
    for name, rx_bytes, rx_packets in (("lo", 5, 1), ("eth0", 1000, 10), ("eth1", 500, 5)):
        stats = tmp_path / name / "statistics"
        stats.mkdir(parents=True)
        (stats / "rx_bytes").write_text(f"{rx_bytes}\n")
        (stats / "rx_packets").write_text(f"{rx_packets}\n")
    assert interface_names(("any",), str(tmp_path)) == ["eth0", "eth1"]
    assert interface_names(("eth1",), str(tmp_path)) == ["eth1"]
    with pytest.raises(FlooddError, match="no interface eth9 here"):
        interface_names(("eth9",), str(tmp_path))
    assert read_counters(["eth0", "eth1"], 7.0, str(tmp_path)) == LinkCounters(7.0, 1500, 15)


def test_own_destinations_leave_out_loopback_and_link_local() -> None:
    own = [net("127.0.0.1/32"), net("::1/128"), net("fe80::1/128"), SERVER, SERVER6]
    assert own_destinations(own) == [SERVER, SERVER6]
