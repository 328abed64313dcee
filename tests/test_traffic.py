from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from floodd.config import Config, Rule, build_config
from floodd.detect.hops import HopEvidence
from floodd.detect.parse import F_EXTRA, F_MALFORMED, F_VERIFIED, Record
from floodd.detect.ratetable import RateTable
from floodd.detect.traffic import (HOP_SUFFIX, MALFORMED_QTYPE, TCP_SUFFIX, Traffic,
                                   address_network, packet_sources, prefix_counts, prefix_key,
                                   prefix_keys, prefix_network, qtype_key, repeating,
                                   split_qtype_key)

A, ANY = 1, 255
S1 = ipaddress.ip_address("198.51.100.7").packed
S2 = ipaddress.ip_address("198.51.100.8").packed
S6 = ipaddress.ip_address("2001:db8:1::7").packed


def rec(ts: float, src: bytes, qtype: int = A, flags: int = 0, proto: int = 17,
        hop: int = 64) -> Record:
    return (ts, src, proto, qtype, flags, hop)


def configured(data: dict[str, Any]) -> Config:
    """The configuration ``data`` describes, whole-source rules allowed below 100 packets."""
    trust = {"min_whole_evidence": 1, **data.get("trust", {})}
    return build_config({**data, "trust": trust})


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


def test_address_network_takes_packed_addresses_only() -> None:
    assert address_network(S1) == ipaddress.ip_network("198.51.100.7/32")
    with pytest.raises(ValueError):
        address_network(b"\x01\x02\x03")


def test_prefix_counts_sum_the_sources_of_each_prefix_first_seen_first() -> None:
    counts = prefix_counts({S6: 1, S1: 3, S2: 2}, 24, 64)
    assert list(counts.items()) == [(prefix_key(S6, 24, 64), 1), (prefix_key(S1, 24, 64), 5)]


def test_a_batch_repeats_its_sources_when_its_start_does() -> None:
    many = [ipaddress.ip_address(f"198.18.{i >> 8}.{i & 0xFF}").packed for i in range(300)]
    assert repeating([S1] * 300 + many)
    assert not repeating(many + [S1] * 300)
    assert not repeating([S1, S2])
    assert repeating([S1, S1])


def test_packet_sources_leaves_out_extra_messages() -> None:
    records = [rec(0, S1), rec(0, S1, flags=F_EXTRA, proto=6), rec(0, S2, flags=F_MALFORMED)]
    assert packet_sources(records) == [S1, S2]


