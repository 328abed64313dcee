"""The lab's load generators and meters (floodd/lab/load.py): parsers on real tool output,
frames checked with floodd's own parser, and the generators run in real namespaces."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from floodd.config import load_config
from floodd.detect.parse import F_MALFORMED, LINKTYPE_ETHERNET, Parser
from floodd.qtypes import qtype_code
from lab import forge, load

WIRE = load.Wire(bytes.fromhex("0200000000aa"), bytes.fromhex("0200000000bb"))

# dnsperf 2.10.0 with -S 1, its source address banned after two seconds.
DNSPERF_OUTPUT = """\
DNS Performance Testing Tool
Version 2.10.0

[Status] Command line: dnsperf -s 192.0.2.53 -a 198.51.100.7 -d /tmp/q.txt -l 4 -Q 150 -q 2000 -t 1 -S 1
[Status] Sending queries (to 192.0.2.53:53)
[Status] Started at: Wed Nov 25 14:13:15 2026
[Status] Stopping after 4.000000 seconds
1795615996.456128: 150.835740
1795615997.457223: 149.835930
1795615998.458241: 0.000000
[Timeout] Query timed out: msg id 301
[Timeout] Query timed out: msg id 302
[Status] Testing complete (time limit)

Statistics:

  Queries sent:         600
  Queries completed:    301 (50.17%)
  Queries lost:         299 (49.83%)

  Response codes:       NOERROR 301 (100.00%)
  Average packet size:  request 31, response 50
  Run time (s):         4.000225
  Queries per second:   75.245767

  Average Latency (s):  0.000075 (min 0.000015, max 0.000512)
  Latency StdDev (s):   0.000070

"""

# `nft -j list table inet floodd` (nftables 1.0.6): a ban by floodd with its counter, an
# element added by hand without a comment, an IPv6 ban, a prefix; and a plain set whose
# elements are bare values.
NFT_LISTING = json.loads("""
{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5",
 "json_schema_version": 1}}, {"table": {"family": "inet", "name": "floodd", "handle": 1}},
 {"set": {"family": "inet", "name": "ban4", "table": "floodd", "type": "ipv4_addr",
 "handle": 1, "flags": ["timeout"], "elem": [{"elem": {"val": "198.51.100.7", "timeout": 600,
 "expires": 599, "comment": "floodd since=1795615085 expires=1795615685 rule=query-flood",
 "counter": {"packets": 12, "bytes": 720}}}, {"elem": {"val": "198.51.100.9", "timeout": 300,
 "expires": 299, "counter": {"packets": 0, "bytes": 0}}}], "stmt": [{"counter": null}]}},
 {"set": {"family": "inet", "name": "ban6", "table": "floodd", "type": "ipv6_addr",
 "handle": 2, "flags": ["timeout"], "elem": [{"elem": {"val": "2001:db8:1::66",
 "timeout": 60, "expires": 59,
 "comment": "floodd since=1795615085 expires=1795615145 rule=rotating-any",
 "counter": {"packets": 0, "bytes": 0}}}], "stmt": [{"counter": null}]}},
 {"set": {"family": "inet", "name": "ban4net", "table": "floodd", "type": "ipv4_addr",
 "handle": 3, "flags": ["interval", "timeout"], "elem": [{"elem": {"val": {"prefix":
 {"addr": "203.0.113.0", "len": 24}}, "timeout": 600, "expires": 599,
 "comment": "floodd since=1795615085 expires=1795615685 rule=prefix-flood",
 "counter": {"packets": 0, "bytes": 0}}}], "stmt": [{"counter": null}]}},
 {"set": {"family": "inet", "name": "plain", "table": "floodd", "type": "ipv4_addr",
 "handle": 4, "elem": ["192.0.2.1"]}}]}
