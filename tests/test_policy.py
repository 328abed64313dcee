from __future__ import annotations

import ipaddress

from floodd.config import build_config
from floodd.detect.parse import Batch, Record
from floodd.decide.policy import Offence, Trigger, ban_time, evaluate, plan
from floodd.detect.traffic import Traffic

net = ipaddress.ip_network


def addr(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def feed(t: Traffic, ts: float, src: str, n: int, qtype: int = 1) -> None:
    records: list[Record] = [(ts, addr(src), 17, qtype, None, 0)] * n
    t.add_batch(Batch(records, n, 0))


RULES = {"rules": [
    {"name": "flood", "threshold": 100, "window": 10},
    {"name": "any", "match": "ANY", "threshold": 4, "window": 60, "ban_time": 3600},
    {"name": "net", "aggregate": "prefix", "prefix_v4": 24, "threshold": 250, "window": 10},
    {"name": "rotating", "match": "ANY", "threshold": 1, "window": 10,
     "total_threshold": 50},
    {"name": "watch", "threshold": 50, "window": 10, "action": "warn"},
]}


def test_per_source_qtype_and_prefix_rules() -> None:
    config = build_config(RULES)
    t = Traffic(config)
    feed(t, 100.0, "198.51.100.7", 101)      # over flood (100) and watch (50)
    feed(t, 100.0, "198.51.100.8", 100)      # not over flood; over watch
    feed(t, 100.0, "198.51.100.9", 60)       # the /24 now has 261 > 250
    feed(t, 100.0, "203.0.113.5", 5, 255)    # 5 ANY > 4
    got = {(x.rule, str(x.network), x.count) for x in evaluate(100.5, t, config.rules)}
    assert got == {
        ("flood", "198.51.100.7/32", 101),
        ("watch", "198.51.100.7/32", 101), ("watch", "198.51.100.8/32", 100),
        ("watch", "198.51.100.9/32", 60),
        ("net", "198.51.100.0/24", 261),
        ("any", "203.0.113.5/32", 5),
    }
    # Ten seconds later the 10 s rules have forgotten; the 60 s ANY rule has not.
    got = {(x.rule, str(x.network)) for x in evaluate(110.5, t, config.rules)}
    assert got == {("any", "203.0.113.5/32")}


def test_rotating_guard_arms_only_above_the_total() -> None:
    config = build_config(RULES)
    t = Traffic(config)
    for i in range(20):                          # 20 sources x 2 ANY = 40 <= 50
        feed(t, 200.0, f"198.18.0.{i}", 2, 255)
    assert not [x for x in evaluate(200.0, t, config.rules) if x.rule == "rotating"]
    for i in range(20, 30):                      # 60 in all > 50: armed
        feed(t, 200.0, f"198.18.0.{i}", 2, 255)
    feed(t, 200.0, "198.18.1.1", 1, 255)         # one ANY is not more than 1
    hit = {str(x.network) for x in evaluate(200.0, t, config.rules) if x.rule == "rotating"}
    assert hit == {f"198.18.0.{i}/32" for i in range(30)}


def trig(src: str, rate: float = 100.0, action: str = "ban", rule: str = "flood") -> Trigger:
    return Trigger(rule, action, net(src), int(rate * 10), 10.0, 600.0)


def never(_: object) -> None:
    return None


def test_plan_safety_cap_dedup_and_order() -> None:
    protected = {net("192.0.2.53/32"): "this host's address"}
    triggers = [trig("198.51.100.1/32", 100), trig("198.51.100.2/32", 300),
                trig("192.0.2.53/32", 900), trig("203.0.113.9/32", 200),
                trig("203.0.113.7/32", 50, action="warn"),
                trig("198.51.100.2/32", 300, rule="other"),
                trig("198.18.5.5/32", 400)]
    p = plan(0.0, triggers, [net("198.18.0.0/16")], protected.get, max_bans=3,
             offences={}, factor=2.0, cap=86400.0)
    assert [str(t.network) for t, _ in p.bans] == ["198.51.100.2/32", "203.0.113.9/32"]
    assert [str(t.network) for t in p.warnings] == ["203.0.113.7/32"]
    reasons = {str(r.trigger.network): r.reason for r in p.refused}
    assert reasons == {"192.0.2.53/32": "this host's address",
                       "198.51.100.1/32": "max_bans (3) reached"}


def test_escalation_for_repeat_offenders() -> None:
    t = trig("198.51.100.1/32")
    assert ban_time(t, None, 1000.0, 2.0, 86400.0) == 600.0
    assert ban_time(t, Offence(1, 900.0), 1000.0, 2.0, 86400.0) == 1200.0
    assert ban_time(t, Offence(3, 900.0), 1000.0, 2.0, 86400.0) == 4800.0
    assert ban_time(t, Offence(10, 900.0), 1000.0, 2.0, 86400.0) == 86400.0
    assert ban_time(t, Offence(3, 0.0), 100000.0, 2.0, 86400.0) == 600.0  # forgotten
    p = plan(1000.0, [t], [], never, 10, {net("198.51.100.1/32"): Offence(2, 999.0)},
             3.0, 86400.0)
    assert p.bans[0][1] == 5400.0
