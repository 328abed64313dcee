"""The nftables backend (parsing, planning, the kernel), the backend registry, and what
every kernel backend promises (parametrized over the backends this host can run)."""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import math
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

import floodd.command
import floodd.enforce.firewall.iptables
from faults import FaultyCommand
from floodd.config import FirewallConfig
from floodd.errors import FlooddError
from floodd.enforce.firewall import BACKENDS, auto_choice, make_backend
from floodd.enforce.firewall.base import Backend, Ban, InstalledBan
from floodd.enforce.firewall.dryrun import DryRunBackend
from floodd.enforce.firewall.comment import ban_comment, parse_ban_comment
from floodd.enforce.firewall.nftables import NftablesBackend, parse_table, plan_commit, render_commit

net = ipaddress.ip_network
NOW = 1_795_615_100.0

# `nft -j list table inet floodd` from nftables 1.0.6 after three bans by floodd and two
# elements added by hand (198.51.100.9 without a comment; a prefix with counters).
SAMPLE = json.loads("""
{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5",
 "json_schema_version": 1}}, {"table": {"family": "inet", "name": "floodd", "handle": 1}},
 {"set": {"family": "inet", "name": "ban4", "table": "floodd", "type": "ipv4_addr",
 "handle": 1, "flags": ["timeout"], "elem": [{"elem": {"val": "198.51.100.7", "timeout": 599,
 "expires": 599, "comment": "floodd since=1795615085 expires=1795615685 rule=query-flood",
 "counter": {"packets": 0, "bytes": 0}}}, {"elem": {"val": "198.51.100.9", "timeout": 300,
 "expires": 299, "counter": {"packets": 12, "bytes": 720}}}], "stmt": [{"counter": null}]}},
 {"set": {"family": "inet", "name": "ban6", "table": "floodd", "type": "ipv6_addr",
 "handle": 2, "flags": ["timeout"], "elem": [{"elem": {"val": "2001:db8:1::7",
 "timeout": 3599, "expires": 3599,
 "comment": "floodd since=1795615085 expires=1795618685 rule=say %22hi%22 100%25",
 "counter": {"packets": 0, "bytes": 0}}}], "stmt": [{"counter": null}]}},
 {"set": {"family": "inet", "name": "ban4net", "table": "floodd", "type": "ipv4_addr",
 "handle": 3, "flags": ["interval", "timeout"], "elem": [{"elem": {"val": {"prefix":
 {"addr": "203.0.113.0", "len": 24}}, "timeout": 599, "expires": 599,
 "comment": "floodd since=1795615085 expires=1795615685 rule=prefix-flood",
 "counter": {"packets": 0, "bytes": 0}}}], "stmt": [{"counter": null}]}},
 {"set": {"family": "inet", "name": "ban6net", "table": "floodd", "type": "ipv6_addr",
 "handle": 4, "flags": ["interval", "timeout"], "elem": [{"elem": {"val": {"prefix":
 {"addr": "2001:db8:1::", "len": 64}}, "timeout": 600, "expires": 600,
 "comment": "floodd since=1700000000 expires=1700000600 rule=prefix-flood",
 "counter": {"packets": 3, "bytes": 300}}}], "stmt": [{"counter": null}]}},
 {"chain": {"family": "inet", "table": "floodd", "name": "input", "handle": 5,
 "type": "filter", "hook": "input", "prio": -10, "policy": "accept"}},
 {"rule": {"family": "inet", "table": "floodd", "chain": "input", "handle": 7,
 "comment": "floodd: drop banned sources", "expr": [{"match": {"op": "==", "left": {"meta":
 {"key": "l4proto"}}, "right": {"set": ["tcp", "udp"]}}}, {"match": {"op": "==", "left":
 {"payload": {"protocol": "th", "field": "dport"}}, "right": 53}}, {"match": {"op": "==",
 "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": "@ban4"}},
 {"drop": null}]}},
 {"rule": {"family": "inet", "table": "floodd", "chain": "input", "handle": 9,
 "comment": "floodd: drop banned sources", "expr": [{"match": {"op": "==", "left": {"meta":
 {"key": "l4proto"}}, "right": {"set": ["tcp", "udp"]}}}, {"match": {"op": "==", "left":
 {"payload": {"protocol": "th", "field": "dport"}}, "right": 53}}, {"match": {"op": "==",
 "left": {"payload": {"protocol": "ip6", "field": "saddr"}}, "right": "@ban6"}},
 {"drop": null}]}},
 {"rule": {"family": "inet", "table": "floodd", "chain": "input", "handle": 11,
 "comment": "floodd: drop banned sources", "expr": [{"match": {"op": "==", "left": {"meta":
 {"key": "l4proto"}}, "right": {"set": ["tcp", "udp"]}}}, {"match": {"op": "==", "left":
 {"payload": {"protocol": "th", "field": "dport"}}, "right": 53}}, {"match": {"op": "==",
 "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": "@ban4net"}},
 {"drop": null}]}},
 {"rule": {"family": "inet", "table": "floodd", "chain": "input", "handle": 13,
 "comment": "floodd: drop banned sources", "expr": [{"match": {"op": "==", "left": {"meta":
 {"key": "l4proto"}}, "right": {"set": ["tcp", "udp"]}}}, {"match": {"op": "==", "left":
 {"payload": {"protocol": "th", "field": "dport"}}, "right": 53}}, {"match": {"op": "==",
 "left": {"payload": {"protocol": "ip6", "field": "saddr"}}, "right": "@ban6net"}},
 {"drop": null}]}}]}
""")