""")

# `nft -j list table inet floodd` (nftables 1.0.6, trimmed to the sets): narrowed bans.
# (A qtype element's last field, 0x0000ff0001 for ANY, is listed as 16711681.)
# A whole-UDP ban of an address and of a prefix, a ban of one address's UDP at TTL / hop
# limit other than 64 (two elements, one ban), ANY-only bans with and without a hop
# exception, and the gate set of the sources with an ANY-only ban.
NFT_NARROWED = json.loads("""
{"nftables": [
 {"set": {"name": "udp4", "type": "ipv4_addr", "flags": ["timeout"], "elem": [
  {"elem": {"val": "203.0.113.11", "counter": {"packets": 0, "bytes": 0},
   "comment": "floodd since=1 expires=61 scope=udp rule=query-flood"}}]}},
 {"set": {"name": "udp6net", "type": "ipv6_addr", "flags": ["interval", "timeout"], "elem": [
  {"elem": {"val": {"prefix": {"addr": "2001:db8:1::", "len": 64}},
   "counter": {"packets": 0, "bytes": 0},
   "comment": "floodd since=1 expires=61 scope=udp rule=prefix-flood"}}]}},
 {"set": {"name": "hop6", "type": ["ipv6_addr", "integer"], "flags": ["interval", "timeout"],
  "elem": [
  {"elem": {"val": {"concat": ["2001:db8:1::10", {"range": [0, 63]}]},
   "counter": {"packets": 7, "bytes": 700},
   "comment": "floodd since=1 expires=61 scope=udp,except=64 rule=query-flood"}},
  {"elem": {"val": {"concat": ["2001:db8:1::10", {"range": [65, 255]}]},
   "counter": {"packets": 3, "bytes": 300},
   "comment": "floodd since=1 expires=61 scope=udp,except=64 rule=query-flood"}}]}},
 {"set": {"name": "qtype4", "type": ["ipv4_addr", "integer", "integer"],
  "flags": ["interval", "timeout"], "elem": [
  {"elem": {"val": {"concat": ["203.0.113.10", {"range": [0, 63]}, 16711681]},
   "counter": {"packets": 0, "bytes": 0},
   "comment": "floodd since=1 expires=61 scope=udp,qtype=255,except=64 rule=any-queries"}},
  {"elem": {"val": {"concat": ["203.0.113.10", {"range": [65, 255]}, 16711681]},
   "counter": {"packets": 0, "bytes": 0},
   "comment": "floodd since=1 expires=61 scope=udp,qtype=255,except=64 rule=any-queries"}},
  {"elem": {"val": {"concat": ["198.18.0.7", {"range": [0, 255]}, 16711681]},
   "counter": {"packets": 0, "bytes": 0},
   "comment": "floodd since=1 expires=61 scope=udp,qtype=255 rule=rotating-any"}}]}},
 {"set": {"name": "qgate4", "type": "ipv4_addr", "flags": ["timeout"], "elem": [
  {"elem": {"val": "198.18.0.7"}}, {"elem": {"val": "203.0.113.10"}}]}}]}
