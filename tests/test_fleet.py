"""The fleet link's pieces: the pure logic (floodd.decide.fleet), the checks of every LAPI
reply and the client against a real CrowdSec Local API on loopback (lab.crowdsec), and the
link thread against a LAPI that is down or answers garbage."""

from __future__ import annotations

import http.server
import io
import ipaddress
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from floodd.config import CrowdsecConfig, build_config, summary
from floodd.decide.fleet import (Decision, FleetBook, FleetUpdate, PushBan, Withdraw,
                                 decision_scope, fleet_rule, own_claims, parse_go_duration,
                                 push_ban, scenario)
from floodd.decide.safety import protected_reason
from floodd.scope import UDP_ONLY, WHOLE, Scope, Target
from floodd.service.fleet import (QUEUE_MAX, FleetLink, LapiClient, LapiError,
                                  parse_alert_decisions, parse_alert_ids, parse_login,
                                  parse_stream)
from floodd.service.journal import EventLog
from lab.crowdsec import LocalAPI, crowdsec_problem

net = ipaddress.ip_network
CONFIG = CrowdsecConfig(url="http://127.0.0.1:1", machine_id="ns1", password="p",
                        api_key="k")
UDP_QTYPE_ANY = Scope(udp_only=True, qtype=255)


# --- Go durations ---------------------------------------------------------------------
@pytest.mark.parametrize("text, seconds", [
    ("9m59.72s", 599.72), ("-4.725606ms", -0.004725606), ("1h0m0s", 3600.0), ("0s", 0.0),
    ("0", 0.0), ("59m59.244099843s", 3599.244099843), ("1.5h", 5400.0), ("300ms", 0.3),
    ("2us", 2e-6), ("2\u00b5s", 2e-6), ("-2.50s", -2.5), (".5s", 0.5)])
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "1d", "m", "1h-5m", "abc", "1e3s", "s", "-",
                                  "1h 5m", "9" * 70 + "s"])
def test_not_go_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_go_duration(text)


# --- what floodd pushes, what a decision bans --------------------------------------------
def test_pushes_carry_rule_and_scope_and_narrowed_bans_stay_local() -> None:
    push = push_ban(net("198.51.100.7/32"), UDP_ONLY, "query-flood", 30, "1000 packets")
    assert push is not None and push.rule == "query-flood" and push.seconds == 30
    assert "198.51.100.7/32" in push.message and "1000 packets" in push.message
    assert scenario("query-flood", UDP_ONLY) == "floodd/query-flood scope=udp"
    assert push_ban(net("198.51.100.7/32"), Scope(True, None, (64,)), "query-flood", 30,
                    "") is None
    assert push_ban(net("198.51.100.7/32"), UDP_ONLY, "fleet/floodd/query-flood", 30,
                    "") is None


@pytest.mark.parametrize("name, origin, scope, rule", [
    ("floodd/query-flood scope=udp", "floodd", UDP_ONLY, "fleet/floodd/query-flood"),
    ("floodd/any-queries scope=udp,qtype=255", "floodd", UDP_QTYPE_ANY,
     "fleet/floodd/any-queries"),
    ("floodd/query-flood scope=all", "floodd", WHOLE, "fleet/floodd/query-flood"),
    # forged-looking narrowing never travels; unreadable floodd scopes are UDP only
    ("floodd/query-flood scope=udp,except=64", "floodd", UDP_ONLY, "fleet/floodd/query-flood"),
    ("floodd/query-flood scope=bogus", "floodd", UDP_ONLY, "fleet/floodd/query-flood"),
    ("floodd/old", "floodd", UDP_ONLY, "fleet/floodd/old"),
    ("something", "floodd", UDP_ONLY, "fleet/something"),
    # CrowdSec's own scenarios read logs of completed connections: the whole source
    ("crowdsecurity/ssh-bf", "crowdsec", WHOLE, "fleet/crowdsecurity/ssh-bf"),
    ("manual 'ban' from 'x'", "cscli", WHOLE, "fleet/manual 'ban' from 'x'"),
])
def test_what_a_fleet_decision_bans(name: str, origin: str, scope: Scope, rule: str) -> None:
    assert decision_scope(name, origin) == scope
    assert fleet_rule(name) == rule


