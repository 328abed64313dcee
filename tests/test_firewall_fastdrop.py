"""The kernel's fast drop (floodd.enforce.firewall.fastdrop): the meters a configuration
gives, the ruleset, reading it back, and the real kernel dropping a burst far over the
rate from a source and hop value (and nothing else) in a lab of two namespaces."""

from __future__ import annotations

import ipaddress
import json
import math
import sys
from typing import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import lab_problem
from floodd.config import FastDropConfig, build_config
from floodd.enforce.firewall.fastdrop import (FastDropped, KernelFastDrop, meter_rules, meters,
                                              parse_dropped, setup_script, spare_script)
from lab.netns import Lab, in_netns

net = ipaddress.ip_network


def test_meters_of_the_shipped_rules() -> None:
    config = build_config({"fast_drop": {"factor": 10}})
    # only query-flood counts every query per source without a guard
    assert [r.name for r in meter_rules(config)] == ["query-flood"]
    (m,) = meters(config)
    assert (m.rule, m.rate, m.unit, m.burst) == ("query-flood", 5000, "second", 5000)
    assert m.per_second == 5000
    assert m.timeout == 2  # the bucket refills in a second
    assert meters(build_config({"fast_drop": {"factor": 0}})) == []  # off
    (default,) = meters(build_config({}))  # twice the rule's rate, as shipped
    assert (default.rate, default.unit) == (1000, "second")


def test_a_slow_rate_is_given_in_a_longer_unit_rounded_up() -> None:
    config = build_config({"fast_drop": {"factor": 1}, "rules": [
        {"name": "slow", "threshold": 150, "window": 7, "ban_time": 600}]})
    (m,) = meters(config)
    # 150 / 7 = 21.43/s: 1285.7 a minute, rounded up
    assert (m.rate, m.unit, m.burst) == (1286, "minute", 150)


@given(threshold=st.integers(100, 10**7), window=st.integers(1, 60),
       factor=st.floats(1, 1000))
def test_a_meter_is_never_stricter_than_its_rule(threshold: int, window: int,
                                                 factor: float) -> None:
    config = build_config({"fast_drop": {"factor": factor}, "rate_table": {"window": 60},
                           "rules": [{"name": "r", "threshold": threshold, "window": window,
                                      "ban_time": 600}]})
    (m,) = meters(config)
    assert m.burst == threshold
    assert m.per_second >= factor * threshold / window * (1 - 1e-12)
    assert m.per_second <= factor * threshold / window * 1.01 + 1 / 86400
    assert m.timeout >= math.ceil(threshold / m.per_second)


def test_the_ruleset_spares_and_meters_per_source_and_hop() -> None:
    config = build_config({"fast_drop": {"factor": 10, "hold": 5, "max_sources": 100}})
    script = setup_script(meters(config), config.fast_drop, [53, 5353],
                          [net("127.0.0.0/8"), net("::1/128"), net("192.0.2.53/32")])
    assert "ip saddr @spare4 return" in script
    assert ("meta nfproto ipv4 udp dport { 53, 5353 } update @meter4_0 { ip saddr . ip ttl "
            "limit rate over 5000/second burst 5000 packets } update @over4 { ip saddr . ip ttl }"
            ' comment "query-flood"') in script
    assert "ip6 saddr . ip6 hoplimit @over6 drop" in script
    assert "size 100; flags dynamic, timeout; timeout 5s; }" in script
    assert "add element inet floodd_fast spare4 { 127.0.0.0/8, 192.0.2.53 }" in script
    assert "tcp" not in script  # UDP only: a TCP client completed a handshake


def test_spare_script_replaces_both_families() -> None:
    assert spare_script([net("2001:db8::/32")]) == (
        "flush set inet floodd_fast spare4\nflush set inet floodd_fast spare6\n"
        "add element inet floodd_fast spare6 { 2001:db8::/32 }\n")