def installed(network: str, packets: int = 0, nbytes: int = 0, rule: str = "r",
              expires: float = NOW + 600) -> InstalledBan:
    return InstalledBan(net(network), rule, NOW - 10, expires, packets, nbytes)


def ban(network: str, rule: str = "r", expires: float = NOW + 600) -> Ban:
    return Ban(net(network), rule, NOW, expires)


# --- parsing real output ------------------------------------------------------------------
def test_parse_table_sample() -> None:
    state = parse_table(SAMPLE, "floodd", NOW)
    assert state.exists and state.complete
    assert state.sets == state.drop_rules == {"ban4", "ban6", "ban4net", "ban6net"}
    bans = {b.network: b for b in state.bans}
    assert bans[net("198.51.100.7/32")] == InstalledBan(
        net("198.51.100.7/32"), "query-flood", 1795615085.0, 1795615685.0, 0, 0)
    assert bans[net("2001:db8:1::7/128")].rule == 'say "hi" 100%'
    assert bans[net("203.0.113.0/24")].rule == "prefix-flood"
    assert bans[net("2001:db8:1::/64")].packets == 3
    assert bans[net("2001:db8:1::/64")].bytes == 300
    by_hand = bans[net("198.51.100.9/32")]
    assert (by_hand.rule, by_hand.packets, by_hand.bytes) == ("(unknown)", 12, 720)
    assert by_hand.expires == NOW + 299 and by_hand.since == NOW - 1


def test_parse_table_incomplete_and_foreign() -> None:
    without_rules = {"nftables": [o for o in SAMPLE["nftables"] if "rule" not in o]}
    state = parse_table(without_rules, "floodd", NOW)
    assert state.exists and not state.complete and len(state.bans) == 5
    other = parse_table(SAMPLE, "hosttest", NOW)
    assert not other.exists and not other.bans and not other.sets


@given(st.text(max_size=200))
def test_comment_round_trip(rule: str) -> None:
    comment = ban_comment(Ban(net("198.51.100.7/32"), rule, 1_700_000_000.4,
                                  1_700_000_600))
    assert len(comment.encode("utf-8", "surrogatepass")) <= 128
    assert '"' not in comment and comment.isprintable()
    parsed = parse_ban_comment(comment)
    assert parsed is not None
    back, since, expires = parsed
    assert (since, expires) == (1_700_000_000, 1_700_000_600)
    assert rule.startswith(back)
    if len(comment.encode()) <= 128 - 12:  # room for any escaped character: not cut
        assert back == rule


def test_parse_comment_of_others() -> None:
    assert parse_ban_comment("added by hand") is None
    assert parse_ban_comment("floodd since=x expires=1 rule=a") is None


# --- planning a transaction ---------------------------------------------------------------
def test_plan_new_bans_and_unbans() -> None:
    plan = plan_commit({net("198.51.100.7/32"): ban("198.51.100.7"),
                        net("203.0.113.9/32"): None,  # not banned: nothing to do
                        net("198.51.100.8/32"): None},
                       [installed("198.51.100.8")])
    assert plan.delete == (net("198.51.100.8/32"),)
    assert [(b.network, p, n) for b, p, n in plan.add] == [(net("198.51.100.7/32"), 0, 0)]


def test_plan_replacing_a_ban_carries_its_counter() -> None:
    plan = plan_commit({net("198.51.100.7/32"): ban("198.51.100.7", expires=NOW + 900)},
                       [installed("198.51.100.7", 40, 2400)])
    assert plan.delete == (net("198.51.100.7/32"),)
    assert [(p, n) for _, p, n in plan.add] == [(40, 2400)]


def test_plan_prefixes_never_overlap_in_the_interval_set() -> None:
    current = [installed("203.0.113.0/25", 5, 500), installed("203.0.113.128/26", 1, 100),
               installed("198.51.100.0/24"), installed("203.0.113.7", 9, 900)]
    plan = plan_commit({net("203.0.113.0/24"): ban("203.0.113.0/24"),  # replaces both /25, /26
                        net("198.51.100.128/25"): ban("198.51.100.128/25"),  # inside a /24
                        net("198.51.100.9/32"): ban("198.51.100.9")},  # own set: added
                       current)
    assert set(plan.delete) == {net("203.0.113.0/25"), net("203.0.113.128/26")}
    added = {b.network: (p, n) for b, p, n in plan.add}
    assert added == {net("203.0.113.0/24"): (6, 600), net("198.51.100.9/32"): (0, 0)}


