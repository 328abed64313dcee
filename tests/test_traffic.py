from __future__ import annotations

import ipaddress

from floodd.config import Config, Rule, build_config
from floodd.detect.parse import F_EXTRA, F_MALFORMED, Record
from floodd.detect.traffic import (MALFORMED_QTYPE, Traffic, address_network, packet_sources,
                                   prefix_key, prefix_keys, prefix_network, qtype_key,
                                   split_qtype_key)

A, ANY = 1, 255
S1 = ipaddress.ip_address("198.51.100.7").packed
S2 = ipaddress.ip_address("198.51.100.8").packed
S6 = ipaddress.ip_address("2001:db8:1::7").packed


def rec(ts: float, src: bytes, qtype: int = A, flags: int = 0, proto: int = 17,
        hop: int = 64) -> Record:
    return (ts, src, proto, qtype, flags, hop)


def rule(config: Config, name: str) -> Rule:
    return next(r for r in config.rules if r.name == name)


def test_prefix_keys_round_trip() -> None:
    assert prefix_network(prefix_key(S1, 24, 64), 24, 64) == ipaddress.ip_network(
        "198.51.100.0/24")
    assert prefix_network(prefix_key(S1, 22, 64), 22, 64) == ipaddress.ip_network(
        "198.51.100.0/22")
    assert prefix_network(prefix_key(S6, 24, 56), 24, 56) == ipaddress.ip_network(
        "2001:db8:1::/56")
    assert prefix_key(S1, 24, 64) != prefix_key(S6, 24, 24)  # families never collide
    assert address_network(S6) == ipaddress.ip_network("2001:db8:1::7/128")
    assert split_qtype_key(qtype_key(S6, MALFORMED_QTYPE)) == (S6, MALFORMED_QTYPE)


def test_prefix_keys_match_prefix_key() -> None:
    v4 = [ipaddress.ip_address(f"198.51.{i}.{j}").packed for i in (0, 100, 255) for j in (1, 7)]
    v6 = [S6, ipaddress.ip_address("2001:db8:ffff::1").packed]
    for sources in (v4, v6, v4 + v6):
        for bits in ((24, 64), (22, 56), (32, 128), (8, 17)):
            assert prefix_keys(sources, *bits) == [prefix_key(s, *bits) for s in sources]


def test_packet_sources_leaves_out_extra_messages() -> None:
    records = [rec(0, S1), rec(0, S1, flags=F_EXTRA, proto=6), rec(0, S2, flags=F_MALFORMED)]
    assert packet_sources(records) == [S1, S2]


def test_tables_follow_the_rules() -> None:
    config = build_config({"rules": [
        {"name": "all", "threshold": 10},
        {"name": "any", "match": "ANY", "threshold": 2},
        {"name": "bad", "match": "malformed", "threshold": 2},
        {"name": "net", "aggregate": "prefix", "prefix_v4": 24, "threshold": 10},
        {"name": "guard", "match": "ANY", "threshold": 1, "total_threshold": 2},
    ]})
    t = Traffic(config)
    now = 100.5
    t.add_batch(now, [rec(100.1, S1), rec(100.2, S1, ANY), rec(100.3, S2, ANY),
                      rec(100.4, S2, -1, F_MALFORMED), rec(100.5, S6, A)])
    assert t.packets == 5
    assert t.table_for(rule(config, "all")).count(now, S1) == 2
    pairs = t.table_for(rule(config, "any"))
    assert pairs is t.table_for(rule(config, "bad"))  # same kind and window: one table
    assert pairs.count(now, qtype_key(S1, ANY)) == 1
    assert pairs.count(now, qtype_key(S1, A)) == 0  # A is not watched by any rule
    assert pairs.count(now, qtype_key(S2, MALFORMED_QTYPE)) == 1
    assert t.table_for(rule(config, "net")).count(now, prefix_key(S1, 24, 64)) == 4
    assert t.rule_total(now, rule(config, "guard")) == 2
    assert t.rule_total(now, rule(config, "all")) == 5
    assert t.sources is t.table_for(rule(config, "all"))


def test_each_rule_window_has_its_own_table() -> None:
    config = build_config({"rules": [
        {"name": "any-minute", "match": "ANY", "threshold": 4, "window": 60},
        {"name": "any-10s", "match": "ANY", "threshold": 1, "window": 10},
        {"name": "all-5s", "threshold": 10, "window": 5},
        {"name": "all-20s", "threshold": 10, "window": 20},
    ]})
    t = Traffic(config)
    minute, ten = (t.table_for(rule(config, n)) for n in ("any-minute", "any-10s"))
    assert (minute.window, ten.window) == (60.0, 10.0)
    for second in range(30):
        t.add_batch(1000.5 + second, [rec(0.0, S1, ANY), rec(0.0, S2, A)])
    now = 1029.6
    assert minute.count(now, qtype_key(S1, ANY)) == 30
    assert ten.count(now, qtype_key(S1, ANY)) == 10
    assert t.table_for(rule(config, "all-5s")).count(now, S1) == 5
    assert t.table_for(rule(config, "all-20s")).count(now, S2) == 20
    assert t.sources.window == 20.0  # status and top read the longest per-source window


