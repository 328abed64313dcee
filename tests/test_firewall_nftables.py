"""The nftables backend (parsing, planning, the kernel), the backend registry, and what
every kernel backend promises (parametrized over the backends this host can run)."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import math
import os
import shutil
import socket
import struct
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

import floodd.command
from faults import FaultyCommand
from floodd.config import FirewallConfig
from floodd.errors import FlooddError
from floodd.enforce.firewall import BACKENDS, auto_choice, make_backend
import floodd.enforce.firewall.nftables
from floodd.enforce.firewall.base import Backend, Ban, Committed, InstalledBan
from floodd.enforce.firewall.dryrun import DryRunBackend
from floodd.enforce.firewall.comment import ban_comment, parse_ban_comment
from floodd.enforce.firewall.nftables import (GATE_MARGIN, SetBan, NftablesBackend,
                                              element_keys, name_offset, parse_table,
                                              plan_commit, render_commit, set_of)
from floodd.scope import UDP_ONLY, WHOLE, Scope, Target

net = ipaddress.ip_network
NOW = 1_795_615_100.0
ANY = 255
TXT = 16


def hops(*spared: int, qtype: int | None = None) -> Scope:
    """UDP (of one qtype) at every hop value but ``spared``."""
    return Scope(True, qtype, spared)


def qtype(code: int, *spared: int) -> Scope:
    return Scope(True, code, spared)


# `nft -j list table inet floodd` from nftables 1.0.6 (a part of it: some sets, four of its
# rules): bans of every scope by floodd, one with a comment of an older floodd (no scope),
# elements added by hand (198.51.100.9 without a comment; 198.51.100.11's hop ranges
# spare 63 and 64 while their comment says 64; 2001:db8:1::10's two ranges without a
# comment), and gates.
SAMPLE = json.loads("""
{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5",
"json_schema_version": 1}}, {"table": {"family": "inet", "name": "floodd", "handle": 4}},
{"set": {"family": "inet", "name": "ban4", "table": "floodd", "type": "ipv4_addr", "handle":
1, "flags": ["timeout"], "elem": [{"elem": {"val": "198.51.100.7", "timeout": 600,
"expires": 599, "comment":
"floodd since=1795615085 expires=1795615685 scope=all rule=query-flood", "counter":
{"packets": 0, "bytes": 0}}}, {"elem": {"val": "198.51.100.9", "timeout": 300, "expires":
299, "counter": {"packets": 12, "bytes": 720}}}], "stmt": [{"counter": null}]}}, {"set":
{"family": "inet", "name": "ban4net", "table": "floodd", "type": "ipv4_addr", "handle": 2,
"flags": ["interval", "timeout"], "elem": [{"elem": {"val": {"prefix": {"addr":
"203.0.113.0", "len": 24}}, "timeout": 600, "expires": 599, "comment":
"floodd since=1795615085 expires=1795615685 scope=all rule=prefix-flood", "counter":
{"packets": 0, "bytes": 0}}}], "stmt": [{"counter": null}]}}, {"set": {"family": "inet",
"name": "udp4", "table": "floodd", "type": "ipv4_addr", "handle": 3, "flags": ["timeout"],
"elem": [{"elem": {"val": "198.51.100.7", "timeout": 600, "expires": 599, "comment":
"floodd since=1795615085 expires=1795615685 scope=udp rule=query-flood", "counter":
{"packets": 3, "bytes": 300}}}], "stmt": [{"counter": null}]}}, {"set": {"family": "inet",
"name": "hop4", "table": "floodd", "type": ["ipv4_addr", "integer"], "handle": 5, "flags":
["interval", "timeout"], "elem": [{"elem": {"val": {"concat": ["198.51.100.10", {"range":
[0, 63]}]}, "timeout": 600, "expires": 599, "comment":
"floodd since=1795615085 expires=1795615685 scope=udp,except=64 rule=query-flood",
"counter": {"packets": 5, "bytes": 500}}}, {"elem": {"val": {"concat": ["198.51.100.10",
{"range": [65, 255]}]}, "timeout": 600, "expires": 599, "comment":
"floodd since=1795615085 expires=1795615685 scope=udp,except=64 rule=query-flood",
"counter": {"packets": 2, "bytes": 200}}}, {"elem": {"val": {"concat": ["198.51.100.11",
{"range": [0, 62]}]}, "timeout": 600, "expires": 599, "comment":
"floodd since=1795615085 expires=1795615685 scope=udp,except=64 rule=query-flood",
"counter": {"packets": 0, "bytes": 0}}}, {"elem": {"val": {"concat": ["198.51.100.11",
{"range": [65, 255]}]}, "timeout": 600, "expires": 599, "comment":
"floodd since=1795615085 expires=1795615685 scope=udp,except=64 rule=query-flood",
"counter": {"packets": 0, "bytes": 0}}}], "stmt": [{"counter": null}]}}, {"set": {"family":
"inet", "name": "qtype4", "table": "floodd", "type": ["ipv4_addr", "integer", "integer"],
"handle": 6, "flags": ["interval", "timeout"], "elem": [{"elem": {"val": {"concat":
[{"prefix": {"addr": "198.51.100.0", "len": 24}}, {"range": [0, 255]}, 16711681]}, "timeout":
3600, "expires": 3599, "comment":
"floodd since=1795615085 expires=1795618685 scope=udp,qtype=255 rule=rotating-any",
"counter": {"packets": 0, "bytes": 0}}}, {"elem": {"val": {"concat": ["198.51.100.20",
{"range": [0, 63]}, 1048577]}, "timeout": 600, "expires": 599, "comment":
"floodd since=1795615085 expires=1795615685 scope=udp,qtype=16,except=64 rule=txt",
"counter": {"packets": 4, "bytes": 400}}}, {"elem": {"val": {"concat": ["198.51.100.20",
{"range": [65, 255]}, 1048577]}, "timeout": 600, "expires": 599, "comment":
"floodd since=1795615085 expires=1795615685 scope=udp,qtype=16,except=64 rule=txt",
"counter": {"packets": 0, "bytes": 0}}}], "stmt": [{"counter": null}]}}, {"set": {"family":
"inet", "name": "qgate4", "table": "floodd", "type": "ipv4_addr", "handle": 7, "flags":
["timeout"], "elem": [{"elem": {"val": "198.51.100.20", "timeout": 660, "expires": 659}}]}},
{"set": {"family": "inet", "name": "qgate4net", "table": "floodd", "type": "ipv4_addr",
"handle": 8, "flags": ["interval", "timeout"], "elem": [{"elem": {"val": {"prefix": {"addr":
"198.51.100.0", "len": 24}}, "timeout": 3660, "expires": 3659}}]}}, {"set": {"family":
"inet", "name": "ban6", "table": "floodd", "type": "ipv6_addr", "handle": 10, "flags":
["timeout"], "elem": [{"elem": {"val": "2001:db8:1::7", "timeout": 3600, "expires": 3599,
"comment": "floodd since=1795615085 expires=1795618685 rule=say %22hi%22 100%25", "counter":
{"packets": 0, "bytes": 0}}}], "stmt": [{"counter": null}]}}, {"set": {"family": "inet",
"name": "hop6", "table": "floodd", "type": ["ipv6_addr", "integer"], "handle": 14, "flags":
["interval", "timeout"], "elem": [{"elem": {"val": {"concat": ["2001:db8:1::10", {"range":
[0, 49]}]}, "timeout": 120, "expires": 119, "counter": {"packets": 0, "bytes": 0}}},
{"elem": {"val": {"concat": ["2001:db8:1::10", {"range": [51, 255]}]}, "timeout": 120,
"expires": 119, "counter": {"packets": 0, "bytes": 0}}}], "stmt": [{"counter": null}]}},
{"chain": {"family": "inet", "table": "floodd", "name": "input", "handle": 19, "type":
"filter", "hook": "input", "prio": -10, "policy": "accept"}}, {"rule": {"family": "inet",
"table": "floodd", "chain": "qtype4", "handle": 21, "expr": [{"match": {"op": "==", "left":
{"concat": [{"payload": {"protocol": "ip", "field": "saddr"}}, {"payload": {"protocol":
"ip", "field": "ttl"}}, {"payload": {"base": "th", "offset": 168, "len": 40}}]}, "right":
"@qtype4"}}, {"drop": null}]}}, {"rule": {"family": "inet", "table": "floodd", "chain":
"input", "handle": 531, "comment": "floodd: drop banned sources", "expr": [{"match": {"op":
"==", "left": {"meta": {"key": "l4proto"}}, "right": {"set": ["tcp", "udp"]}}}, {"match":
{"op": "==", "left": {"payload": {"protocol": "th", "field": "dport"}}, "right": 53}},
{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right":
"@ban4"}}, {"drop": null}]}}, {"rule": {"family": "inet", "table": "floodd", "chain":
"input", "handle": 542, "comment": "floodd: drop banned sources", "expr": [{"match": {"op":
"==", "left": {"payload": {"protocol": "udp", "field": "dport"}}, "right": 53}}, {"match":
{"op": "==", "left": {"concat": [{"payload": {"protocol": "ip", "field": "saddr"}},
{"payload": {"protocol": "ip", "field": "ttl"}}]}, "right": "@hop4"}}, {"drop": null}]}},
{"rule": {"family": "inet", "table": "floodd", "chain": "input", "handle": 544, "comment":
"floodd: banned query types", "expr": [{"match": {"op": "==", "left": {"payload":
{"protocol": "udp", "field": "dport"}}, "right": 53}}, {"match": {"op": "==", "left":
{"payload": {"protocol": "ip", "field": "saddr"}}, "right": "@qgate4"}}, {"jump": {"target":
"qtype4"}}]}}]}
""")


def target(network: str, scope: Scope = WHOLE) -> Target:
    return Target(net(network), scope)


def installed(network: str, packets: int = 0, nbytes: int = 0, rule: str = "r",
              expires: float = NOW + 600, scope: Scope = WHOLE) -> SetBan:
    """A ban in the kernel as floodd writes it."""
    ib = InstalledBan(net(network), rule, NOW - 10, expires, packets, nbytes, scope=scope)
    return SetBan(ib, set_of(ib.target), element_keys(ib.target))


def ban(network: str, rule: str = "r", expires: float = NOW + 600,
        scope: Scope = WHOLE) -> Ban:
    return Ban(net(network), rule, NOW, expires, scope)


def pending(*changes: Ban | Target) -> dict[Target, Ban | None]:
    """Buffered changes: a Ban to install, a Target to unban."""
    return {c.target if isinstance(c, Ban) else c: c if isinstance(c, Ban) else None
            for c in changes}


def added(plan: Any) -> dict[Target, tuple[int, int]]:
    return {b.target: (p, n) for b, p, n in plan.add}


def deleted(plan: Any) -> list[Target]:
    return [kb.ban.target for kb in plan.delete]


# --- parsing real output ------------------------------------------------------------------
def test_parse_table_sample() -> None:
    state = parse_table(SAMPLE, "floodd", NOW)
    assert state.exists and not state.complete  # most rules left out of the sample
    assert state.rules == {"input: drop @ban4", "input: drop @hop4",
                           "input: @qgate4 jump qtype4", "qtype4: drop @qtype4 at 168"}
    bans = {b.target: b for b in state.bans}
    assert len(bans) == len(state.bans) == 10
    assert bans[target("198.51.100.7/32")] == InstalledBan(
        net("198.51.100.7/32"), "query-flood", 1795615085.0, 1795615685.0, 0, 0)
    assert bans[target("198.51.100.7/32", UDP_ONLY)].packets == 3
    assert bans[target("2001:db8:1::7/128")].rule == 'say "hi" 100%'  # no scope: whole
    assert bans[target("203.0.113.0/24")].rule == "prefix-flood"
    # one ban of two elements: counters summed
    merged = bans[target("198.51.100.10/32", hops(64))]
    assert (merged.rule, merged.packets, merged.bytes, merged.remaining) == (
        "query-flood", 7, 700, 599)
    assert bans[target("198.51.100.0/24", qtype(ANY))].rule == "rotating-any"
    assert bans[target("198.51.100.20/32", qtype(TXT, 64))].packets == 4
    # the keys are the truth: a comment naming another scope is not floodd's
    wrong = bans[target("198.51.100.11/32", hops(63, 64))]
    assert (wrong.rule, wrong.expires) == ("(unknown)", NOW + 599)
    by_hand = bans[target("198.51.100.9/32")]
    assert (by_hand.rule, by_hand.packets, by_hand.bytes) == ("(unknown)", 12, 720)
    assert by_hand.expires == NOW + 299 and by_hand.since == NOW - 1
    assert bans[target("2001:db8:1::10/128", hops(50))].rule == "(unknown)"
    assert state.gates == {net("198.51.100.20/32"): NOW + 659,
                           net("198.51.100.0/24"): NOW + 3659}
    kb = next(k for k in state.kernel_bans if k.ban.target == merged.target)
    assert (kb.set, kb.keys) == ("hop4", ("198.51.100.10 . 0-63", "198.51.100.10 . 65-255"))


def test_parse_table_incomplete_and_foreign() -> None:
    without_rules = {"nftables": [o for o in SAMPLE["nftables"] if "rule" not in o]}
    state = parse_table(without_rules, "floodd", NOW)
    assert state.exists and not state.complete and len(state.bans) == 10
    other = parse_table(SAMPLE, "hosttest", NOW)
    assert not other.exists and not other.bans and not other.sets


def test_parse_leaves_out_keys_floodd_cannot_express() -> None:
    def elem(val: Any) -> dict[str, Any]:
        return {"elem": {"val": val, "timeout": 60, "expires": 59}}
    data = {"nftables": [
        {"table": {"family": "inet", "name": "floodd"}},
        {"set": {"table": "floodd", "name": "hop4", "elem": [
            elem({"concat": ["192.0.2.1", {"range": [0, 10]}]}),  # spares 245 values
            elem({"concat": ["192.0.2.2", {"range": [0, 255]}]})]}},  # spares none
        {"set": {"table": "floodd", "name": "qtype4", "elem": [
            elem({"concat": ["192.0.2.3", {"range": [0, 255]}, 0x01_00FF_0001]}),  # no root
            elem({"concat": ["192.0.2.8", {"range": [0, 255]}, 0x00FF_0003]}),  # class CH
            elem({"concat": ["192.0.2.4", {"range": [0, 255]}, {"range": [1, 2]}]}),
            elem({"concat": ["192.0.2.5", 64]})]}},  # not a qtype key
        {"set": {"table": "floodd", "name": "ban4", "elem": [
            elem({"concat": ["192.0.2.6", 64]}), "192.0.2.7"]}}]}
    bans = parse_table(data, "floodd", NOW).bans
    assert [b.target for b in bans] == [target("192.0.2.2/32", UDP_ONLY),
                                        target("192.0.2.7/32")]
    assert bans[1].expires == math.inf and bans[1].rule == "(unknown)"


@given(st.text(max_size=200), st.sampled_from([WHOLE, UDP_ONLY, hops(63, 64),
                                               qtype(ANY), qtype(65535, *range(8))]))
def test_comment_round_trip(rule: str, scope: Scope) -> None:
    comment = ban_comment(Ban(net("198.51.100.7/32"), rule, 1_700_000_000.4,
                              1_700_000_600, scope))
    assert len(comment.encode("utf-8", "surrogatepass")) <= 128
    assert '"' not in comment and comment.isprintable()
    parsed = parse_ban_comment(comment)
    assert parsed is not None
    back, since, expires, scope_back = parsed
    assert (since, expires, scope_back) == (1_700_000_000, 1_700_000_600, scope)
    assert rule.startswith(back)
    if len(comment.encode()) <= 128 - 12:  # room for any escaped character: not cut
        assert back == rule


def test_parse_comment_of_others() -> None:
    assert parse_ban_comment("added by hand") is None
    assert parse_ban_comment("floodd since=x expires=1 rule=a") is None
    assert parse_ban_comment("floodd since=1 expires=2 scope=udp,qtype=70000 rule=a") is None


# --- what a ban is in the kernel ----------------------------------------------------------
def test_sets_and_elements_of_each_scope() -> None:
    cases = [
        (target("198.51.100.7/32"), "ban4", ("198.51.100.7",)),
        (target("198.51.100.0/24"), "ban4net", ("198.51.100.0/24",)),
        (target("2001:db8:1::7/128", UDP_ONLY), "udp6", ("2001:db8:1::7",)),
        (target("2001:db8:1::/64", UDP_ONLY), "udp6net", ("2001:db8:1::/64",)),
        (target("198.51.100.7/32", hops(0, 64)), "hop4",
         ("198.51.100.7 . 1-63", "198.51.100.7 . 65-255")),
        (target("198.51.100.0/24", hops(255)), "hop4", ("198.51.100.0/24 . 0-254",)),
        (target("2001:db8:1::/64", qtype(ANY)), "qtype6",
         ("2001:db8:1::/64 . 0-255 . 0x0000ff0001",)),
        (target("198.51.100.7/32", qtype(TXT, 63, 65)), "qtype4",
         ("198.51.100.7 . 0-62 . 0x0000100001", "198.51.100.7 . 64 . 0x0000100001",
          "198.51.100.7 . 66-255 . 0x0000100001")),
    ]
    for tgt, name, keys in cases:
        assert (set_of(tgt), element_keys(tgt)) == (name, keys), tgt


def _query(name: str, code: int, qid: int = 1, edns: bool = False) -> bytes:
    """A DNS query (RFC 1035; with an EDNS OPT record, RFC 6891, as resolvers send)."""
    labels = [p for p in name.split(".") if p]
    qname = b"".join(bytes([len(p)]) + p.encode() for p in labels) + b"\0"
    opt = b"\0" + struct.pack("!HHIH", 41, 1232, 0, 0) if edns else b""
    return (struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 1 if edns else 0) + qname
            + struct.pack("!HH", code, 1) + opt)


LONGEST = ".".join(["a" * 63] * 3 + ["b" * 61])  # wire length 255, the longest name


def test_name_offset_is_the_root_label_and_qtype_of_a_query() -> None:
    for name, length in ((".", 1), ("lab.example", 13), (LONGEST, 255)):
        for edns in (False, True):
            udp = b"\0" * 8 + _query(name, ANY, edns=edns)  # the UDP header, then DNS
            at = name_offset(length) // 8
            assert udp[at:at + 3] == b"\x00\x00\xff", (name, edns)


# --- planning a transaction ---------------------------------------------------------------
def test_plan_new_bans_and_unbans() -> None:
    plan = plan_commit(pending(ban("198.51.100.7"),
                               target("203.0.113.9/32"),  # not banned: nothing to do
                               target("198.51.100.8/32"),
                               ban("198.51.100.8", scope=UDP_ONLY)),
                       [installed("198.51.100.8"), installed("198.51.100.8", scope=hops(64))])
    # one network, several bans: only the whole-source one goes
    assert deleted(plan) == [target("198.51.100.8/32")]
    assert added(plan) == {target("198.51.100.7/32"): (0, 0),
                           target("198.51.100.8/32", UDP_ONLY): (0, 0)}
    assert plan.committed().removed == (target("198.51.100.8/32"),)
    assert plan.gate_add == plan.gate_delete == ()


def test_plan_replacing_a_ban_carries_its_counter() -> None:
    scope = hops(64)
    plan = plan_commit(pending(ban("198.51.100.7", expires=NOW + 900, scope=scope)),
                       [installed("198.51.100.7", 40, 2400, scope=scope)])
    assert [kb.keys for kb in plan.delete] == [("198.51.100.7 . 0-63",
                                                "198.51.100.7 . 65-255")]
    assert added(plan) == {target("198.51.100.7/32", scope): (40, 2400)}
    assert plan.committed().removed == ()  # replaced, not gone


def test_plan_unban_deletes_every_element() -> None:
    scope = qtype(ANY, 63, 64)
    plan = plan_commit(pending(target("198.51.100.7/32", scope)),
                       [installed("198.51.100.7", scope=scope)])
    assert render_commit(plan, "floodd", NOW) == (
        "delete element inet floodd qtype4 { 198.51.100.7 . 0-62 . 0x0000ff0001, "
        "198.51.100.7 . 65-255 . 0x0000ff0001 }\n")
    assert plan.committed().removed == (target("198.51.100.7/32", scope),)


def test_plan_prefixes_never_overlap_in_the_interval_set() -> None:
    current = [installed("203.0.113.0/25", 5, 500), installed("203.0.113.128/26", 1, 100),
               installed("198.51.100.0/24"), installed("203.0.113.7", 9, 900)]
    plan = plan_commit(pending(ban("203.0.113.0/24"),  # replaces the /25 and the /26
                               ban("198.51.100.128/25"),  # inside a /24
                               ban("198.51.100.128/25", scope=UDP_ONLY),  # another set
                               ban("198.51.100.9")),  # own set: added
                       current)
    assert set(deleted(plan)) == {target("203.0.113.0/25"), target("203.0.113.128/26")}
    assert added(plan) == {target("203.0.113.0/24"): (6, 600),
                           target("198.51.100.128/25", UDP_ONLY): (0, 0),
                           target("198.51.100.9/32"): (0, 0)}


def test_plan_widest_prefix_of_one_batch_wins() -> None:
    plan = plan_commit(pending(ban("2001:db8:1:1::/64"), ban("2001:db8:1::/48")), [])
    assert list(added(plan)) == [target("2001:db8:1::/48")]


def test_plan_hop_bans_never_overlap() -> None:
    current = [installed("198.51.100.10", 5, 50, scope=hops(64)),
               installed("198.51.100.20", 3, 30, scope=hops(63, 64)),
               installed("198.51.100.30", 1, 10, scope=hops(63)),
               installed("203.0.113.0/24", 7, 70, scope=hops(64))]
    plan = plan_commit(pending(
        ban("198.51.100.10", scope=hops(63, 64)),  # the ban in place drops more: skipped
        ban("198.51.100.20", scope=hops(64)),  # drops more than the one in place: replaces
        ban("198.51.100.30", scope=hops(64)),  # neither covers the other: the newer wins
        ban("203.0.113.5", scope=hops(64)),  # inside a banned /24, covered
        ban("203.0.113.6", scope=hops(60)),  # inside it, not covered: the wider one wins
        ban("198.51.100.40", scope=hops(64))), current)
    assert added(plan) == {target("198.51.100.20/32", hops(64)): (3, 30),
                           target("198.51.100.30/32", hops(64)): (1, 10),
                           target("198.51.100.40/32", hops(64)): (0, 0)}
    assert deleted(plan) == [target("198.51.100.20/32", hops(63, 64)),
                             target("198.51.100.30/32", hops(63))]
    assert set(plan.committed().removed) == set(deleted(plan))


def test_plan_a_prefix_hop_ban_replaces_those_inside() -> None:
    current = [installed("198.51.100.10", 5, 50, scope=hops(64)),
               installed("198.51.100.20", 3, 30, scope=hops(50, 64)),  # not covered: replaced
               installed("198.51.100.10", 2, 20, scope=UDP_ONLY),  # another set: stays
               installed("203.0.113.0/24", scope=hops(64))]
    plan = plan_commit(pending(ban("198.51.100.0/24", scope=hops(64)),
                               ban("198.51.100.30", scope=hops(64)),  # same batch, inside
                               ban("203.0.113.0/25", scope=hops(64))),  # inside: skipped
                       current)
    assert added(plan) == {target("198.51.100.0/24", hops(64)): (8, 80)}
    assert set(deleted(plan)) == {target("198.51.100.10/32", hops(64)),
                                  target("198.51.100.20/32", hops(50, 64))}
    # inside a wider network's ban that spares more: the wider one wins
    plan = plan_commit(pending(ban("198.51.100.0/24", scope=hops(64))),
                       [installed("198.51.0.0/16", scope=hops(64, 65))])
    assert plan.add == plan.delete == ()


def test_plan_qtype_bans_overlap_only_within_a_qtype() -> None:
    current = [installed("198.51.100.10", 4, 40, scope=qtype(ANY)),
               installed("198.51.100.10", scope=qtype(TXT))]
    plan = plan_commit(pending(ban("198.51.100.0/24", scope=qtype(ANY)),
                               ban("198.51.100.11", scope=qtype(ANY, 64)),  # inside: skipped
                               ban("198.51.100.11", scope=qtype(TXT, 64))),
                       current, {net("198.51.100.10/32"): NOW + 3600})
    assert deleted(plan) == [target("198.51.100.10/32", qtype(ANY))]
    assert added(plan) == {target("198.51.100.0/24", qtype(ANY)): (4, 40),
                           target("198.51.100.11/32", qtype(TXT, 64)): (0, 0)}
    # gates: the new prefix and address; 198.51.100.10's gate lasts long enough
    assert set(plan.gate_add) == {(net("198.51.100.0/24"), NOW + 600 + GATE_MARGIN),
                                  (net("198.51.100.11/32"), NOW + 600 + GATE_MARGIN)}


def test_plan_gates_last_as_long_as_the_longest_qtype_ban() -> None:
    current = [installed("198.51.100.10", scope=qtype(TXT), expires=NOW + 900)]
    new = ban("198.51.100.10", scope=qtype(ANY), expires=NOW + 600)
    for gate, refreshed in ((None, True), (NOW + 100, True), (NOW + 900, False),
                            (NOW + 960, False)):
        gates = {} if gate is None else {net("198.51.100.10/32"): gate}
        plan = plan_commit(pending(new), current, gates)
        want = ((net("198.51.100.10/32"), NOW + 900 + GATE_MARGIN),) if refreshed else ()
        assert plan.gate_add == want, gate
    # a qtype element added by hand without a timeout: its gate has none either
    forever = [installed("198.51.100.30", scope=qtype(ANY), expires=math.inf)]
    script = render_commit(plan_commit(pending(ban("198.51.100.31")), forever), "floodd", NOW)
    assert script.splitlines()[-1] == "add element inet floodd qgate4 { 198.51.100.30 }"
    # whole-source, UDP-only and hop bans are not gated; a gate is never deleted for one
    plan = plan_commit(pending(ban("198.51.100.20"), ban("198.51.100.20", scope=hops(64)),
                               target("198.51.100.10/32", qtype(TXT))), current)
    assert plan.gate_add == plan.gate_delete == ()


def test_plan_prefix_gates_never_overlap() -> None:
    new = ban("198.51.100.0/24", scope=qtype(ANY))
    inside = {net("198.51.100.0/25"): NOW + 2000, net("198.51.100.200/32"): NOW + 10}
    plan = plan_commit(pending(new), [], inside)
    assert plan.gate_delete == (net("198.51.100.0/25"),)  # the interval set refuses both
    assert plan.gate_add == ((net("198.51.100.0/24"), NOW + 2000),)  # the later end
    wider = {net("198.51.0.0/16"): NOW + 100}
    plan = plan_commit(pending(new), [], wider)
    # given a later end: deleted and added again (re-adding keeps the old timeout on older
    # kernels)
    assert (plan.gate_delete, plan.gate_add) == ((net("198.51.0.0/16"),), (
        (net("198.51.0.0/16"), NOW + 600 + GATE_MARGIN),))
    address = plan_commit(pending(ban("198.51.100.7", scope=qtype(ANY))), [],
                          {net("198.51.100.7/32"): NOW + 100})
    assert render_commit(address, "floodd", NOW).splitlines() == [
        "delete element inet floodd qgate4 { 198.51.100.7 }",
        'add element inet floodd qtype4 { 198.51.100.7 . 0-255 . 0x0000ff0001 timeout '
        f'600000ms comment "floodd since={NOW:.0f} expires={NOW + 600:.0f} '
        'scope=udp,qtype=255 rule=r" }',
        "add element inet floodd qgate4 { 198.51.100.7 timeout 660000ms }"]
    plan = plan_commit(pending(new), [], {net("198.51.0.0/16"): NOW + 700})
    assert plan.gate_delete == plan.gate_add == ()


def test_plan_tells_what_it_relied_on() -> None:
    """The bans a plan skipped new ones for and those whose counters it carries: what a
    mirror must be sure of."""
    wide = installed("203.0.113.0/24", 5, 500)
    narrow = installed("198.51.100.0/25", 2, 200)
    gone = installed("198.51.100.7")
    plan = plan_commit(pending(ban("203.0.113.0/25"),  # covered
                               ban("198.51.100.0/24"),  # replaces, counters carried
                               target("198.51.100.7/32")),  # unbanned: deleted only
                       [wide, narrow, gone])
    assert (plan.kept, plan.carried) == ((wide,), (narrow,))
    assert set(plan.delete) == {narrow, gone}


def test_render_commit() -> None:
    plan = plan_commit(pending(ban("198.51.100.7", "query-flood"),
                               ban("2001:db8:1::/64", "p", NOW + 60.5),
                               ban("198.51.100.8", "f", scope=hops(64)),
                               ban("198.51.100.9", "a", scope=qtype(ANY)),
                               target("203.0.113.9/32")),
                       [installed("203.0.113.9"), installed("198.51.100.7", 3, 180),
                        installed("198.51.100.8", 2, 100, scope=hops(64))])
    c = f"since={NOW:.0f} expires={NOW + 600:.0f}"
    assert render_commit(plan, "floodd", NOW).splitlines() == [
        "delete element inet floodd ban4 { 203.0.113.9, 198.51.100.7 }",
        "delete element inet floodd hop4 { 198.51.100.8 . 0-63, 198.51.100.8 . 65-255 }",
        'add element inet floodd ban4 { 198.51.100.7 counter packets 3 bytes 180 timeout '
        f'600000ms comment "floodd {c} scope=all rule=query-flood" }}',
        # the carried counter goes to the first element only
        'add element inet floodd hop4 { 198.51.100.8 . 0-63 counter packets 2 bytes 100 '
        f'timeout 600000ms comment "floodd {c} scope=udp,except=64 rule=f", '
        f'198.51.100.8 . 65-255 timeout 600000ms comment "floodd {c} scope=udp,except=64 '
        'rule=f" }',
        'add element inet floodd qtype4 { 198.51.100.9 . 0-255 . 0x0000ff0001 timeout 600000ms '
        f'comment "floodd {c} scope=udp,qtype=255 rule=a" }}',
        'add element inet floodd ban6net { 2001:db8:1::/64 timeout 60500ms comment '
        f'"floodd since={NOW:.0f} expires={NOW + 60:.0f} scope=all rule=p" }}',
        "add element inet floodd qgate4 { 198.51.100.9 timeout 660000ms }",
    ]
    assert render_commit(plan_commit({}, []), "floodd", NOW) == ""


def test_setup_script_follows_scope_ports_and_protocols() -> None:
    dns = NftablesBackend([53, 5353], ["udp"]).setup_script()
    assert "add rule inet floodd input meta l4proto udp th dport { 53, 5353 } ip saddr " \
           '@ban4 drop comment "floodd: drop banned sources"' in dns
    for rule in ("udp dport { 53, 5353 } ip6 saddr @udp6net drop",
                 "udp dport { 53, 5353 } ip saddr . ip ttl @hop4 drop",
                 "udp dport { 53, 5353 } ip6 saddr . ip6 hoplimit @hop6 drop",
                 "udp dport { 53, 5353 } ip saddr @qgate4net jump qtype4"):
        assert f"add rule inet floodd input {rule}" in dns, rule
    everything = NftablesBackend([53], ["udp", "tcp"], scope="all").setup_script()
    assert "add rule inet floodd input ip6 saddr @ban6net drop" in everything
    # UDP-only bans still match UDP only
    assert "add rule inet floodd input meta l4proto udp ip saddr @udp4 drop" in everything
    assert "add rule inet floodd input meta l4proto udp ip6 saddr @qgate6 jump qtype6" \
        in everything
    assert "flags interval, timeout; counter;" in everything
    for version, ip, hop in ((4, "ip", "ip ttl"), (6, "ip6", "ip6 hoplimit")):
        chain = [ln for ln in dns.splitlines()
                 if ln.startswith(f"add rule inet floodd qtype{version} ")]
        assert chain == [f"add rule inet floodd qtype{version} {ip} saddr . {hop} . "
                         f"@th,{8 * (19 + length)},40 @qtype{version} drop"
                         for length in range(1, 256)]
    for bad in (dict(scope="some"), dict(table="in valid")):
        with pytest.raises(FlooddError):
            NftablesBackend([53], ["udp"], **bad)  # type: ignore[arg-type]


# --- choosing a backend -------------------------------------------------------------------
def test_auto_choice() -> None:
    def usable() -> None:
        return None

    def broken() -> str:
        return "no ip_tables module"
    assert auto_choice("iptables v1.8.9 (nf_tables)\n", broken)[0] == "nftables"
    assert auto_choice(None, usable) == ("nftables", "auto: no iptables command on this host")
    assert auto_choice("iptables v1.8.9 (legacy)", usable) == (
        "iptables", "auto: iptables here is iptables v1.8.9 (legacy)")
    assert auto_choice("iptables v1.6.1", broken) == (
        "nftables", "auto: legacy iptables is not usable (no ip_tables module)")


def test_make_backend() -> None:
    fw = FirewallConfig(backend="dry-run", scope="all")
    backend, why = make_backend(fw, [53], ["udp"])
    assert isinstance(backend, DryRunBackend) and why == "firewall.backend"
    backend, why = make_backend(FirewallConfig(backend="nftables"), [53], ["udp"], dry_run=True)
    assert backend.name == "dry-run" and why.startswith("dry run")
    if shutil.which("nft"):
        backend, _ = make_backend(FirewallConfig(backend="nftables"), [53], ["udp"])
        assert isinstance(backend, NftablesBackend)
    try:
        backend, why = make_backend(FirewallConfig(backend="auto"), [53], ["udp", "tcp"])
    except FlooddError as exc:  # the backend auto chose cannot run here
        assert "\n" not in str(exc)
    else:
        assert backend.name in BACKENDS and why.startswith("auto: ")


def test_a_hung_iptables_version_is_one_line(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    if shutil.which("iptables") is None:
        pytest.skip("needs iptables")
    iptables = FaultyCommand(tmp_path / "bin", "iptables")
    iptables.hang()
    monkeypatch.setenv("PATH", f"{iptables.dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(floodd.command, "TIMEOUT", 0.5)
    with pytest.raises(FlooddError, match=r"^iptables --version did not finish within 0\.5 s "
                                          r"\(killed\)$"):
        make_backend(FirewallConfig(backend="auto"), [53], ["udp"])


def test_missing_nft_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(FlooddError, match="^firewall backend nftables: nft not found"):
        make_backend(FirewallConfig(backend="nftables"), [53], ["udp"])


# --- the kernel ---------------------------------------------------------------------------
def _make(name: str, scope: str = "dns") -> Backend:
    backend, _ = make_backend(FirewallConfig(backend=name, scope=scope), [53], ["udp", "tcp"])
    return backend


def _present(backend: Backend) -> bool:
    return backend.survey() is not None


def _apply(backend: Backend, bans: list[Ban]) -> None:
    backend.setup()
    backend.ban(bans)
    backend.commit()


def _nft(lab: Any, *args: str) -> str:
    out: str = lab.run(lab.server_ns, ["nft", *args], text=True).stdout
    return out


HOST_TABLE = """table inet hosttest {
    set trusted { type ipv4_addr; elements = { 192.0.2.99 } }
    chain input { type filter hook input priority 0; policy accept;
        ip saddr @trusted counter accept
        tcp dport 22 counter accept comment "host rule"
    }
}
"""


def test_hosts_own_rules_survive_setup_and_teardown(lab: Any, in_server: Any,
                                                     backend_name: str) -> None:
    lab.run(lab.server_ns, ["nft", "-f", "-"], input=HOST_TABLE, text=True)
    legacy = shutil.which("iptables-legacy")
    if legacy:
        lab.run(lab.server_ns, [legacy, "-A", "INPUT", "-s", "192.0.2.98", "-j", "ACCEPT"])
    host_before = _nft(lab, "list", "table", "inet", "hosttest")
    legacy_before = lab.run(lab.server_ns, [legacy, "-S"], text=True).stdout if legacy else ""
    backend = in_server(_make, backend_name)
    in_server(_apply, backend, [Ban(net("198.51.100.7/32"), "r", time.time(),
                                    time.time() + 60)])
    assert in_server(_present, backend)
    assert _nft(lab, "list", "table", "inet", "hosttest") == host_before
    in_server(backend.teardown)
    assert not in_server(_present, backend)
    assert in_server(backend.list) == []
    assert _nft(lab, "list", "table", "inet", "hosttest") == host_before
    if legacy:
        assert lab.run(lab.server_ns, [legacy, "-S"], text=True).stdout == legacy_before
    in_server(backend.teardown)  # nothing left to remove: not an error


def _wipe(lab: Any, backend_name: str) -> None:
    """What an operator's careless flush does to floodd's firewall state."""
    if backend_name == "nftables":
        lab.run(lab.server_ns, ["nft", "flush", "ruleset"])
    else:
        for tool in ("iptables-legacy", "ip6tables-legacy"):
            lab.run(lab.server_ns, [tool, "-F"])
            lab.run(lab.server_ns, [tool, "-X"])
        lab.run(lab.server_ns, ["ipset", "destroy"])


def test_repair_after_an_external_flush(dns_lab: Any, in_server: Any,
                                        backend_name: str) -> None:
    lab = dns_lab
    lab.add_client_address("198.51.100.7")
    now = time.time()
    bans = [Ban(net("198.51.100.7/32"), "query-flood", now, now + 600),
            Ban(net("2001:db8:1::/64"), "prefix-flood", now, now + 600)]
    backend = in_server(_make, backend_name)
    in_server(_apply, backend, bans)
    assert not lab.dig("www.lab.example", source="198.51.100.7")
    _wipe(lab, backend_name)
    assert not in_server(_present, backend)
    assert in_server(backend.list) == []
    assert lab.dig("www.lab.example", source="198.51.100.7")
    in_server(_apply, backend, bans)  # what the daemon's repair does
    assert in_server(_present, backend)
    # Expiries are recorded in whole seconds, rounded down.
    assert {(b.network, b.rule, round(b.since), b.expires)
            for b in in_server(backend.list)} == {
        (b.network, b.rule, round(b.since), math.floor(b.expires)) for b in bans}
    assert not lab.dig("www.lab.example", source="198.51.100.7")


def test_adoption_by_a_new_backend_object(lab: Any, in_server: Any, backend_name: str,
                                          send_queries: Callable[[str, int], None],
                                          wait_for: Callable[..., bool]) -> None:
    lab.add_client_address("203.0.113.9")
    now = time.time()
    first = in_server(_make, backend_name)
    in_server(_apply, first, [Ban(net("203.0.113.0/24"), "prefix-flood", now, now + 600)])
    send_queries("203.0.113.9", 4)
    assert wait_for(lambda: in_server(first.list)[0].packets == 4)
    second = in_server(_make, backend_name)  # as after a restart
    in_server(second.setup)
    assert in_server(second.list) == in_server(first.list)
    assert in_server(second.list)[0].packets == 4


def test_setup_is_idempotent_and_follows_scope(lab: Any, in_server: Any,
                                               backend_name: str) -> None:
    backend = in_server(_make, backend_name)
    assert not in_server(_present, backend)
    in_server(backend.setup)
    in_server(backend.setup)
    assert in_server(_present, backend) and in_server(backend.list) == []
    wide = in_server(_make, backend_name, "all")
    in_server(wide.setup)  # the drop rules are replaced, bans stay
    assert in_server(_present, wide)


def _send_udp(source: str, server: str, port: int, count: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        for _ in range(count):
            sock.sendto(b"not dns", (server, port))


def test_drop_rules_follow_new_ports_and_protocols(lab: Any, in_server: Any, in_client: Any,
                                                   backend_name: str,
                                                   wait_for: Callable[..., bool]) -> None:
    lab.add_client_address("198.51.100.7")
    backend = in_server(_make, backend_name)  # udp and tcp to port 53
    now = time.time()
    in_server(_apply, backend, [Ban(net("198.51.100.7/32"), "query-flood", now, now + 600)])
    in_client(_send_udp, "198.51.100.7", lab.server_v4, 5353, 2)
    time.sleep(0.3)
    assert in_server(backend.list)[0].packets == 0  # port 5353 is not floodd's
    in_server(backend.configure, [53, 5353], ["udp"])
    assert in_server(_present, backend) == (backend_name == "nftables")  # iptables: jumps
    in_server(backend.setup)
    assert in_server(_present, backend)
    in_client(_send_udp, "198.51.100.7", lab.server_v4, 5353, 3)
    assert wait_for(lambda: in_server(backend.list)[0].packets == 3)
    [kept] = in_server(backend.list)  # the ban stays, with its rule and times
    assert (kept.network, kept.rule, kept.since) == (net("198.51.100.7/32"), "query-flood",
                                                     round(now))
    if backend_name == "nftables":
        chain = _nft(lab, "list", "chain", "inet", "floodd", "input")
        assert chain.count("udp dport { 53, 5353 } ") == 14, chain  # every rule
    with pytest.raises(FlooddError):
        backend.configure([], ["udp"])  # refused, nothing changed
    assert in_server(_present, backend)


@contextlib.contextmanager
def _commit_fails(backend_name: str, tmp_path: Path,
                  monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], Any]]:
    """A context giving ``failing()``: within it, a commit of that backend fails (nft
    refuses the transaction; ipset refuses the batch)."""
    if backend_name == "nftables":
        nft = FaultyCommand(tmp_path / "bin", "nft")
        monkeypatch.setenv("PATH", f"{nft.dir}{os.pathsep}{os.environ['PATH']}")

        @contextlib.contextmanager
        def failing() -> Iterator[None]:
            nft.fail("-f")
            yield
            nft.heal()
    else:
        ipset = FaultyCommand(tmp_path / "bin", "ipset")
        monkeypatch.setenv("PATH", f"{ipset.dir}{os.pathsep}{os.environ['PATH']}")

        @contextlib.contextmanager
        def failing() -> Iterator[None]:
            ipset.fail()
            yield
            ipset.heal()
    yield failing


def test_a_failed_commit_is_never_applied_later(lab: Any, in_server: Any, backend_name: str,
                                                tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    now = time.time()
    first, failed, later = (Ban(net(n), "r", now, now + 600)
                            for n in ("198.51.100.7/32", "198.51.100.8/32", "203.0.113.9/32"))
    with _commit_fails(backend_name, tmp_path, monkeypatch) as failing:
        backend = in_server(_make, backend_name)
        in_server(_apply, backend, [first])
        backend.ban([failed])
        with failing():
            with pytest.raises(FlooddError):
                in_server(backend.commit)
        backend.ban([later])
        done = in_server(backend.commit)
    assert {b.network for b in in_server(backend.list)} == {first.network, later.network}
    assert [b.network for b in done.added] == [later.network]


def test_nftables_replacing_a_ban_keeps_its_counter(lab: Any, in_server: Any,
                                                    send_queries: Callable[[str, int], None],
                                                    wait_for: Callable[..., bool]) -> None:
    if shutil.which("nft") is None:
        pytest.skip("needs nft")
    lab.add_client_address("198.51.100.7")
    now = time.time()
    backend = NftablesBackend([53], ["udp", "tcp"])
    in_server(_apply, backend, [Ban(net("198.51.100.7/32"), "query-flood", now, now + 60)])
    send_queries("198.51.100.7", 5)
    assert wait_for(lambda: in_server(backend.list)[0].packets == 5)
    in_server(_apply, backend, [Ban(net("198.51.100.7/32"), "query-flood", now, now + 3600)])
    [extended] = in_server(backend.list)
    assert (extended.packets, extended.expires) == (5, math.floor(now + 3600))
    element = _nft(lab, "list", "set", "inet", "floodd", "ban4")
    assert "timeout 59m" in element or "timeout 1h" in element


def test_nftables_prefix_overlaps_and_kernel_timeout(lab: Any, in_server: Any) -> None:
    if shutil.which("nft") is None:
        pytest.skip("needs nft")
    now = time.time()
    backend = NftablesBackend([53], ["udp", "tcp"])
    in_server(_apply, backend, [Ban(net("203.0.113.0/25"), "a", now, now + 60),
                                Ban(net("203.0.113.7/32"), "b", now, now + 1.2)])
    backend.ban([Ban(net("203.0.113.64/26"), "c", now, now + 60)])  # inside
    assert in_server(backend.commit).added == ()  # not taken: the caller is told
    assert {b.rule for b in in_server(backend.list)} == {"a", "b"}
    backend.ban([Ban(net("203.0.113.0/24"), "d", now, now + 60)])  # replaces
    done = in_server(backend.commit)
    assert [b.rule for b in done.added] == ["d"]
    assert done.removed == (Target(net("203.0.113.0/25"), WHOLE),)
    assert {b.network: b.rule for b in in_server(backend.list)} == {
        net("203.0.113.0/24"): "d", net("203.0.113.7/32"): "b"}
    time.sleep(1.5)  # the kernel alone ends the 1.2 s ban
    assert {b.network for b in in_server(backend.list)} == {net("203.0.113.0/24")}


def test_commit_without_setup_is_one_line(lab: Any, in_server: Any) -> None:
    if shutil.which("nft") is None:
        pytest.skip("needs nft")
    backend = NftablesBackend([53], ["udp"])
    backend.ban([ban("198.51.100.7")])
    with pytest.raises(FlooddError, match="^nftables table inet floodd does not exist"):
        in_server(backend.commit)


def test_nft_errors_are_one_line(lab: Any, in_server: Any) -> None:
    if shutil.which("nft") is None:
        pytest.skip("needs nft")
    lab.run(lab.server_ns, ["nft", "add", "table", "inet", "floodd"])
    lab.run(lab.server_ns, ["nft", "add", "set", "inet", "floodd", "ban4",
                            "{ type ipv4_addr; }"])  # not floodd's definition
    backend = NftablesBackend([53], ["udp"])
    with pytest.raises(FlooddError) as exc:
        in_server(backend.setup)
    assert str(exc.value).startswith("nft -f - failed: ") and "\n" not in str(exc.value)


# --- the nftables kernel, every scope -----------------------------------------------------
def _needs_nft() -> None:
    if shutil.which("nft") is None:
        pytest.skip("needs nft")


def _replies(source: str, server: str, queries: list[bytes], hop: int | None = None,
             wait: float = 1.0) -> int:
    """Send ``queries`` (distinct ids) over UDP from ``source`` with IP TTL / IPv6 hop
    limit ``hop``; how many got a reply (waiting ``wait`` s after the last one)."""
    family = socket.AF_INET6 if ":" in source else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        if hop is not None:
            if family == socket.AF_INET:
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, hop)
            else:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, hop)
        for query in queries:
            sock.sendto(query, (server, 53))
        sock.settimeout(wait)
        ids = set()
        with contextlib.suppress(TimeoutError):
            while len(ids) < len(queries):
                ids.add(sock.recv(4096)[:2])
    return len(ids)


def _server(lab: Any, source: str) -> str:
    server: str = lab.server_v6 if ":" in source else lab.server_v4
    return server


def _dig(lab: Any, source: str, *args: str) -> bool:
    """``dig`` from ``source`` in the client namespace: whether it was answered."""
    proc = lab.run(lab.client_ns, ["dig", "+tries=1", "+timeout=1", "+short",
                                   f"@{_server(lab, source)}", "-b", source, *args],
                   check=False, timeout=15)
    return bool(proc.returncode == 0)


def _counts(backend: NftablesBackend) -> dict[Target, int]:
    return {b.target: b.packets for b in backend.list()}


def test_nftables_every_scope_round_trips(lab: Any, in_server: Any, in_client: Any,
                                          wait_for: Callable[..., bool]) -> None:
    _needs_nft()
    now = time.time()
    scopes = [("198.51.100.7/32", WHOLE), ("198.51.100.7/32", UDP_ONLY),
              ("198.51.100.7/32", hops(64)), ("198.51.100.7/32", qtype(ANY)),
              ("198.51.100.7/32", qtype(TXT, 63, 64)), ("203.0.113.0/24", UDP_ONLY),
              ("203.0.113.0/25", hops(63, 64)), ("198.18.0.0/15", qtype(ANY)),
              ("2001:db8:1::7/128", hops(64)), ("2001:db8:1::/64", qtype(ANY, 64)),
              ("2001:db8:2::/64", WHOLE), ("2001:db8:1::8/128", UDP_ONLY)]
    bans = [Ban(net(n), f"rule-{i}", now, now + 600 + i, s)
            for i, (n, s) in enumerate(scopes)]
    backend = NftablesBackend([53], ["udp", "tcp"])
    in_server(backend.setup)
    assert in_server(_present, backend)
    backend.ban(bans)
    done = in_server(backend.commit)
    assert {b.target for b in done.added} == {b.target for b in bans} and not done.removed
    listed = {b.target: b for b in in_server(backend.list)}
    assert {t: (b.rule, b.since, b.expires, b.packets) for t, b in listed.items()} == {
        b.target: (b.rule, round(now), math.floor(b.expires), 0) for b in bans}
    assert all(b.remaining is not None and 590 < b.remaining <= 612 for b in listed.values())
    # a hop ban is one element per dropped hop range: its counter is their sum
    lab.add_client_address("2001:db8:1::7")
    for hop in (50, 100, 64):  # 64 passes
        in_client(_replies, "2001:db8:1::7", lab.server_v6, [_query("lab.example", 1)], hop,
                  0.1)
    hop6 = target("2001:db8:1::7/128", hops(64))
    assert wait_for(lambda: in_server(_counts, backend)[hop6] == 2)
    # gated sources: the qtype bans' networks, until the longest of their bans ends
    gates = in_server(backend.state).gates
    assert set(gates) == {net("198.51.100.7/32"), net("198.18.0.0/15"), net("2001:db8:1::/64")}
    assert gates[net("198.51.100.7/32")] >= math.floor(now + 604 + GATE_MARGIN) - 1
    # a longer ban refreshes the gate (add element resets an element's timeout)
    longer = Ban(net("198.51.100.7/32"), "rule-3", now, now + 3600, qtype(ANY))
    backend.ban([longer])
    assert [b.target for b in in_server(backend.commit).added] == [longer.target]
    assert in_server(backend.state).gates[net("198.51.100.7/32")] >= now + 3600
    backend.unban([b.target for b in bans])
    done = in_server(backend.commit)
    assert set(done.removed) == {b.target for b in bans}
    assert in_server(backend.list) == []
    assert set(in_server(backend.state).gates) == set(gates)  # gates stay until they time out
    assert "elements" not in _nft(lab, "list", "set", "inet", "floodd", "hop4")


def test_nftables_udp_only_ban_drops_udp_not_tcp(dns_lab: Any, in_server: Any) -> None:
    _needs_nft()
    lab = dns_lab
    now = time.time()
    backend = NftablesBackend([53], ["udp", "tcp"])
    for source in ("198.51.100.7", "2001:db8:1::7"):
        lab.add_client_address(source)
        assert _dig(lab, source, "www.lab.example")
    in_server(_apply, backend, [Ban(net(s), "query-flood", now, now + 600, UDP_ONLY)
                                for s in ("198.51.100.7", "2001:db8:1::7")])
    for source in ("198.51.100.7", "2001:db8:1::7"):
        assert not _dig(lab, source, "www.lab.example")
        assert _dig(lab, source, "+tcp", "www.lab.example")
    assert all(n >= 1 for n in in_server(_counts, backend).values())


def test_nftables_udp_only_ban_with_scope_all(dns_lab: Any, in_server: Any, in_client: Any,
                                              wait_for: Callable[..., bool]) -> None:
    """Firewall scope all: a UDP-only ban drops UDP to any port, still no TCP."""
    _needs_nft()
    lab = dns_lab
    lab.add_client_address("198.51.100.7")
    now = time.time()
    backend = NftablesBackend([53], ["udp", "tcp"], scope="all")
    in_server(_apply, backend, [Ban(net("198.51.100.7/32"), "r", now, now + 600, UDP_ONLY)])
    in_client(_send_udp, "198.51.100.7", lab.server_v4, 5353, 2)
    assert wait_for(lambda: in_server(backend.list)[0].packets == 2)
    assert _dig(lab, "198.51.100.7", "+tcp", "www.lab.example")
    assert not _dig(lab, "198.51.100.7", "www.lab.example")


def test_nftables_hop_ban_spares_the_usual_hop_value(dns_lab: Any, in_server: Any,
                                                     in_client: Any) -> None:
    """Packets from the client namespace arrive with TTL / hop limit 64 (one link)."""
    _needs_nft()
    lab = dns_lab
    now = time.time()
    sources = ("198.51.100.7", "2001:db8:1::7")
    for source in sources:
        lab.add_client_address(source)
    backend = NftablesBackend([53], ["udp", "tcp"])
    in_server(_apply, backend, [Ban(net(s), "query-flood", now, now + 600, hops(64))
                                for s in sources])
    for source in sources:
        queries = [_query("www.lab.example", 1, qid) for qid in range(5)]
        server = _server(lab, source)
        assert in_client(_replies, source, server, queries, 50) == 0  # forged: dropped
        assert in_client(_replies, source, server, queries, 200) == 0
        assert in_client(_replies, source, server, queries, 64) == 5  # the usual: passes
        assert in_client(_replies, source, server, queries) == 5  # the system default
        assert _dig(lab, source, "+tcp", "www.lab.example")  # UDP only
    assert set(in_server(_counts, backend).values()) == {10}


def test_nftables_qtype_ban_drops_only_that_type(dns_lab: Any, in_server: Any,
                                                 in_client: Any) -> None:
    _needs_nft()
    lab = dns_lab
    now = time.time()
    names = [".", "lab.example", "www.lab.example", "a.b.c.d.lab.example", LONGEST,
             LONGEST[2:]]
    sources = ("198.51.100.7", "2001:db8:1::7", "203.0.113.9")
    for source in (*sources, "198.51.100.8"):
        lab.add_client_address(source)
    backend = NftablesBackend([53], ["udp", "tcp"])
    in_server(_apply, backend, [
        Ban(net("198.51.100.7/32"), "any-queries", now, now + 600, qtype(ANY)),
        Ban(net("2001:db8:1::7/128"), "any-queries", now, now + 600, qtype(ANY)),
        Ban(net("203.0.113.0/24"), "any-queries", now, now + 600, qtype(ANY)),  # a prefix
        Ban(net("198.51.100.8/32"), "any-queries", now, now + 600, qtype(ANY, 64))])
    for source in sources:
        server = _server(lab, source)
        for code, answered in ((ANY, 0), (1, len(names)), (TXT, len(names))):
            for edns in (False, True):
                queries = [_query(n, code, qid, edns) for qid, n in enumerate(names)]
                assert in_client(_replies, source, server, queries) == answered, \
                    (source, code, edns)
        # dig asks for ANY over TCP unless told otherwise
        assert not _dig(lab, source, "+notcp", "lab.example", "ANY")  # EDNS and a cookie
        assert _dig(lab, source, "www.lab.example", "A")
        assert _dig(lab, source, "+tcp", "lab.example", "ANY")  # UDP only
    queries = [_query(n, ANY, qid) for qid, n in enumerate(names)]
    assert in_client(_replies, "198.51.100.8", lab.server_v4, queries, 50) == 0
    assert in_client(_replies, "198.51.100.8", lab.server_v4, queries, 64) == len(names)
    counts = in_server(_counts, backend)
    # each source's ANY queries: 2 x len(names) raw, 1 by dig
    assert counts[target("198.51.100.7/32", qtype(ANY))] == 2 * len(names) + 1
    assert counts[target("198.51.100.8/32", qtype(ANY, 64))] == len(names)


OLD_TABLE = """add table inet floodd
add set inet floodd ban4 { type ipv4_addr; flags timeout; counter; }
add set inet floodd ban6 { type ipv6_addr; flags timeout; counter; }
add set inet floodd ban4net { type ipv4_addr; flags interval, timeout; counter; }
add set inet floodd ban6net { type ipv6_addr; flags interval, timeout; counter; }
add chain inet floodd input { type filter hook input priority filter - 10; policy accept; }
add rule inet floodd input meta l4proto { tcp, udp } th dport 53 ip saddr @ban4 drop
add element inet floodd ban4 { 198.51.100.7 timeout 600s comment "floodd since=1795615085 \
expires=1795615685 rule=query-flood" }
"""


def test_nftables_setup_completes_an_older_table(lab: Any, in_server: Any) -> None:
    """The table of a floodd that banned whole sources only: its bans stay, as whole."""
    _needs_nft()
    lab.run(lab.server_ns, ["nft", "-f", "-"], input=OLD_TABLE, text=True)
    backend = NftablesBackend([53], ["udp", "tcp"])
    assert not in_server(_present, backend)
    in_server(backend.setup)
    assert in_server(_present, backend)
    [kept] = in_server(backend.list)
    assert (kept.target, kept.rule) == (target("198.51.100.7/32"), "query-flood")


def test_nftables_present_needs_every_rule(lab: Any, in_server: Any) -> None:
    _needs_nft()
    backend = NftablesBackend([53], ["udp", "tcp"])
    in_server(backend.setup)
    listing = json.loads(_nft(lab, "-j", "list", "chain", "inet", "floodd", "qtype6"))
    handle = [o["rule"]["handle"] for o in listing["nftables"] if "rule" in o][-1]
    _nft(lab, "delete", "rule", "inet", "floodd", "qtype6", "handle", str(handle))
    assert not in_server(_present, backend)  # names of wire length 255 would pass
    in_server(backend.setup)
    assert in_server(_present, backend)
    assert _nft(lab, "list", "chain", "inet", "floodd", "qtype6").count("@qtype6 drop") == 255


# --- commits planned against the mirror -----------------------------------------------
LIST = "-j list table inet floodd"
CHANGE = "-f -"


@pytest.fixture
def nft_calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FaultyCommand:
    """floodd's ``nft`` runs through a wrapper recording each call (out-of-band changes
    run the real one, ``nft_calls.real``)."""
    _needs_nft()
    nft = FaultyCommand(tmp_path / "bin", "nft")
    monkeypatch.setenv("PATH", f"{nft.dir}{os.pathsep}{os.environ['PATH']}")
    return nft


def _calls_during(nft: FaultyCommand, fn: Callable[..., Any], *args: Any) -> tuple[Any, list[str]]:
    seen = len(nft.calls())
    result = fn(*args)
    return result, nft.calls()[seen:]


def test_nftables_a_commit_is_one_nft_without_listing(lab: Any, in_server: Any,
                                                      nft_calls: FaultyCommand) -> None:
    backend = NftablesBackend([53], ["udp", "tcp"])
    in_server(backend.setup)
    now = time.time()
    bans = [Ban(net(f"198.51.100.{i}/32"), "r", now, now + 600, qtype(ANY) if i % 2 else
                hops(64) if i % 3 else WHOLE) for i in range(1, 21)]
    calls = []
    for b in bans:
        backend.ban([b])
        done, made = _calls_during(nft_calls, in_server, backend.commit)
        assert done.added == (b,)
        calls += made
    assert calls == [LIST] + [CHANGE] * len(bans)  # only the first commit lists the table
    state = in_server(backend.state)
    assert {b.target for b in state.bans} == {b.target for b in bans}
    assert set(state.gates) == {b.network for b in bans if b.scope.qtype is not None}
    # extended: each replaced in one transaction (its counter read by the listing above)
    longer = [replace(b, expires=now + 3600) for b in bans]
    backend.ban(longer)
    done, calls = _calls_during(nft_calls, in_server, backend.commit)
    assert calls == [CHANGE] and set(done.added) == set(longer) and not done.removed
    assert {b.target: b.expires for b in in_server(backend.list)} == {
        b.target: math.floor(now + 3600) for b in bans}
    assert all(in_server(backend.state).gates[b.network] >= now + 3600 + GATE_MARGIN - 1
               for b in bans if b.scope.qtype is not None)
    backend.unban([b.target for b in bans])
    done, calls = _calls_during(nft_calls, in_server, backend.commit)
    assert calls == [CHANGE] and set(done.removed) == {b.target for b in bans}
    assert in_server(backend.list) == []
    # nothing to change, nothing run
    backend.unban([bans[0].target])
    assert _calls_during(nft_calls, in_server, backend.commit) == (Committed((), ()), [])


def test_nftables_retries_after_out_of_band_changes(lab: Any, in_server: Any,
                                                    nft_calls: FaultyCommand,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The mirror does not see an operator's nft: the transaction it plans is refused,
    planned again against a listing and applied."""
    monkeypatch.setattr(floodd.enforce.firewall.nftables, "COUNTERS_FRESH", math.inf)
    backend = NftablesBackend([53], ["udp", "tcp"])
    now = time.time()
    a, b, c = (Ban(net(n), "r", now, now + 600, s) for n, s in (
        ("198.51.100.7/32", WHOLE), ("198.51.100.8/32", hops(64)), ("203.0.113.0/24", WHOLE)))
    in_server(_apply, backend, [a, b, c])

    def by_hand(*args: str) -> None:
        lab.run(lab.server_ns, [nft_calls.real, *args])
    by_hand("delete", "element", "inet", "floodd", "ban4", "{ 198.51.100.7 }")
    backend.unban([a.target])
    done, calls = _calls_during(nft_calls, in_server, backend.commit)
    assert calls == [CHANGE, LIST] and done == Committed((), ())  # nothing left to do
    by_hand("flush", "set", "inet", "floodd", "hop4")
    longer = replace(b, expires=now + 3600)
    backend.ban([longer])
    done, calls = _calls_during(nft_calls, in_server, backend.commit)
    assert calls == [CHANGE, LIST, CHANGE] and done.added == (longer,)
    assert {ib.target: ib.expires for ib in in_server(backend.list)} == {
        b.target: math.floor(now + 3600), c.target: math.floor(now + 600)}
    # an element added by hand inside a banned prefix: the prefix's replacement is refused
    by_hand("add", "element", "inet", "floodd", "ban4net", "{ 198.51.100.0/24 }")
    wider = Ban(net("198.51.100.0/23"), "r", now, now + 600)
    backend.ban([wider])
    done, calls = _calls_during(nft_calls, in_server, backend.commit)
    assert calls == [CHANGE, LIST, CHANGE] and done.added == (wider,)
    assert done.removed == (Target(net("198.51.100.0/24"), WHOLE),)
    by_hand("flush", "ruleset")
    backend.ban([a])
    with pytest.raises(FlooddError, match="^nftables table inet floodd does not exist"):
        in_server(backend.commit)
    in_server(_apply, backend, [a])
    assert [ib.target for ib in in_server(backend.list)] == [a.target]