""")

# iptables-legacy-save -c -t filter (iptables 1.8.9) with bans as floodd's iptables backend
# writes them: ANY over UDP except TTL 63 and 64, a prefix whole, and another chain's rule.
IPTABLES_SAVE = """\
# Generated by iptables-save v1.8.9 on Wed Dec  2 00:45:56 2026
*filter
:INPUT ACCEPT [0:0]
:FLOODD - [0:0]
[0:0] -A INPUT -p udp -m multiport --dports 53 -m comment --comment "floodd udp dports=53" -j FLOODD
[5:300] -A FLOODD -s 203.0.113.10/32 -p udp -m ttl ! --ttl-eq 63 -m ttl ! --ttl-eq 64 \
-m string --hex-string "|0000ff0001|" --algo bm -m comment --comment \
"floodd since=1 expires=2 scope=udp,qtype=255,except=63+64 rule=any-queries" -j DROP
[9:540] -A FLOODD -s 198.51.100.0/24 -m comment --comment \
"floodd since=1 expires=2 rule=prefix-flood" -j DROP
[0:0] -A FLOODD -s 2001:db8:1::10/128 -p udp -m hl ! --hl-eq 64 -m comment --comment \
"floodd since=1 expires=2 scope=udp,except=64 rule=query-flood" -j DROP
COMMIT
"""


def _parse(frames: list[bytes]) -> list[Any]:
    parser = Parser(LINKTYPE_ETHERNET)
    return parser.parse_frames((i / 1000, f) for i, f in enumerate(frames)).records


# --- parsers ---------------------------------------------------------------------------
def test_parse_dnsperf_final_report_and_intervals() -> None:
    report = load.parse_dnsperf(DNSPERF_OUTPUT)
    assert (report.sent, report.completed, report.lost) == (600, 301, 299)
    assert report.runtime == pytest.approx(4.000225)
    assert report.qps == pytest.approx(75.245767)
    assert report.answered == pytest.approx(301 / 600)
    assert report.intervals == ((1795615996.456128, 150.83574),
                                (1795615997.457223, 149.83593),
                                (1795615998.458241, 0.0))


def test_parse_dnsperf_without_statistics_is_an_error() -> None:
    with pytest.raises(ValueError, match="sent"):
        load.parse_dnsperf("Error: input file contains no data\n")
    assert load.DnsperfReport(0, 0, 0, 0.0, 0.0).answered == 1.0


def test_parse_nft_bans() -> None:
    bans = load.parse_nft_bans(NFT_LISTING)
    assert bans == {
        "198.51.100.7": load.KernelBan("198.51.100.7", 12, "query-flood"),
        "198.51.100.9": load.KernelBan("198.51.100.9", 0, ""),
        "2001:db8:1::66": load.KernelBan("2001:db8:1::66", 0, "rotating-any"),
        "203.0.113.0/24": load.KernelBan("203.0.113.0/24", 0, "prefix-flood"),
        "192.0.2.1": load.KernelBan("192.0.2.1", 0, ""),
    }
    assert load.parse_nft_bans({"nftables": []}) == {}


def test_parse_nft_elements_of_narrowed_bans() -> None:
    elements = load.parse_nft_elements(NFT_NARROWED)
    assert [(e.set, e.source, e.hops, e.qtype, e.packets) for e in elements] == [
        ("udp4", "203.0.113.11", (0, 255), None, 0),
        ("udp6net", "2001:db8:1::/64", (0, 255), None, 0),
        ("hop6", "2001:db8:1::10", (0, 63), None, 7),
        ("hop6", "2001:db8:1::10", (65, 255), None, 3),
        ("qtype4", "203.0.113.10", (0, 63), 255, 0),
        ("qtype4", "203.0.113.10", (65, 255), 255, 0),
        ("qtype4", "198.18.0.7", (0, 255), 255, 0),
        ("qgate4", "198.18.0.7", (0, 255), None, 0),
        ("qgate4", "203.0.113.10", (0, 255), None, 0),
    ]
    assert elements[4].rule == "any-queries" and elements[4].scope == "udp,qtype=255,except=64"
    assert elements[7].rule == "" and elements[7].scope == "all"
    # Whole-source sets keep their meaning: every listed element of NFT_LISTING drops all.
    assert all(e.drops(e.source.split("/")[0], hop=64, qtype=1, udp=False)
               for e in load.parse_nft_elements(NFT_LISTING))


@pytest.mark.parametrize("address,hop,qtype,udp,dropped_by", [
    ("203.0.113.11", 64, 1, True, ["udp4"]),
    ("203.0.113.11", 64, 1, False, []),  # UDP only
    ("2001:db8:1::99", 64, 1, True, ["udp6net"]),  # inside the prefix
    ("2001:db8:1::10", 64, 1, True, ["udp6net"]),  # the hop ban spares 64, the prefix not
    ("2001:db8:1::10", 50, 1, True, ["udp6net", "hop6"]),
    ("203.0.113.10", 64, 255, True, []),  # its usual TTL passes
    ("203.0.113.10", 50, 255, True, ["qtype4"]),
    ("203.0.113.10", 50, 1, True, []),  # other query types pass
    ("198.18.0.7", 64, 255, True, ["qtype4"]),
    ("198.18.0.7", 64, 255, False, []),
    ("192.0.2.1", 64, 255, True, []),
])
def test_what_narrowed_elements_drop(address: str, hop: int, qtype: int, udp: bool,
                                     dropped_by: list[str]) -> None:
    elements = load.parse_nft_elements(NFT_NARROWED)
    assert sorted({e.set for e in elements if e.drops(address, hop=hop, qtype=qtype, udp=udp)}) \
        == sorted(dropped_by)


def test_parse_nft_bans_merges_a_sources_elements_and_leaves_the_gate_out() -> None:
    bans = load.parse_nft_bans(NFT_NARROWED)
    assert bans == {
        "203.0.113.11": load.KernelBan("203.0.113.11", 0, "query-flood", "udp"),
        "2001:db8:1::/64": load.KernelBan("2001:db8:1::/64", 0, "prefix-flood", "udp"),
        "2001:db8:1::10": load.KernelBan("2001:db8:1::10", 10, "query-flood", "udp,except=64"),
        "203.0.113.10": load.KernelBan("203.0.113.10", 0, "any-queries",
                                       "udp,qtype=255,except=64"),
        "198.18.0.7": load.KernelBan("198.18.0.7", 0, "rotating-any", "udp,qtype=255"),
    }
    both = load.merge_bans([("198.51.100.7", 2, "floodd since=1 expires=2 rule=query-flood"),
                            ("198.51.100.7", 3, "floodd since=1 expires=2 scope=udp,qtype=255 "
                                                "rule=any-queries")])
    assert both == {"198.51.100.7": load.KernelBan("198.51.100.7", 5, "query-flood + any-queries",
                                                   "all + udp,qtype=255")}


def test_parse_ipset_save() -> None:
    text = ("create floodd-udp4 hash:ip family inet hashsize 1024 maxelem 1048576 timeout 0 "
            "counters comment\n"
            'add floodd-udp4 198.51.100.7 timeout 3599 packets 12 bytes 720 comment '
            '"floodd since=1 expires=2 scope=udp rule=query-flood"\n'
            "add floodd-ban6net 2001:db8::/64 packets 3 bytes 9\n"
            "add other 192.0.2.1\n")
    bans = load.parse_ipset_save(text)
    assert [(b.source, b.udp_only, b.packets) for b in bans] == \
        [("198.51.100.7", True, 12), ("2001:db8::/64", False, 3)]
    assert bans[0].comment.endswith("rule=query-flood")
    assert bans[0].drops("198.51.100.7", hop=64, qtype=1)
    assert not bans[0].drops("198.51.100.7", hop=64, qtype=1, udp=False)


def test_parse_iptables_save() -> None:
    rules = load.parse_iptables_save(IPTABLES_SAVE)
    assert [(r.source, r.udp_only, r.except_hops, r.qtype, r.packets) for r in rules] == [
        ("203.0.113.10", True, (63, 64), 255, 5),
        ("198.51.100.0/24", False, (), None, 9),
        ("2001:db8:1::10", True, (64,), None, 0),
    ]
    assert rules[0].comment.endswith("rule=any-queries")
    any_ban, prefix, hop = rules
    assert any_ban.drops("203.0.113.10", hop=50, qtype=255)
    assert not any_ban.drops("203.0.113.10", hop=64, qtype=255)
    assert not any_ban.drops("203.0.113.10", hop=50, qtype=1)
    assert not any_ban.drops("203.0.113.10", hop=50, qtype=255, udp=False)
    assert prefix.drops("198.51.100.9", hop=64, qtype=1, udp=False)
    assert hop.drops("2001:db8:1::10", hop=63, qtype=1) and not hop.drops(
        "2001:db8:1::10", hop=64, qtype=1)
    assert load.merge_bans((r.source, r.packets, r.comment) for r in rules)[
        "203.0.113.10"] == load.KernelBan("203.0.113.10", 5, "any-queries",
                                          "udp,qtype=255,except=63+64")
    with pytest.raises(ValueError, match="TTL"):
        load.parse_iptables_save("[0:0] -A FLOODD -s 192.0.2.1/32 -m ttl --ttl-eq 5 -j DROP")


def test_write_queries_replaces_the_file_whole(tmp_path: Path) -> None:
    path = load.write_queries(tmp_path / "q.txt", ["a.example A", "b.example ANY"])
    with open(path) as reader:
        load.write_queries(path)  # a dnsperf reading the old file keeps its content
        assert reader.read() == "a.example A\nb.example ANY\n"
    assert path.read_text().splitlines() == list(load.LEGIT_QUERIES)
    assert [p.name for p in tmp_path.iterdir()] == ["q.txt"]


# --- frames ----------------------------------------------------------------------------
def test_query_frames_are_queries_from_the_source_to_the_server_mac() -> None:
    frames = load.query_frames(WIRE, "203.0.113.9", 50, qtype="TXT")
    assert all(f[:6] == WIRE.server_mac and f[6:12] == WIRE.client_mac for f in frames)
    records = _parse(frames)
    assert len(records) == 50
    assert {r[1] for r in records} == {ipaddress.ip_address("203.0.113.9").packed}
    assert {(r[3], r[4]) for r in records} == {(qtype_code("TXT"), 0)}
    v6 = _parse(load.query_frames(WIRE, "2001:db8:1::9", 3))
    assert [r[1] for r in v6] == [ipaddress.ip_address("2001:db8:1::9").packed] * 3


def test_spoofed_frames_come_from_distinct_sources_of_the_benchmark_range() -> None:
    records = _parse(load.spoofed_frames(WIRE, 5000, seed=3))
    sources = [ipaddress.ip_address(r[1]) for r in records]
    assert len(set(sources)) == 5000
    assert all(s in load.SPOOF_NETWORK for s in sources)
    assert {r[3] for r in records} == {qtype_code("A")}
    assert load.spoofed_sources(10, seed=3) == load.spoofed_sources(10, seed=3)
    with pytest.raises(ValueError):
        load.spoofed_sources(load.SPOOF_NETWORK.num_addresses + 1)


def test_rotating_any_frames_go_round_the_sources() -> None:
    records = _parse(load.rotating_any_frames(WIRE, 300, 4))
    assert {r[3] for r in records} == {qtype_code("ANY")}
    rounds = [[r[1] for r in records[i * 300:(i + 1) * 300]] for i in range(4)]
    assert len(set(rounds[0])) == 300
    assert all(r == rounds[0] for r in rounds)  # every source once a round, same order


def test_every_malformed_payload_is_malformed_to_floodd() -> None:
    kinds = len(load.MALFORMED_PAYLOADS)
    records = _parse(load.malformed_frames(WIRE, "203.0.113.41", 3 * kinds))
    assert len(records) == 3 * kinds
    assert all(r[4] & F_MALFORMED and r[3] == -1 for r in records)
    assert {r[1] for r in records} == {ipaddress.ip_address("203.0.113.41").packed}


def test_forged_queries_carry_the_chosen_source_ttl_type_and_forged_ports() -> None:
    frames = forge.forged_queries(WIRE, "203.0.113.10", 30, hops=50, qtype="ANY",
                                  qname="lab.example")
    records = _parse(frames)
    assert {(r[1], r[3]) for r in records} == {(ipaddress.ip_address("203.0.113.10").packed,
                                                qtype_code("ANY"))}
    assert {f[14 + 8] for f in frames} == {50}  # the IPv4 TTL
    assert {r[5] for r in records} == {50}  # as floodd's parser reads it
    ports = {int.from_bytes(f[34:36], "big") for f in frames}
    assert len(ports) == 30 and all(forge.FORGED_PORTS[0] <= p <= forge.FORGED_PORTS[1]
                                    for p in ports)
    v6 = forge.forged_queries(WIRE, "2001:db8:1::10", 3, hops=7)
    assert [r[1] for r in _parse(v6)] == [ipaddress.ip_address("2001:db8:1::10").packed] * 3
    assert {f[14 + 7] for f in v6} == {7}  # the IPv6 hop limit
    assert {r[5] for r in _parse(v6)} == {7}


def test_rotating_queries_go_round_the_sources() -> None:
    sources = ["203.0.113.10", *load.spoofed_sources(99)]
    frames = forge.rotating_queries(WIRE, sources, 3, hops=50)
    records = _parse(frames)
    assert [ipaddress.ip_address(r[1]).compressed for r in records] == sources * 3
    assert {r[3] for r in records} == {qtype_code("ANY")} and {f[22] for f in frames} == {50}
    assert len({f[34:36] for f in frames}) == 300


def test_forger_bounds() -> None:
    with pytest.raises(ValueError):
        forge.Forger(None, [], Path("unused"), pps=10)  # type: ignore[arg-type]


def test_fast_rules_keep_rates_and_handfuls() -> None:
    rules = [{"name": "flood", "threshold": 5000, "window": "10s"},
             {"name": "any", "match": "ANY", "threshold": 4, "window": "1m"},
             {"name": "rotating", "match": "ANY", "threshold": 1, "window": 10,
              "total_threshold": 1000},
             {"name": "short", "threshold": 200, "window": 2}]
    assert forge.fast_rules(rules, 3) == [
        {"name": "flood", "threshold": 1500, "window": 3},
        {"name": "any", "match": "ANY", "threshold": 4, "window": 3},
        {"name": "rotating", "match": "ANY", "threshold": 1, "window": 3,
         "total_threshold": 300},
        {"name": "short", "threshold": 200, "window": 2}]


@pytest.mark.parametrize("fast", [None, 3.0])
def test_shipped_config_for_the_lab_is_valid(tmp_path: Path, fast: float | None) -> None:
    import yaml

    shipped = yaml.safe_load(forge.SHIPPED_CONFIG.read_text())
    config = load_config(str(forge.shipped_config(tmp_path, backend="iptables",
                                                  fast_window=fast,
                                                  trust={"udp_evidence_bans": "all"})))
    assert [r.name for r in config.rules] == [r["name"] for r in shipped["rules"]]
    assert config.firewall.backend == "iptables" and config.firewall.on_exit == "flush"
    assert config.trust.udp_evidence_bans == "all"
    assert config.daemon.control_socket == str(tmp_path / "control.sock")
    if fast:
        assert max(r.window for r in config.rules) == fast == config.trust.hop_learn_after
    else:
        assert config.rules == load_config(str(forge.SHIPPED_CONFIG)).rules


@given(st.lists(st.integers(0, 40), min_size=1, max_size=5))
def test_interleave_keeps_every_frame_and_each_stream_in_order(sizes: list[int]) -> None:
    streams = [[bytes((n, i)) for i in range(size)] for n, size in enumerate(sizes)]
    mixed = load.interleave(*streams)
    assert Counter(mixed) == Counter(f for s in streams for f in s)
    for n, stream in enumerate(streams):
        assert [f for f in mixed if f[0] == n] == stream


def test_interleave_spreads_a_small_stream() -> None:
    mixed = load.interleave([b"a"] * 90, [b"b"] * 10)
    positions = [i for i, f in enumerate(mixed) if f == b"b"]
    assert positions == list(range(5, 100, 10))  # on a tie the first stream goes first


def test_write_frames_is_a_pcap_floodd_reads(tmp_path: Path) -> None:
    from floodd.detect.capture import OfflineCapture

    path = load.write_frames(tmp_path / "f.pcap", load.query_frames(WIRE, "198.51.100.3", 7))
    capture = OfflineCapture(str(path))
    batch = capture.read()
    capture.close()
    assert batch is not None and len(batch.records) == 7


# --- processes and config -------------------------------------------------------------
def test_cpu_and_rss_of_a_process() -> None:
    before = load.cpu_seconds(os.getpid())
    deadline = time.process_time() + 0.2
    while time.process_time() < deadline:
        pass
    assert load.cpu_seconds(os.getpid()) >= before + 0.1
    assert 1000 < load.rss_kib(os.getpid()) < 10_000_000


def test_lab_config_is_a_valid_floodd_config(tmp_path: Path) -> None:
    rules = [{"name": "query-flood", "threshold": 5000, "window": 10, "ban_time": 4}]
    path = load.lab_config(tmp_path, rules, whitelist=["198.51.100.0/24"],
                           rate_table={"capacity": 2000}, capture={"buffer_size_mb": 8},
                           firewall={"rescan_interval": 2}, daemon={"tick": 0.5})
    config = load_config(str(path))
    assert [r.name for r in config.rules] == ["query-flood"]
    assert [str(n) for n in config.whitelist] == ["198.51.100.0/24"]
    assert config.rate_table.capacity == 2000 and config.rate_table.window == 10
    assert config.capture.buffer_size_mb == 8
    assert config.firewall.backend == "nftables" and config.firewall.rescan_interval == 2
    assert config.daemon.tick == 0.5
    assert config.daemon.control_socket == str(tmp_path / "control.sock")


# --- in real namespaces ---------------------------------------------------------------
def _lab_problem() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    missing = [t for t in ("ip", "named", "dig", "nft", "dnsperf", "tcpreplay", "stdbuf")
               if shutil.which(t) is None]
    return f"needs {', '.join(missing)}" if missing else None


@pytest.fixture
def bind_lab(dns_lab: Any) -> Any:
    problem = _lab_problem()
    if problem:
        pytest.skip(problem)
    return dns_lab


def test_dnsperf_legit_client_is_answered(bind_lab: Any, tmp_path: Path) -> None:
    perf = load.Dnsperf(bind_lab, "198.51.100.30", tmp_path, duration=2, rate=100,
                        interval=1).start()
    assert perf.running
    report = perf.wait()
    assert 180 <= report.sent <= 220
    assert report.answered == 1.0
    assert len(report.intervals) >= 1 and perf.intervals() == report.intervals
    v6 = load.Dnsperf(bind_lab, "2001:db8:1::30", tmp_path, duration=1, rate=100).start()
    assert v6.wait().answered == 1.0


def test_replayed_frames_reach_bind_and_are_answered(bind_lab: Any, tmp_path: Path) -> None:
    wire = load.lab_wire(bind_lab)
    load.add_address(bind_lab, "203.0.113.99")
    load.add_address(bind_lab, "203.0.113.99")  # already there: nothing to do
    capture = load.write_frames(tmp_path / "q.pcap",
                                load.query_frames(wire, "203.0.113.99", 300))
    with load.ReplyCounter(bind_lab, "203.0.113.99/32") as replies:
        report = load.Replay(bind_lab, capture, pps=1000).start().wait()
        time.sleep(0.3)
        assert report.packets == 300 and report.pps > 500
        assert replies.packets() == 300
    spoofed = load.write_frames(tmp_path / "s.pcap", load.spoofed_frames(wire, 2000))
    with load.ReplyCounter(bind_lab) as replies:
        load.Replay(bind_lab, spoofed, pps=10_000).start().wait()
        time.sleep(0.3)
        # Replies to spoofed sources leave the server (none resolved on the link).
        assert replies.packets() >= 1900
    assert bind_lab.dig("www.lab.example", source="203.0.113.99")


def test_forged_frames_reach_the_server_with_their_ttl_and_are_answered(
        bind_lab: Any, tmp_path: Path) -> None:
    wire = load.lab_wire(bind_lab)
    real = "203.0.113.10"
    load.add_address(bind_lab, real)
    # What the server's kernel sees: queries from the real address at TTL 50 and 64.
    seen = ("table inet floodd_seen {\n chain in {\n"
            "  type filter hook prerouting priority raw; policy accept;\n"
            f"  ip saddr {real} ip ttl 50 udp dport 53 counter\n"
            f"  ip saddr {real} ip ttl 64 udp dport 53 counter\n }}\n}}\n")
    bind_lab.run(bind_lab.server_ns, ["nft", "-f", "-"], input=seen.encode())
    try:
        with load.ReplyCounter(bind_lab, None, ports=forge.FORGED_PORTS) as replies:
            forger = forge.Forger(bind_lab, forge.forged_queries(wire, real, 20, hops=50),
                                  tmp_path / "f.pcap", pps=200, loops=2).start()
            assert forger.wait().packets == forger.limit == 40
            assert bind_lab.dig("www.lab.example", real, tcp=False)  # a real query, TTL 64
            assert bind_lab.dig("lab.example", real, qtype="ANY", tcp=True)
            time.sleep(0.3)
            assert replies.packets() == 40  # the forged queries' replies only
        shown = json.loads(bind_lab.run(bind_lab.server_ns, ["nft", "-j", "list", "table",
                                                             "inet", "floodd_seen"],
                                        text=True).stdout)
        counts = [e["counter"]["packets"] for o in shown["nftables"]
                  for e in o.get("rule", {}).get("expr", ()) if "counter" in e]
        assert counts == [40, 1]
    finally:
        bind_lab.run(bind_lab.server_ns, ["nft", "delete", "table", "inet", "floodd_seen"],
                     check=False)


def test_kernel_elements_and_iptables_rules_read_back(bind_lab: Any) -> None:
    script = ("table inet floodd {\n set hop4 { typeof ip saddr . ip ttl; "
              "flags interval, timeout; counter; }\n}\n"
              "add element inet floodd hop4 { 203.0.113.10 . 0-63 timeout 60s comment "
              "\"floodd since=1 expires=61 scope=udp,except=64 rule=query-flood\", "
              "203.0.113.10 . 65-255 timeout 60s comment "
              "\"floodd since=1 expires=61 scope=udp,except=64 rule=query-flood\" }\n")
    bind_lab.run(bind_lab.server_ns, ["nft", "-f", "-"], input=script.encode())
    try:
        elements = load.kernel_elements(bind_lab)
        assert [(e.set, e.source, e.hops) for e in elements] == [
            ("hop4", "203.0.113.10", (0, 63)), ("hop4", "203.0.113.10", (65, 255))]
        assert load.kernel_bans(bind_lab) == {"203.0.113.10": load.KernelBan(
            "203.0.113.10", 0, "query-flood", "udp,except=64")}
    finally:
        load.delete_table(bind_lab)
    assert load.kernel_elements(bind_lab) == []
    if shutil.which("iptables-legacy") is None:
        return
    ns = bind_lab.server_ns
    bind_lab.run(ns, ["iptables-legacy", "-N", "FLOODD"])
    try:
        bind_lab.run(ns, ["iptables-legacy", "-A", "FLOODD", "-s", "203.0.113.10", "-p", "udp",
                          "-m", "ttl", "!", "--ttl-eq", "64", "-m", "comment", "--comment",
                          "floodd since=1 expires=61 scope=udp,except=64 rule=query-flood",
                          "-j", "DROP"])
        assert load.iptables_rules(bind_lab) == [load.IptablesBan(
            "203.0.113.10", True, (64,), None, 0,
            "floodd since=1 expires=61 scope=udp,except=64 rule=query-flood")]
    finally:
        bind_lab.run(ns, ["iptables-legacy", "-F", "FLOODD"], check=False)
        bind_lab.run(ns, ["iptables-legacy", "-X", "FLOODD"], check=False)

def test_kernel_bans_and_the_watcher(bind_lab: Any) -> None:
    assert load.kernel_bans(bind_lab) == {}
    watcher = load.BanWatcher(bind_lab, interval=0.05, limit=30).start()
    script = ("table inet floodd {\n set ban4 { type ipv4_addr; flags timeout; counter; }\n}\n"
              "add element inet floodd ban4 { 203.0.113.77 timeout 60s comment "
              "\"floodd since=1 expires=61 rule=query-flood\" }\n")
    before = time.time()
    bind_lab.run(bind_lab.server_ns, ["nft", "-f", "-"], input=script.encode())
    added = time.time()
    try:
        assert watcher.wait_for(["203.0.113.77"], 5)
        # The watcher may see the element before nft has even returned.
        assert before <= watcher.first_seen["203.0.113.77"] < added + 1
        assert watcher.seen["203.0.113.77"] == load.KernelBan("203.0.113.77", 0, "query-flood")
        assert watcher.most == 1 and watcher.error is None
    finally:
        watcher.stop()
        load.delete_table(bind_lab)
    assert load.kernel_bans(bind_lab) == {}
    assert not watcher.wait_for(["198.51.100.1"], 0.1)


# --- the demo (floodd/lab/demo.py; the live one is run by hand: it takes 25 s) --------
def test_offline_demo_prints_floodd_analyze_of_a_generated_capture(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lab import demo

    capture = tmp_path / "sample.pcap"
    assert demo.main(["--offline", "--capture", str(capture)]) == 0
    out = capsys.readouterr().out
    assert f"floodd analyze {capture}" in out
    assert "300000 packets to the DNS port(s)" in out
    assert "rule query-flood" in out and "more: " in out
    assert len([line for line in out.splitlines() if line.startswith("  ban ")]) \
        == demo.SHOWN_BANS
    assert capture.stat().st_size > 300_000 * 60


@pytest.mark.parametrize("args", [["--duration", "5"], ["--rate", "10"],
                                  ["--legit-rate", "0"]])
def test_demo_refuses_out_of_range_options(args: list[str],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    from lab import demo

    assert demo.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("floodd demo: ") and err.count("\n") == 1