def test_records_are_counted_at_the_time_given_not_their_own() -> None:
    # The daemon stamps batches with its monotonic clock; the records' own (wall-clock)
    # timestamps may step by an hour either way and change nothing.
    t = Traffic(build_config({}))
    for i, wall in enumerate((5000.0, 1400.0, 8600.0)):
        t.add_batch(10.0 + i, [rec(wall, S1)] * 100)
    assert t.sources.count(12.0, S1) == 300


def test_banned_sources_are_skipped_but_counted_in_totals() -> None:
    t = Traffic(build_config({}))
    t.add_batch(1.0, [rec(1.0, S1), rec(1.0, S2)], skip={S1})
    assert t.packets == 2
    assert t.sources.count(1.0, S1) == 0 and t.sources.count(1.0, S2) == 1


def test_forget_clears_a_source_in_every_table_keyed_by_it() -> None:
    config = build_config({"rules": [
        {"name": "all-5s", "threshold": 10, "window": 5},
        {"name": "all-20s", "threshold": 10, "window": 20},
        {"name": "any-10s", "match": "ANY", "threshold": 1, "window": 10},
        {"name": "net", "aggregate": "prefix", "prefix_v4": 24, "threshold": 10, "window": 5},
    ]})
    t = Traffic(config)
    t.add_batch(1.0, [rec(0.0, S1, ANY), rec(0.0, S1, A), rec(0.0, S2, ANY)])
    t.forget(S1)
    for name in ("all-5s", "all-20s"):
        assert t.table_for(rule(config, name)).count(1.0, S1) == 0
        assert t.table_for(rule(config, name)).count(1.0, S2) == 1
    assert t.table_for(rule(config, "any-10s")).count(1.0, qtype_key(S1, ANY)) == 0
    assert t.table_for(rule(config, "any-10s")).count(1.0, qtype_key(S2, ANY)) == 1
    assert t.table_for(rule(config, "net")).count(1.0, prefix_key(S1, 24, 64)) == 3


RELOAD_RULES = [
    {"name": "flood", "threshold": 100, "window": 10},
    {"name": "any", "match": "ANY", "threshold": 4, "window": 60},
    {"name": "net", "aggregate": "prefix", "prefix_v4": 24, "threshold": 250, "window": 10},
    {"name": "guard", "match": "ANY", "threshold": 1, "window": 10, "total_threshold": 50},
]


def test_reconfigure_keeps_the_counts_of_unchanged_tables() -> None:
    old = build_config({"rules": RELOAD_RULES})
    t = Traffic(old)
    for second in range(5):
        t.add_batch(100.0 + second, [rec(0.0, S1, ANY)] * 20)
    now = 104.0
    kept = {r.name: t.table_for(r) for r in old.rules}
    # New thresholds, ban times and names change no table; a new window does.
    changed = [dict(r) for r in RELOAD_RULES]
    changed[0].update(threshold=50, ban_time=300)
    changed[1].update(name="any-renamed")
    changed[2].update(window=20)
    new = build_config({"rules": changed})
    t.reconfigure(new)
    assert t.table_for(rule(new, "flood")) is kept["flood"]
    assert t.table_for(rule(new, "flood")).count(now, S1) == 100
    assert t.table_for(rule(new, "any-renamed")) is kept["any"]
    assert t.table_for(rule(new, "any-renamed")).count(now, qtype_key(S1, ANY)) == 100
    assert t.rule_total(now, rule(new, "guard")) == 100
    assert t.table_for(rule(new, "net")) is not kept["net"]
    assert t.table_for(rule(new, "net")).count(now, prefix_key(S1, 24, 64)) == 0
    assert t.packets == 100
    # Counting goes on into the kept and the new tables alike.
    t.add_batch(now, [rec(0.0, S1, ANY)])
    assert t.table_for(rule(new, "flood")).count(now, S1) == 101
    assert t.table_for(rule(new, "net")).count(now, prefix_key(S1, 24, 64)) == 1
    # The bucket or the capacity change every table.
    for rate_table in ({"bucket": 2}, {"capacity": 5000}):
        other = build_config({"rules": changed, "rate_table": rate_table})
        t.reconfigure(other)
        assert t.table_for(rule(other, "flood")).count(now, S1) == 0