def test_parse_dropped_reads_pairs_and_leaves_out_the_rest() -> None:
    data = json.loads("""{"nftables": [{"metainfo": {"version": "1.0.6"}},
      {"set": {"family": "inet", "name": "dropped4", "table": "floodd_fast",
       "type": ["ipv4_addr", "integer"], "size": 20000, "flags": ["timeout"], "timeout": 10,
       "elem": [{"elem": {"val": {"concat": ["198.51.100.7", 64]}, "expires": 7,
                 "counter": {"packets": 14957, "bytes": 867506}}},
                {"elem": {"val": {"concat": ["198.51.100.8", {"range": [1, 2]}]}}},
                {"elem": {"val": "198.51.100.9"}}]}}]}""")
    assert parse_dropped(data, 10.0) == [
        FastDropped(net("198.51.100.7/32"), 64, 14957, 867506, 3.0)]
    assert parse_dropped({"nftables": []}, 10.0) == []


# --- the real kernel ---------------------------------------------------------------------
FLOODER = "198.51.100.7"
SPARED = "198.51.100.8"
SLOW = "198.51.100.9"
FLOODER6 = "2001:db8:1::7"

SEND = """
import socket, sys, time
source, count, pause = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
family = socket.AF_INET6 if ":" in source else socket.AF_INET
server = "2001:db8::53" if ":" in source else "192.0.2.53"
s = socket.socket(family, socket.SOCK_DGRAM)
s.bind((source, 0))
for _ in range(count):
    s.sendto(b"\\0" * 12, (server, 53))
    if pause:
        time.sleep(pause)
"""


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    problem = lab_problem(("ip", "nft"))
    if problem:
        pytest.skip(problem)
    with Lab("fd") as the_lab:
        for address in (FLOODER, SPARED, SLOW, FLOODER6):
            the_lab.add_client_address(address)
        yield the_lab


def _send(lab: Lab, source: str, count: int, pause: float = 0.0) -> None:
    lab.run(lab.client_ns, [sys.executable, "-c", SEND, source, str(count), str(pause)])


def test_the_kernel_drops_a_burst_far_over_the_rate_and_nothing_else(lab: Lab) -> None:
    config = build_config({"fast_drop": {"factor": 10, "hold": 5}})
    kernel = KernelFastDrop(config.fast_drop)
    spared = [net(f"{SPARED}/32"), net("127.0.0.0/8")]
    in_netns(lab.server_ns, lambda: kernel.setup(meters(config), [53], spared))
    try:
        assert in_netns(lab.server_ns, kernel.dropped) == []
        _send(lab, FLOODER, 20_000)  # in some 0.05 s: far over 5,000/s
        _send(lab, FLOODER6, 20_000)
        _send(lab, SPARED, 20_000)  # as fast, but spared
        _send(lab, SLOW, 300, pause=0.002)  # under 500/s
        dropped = {(str(p.network.network_address), p.hop): p
                   for p in in_netns(lab.server_ns, kernel.dropped)}
        assert set(dropped) == {(FLOODER, 64), (FLOODER6, 64)}, dropped
        for pair in dropped.values():
            # a bucket of 5,000, refilled at 5,000/s while the burst lasts
            assert 20_000 - 5_000 - 5_000 <= pair.packets <= 15_000, pair
            assert pair.idle <= 2
        # a new hold value and spared networks replace the table and its meters
        in_netns(lab.server_ns, lambda: kernel.spare([net(f"{FLOODER}/32")]))
        assert "198.51.100.7" in lab.run(lab.server_ns, ["nft", "list", "set", "inet",
                                                         "floodd_fast", "spare4"],
                                         text=True).stdout
    finally:
        in_netns(lab.server_ns, kernel.teardown)
    listing = lab.run(lab.server_ns, ["nft", "list", "tables"], text=True).stdout
    assert "floodd_fast" not in listing


def test_a_settings_change_is_one_transaction_nft_accepts(lab: Lab) -> None:
    kernel = KernelFastDrop(FastDropConfig(factor=2, hold=1, max_sources=1, meter_size=1024))
    config = build_config({"fast_drop": {"factor": 2}})
    try:
        for _ in range(2):  # set up over an existing table: replaced
            in_netns(lab.server_ns, lambda: kernel.setup(meters(config), [53, 853], []))
        shown = lab.run(lab.server_ns, ["nft", "list", "table", "inet", "floodd_fast"],
                        text=True).stdout
        assert "limit rate over 1000/second burst 5000 packets" in shown, shown
        assert shown.count("set meter4_0") == 1
    finally:
        in_netns(lab.server_ns, kernel.teardown)