# --- the book of fleet decisions -------------------------------------------------------------
def decision(id: int, value: str = "198.51.100.7", seconds: float = 100.0,
             origin: str = "floodd", name: str = "floodd/query-flood scope=udp",
             scope: str = "Ip", type: str = "ban") -> Decision:
    return Decision(id, origin, name, scope, net(value), type, seconds)


def update(*new: Decision, deleted: tuple[int, ...] = (), startup: bool = False,
           at: float = 1000.0) -> FleetUpdate:
    return FleetUpdate(at, startup, tuple(new), deleted)


OWN = [net("192.0.2.53/32")]


def protected(network: Any) -> str | None:
    return protected_reason(network, [net("203.0.113.0/24")], OWN)


def plan(book: FleetBook, banned: dict[Target, tuple[str, float]] | None = None,
         now: float = 1000.0, max_fleet: int = 10, room: int = 100) -> Any:
    return book.plan(now, banned or {}, protected, max_fleet, room)


T7 = Target(net("198.51.100.7/32"), UDP_ONLY)


def test_a_decision_is_banned_with_its_remaining_time_and_rule() -> None:
    book = FleetBook()
    assert book.apply(update(decision(1, seconds=99.5), startup=True), CONFIG) == 0
    todo = plan(book, now=1010.0)
    assert [(b.target, b.rule, b.seconds) for b in todo.bans] == \
        [(T7, "fleet/floodd/query-flood", 89.5)]
    assert todo.unbans == () and todo.refused == ()


def test_covered_targets_are_not_banned_twice_and_own_bans_stay() -> None:
    book = FleetBook()
    book.apply(update(decision(1), decision(2, "198.51.100.8"), decision(3, "198.51.100.9",
                                                                           seconds=500),
                      startup=True), CONFIG)
    banned = {T7: ("query-flood", 1030.0),  # floodd's own: left as it is
              Target(net("198.51.100.8/32"), WHOLE): ("operator", 1010.0),  # covers UDP
              Target(net("198.51.100.9/32"), UDP_ONLY): ("fleet/floodd/x", 1100.0)}
    todo = plan(book, banned)
    # only the fleet ban whose decision now ends later is made again, with the later end
    assert [(str(b.network), b.seconds) for b in todo.bans] == [("198.51.100.9/32", 500.0)]
    # a prefix covers the addresses in it
    book2 = FleetBook()
    book2.apply(update(decision(4, "198.51.100.66"), startup=True), CONFIG)
    assert plan(book2, {Target(net("198.51.100.0/24"), WHOLE): ("prefix-flood", 2000.0)}
                ).bans == ()


def test_protected_networks_and_the_caps_refuse() -> None:
    book = FleetBook()
    book.apply(update(decision(1, "192.0.2.53"), decision(2, "203.0.113.9"),
                      decision(3, "192.0.2.0/24", scope="Range"),
                      decision(4, "127.0.0.1"), startup=True), CONFIG)
    todo = plan(book)
    assert todo.bans == ()
    assert sorted(r.reason for r in todo.refused) == [
        "contains this host's address 192.0.2.53", "loopback", "this host's address",
        "whitelisted by 203.0.113.0/24"]
    book = FleetBook()
    book.apply(update(*(decision(i, f"198.51.100.{i}") for i in range(1, 6)), startup=True),
               CONFIG)
    fleet_ban = {Target(net("198.51.100.200/32"), UDP_ONLY): ("fleet/floodd/x", 2000.0)}
    todo = plan(book, fleet_ban, max_fleet=3)
    assert len(todo.bans) == 2 and len(todo.refused) == 3
    assert todo.refused[0].reason == "max_bans (3 fleet bans) reached"
    todo = plan(book, fleet_ban, room=1)
    assert len(todo.bans) == 1 and todo.refused[0].reason == "max_bans reached"


