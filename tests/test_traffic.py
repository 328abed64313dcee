from __future__ import annotations

import ipaddress

from floodd.config import build_config
from floodd.detect.parse import F_EXTRA, F_MALFORMED, Batch, Record
from floodd.detect.traffic import (MALFORMED_QTYPE, Traffic, address_network, packet_sources,
                            prefix_key, prefix_keys, prefix_network, qtype_key,
                            split_qtype_key)

A, ANY = 1, 255
S1 = ipaddress.ip_address("198.51.100.7").packed
S2 = ipaddress.ip_address("198.51.100.8").packed
S6 = ipaddress.ip_address("2001:db8:1::7").packed


def rec(ts: float, src: bytes, qtype: int = A, flags: int = 0, proto: int = 17) -> Record:
    return (ts, src, proto, qtype, None, flags)


def batch(records: list[Record]) -> Batch:
    return Batch(records, len(records), 0)


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
    ]})
    t = Traffic(config)
    t.add_batch(batch([rec(100.1, S1), rec(100.2, S1, ANY), rec(100.3, S2, ANY),
                       rec(100.4, S2, -1, F_MALFORMED), rec(100.5, S6, A)]))
    now = 100.5
    assert t.packets == 5 and t.malformed == 1
    assert t.sources.count(now, S1) == 2
    assert t.by_qtype.count(now, qtype_key(S1, ANY)) == 1
    assert t.by_qtype.count(now, qtype_key(S1, A)) == 0  # A is not watched by any rule
    assert t.by_qtype.count(now, qtype_key(S2, MALFORMED_QTYPE)) == 1
    assert t.prefixes[(24, 64)].count(now, prefix_key(S1, 24, 64)) == 4
    assert t.qtype_totals.count(now, ANY) == 2


def test_batches_spanning_buckets_are_split_and_reported() -> None:
    t = Traffic(build_config({}))
    ends: list[float] = []
    t.on_bucket_end = ends.append
    t.add_batch(batch([rec(10.0, S1), rec(10.5, S1), rec(12.2, S1), rec(15.9, S2)]))
    t.add_batch(batch([rec(16.1, S1)]))
    assert ends == [10.5, 12.2, 15.9]
    assert t.sources.count(16.1, S1, window=1) == 1
    assert t.sources.count(16.1, S1, window=10) == 4


def test_banned_sources_are_skipped_but_counted_in_totals() -> None:
    t = Traffic(build_config({}))
    t.add_batch(batch([rec(1.0, S1), rec(1.0, S2)]), skip={S1})
    assert t.packets == 2
    assert t.sources.count(1.0, S1) == 0 and t.sources.count(1.0, S2) == 1