def test_plan_widest_prefix_of_one_batch_wins() -> None:
    plan = plan_commit({net("2001:db8:1:1::/64"): ban("2001:db8:1:1::/64"),
                        net("2001:db8:1::/48"): ban("2001:db8:1::/48")}, [])
    assert [b.network for b, _, _ in plan.add] == [net("2001:db8:1::/48")]


def test_render_commit() -> None:
    plan = plan_commit({net("198.51.100.7/32"): ban("198.51.100.7", "query-flood"),
                        net("2001:db8:1::/64"): ban("2001:db8:1::/64", "p", NOW + 60.5),
                        net("203.0.113.9/32"): None},
                       [installed("203.0.113.9"), installed("198.51.100.7", 3, 180)])
    assert render_commit(plan, "floodd", NOW).splitlines() == [
        "delete element inet floodd ban4 { 203.0.113.9, 198.51.100.7 }",
        'add element inet floodd ban4 { 198.51.100.7 counter packets 3 bytes 180 timeout '
        f'600000ms comment "floodd since={NOW:.0f} expires={NOW + 600:.0f} rule=query-flood" }}',
        'add element inet floodd ban6net { 2001:db8:1::/64 timeout 60500ms comment '
        f'"floodd since={NOW:.0f} expires={NOW + 60:.0f} rule=p" }}',
    ]
    assert render_commit(plan_commit({}, []), "floodd", NOW) == ""


def test_setup_script_follows_scope_ports_and_protocols() -> None:
    dns = NftablesBackend([53, 5353], ["udp"]).setup_script()
    assert "add rule inet floodd input meta l4proto udp th dport { 53, 5353 } ip saddr " \
           '@ban4 drop comment "floodd: drop banned sources"' in dns
    everything = NftablesBackend([53], ["udp", "tcp"], scope="all").setup_script()
    assert "add rule inet floodd input ip6 saddr @ban6net drop" in everything
    assert "flags interval, timeout; counter;" in everything
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
    assert in_server(backend.present)
    assert _nft(lab, "list", "table", "inet", "hosttest") == host_before
    in_server(backend.teardown)
    assert not in_server(backend.present)
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
    assert not in_server(backend.present)
    assert in_server(backend.list) == []
    assert lab.dig("www.lab.example", source="198.51.100.7")
    in_server(_apply, backend, bans)  # what the daemon's repair does
    assert in_server(backend.present)
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
    assert not in_server(backend.present)
    in_server(backend.setup)
    in_server(backend.setup)
    assert in_server(backend.present) and in_server(backend.list) == []
    wide = in_server(_make, backend_name, "all")
    in_server(wide.setup)  # the drop rules are replaced, bans stay
    assert in_server(wide.present)


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
    assert in_server(backend.present) == (backend_name == "nftables")  # iptables: jumps
    in_server(backend.setup)
    assert in_server(backend.present)
    in_client(_send_udp, "198.51.100.7", lab.server_v4, 5353, 3)
    assert wait_for(lambda: in_server(backend.list)[0].packets == 3)
    [kept] = in_server(backend.list)  # the ban stays, with its rule and times
    assert (kept.network, kept.rule, kept.since) == (net("198.51.100.7/32"), "query-flood",
                                                     round(now))
    if backend_name == "nftables":
        chain = _nft(lab, "list", "chain", "inet", "floodd", "input")
        assert chain.count("udp dport { 53, 5353 } ") == 4, chain
    with pytest.raises(FlooddError):
        backend.configure([], ["udp"])  # refused, nothing changed
    assert in_server(backend.present)


@contextlib.contextmanager
def _commit_fails(backend_name: str, tmp_path: Path,
                  monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], Any]]:
    """A context giving ``failing()``: within it, a commit of that backend fails (nft
    refuses the transaction; the xtables lock is held by someone else)."""
    if backend_name == "nftables":
        nft = FaultyCommand(tmp_path / "bin", "nft")
        monkeypatch.setenv("PATH", f"{nft.dir}{os.pathsep}{os.environ['PATH']}")

        @contextlib.contextmanager
        def failing() -> Iterator[None]:
            nft.fail("-f")
            yield
            nft.heal()
    else:
        lock = tmp_path / "xtables.lock"
        lock.touch()
        monkeypatch.setenv("XTABLES_LOCKFILE", str(lock))
        monkeypatch.setattr(floodd.enforce.firewall.iptables, "LOCK_WAIT", 0.3)

        @contextlib.contextmanager
        def failing() -> Iterator[None]:
            with open(lock) as held:
                fcntl.flock(held, fcntl.LOCK_EX)
                yield
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
    assert [b.rule for b in done.added] == ["d"] and done.removed == (net("203.0.113.0/25"),)
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