def test_tables_follow_the_rules() -> None:
    config = configured({"rules": [
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
    config = configured({"rules": [
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
    config = configured({"rules": [
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
    old = configured({"rules": RELOAD_RULES})
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
    new = configured({"rules": changed})
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
        other = configured({"rules": changed, "rate_table": rate_table})
        t.reconfigure(other)
        assert t.table_for(rule(other, "flood")).count(now, S1) == 0


# --- hop evidence ---------------------------------------------------------------------

TCP = 6
EVIDENCE_RULES = [
    {"name": "flood", "threshold": 100, "window": 10},
    {"name": "any", "match": "ANY", "threshold": 4, "window": 60},
    {"name": "net", "aggregate": "prefix", "prefix_v4": 24, "threshold": 100, "window": 10},
]
NET = prefix_key(S1, 24, 64)  # S1 and S2 share it


def learn(t: Traffic, *sources: bytes, hop: int = 64) -> None:
    """Teach ``hop`` to each source (and its /24): first seen at 0, again at 60."""
    for now in (0.0, 60.0):
        t.add_batch(now, [rec(now, src, hop=hop) for src in sources])


def test_evidence_counts_the_packets_at_the_usual_hops_and_over_verified_tcp() -> None:
    config = configured({"rules": EVIDENCE_RULES})
    flood, any_rule, net = (rule(config, n) for n in ("flood", "any", "net"))
    t = Traffic(config)
    learn(t, S1)
    # A forged flood with S1's address at TTL 50, the real S1 at 64, S2 over TCP at 55.
    for second in range(100, 106):
        now = second + 0.5
        t.add_batch(now, [rec(now, S1, hop=50)] * 50 + [rec(now, S1, hop=64)] * 3
                    + [rec(now, S1, ANY, hop=50)] * 2 + [rec(now, S1, ANY, hop=64)]
                    + [rec(now, S2, ANY, F_VERIFIED, TCP, hop=55)] * 4)
    now = 105.5
    assert t.table_for(flood).count(now, S1) == 6 * 56
    assert t.evidence(now, flood, S1) == HopEvidence((64,), False, 6 * 4, 0)
    assert t.evidence(now, any_rule, S1) == HopEvidence((64,), False, 6, 0)
    assert t.evidence(now, flood, S2) == HopEvidence((55,), True, 24, 24)
    assert t.evidence(now, any_rule, S2) == HopEvidence((55,), True, 24, 24)
    # S2's handshakes verified the /24: its usual values are S2's.
    assert t.evidence(now, net, NET) == HopEvidence((55,), True, 24, 24)
    assert t.evidence(now, flood, S6) == HopEvidence((), False, 0, 0)


def test_evidence_is_as_exact_as_the_rule_count() -> None:
    # At any phase of the bucket, at_usual is what the rule's own table would count of
    # the packets at the usual hop values alone, and tcp of the verified packets alone.
    config = configured({"rules": [{"name": "flood", "threshold": 100, "window": 10,
                                    "ban_time": 600}]})
    flood = rule(config, "flood")
    t = Traffic(config)
    learn(t, S1)
    at_usual = RateTable[bytes](10.0, 1.0, 100_000)
    verified = RateTable[bytes](10.0, 1.0, 100_000)
    for i in range(400):
        now = 100.0 + i * 0.07
        flags = F_VERIFIED if i % 7 == 0 else 0  # the real client over TCP, at 64
        hop = 64 if flags else (64, 50, 64, 51, 52)[i % 5]
        batch = [rec(now, S1, hop=hop, flags=flags, proto=TCP if flags else 17)] * (1 + i % 3)
        t.add_batch(now, batch)
        if hop == 64:
            at_usual.add_keys(now, [S1] * len(batch))
        if flags:
            verified.add_keys(now, [S1] * len(batch))
        if i % 13 == 0:
            ev = t.evidence(now, flood, S1)
            assert ev.usual == (64,) and ev.verified
            assert (ev.at_usual, ev.tcp) == (at_usual.count(now, S1), verified.count(now, S1))


def test_a_flood_does_not_teach_its_own_hops() -> None:
    config = configured({"rules": EVIDENCE_RULES})
    flood, net = rule(config, "flood"), rule(config, "net")
    t = Traffic(config)
    learn(t, S1)
    t.add_batch(100.0, [rec(100.0, S1, hop=50)] * 200)
    t.suspect(100.5, flood, S1)  # the rule fired: S1 and its /24 are suspect
    for second in range(101, 161):  # the flood goes on for the next 60 s
        t.add_batch(float(second), [rec(second, S1, hop=50)] * 200)
    assert t.evidence(160.0, flood, S1).usual == (64,)
    assert t.evidence(160.0, net, NET).usual == (64,)
    # Without the rule firing, a minute of the same traffic makes 50 usual.
    quiet = Traffic(config)
    learn(quiet, S1)
    for second in range(100, 161):
        quiet.add_batch(float(second), [rec(second, S1, hop=50)])
    assert quiet.evidence(160.0, flood, S1).usual == (50, 64)


def test_banned_sources_teach_no_hops() -> None:
    config = configured({"rules": EVIDENCE_RULES})
    t = Traffic(config)
    learn(t, S1)
    for second in range(100, 161):
        t.add_batch(float(second), [rec(second, S1, hop=50)], skip={S1})
    assert t.evidence(160.0, rule(config, "flood"), S1).usual == (64,)


def test_forget_drops_the_evidence_but_not_the_usual_hops() -> None:
    config = configured({"rules": EVIDENCE_RULES})
    flood, any_rule = rule(config, "flood"), rule(config, "any")
    t = Traffic(config)
    learn(t, S1)
    t.add_batch(100.0, [rec(100.0, S1, ANY, F_VERIFIED, TCP, hop=64)] * 5)
    assert t.evidence(100.0, any_rule, S1) == HopEvidence((64,), True, 5, 5)
    t.forget(S1)
    assert t.evidence(100.0, flood, S1) == HopEvidence((64,), True, 0, 0)
    assert t.evidence(100.0, any_rule, S1) == HopEvidence((64,), True, 0, 0)


def test_reconfigure_keeps_the_hop_histories_and_evidence_tables() -> None:
    old = configured({"rules": EVIDENCE_RULES})
    t = Traffic(old)
    learn(t, S1)
    t.add_batch(100.0, [rec(100.0, S1, ANY, F_VERIFIED, TCP, hop=64)] * 5
                + [rec(100.0, S1, ANY, hop=50)] * 3)
    histories = dict(t.histories)
    evidence_tables = {s: table for s, table in t.tables.items()
                       if s.kind.endswith((HOP_SUFFIX, TCP_SUFFIX))}
    assert {s.kind for s in evidence_tables} == {
        "source+hop", "source+tcp", "source+qtype+hop", "source+qtype+tcp", "prefix+hop",
        "prefix+tcp"}
    changed = [{**r, "threshold": 200} for r in EVIDENCE_RULES]
    new = configured({"rules": changed, "trust": {"hop_learn_after": 120}})
    t.reconfigure(new)
    assert t.histories == histories
    assert all(h.learn_after == 120.0 for h in t.histories.values())
    assert all(t.tables[s] is table for s, table in evidence_tables.items())
    assert t.evidence(100.0, rule(new, "any"), S1) == HopEvidence((64,), True, 5, 5)
    # A new hop capacity starts the histories afresh; without hop_check there are none,
    # and no hop evidence, but the verified TCP is still counted.
    t.reconfigure(configured({"rules": changed, "trust": {"hop_capacity": 5000}}))
    assert t.evidence(100.0, rule(new, "any"), S1) == HopEvidence((), False, 0, 5)
    off = configured({"rules": changed, "trust": {"hop_check": False}})
    t.reconfigure(off)
    assert t.histories == {} and not any(s.kind.endswith("+hop") for s in t.tables)
    t.add_batch(101.0, [rec(101.0, S1, ANY, F_VERIFIED, TCP, hop=64)])
    assert t.evidence(101.0, rule(off, "any"), S1) == HopEvidence((), False, 0, 6)


# ---------------------------------------------------------------------------
# Sampled batches, and the keys that go over a ban threshold as they are counted.

def test_weight_multiplies_every_count() -> None:
    config = configured({"rules": [
        {"name": "all", "threshold": 100},
        {"name": "any", "match": "ANY", "threshold": 100, "total_threshold": 1000},
        {"name": "net", "aggregate": "prefix", "prefix_v4": 24, "threshold": 100}]})
    t = Traffic(config)
    t.add_batch(1.0, [rec(1.0, S1), rec(1.0, S1, ANY), rec(1.0, S2, flags=F_VERIFIED, proto=6)],
                weight=8)
    assert t.packets == 24
    assert t.table_for(rule(config, "all")).count(1.0, S1) == 16
    assert t.table_for(rule(config, "any")).count(1.0, qtype_key(S1, ANY)) == 8
    assert t.table_for(rule(config, "net")).count(1.0, prefix_key(S1, 24, 64)) == 24
    assert t.rule_total(1.0, rule(config, "any")) == 8
    assert t.evidence(1.0, rule(config, "all"), S2).tcp == 8


def test_a_key_going_over_a_ban_threshold_is_reported_once_until_taken() -> None:
    config = configured({"rules": [
        {"name": "all", "threshold": 5},
        {"name": "watch", "threshold": 2, "action": "warn"},
        {"name": "net", "aggregate": "prefix", "prefix_v4": 24, "threshold": 8}]})
    t = Traffic(config)
    all_rule, net = rule(config, "all"), rule(config, "net")
    assert not t.add_batch(1.0, [rec(1.0, S1)] * 5 + [rec(1.0, S2)] * 3)  # warn: no wake
    assert t.take_candidates() == {}
    assert t.add_batch(1.1, [rec(1.1, S1)])  # S1: 6 > 5; the /24: 9 > 8
    assert not t.add_batch(1.2, [rec(1.2, S1)])  # over already, reported
    taken = t.take_candidates()
    assert t.over(1.2, all_rule, taken) == [(S1, 7)]
    assert t.over(1.2, net, taken) == [(prefix_key(S1, 24, 64), 10)]
    # A warn rule wakes nothing, but reads the candidates of the table it shares.
    assert t.over(1.2, rule(config, "watch"), taken) == [(S1, 7)]
    assert t.take_candidates() == {}
    assert not t.add_batch(1.3, [rec(1.3, S1)])  # went over before: not again
    assert t.add_batch(1.4, [rec(1.4, S2)] * 3)  # S2: 6 > 5
    assert t.over(1.4, all_rule, t.take_candidates()) == [(S2, 6)]
    # Without candidates: every key over, most first.
    assert t.over(1.4, all_rule) == [(S1, 8), (S2, 6)]
    assert t.over(1.4, rule(config, "watch")) == [(S1, 8), (S2, 6)]


def test_weighted_keys_are_reported_when_their_sample_crosses() -> None:
    t = Traffic(configured({"rules": [{"name": "all", "threshold": 100}]}))
    assert not t.add_batch(1.0, [rec(1.0, S1)] * 12, weight=8)  # 96
    assert t.add_batch(1.1, [rec(1.1, S1)], weight=8)  # 104
    assert dict(t.take_candidates()).popitem()[1] == {S1}


def test_qtype_rule_candidates_and_over_are_of_its_qtype() -> None:
    config = configured({"rules": [
        {"name": "any", "match": "ANY", "threshold": 2},
        {"name": "txt", "match": "TXT", "threshold": 5}]})
    t = Traffic(config)
    txt = 16
    assert t.add_batch(1.0, [rec(1.0, S1, ANY)] * 3 + [rec(1.0, S2, txt)] * 3)
    taken = t.take_candidates()
    assert t.over(1.0, rule(config, "any"), taken) == [(qtype_key(S1, ANY), 3)]
    assert t.over(1.0, rule(config, "txt"), taken) == []  # S2's 3 TXT woke the table
    assert t.over(1.0, rule(config, "txt")) == []


def test_a_guard_arming_reports_the_keys_already_over() -> None:
    config = configured({"rules": [
        {"name": "rotating", "match": "ANY", "threshold": 1, "total_threshold": 4}]})
    t = Traffic(config)
    guard = rule(config, "rotating")
    assert not t.add_batch(1.0, [rec(1.0, S1, ANY)] * 2 + [rec(1.0, S2, ANY)])  # 3: unarmed
    assert t.add_batch(1.1, [rec(1.1, S6, ANY)] * 2)  # 5 > 4: armed, S1 and S6 over
    taken = t.take_candidates()
    assert sorted(t.over(1.1, guard, taken)) == sorted([(qtype_key(S1, ANY), 2),
                                                        (qtype_key(S6, ANY), 2)])
    assert t.add_batch(1.2, [rec(1.2, S2, ANY)])  # armed: counted as they cross
    assert t.over(1.2, guard, t.take_candidates()) == [(qtype_key(S2, ANY), 2)]


def test_reports_leave_out_banned_sources() -> None:
    t = Traffic(configured({"rules": [{"name": "all", "threshold": 2}]}))
    assert not t.add_batch(1.0, [rec(1.0, S1)] * 5, skip=frozenset({S1}))
    assert t.packets == 5 and t.take_candidates() == {}


def test_queries_by_qtype_count_every_query_banned_sources_included() -> None:
    traffic = Traffic(configured({}))
    batch = [rec(0, S1)] * 3 + [rec(0, S2, ANY), rec(0, S2, -1, flags=F_MALFORMED),
                                rec(0, S2, -1, flags=F_VERIFIED, proto=6)]  # a bare segment
    traffic.add_batch(1.0, batch, skip={S2})
    traffic.add_batch(1.0, [rec(0, S1, ANY)], weight=4)
    assert traffic.queries == {A: 3, ANY: 5, MALFORMED_QTYPE: 1}


def test_qtype_mix_estimates_each_sources_types_from_a_sample() -> None:
    traffic = Traffic(configured({}))
    for _ in range(40):  # batches of 5: the sample runs on across batches
        traffic.add_batch(1.0, [rec(0, S1)] * 3 + [rec(0, S1, ANY), rec(0, S2, 28)])
    mix, mix2, mix6 = traffic.qtype_mixes(1.0, [S1, S2, S6])
    assert set(mix) == {A, ANY} and list(mix)[0] == A, mix  # the busiest type first
    assert 0.5 < mix[A] / (3 * 40) < 1.5 and 0.5 < mix[ANY] / 40 < 1.5, mix
    assert mix2 and set(mix2) == {28}
    assert mix6 == {}
    assert traffic.table_keys()["mix"] == 3


def test_table_keys_are_summed_by_kind() -> None:
    traffic = Traffic(configured({"rules": [
        {"name": "a", "match": "all", "threshold": 10, "window": 10},
        {"name": "b", "match": "all", "threshold": 10, "window": 20},
        {"name": "c", "match": "ANY", "threshold": 10, "window": 10}]}))
    traffic.add_batch(1.0, [rec(0, S1), rec(0, S2, ANY)])
    keys = traffic.table_keys()
    assert keys["source"] == 4  # two tables (two windows), two sources each
    assert keys["source+qtype"] == 1


def test_counting_per_source_or_per_packet_gives_the_same_tables() -> None:
    # The same packets, once in an order whose start repeats its sources (counted per
    # distinct source) and once not (per packet): every table, crossing and piece of
    # evidence agrees.
    config = configured({"rules": [
        {"name": "flood", "threshold": 400, "window": 10},
        {"name": "any", "match": "ANY", "threshold": 3, "window": 60},
        {"name": "net", "aggregate": "prefix", "prefix_v4": 24, "threshold": 500,
         "window": 10}]})
    many = [ipaddress.ip_address(f"203.0.113.{i}").packed for i in range(1, 200)] + \
        [ipaddress.ip_address(f"2001:db8::{i:x}").packed for i in range(1, 200)]
    heavy = [rec(0, S1, hop=50)] * 300 + [rec(0, S1, ANY, hop=64)] * 4 + \
        [rec(0, S2, F_VERIFIED, TCP, hop=55)] * 200 + [rec(0, S2, flags=F_MALFORMED)] * 5
    light = [rec(0, src, ANY if i % 3 else A, hop=60) for i, src in enumerate(many)]
    repeats, spread = Traffic(config), Traffic(config)
    for t in (repeats, spread):
        learn(t, S1, S2, *many[:50])
    woke = []
    for second in range(100, 103):
        now = second + 0.5
        woke.append((repeats.add_batch(now, heavy + light),
                     spread.add_batch(now, light + heavy)))
        assert dict(repeats.take_candidates()) == dict(spread.take_candidates())
    # S1 over "any" and its /24 over "net" in the first batch, S1 over "flood" in the
    # second, the other /24 and /64 over "net" in the third.
    assert woke == [(True, True)] * 3
    assert repeats.packets == spread.packets
    for spec, table in repeats.tables.items():
        other = spread.tables[spec]
        assert sorted(table.over(now, 0)) == sorted(other.over(now, 0)), spec
        assert table.total(now) == other.total(now)
    for r in config.rules:
        for key in (S1, S2, NET, many[0], many[-1]):
            assert repeats.evidence(now, r, key) == spread.evidence(now, r, key)
        assert repeats.over(now, r) == spread.over(now, r) != []


def test_without_crossings_nothing_is_reported_and_the_same_is_counted() -> None:
    config = configured({"rules": [{"name": "all", "threshold": 5},
                                   {"name": "any", "match": "ANY", "threshold": 1,
                                    "total_threshold": 2}]})
    watching, counting = Traffic(config), Traffic(config, crossings=False)
    batch = [rec(1.0, S1)] * 8 + [rec(1.0, S2, ANY)] * 3
    assert watching.add_batch(1.0, batch) and not counting.add_batch(1.0, batch)
    assert counting.take_candidates() == {}
    for r in config.rules:
        assert counting.over(1.0, r) == watching.over(1.0, r) != []