def test_filters_origins_scopes_types_and_wide_ranges() -> None:
    config = CrowdsecConfig(url="http://127.0.0.1:1", origins=("floodd", "cscli"),
                            scopes=("ip",))
    book = FleetBook()
    filtered = book.apply(update(
        decision(1), decision(2, origin="CAPI", name="crowdsecurity/ssh-bf"),
        decision(3, origin="cscli", name="manual"),
        decision(4, "198.51.100.0/24", scope="Range"),
        decision(5, "198.51.100.9", type="captcha"), startup=True), config)
    assert filtered == 3 and len(book) == 2
    wide = FleetBook()
    assert wide.apply(update(decision(6, "10.0.0.0/15", scope="Range"),
                             decision(7, "2001:db8::/31", scope="Range"),
                             decision(8, "10.0.0.0/16", scope="Range"),
                             decision(9, "2001:db8::/32", scope="Range"),
                             startup=True), CONFIG) == 2
    assert len(wide) == 2


def test_deleted_decisions_lift_fleet_bans_only_after_the_first_sync() -> None:
    book = FleetBook()
    adopted = {T7: ("fleet/floodd/query-flood", 1050.0)}
    book.apply(update(decision(1)), CONFIG)  # a delta before any startup reply
    book.apply(update(deleted=(1,)), CONFIG)
    assert plan(book, adopted).unbans == ()  # not synced: kept
    book.apply(update(decision(2), startup=True), CONFIG)
    assert plan(book, adopted).unbans == ()  # asked for again: kept
    for _ in range(2):  # a deletion may come again: the same result
        book.apply(update(deleted=(2,)), CONFIG)
        assert plan(book, adopted).unbans == (T7,)
    # a decision over by its time lifts the ban too, and the same value banned again by
    # a new decision stays banned when the old one's deletion repeats
    book.apply(update(decision(3, seconds=5)), CONFIG)
    assert plan(book, adopted, now=1004.0).unbans == ()
    assert plan(book, adopted, now=1006.0).unbans == (T7,)
    book.apply(update(decision(4), deleted=(3,)), CONFIG)
    book.apply(update(deleted=(3,)), CONFIG)
    assert plan(book, adopted).unbans == ()


def test_a_startup_reply_replaces_everything_and_the_operator_dismisses() -> None:
    book = FleetBook()
    book.apply(update(decision(1), decision(2, "198.51.100.8"), startup=True), CONFIG)
    book.apply(update(decision(3, "198.51.100.9"), startup=True), CONFIG)
    assert [str(b.network) for b in plan(book).bans] == ["198.51.100.9/32"]
    book.dismiss([net("198.51.100.9/32")])
    assert plan(book).bans == ()
    book.apply(update(decision(3, "198.51.100.9"), startup=True), CONFIG)  # sent again
    assert plan(book).bans == ()
    book.apply(update(decision(5, "198.51.100.9")), CONFIG)  # a new decision counts
    assert len(plan(book).bans) == 1
    book.dismiss(None)
    assert len(book) == 0


def test_own_decisions_are_found_after_a_restart() -> None:
    reply = update(decision(1), decision(2, "198.51.100.8"),
                   decision(3, name="floodd/other-rule scope=udp"),
                   decision(4, origin="crowdsec", name="crowdsecurity/ssh-bf"), startup=True)
    claims = own_claims(reply, {T7: "query-flood",
                                Target(net("198.51.100.8/32"), WHOLE): "query-flood"})
    assert [(c.target, c.ids) for c in claims] == [(T7, (1,))]