def test_nftables_mirror_knows_kernel_timeouts(lab: Any, in_server: Any,
                                               nft_calls: FaultyCommand) -> None:
    """An element whose timeout may just have fired is not trusted: the table is listed
    before a transaction that would delete it."""
    backend = NftablesBackend([53], ["udp", "tcp"])
    in_server(backend.setup)
    now = time.time()
    short = [Ban(net(n), "r", now, now + 1.2, s) for n, s in (
        ("198.51.100.7/32", WHOLE), ("198.51.100.8/32", hops(64)))]
    backend.ban(short)
    in_server(backend.commit)
    time.sleep(0.3)  # within the doubt around the end of the 1.2 s timeouts
    kept = replace(short[0], expires=now + 600)
    backend.ban([kept])
    done, calls = _calls_during(nft_calls, in_server, backend.commit)
    assert calls == [LIST, CHANGE] and done.added == (kept,)
    listed = {ib.target: ib.expires for ib in in_server(backend.list)}
    assert listed[kept.target] == math.floor(now + 600)


def test_nftables_a_hung_commit_is_not_retried(lab: Any, in_server: Any,
                                               nft_calls: FaultyCommand,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """After nft was killed the mirror is unknown: the next commit lists the table."""
    backend = NftablesBackend([53], ["udp", "tcp"])
    now = time.time()
    in_server(_apply, backend, [Ban(net("198.51.100.7/32"), "r", now, now + 600)])
    monkeypatch.setattr(floodd.command, "TIMEOUT", 0.5)
    nft_calls.hang("-f")
    backend.ban([Ban(net("198.51.100.8/32"), "r", now, now + 600)])
    with pytest.raises(floodd.command.CommandTimeout):
        _calls_during(nft_calls, in_server, backend.commit)
    nft_calls.heal()
    assert nft_calls.calls()[-1] == CHANGE  # not tried again
    later = Ban(net("198.51.100.9/32"), "r", now, now + 600)
    backend.ban([later])
    done, calls = _calls_during(nft_calls, in_server, backend.commit)
    assert calls == [LIST, CHANGE] and done.added == (later,)


def test_nftables_mirror_without_listing_after_timeouts(lab: Any, in_server: Any,
                                                        nft_calls: FaultyCommand) -> None:
    """Bans the kernel has ended are planned around without a listing: not deleted, not
    covering, their keys added again."""
    backend = NftablesBackend([53], ["udp", "tcp"])
    now = time.time()
    gone = Ban(net("203.0.113.0/24"), "r", now, now + 1.2)
    hop = Ban(net("198.51.100.8/32"), "r", now, now + 1.2, hops(64))
    in_server(_apply, backend, [gone, hop])
    time.sleep(now + 1.2 + 2 * 1.0 + 1.5 - time.time())
    inside = Ban(net("203.0.113.0/25"), "r", now, now + 600)
    back = replace(hop, expires=now + 600)
    backend.ban([inside, back])
    backend.unban([gone.target])
    done, calls = _calls_during(nft_calls, in_server, backend.commit)
    assert calls == [CHANGE]
    assert set(done.added) == {inside, back} and not done.removed
    assert {ib.target: ib.rule for ib in in_server(backend.list)} == {
        inside.target: "r", back.target: "r"}


def test_nftables_old_counters_are_read_again(lab: Any, in_server: Any,
                                              nft_calls: FaultyCommand,
                                              send_queries: Callable[[str, int], None],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A replaced ban carries its counter on: from a listing just made when the mirror's
    counters are old."""
    lab.add_client_address("198.51.100.7")
    backend = NftablesBackend([53], ["udp", "tcp"])
    now = time.time()
    first = Ban(net("198.51.100.7/32"), "r", now, now + 60)
    in_server(_apply, backend, [first])
    send_queries("198.51.100.7", 5)
    time.sleep(0.3)
    monkeypatch.setattr(floodd.enforce.firewall.nftables, "COUNTERS_FRESH", 0.0)
    backend.ban([replace(first, expires=now + 600)])
    _, calls = _calls_during(nft_calls, in_server, backend.commit)
    assert calls == [LIST, CHANGE]
    assert in_server(backend.list)[0].packets == 5


def test_nftables_gates_follow_without_listing(lab: Any, in_server: Any,
                                               nft_calls: FaultyCommand) -> None:
    """A gate outlives its network's last qtype ban; a wider qtype ban replaces it, a
    longer one renews it, each in one transaction."""
    backend = NftablesBackend([53], ["udp", "tcp"])
    now = time.time()
    narrow = Ban(net("203.0.113.0/25"), "r", now, now + 600, qtype(ANY))
    address = Ban(net("198.51.100.7/32"), "r", now, now + 600, qtype(ANY))
    in_server(_apply, backend, [narrow, address])
    backend.unban([narrow.target, address.target])
    assert _calls_during(nft_calls, in_server, backend.commit)[1] == [CHANGE]
    wide = Ban(net("203.0.113.0/24"), "r", now, now + 1200, qtype(ANY))
    longer = Ban(net("198.51.100.7/32"), "r", now, now + 3600, qtype(TXT))
    backend.ban([wide, longer])
    done, calls = _calls_during(nft_calls, in_server, backend.commit)
    assert calls == [CHANGE] and set(done.added) == {wide, longer}
    gates = in_server(backend.state).gates
    assert set(gates) == {net("203.0.113.0/24"), net("198.51.100.7/32")}
    assert gates[net("203.0.113.0/24")] >= now + 1200 + GATE_MARGIN - 1
    assert gates[net("198.51.100.7/32")] >= now + 3600 + GATE_MARGIN - 1