# --- checking the LAPI's replies --------------------------------------------------------------
def test_stream_replies_are_checked_field_by_field() -> None:
    good = {"id": 7, "origin": "crowdsec", "scenario": "crowdsecurity/ssh-bf", "scope": "Ip",
            "type": "ban", "value": "198.51.100.7", "duration": "3h59m58.5s"}
    reply = parse_stream({"new": [
        good, {**good, "id": 8, "scope": "Range", "value": "2001:db8::/48"},
        {**good, "id": 9, "scope": "Country", "value": "FR"},
        {**good, "id": "10"}, {**good, "id": 11, "value": "198.51.100.300"},
        {**good, "id": 12, "scope": "Range", "value": "198.51.100.7/24"},
        {**good, "id": 13, "duration": "forever"}, {**good, "id": 14, "origin": None},
        {**good, "id": 15, "scenario": "x\n"}, "junk", None],
        "deleted": [{**good, "id": 3, "duration": "-1.5s"}]})
    assert [d.id for d in reply.new] == [7, 8] and reply.deleted == (3,)
    assert reply.new[0].seconds == pytest.approx(14398.5)
    assert reply.new[1].network == net("2001:db8::/48") and reply.new[1].scope == "Range"
    assert reply.other_scopes == 1 and reply.bad == 8
    assert reply.first_bad == "decision: field 'id' missing or not int"
    assert parse_stream({"new": None, "deleted": None}).new == ()
    garbage: Any
    for garbage in ([], "x", None, {"new": {}}, {"deleted": "x"}):
        with pytest.raises(LapiError):
            parse_stream(garbage)


def test_login_and_alert_replies_are_checked() -> None:
    token, expire = parse_login({"code": 200, "expire": "2026-01-02T03:04:05Z",
                                 "token": "a.b.c"})
    assert token == "a.b.c" and expire == 1767323045.0
    bad: Any
    for bad in ({"token": "a"}, {"expire": "2026-01-02T03:04:05Z"}, [],
                {"token": "", "expire": "2026-01-02T03:04:05Z"},
                {"token": "a\nb", "expire": "2026-01-02T03:04:05Z"},
                {"token": "a", "expire": "soon"}):
        with pytest.raises(LapiError):
            parse_login(bad)
    assert parse_alert_ids(["12"]) == [12]
    for bad_ids in ([], ["x"], [True], {"id": 1}, ["-1"]):
        with pytest.raises(LapiError):
            parse_alert_ids(bad_ids)
    assert parse_alert_decisions({"decisions": [{"id": 4}, {"id": 5}]}) == [4, 5]
    for bad_alert in ({}, {"decisions": [{"id": "4"}]}, {"decisions": None}):
        with pytest.raises(LapiError):
            parse_alert_decisions(bad_alert)


def test_secrets_are_never_shown() -> None:
    config = build_config({"crowdsec": {"url": "http://192.0.2.10:8080", "machine_id": "ns1",
                                        "password": "s3cret-pw", "api_key": "s3cret-key"}})
    text = "\n".join(summary(config)) + repr(config)
    assert "s3cret" not in text
    assert "crowdsec: Local API http://192.0.2.10:8080: push floodd's bans as machine ns1 " \
           "(password inline); pull decisions every 10 s (key inline)" in text
    assert "crowdsec: off" in summary(build_config({}))


def test_secret_files_are_read(tmp_path: Path) -> None:
    (tmp_path / "key").write_text("abc123\n")
    config = build_config({"crowdsec": {"url": "http://192.0.2.10:8080/", "push": False,
                                        "api_key_file": str(tmp_path / "key")}})
    assert config.crowdsec.api_key == "abc123" and config.crowdsec.url == \
        "http://192.0.2.10:8080"
    assert config.crowdsec.max_bans == 5000 and config.crowdsec.enabled


# --- the client against a real LAPI ---------------------------------------------------------
@pytest.fixture
def lapi() -> Iterator[LocalAPI]:
    problem = crowdsec_problem()
    if problem:
        pytest.skip(problem)
    with LocalAPI("127.0.0.1", 18081) as api:
        yield api


def node(api: LocalAPI, name: str, **changes: Any) -> CrowdsecConfig:
    settings: dict[str, Any] = {"url": api.url, "machine_id": name,
                                "password": api.add_machine(name),
                                "api_key": api.add_bouncer(name), **changes}
    return CrowdsecConfig(**settings)


def test_push_pull_and_delete_against_a_real_lapi(lapi: LocalAPI) -> None:
    a, b = LapiClient(node(lapi, "ns1")), LapiClient(node(lapi, "ns2"))
    assert b.stream(startup=True).new == ()
    push = PushBan(net("198.51.100.0/24"), UDP_QTYPE_ANY, "any-queries", 599.6, "why")
    alert = a.push(push)
    ids = a.decision_ids(alert)
    assert len(ids) == 1
    got = b.stream(startup=False)
    assert [(d.id, d.origin, d.scenario, d.scope, d.network, d.type) for d in got.new] == \
        [(ids[0], "floodd", "floodd/any-queries scope=udp,qtype=255", "Range",
          net("198.51.100.0/24"), "ban")]
    assert 590 < got.new[0].seconds <= 600
    assert decision_scope(got.new[0].scenario, got.new[0].origin) == UDP_QTYPE_ANY
    assert [a["message"] for a in lapi.decisions()] == ["why"]
    a.delete(ids[0])
    a.delete(ids[0])  # twice: still fine
    assert b.stream(startup=False).deleted == (ids[0],)
    assert b.stream(startup=True).new == ()
    # an operator's decision: origin cscli, the whole source
    lapi.add_decision("192.0.2.99", "1h", reason="seen in the logs")
    [mine] = b.stream(startup=False).new
    assert (mine.origin, mine.scenario, decision_scope(mine.scenario, mine.origin)) == \
        ("cscli", "seen in the logs", WHOLE)


def test_the_lapi_refuses_bad_credentials(lapi: LocalAPI) -> None:
    good = node(lapi, "ns1")
    with pytest.raises(LapiError, match="HTTP 401") as err:
        LapiClient(CrowdsecConfig(url=lapi.url, machine_id="ns1", password="wrong")).login()
    assert not err.value.permanent
    with pytest.raises(LapiError, match="HTTP 403"):
        LapiClient(CrowdsecConfig(url=lapi.url, api_key="wrong")).stream(startup=True)
    LapiClient(good).login()
    with pytest.raises(LapiError, match="Connection refused"):
        LapiClient(CrowdsecConfig(url="http://127.0.0.1:1", api_key="k")).stream(True)


# --- the link thread -------------------------------------------------------------------------
class _Garbage(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        body = b'{"new": [{"id": "x"}], "deleted": 5}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_a_lapi_answering_garbage_is_one_journal_line() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Garbage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    config = CrowdsecConfig(url=f"http://127.0.0.1:{server.server_port}", push=False,
                            api_key="k", pull_interval=0.05)
    stream = io.StringIO()
    link = FleetLink(config, EventLog(journal=False, stream=stream))
    try:
        link.start()
        deadline = time.monotonic() + 5
        while link.state.up is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(1.0)  # several attempts with back-off
        assert link.state.up is False and "'deleted' is not a list" in link.state.error
        assert link.updates() == []
        lines = stream.getvalue().splitlines()
        assert len(lines) == 1 and "fleet link to" in lines[0] and " lost: " in lines[0]
        assert link._thread.is_alive()
    finally:
        link.stop()
        server.shutdown()
        server.server_close()


def test_pushes_wait_in_a_bounded_queue_while_the_lapi_is_down() -> None:
    link = FleetLink(CONFIG, EventLog(journal=False, stream=io.StringIO()))
    pushes = [PushBan(net(f"198.51.{i // 256}.{i % 256}/32"), UDP_ONLY, "r", 30, "")
              for i in range(QUEUE_MAX + 5)]
    link.submit(list(pushes))  # not started: nothing is sent
    assert (link.state.queued, link.state.dropped) == (QUEUE_MAX, 5)
    # a withdrawal takes the pushes of its ban out of the queue
    link.submit([Withdraw(pushes[-1].target)])
    assert link.state.queued == QUEUE_MAX
