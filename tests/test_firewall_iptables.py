"""floodd.enforce.firewall.iptables against the real kernel, in the namespaces of conftest's lab.

Every backend step runs in a child ``python`` started with ``ip netns exec`` in the
lab's server namespace (python-iptables and ipset act on the namespace of their process),
so each run is a fresh floodd process that knows only what the kernel holds.  A ban is given
and shown as ``[network, rule, since, expires, scope]`` (scope in its text form, see
floodd.scope), a target as ``[network, scope]``.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import socket
import struct
import sys
import time
from typing import Any, Callable, Sequence

import pytest

from conftest import InNamespace
from floodd.errors import FlooddError
from floodd.enforce.firewall.iptables import IptablesBackend
from lab.netns import Lab

Send = Callable[[str, int], None]
WaitFor = Callable[..., bool]

# Whole seconds, now: whole-source and UDP-only bans get kernel timeouts from it.
NOW = float(math.floor(time.time()))
SETS = [f"floodd-{kind}{v}{net}" for v in "46" for kind in ("ban", "udp") for net in ("", "net")]
NAME = "www.lab.example"
# conftest's send_queries: DNS queries for www.lab.example/A (header, name, type, class),
# counted by the kernel with their IP and UDP headers.
QUERY_SIZE = 12 + len(b"\x03www\x03lab\x07example\x00") + 4
V4_PACKET = 20 + 8 + QUERY_SIZE
V6_PACKET = 40 + 8 + QUERY_SIZE
_COUNTERS = re.compile(r" \[\d+:\d+\]$")  # a chain's [packets:bytes] in iptables-save
ANY, TXT = 255, 16
# A name of the longest wire length, 255 bytes (root label included), in the lab's zone.
LONG_NAME = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 49, "lab.example"])
_QUERY_IDS = itertools.count(1)

# Runs backend steps given as JSON; prints one JSON result per step, and stops at
# the first FlooddError with {"error": message}.
_DRIVER = r"""
import ipaddress, json, sys
from floodd.errors import FlooddError
from floodd.enforce.firewall.base import Ban
from floodd.enforce.firewall.iptables import IptablesBackend
from floodd.scope import Scope, Target

spec = json.loads(sys.argv[1])
results = []
try:
    backend = IptablesBackend(**spec["backend"])
    for step in spec["steps"]:
        op, arg = (step, None) if isinstance(step, str) else step
        if op == "ban":
            result = backend.ban([Ban(ipaddress.ip_network(n), rule, since, expires,
                                      Scope.parse(scope))
                                  for n, rule, since, expires, scope in arg])
        elif op == "unban":
            result = backend.unban([Target(ipaddress.ip_network(n), Scope.parse(scope))
                                    for n, scope in arg])
        elif op == "list":
            result = sorted([str(b.network), b.rule, b.since, b.expires, b.scope.text(),
                             b.packets, b.bytes] for b in backend.list())
        elif op == "remaining":
            result = sorted([str(b.network), b.scope.text(), b.remaining]
                            for b in backend.list())
        elif op == "present":
            result = backend.survey() is not None
        elif op == "commit":
            done = backend.commit()
            result = {"added": sorted([str(b.network), b.scope.text()] for b in done.added),
                      "removed": sorted([str(t.network), t.scope.text()]
                                        for t in done.removed)}
        else:
            result = getattr(backend, op)()
        results.append(result)
except FlooddError as exc:
    results.append({"error": str(exc)})
print(json.dumps(results))
"""

_TCP_CONNECT = r"""
import socket, sys
source, server = sys.argv[1], sys.argv[2]
family = socket.AF_INET6 if ":" in source else socket.AF_INET
with socket.socket(family, socket.SOCK_STREAM) as s:
    s.bind((source, 0))
    s.settimeout(0.5)
    try:
        s.connect((server, 53))
    except OSError:
        sys.exit(1)
"""


def run(lab: Lab, *steps: Any, prefix: tuple[str, ...] = (), **options: Any) -> list[Any]:
    """Backend steps in a new process in the server namespace, one result per step."""
    spec = {"backend": {"ports": [53], "protocols": ["udp", "tcp"], **options},
            "steps": steps}
    proc = lab.run(lab.server_ns, [*prefix, sys.executable, "-c", _DRIVER, json.dumps(spec)],
                   text=True)
    result: list[Any] = json.loads(proc.stdout)
    return result


def committed(added: Sequence[list[Any]] = (),
              removed: Sequence[list[Any]] = ()) -> dict[str, Any]:
    """What the driver shows for a commit that added and removed these bans."""
    return {"added": sorted(target(b) for b in added),
            "removed": sorted(target(b) for b in removed)}


def target(ban: list[Any]) -> list[str]:
    """``[network, scope]`` of a ban in the driver's form."""
    return [ban[0], ban[4]]


def legacy(lab: Lab, *argv: str) -> str:
    proc = lab.run(lab.server_ns, list(argv), text=True)
    out: str = proc.stdout
    return out


def filter_table(lab: Lab) -> list[str]:
    """Both legacy filter tables as iptables-save lines, without counters and dates."""
    lines = []
    for version, tool in (("4", "iptables-legacy-save"), ("6", "ip6tables-legacy-save")):
        for line in legacy(lab, tool, "-t", "filter").splitlines():
            if not line.startswith("#"):
                lines.append(f"{version} {_COUNTERS.sub('', line)}")
    return lines


def set_entries(lab: Lab, name: str) -> list[str]:
    """The ``add`` lines of ``ipset save NAME`` in the server namespace."""
    return [line for line in legacy(lab, "ipset", "save", name).splitlines()
            if line.startswith("add ")]


def floodd_sets(lab: Lab) -> list[str]:
    return sorted(set(legacy(lab, "ipset", "list", "-n").split()) & set(SETS))


def tcp_connects(lab: Lab, source: str) -> bool:
    server = lab.server_v6 if ":" in source else lab.server_v4
    proc = lab.run(lab.client_ns, [sys.executable, "-c", _TCP_CONNECT, source, server],
                   check=False)
    return proc.returncode == 0


def counters(lab: Lab, network: str, scope: str = "all") -> tuple[int, int]:
    """The (packets, bytes) of the ban of ``network`` and ``scope``, read by a new process."""
    return {(ban[0], ban[4]): (ban[5], ban[6]) for ban in run(lab, "list")[0]}[network, scope]


def dns_question(name: str, qtype: int, qid: int) -> bytes:
    """A DNS query without EDNS (RFC 1035 wire format): header, name, type, class IN."""
    labels = [label.encode() for label in name.split(".") if label]
    qname = b"".join(bytes([len(label)]) + label for label in labels) + b"\0"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", qtype, 1)


def _ask(source: str, server: str, name: str, qtype: int, hop: int | None,
         timeout: float) -> bool:
    """One UDP query from ``source``, sent with IP TTL / IPv6 hop limit ``hop`` (None:
    the system's); whether its answer came within ``timeout`` seconds."""
    v6 = ":" in source
    qid = next(_QUERY_IDS) % 65536
    with socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        if hop is not None:
            if v6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, hop)
            else:
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, hop)
        sock.settimeout(timeout)
        sock.sendto(dns_question(name, qtype, qid), (server, 53))
        try:
            while True:
                if sock.recv(4096)[:2] == struct.pack("!H", qid):
                    return True
        except TimeoutError:
            return False


Ask = Callable[..., bool]


@pytest.fixture
def ask(lab: Lab, in_client: InNamespace) -> Ask:
    """``ask(source, name=NAME, qtype=1, hop=None, timeout=0.5)``: whether one UDP query
    from ``source`` (in the client namespace) is answered by the lab server."""
    def query(source: str, name: str = NAME, qtype: int = 1, hop: int | None = None,
              timeout: float = 0.5) -> bool:
        server = lab.server_v6 if ":" in source else lab.server_v4
        return in_client(_ask, source, server, name, qtype, hop, timeout)
    return query


def dig(lab: Lab, transport: str, name: str, source: str, qtype: str = "A") -> bool:
    """Whether ``dig`` from ``source`` over ``transport`` (udp or tcp) gets an answer:
    lab.dig, with the transport chosen (dig asks ANY over TCP unless told otherwise)."""
    server = lab.server_v6 if ":" in source else lab.server_v4
    proc = lab.run(lab.client_ns, ["dig", f"+{'no' if transport == 'udp' else ''}tcp",
                                   "+tries=1", "+timeout=1", "+short", f"@{server}",
                                   "-b", source, name, qtype], check=False)
    return proc.returncode == 0


def test_setup_is_idempotent_and_leaves_other_rules_alone(lab: Lab) -> None:
    for tool, source in (("iptables-legacy", "203.0.113.99"),
                         ("ip6tables-legacy", "2001:db8:1::99")):
        legacy(lab, tool, "-A", "INPUT", "-s", source, "-j", "ACCEPT")
        legacy(lab, tool, "-N", "OPERATOR")
        legacy(lab, tool, "-A", "OPERATOR", "-p", "udp", "--dport", "53", "-j", "DROP")
        legacy(lab, tool, "-A", "INPUT", "-j", "OPERATOR")
    before = filter_table(lab)

    assert run(lab, "present", "setup", "setup", "present") == [False, None, None, True]
    assert floodd_sets(lab) == sorted(SETS)
    after = filter_table(lab)
    assert [line for line in after if "FLOODD" not in line] == before
    jumps = [line for line in after if "-j FLOODD" in line]
    assert jumps == [
        f"{v} -A INPUT -p {p} -m multiport --dports 53 -m comment "
        f'--comment "floodd {p} dports=53" -j FLOODD'
        for v in "46" for p in ("udp", "tcp")]
    # floodd's jumps come first in INPUT, before the operator's rules.
    assert [line for line in after if " -A INPUT " in line][:2] == jumps[:2]
    # One rule per set, address sets first, each family its own.
    assert [line for line in after if " -A FLOODD " in line] == [
        f"{v} -A FLOODD {'-p udp ' if kind == 'udp' else ''}-m set --match-set "
        f'floodd-{kind}{v}{net} src -m comment --comment "floodd set floodd-{kind}{v}{net}" '
        "-j DROP" for v in "46" for kind in ("ban", "udp") for net in ("", "net")]

    assert run(lab, "setup", "present", scope="all") == [None, True]
    assert [line for line in filter_table(lab) if "-j FLOODD" in line] == [
        f'{v} -A INPUT -m comment --comment "floodd all" -j FLOODD' for v in "46"]
    assert run(lab, "present") == [False]  # scope dns expects its own jumps

    ban = ["198.51.100.7/32", "query-flood", NOW, NOW + 600, "all"]
    assert run(lab, "setup", ("ban", [ban]), "commit", "teardown", "present") == [
        None, None, committed([ban]), None, False]
    assert filter_table(lab) == before
    assert floodd_sets(lab) == []


def test_banned_source_gets_no_answer_until_unbanned(dns_lab: Lab, send_queries: Send,
                                                     wait_for: WaitFor) -> None:
    lab = dns_lab
    for address in ("198.51.100.7", "198.51.100.8"):
        lab.add_client_address(address)
    ban = ["198.51.100.7/32", "query-flood", NOW, NOW + 600, "all"]
    assert run(lab, "setup", ("ban", [ban]), "commit", "list") == [
        None, None, committed([ban]), [[*ban, 0, 0]]]

    send_queries("198.51.100.7", 25)
    assert wait_for(lambda: counters(lab, "198.51.100.7/32") == (25, 25 * V4_PACKET))
    assert not lab.dig(NAME, source="198.51.100.7")
    assert lab.dig(NAME, source="198.51.100.8")
    assert not tcp_connects(lab, "198.51.100.7")
    assert tcp_connects(lab, "198.51.100.8")

    # Unbanning a target that is not banned is not an error.
    assert run(lab, ("unban", [target(ban), ["203.0.113.0/24", "all"],
                               ["198.51.100.7/32", "udp"]]), "commit", "list") == [
        None, committed(removed=[ban]), []]
    assert lab.dig(NAME, source="198.51.100.7")
    assert tcp_connects(lab, "198.51.100.7")


def test_prefix_and_ipv6_bans(dns_lab: Lab, send_queries: Send, wait_for: WaitFor) -> None:
    lab = dns_lab
    for address in ("203.0.113.5", "198.51.100.8", "2001:db8:1::7", "2001:db8:1::8"):
        lab.add_client_address(address)
    # Answered before the ban (this also resolves the server's IPv6 neighbour entry).
    assert lab.dig(NAME, source="2001:db8:1::7", qtype="AAAA")
    bans = [["203.0.113.0/24", "prefix-flood", NOW, NOW + 600, "all"],
            ["2001:db8:1::7/128", "query-flood", NOW, NOW + 600, "all"]]
    assert run(lab, "setup", ("ban", bans), "commit") == [None, None, committed(bans)]

    send_queries("2001:db8:1::7", 25)
    assert wait_for(lambda: counters(lab, "2001:db8:1::7/128") == (25, 25 * V6_PACKET))
    assert not lab.dig(NAME, source="2001:db8:1::7", qtype="AAAA")
    assert lab.dig(NAME, source="2001:db8:1::8", qtype="AAAA")
    assert not lab.dig(NAME, source="203.0.113.5")
    assert lab.dig(NAME, source="198.51.100.8")


def test_a_new_process_adopts_the_bans_and_a_re_ban_keeps_counters(
        lab: Lab, send_queries: Send, wait_for: WaitFor) -> None:
    lab.add_client_address("198.51.100.7")
    bans = [["198.51.100.7/32", "query-flood", NOW + 0.4, NOW + 600.6, "all"],
            ["2001:db8:1::/64", "prefix-flood", NOW, NOW + 3600, "all"],
            ["203.0.113.0/24", 'manual: "abuse" desk\tticket \u00e9 100%', NOW, NOW + 86400,
             "all"],
            ["203.0.113.99/32", "x" * 300, NOW, NOW + 600, "udp,qtype=255,except=63+64"]]
    assert run(lab, "setup", ("ban", bans), "commit") == [None, None, committed(bans)]

    # Times are kept in whole seconds (the expiry rounded down); a rule name comes back
    # as given, cut to fit the comment (the same one the nftables backend writes).
    head = f"floodd since={NOW:.0f} expires={NOW + 600:.0f} scope={bans[3][4]} rule="
    assert run(lab, "list") == [sorted([
        ["198.51.100.7/32", "query-flood", NOW, NOW + 600, "all", 0, 0],
        [*bans[1], 0, 0],
        [*bans[2], 0, 0],
        [bans[3][0], "x" * (128 - len(head)), *bans[3][2:], 0, 0]])]

    send_queries("198.51.100.7", 10)
    assert wait_for(lambda: counters(lab, "198.51.100.7/32") == (10, 10 * V4_PACKET))
    again = ["198.51.100.7/32", "any-queries", NOW + 300, NOW + 3900, "all"]
    listed = run(lab, ("ban", [again]), "commit", "list")[2]
    assert [*again, 10, 10 * V4_PACKET] in listed
    assert len(listed) == 4
    [entry] = [e for e in set_entries(lab, "floodd-ban4") if " 198.51.100.7 " in e]
    assert f" packets 10 bytes {10 * V4_PACKET} " in entry


def test_rules_removed_from_outside_are_noticed_and_restored(
        lab: Lab, send_queries: Send, wait_for: WaitFor) -> None:
    lab.add_client_address("198.51.100.7")
    ban = ["198.51.100.7/32", "query-flood", NOW, NOW + 600, "all"]
    assert run(lab, "setup", ("ban", [ban]), "commit") == [None, None, committed([ban])]

    # The set rules flushed: the ban is still in its set, and setup puts the rules back.
    legacy(lab, "iptables-legacy", "-F", "FLOODD")
    assert run(lab, "present", "list", "setup", "present") == [
        False, [[*ban, 0, 0]], None, True]
    send_queries("198.51.100.7", 3)
    assert wait_for(lambda: counters(lab, "198.51.100.7/32") == (3, 3 * V4_PACKET))

    # The set emptied from outside: no ban, floodd's rules still in place.
    legacy(lab, "ipset", "flush", "floodd-ban4")
    assert run(lab, "present", "list") == [True, []]

    assert run(lab, ("ban", [ban]), "commit") == [None, committed([ban])]
    legacy(lab, "iptables-legacy", "-F")
    legacy(lab, "iptables-legacy", "-X")
    legacy(lab, "ipset", "destroy", "floodd-ban4net")
    # The ban stays in its set (and expires there) while no rule matches it.
    assert run(lab, "present", "list", ("unban", [target(ban)]), "commit", "list") == [
        False, [[*ban, 0, 0]], None, committed(removed=[ban]), []]
    refused = run(lab, ("ban", [ban]), "commit")
    assert refused[0] is None
    assert "chain FLOODD is missing" in refused[1]["error"]

    assert run(lab, "setup", ("ban", [ban]), "commit", "present", "list") == [
        None, None, committed([ban]), True, [[*ban, 0, 0]]]
    assert floodd_sets(lab) == sorted(SETS)
    send_queries("198.51.100.7", 5)
    assert wait_for(lambda: counters(lab, "198.51.100.7/32") == (5, 5 * V4_PACKET))


def test_the_kernel_ends_set_bans_and_floodd_the_others(dns_lab: Lab, ask: Ask,
                                                        wait_for: WaitFor) -> None:
    lab = dns_lab
    for address in ("198.51.100.7", "2001:db8:1::7", "203.0.113.10"):
        lab.add_client_address(address)
    assert ask("2001:db8:1::7")
    now = float(math.floor(time.time()))
    bans = [["198.51.100.7/32", "query-flood", now, now + 3, "all"],
            ["2001:db8:1::7/128", "query-flood", now, now + 3, "udp"],
            ["203.0.113.10/32", "query-flood", now, now + 3, "udp,except=64"],
            # longer than ipset's longest timeout: floodd ends it
            ["203.0.113.0/24", "manual", now, now + 30 * 86400, "all"]]
    done = run(lab, "setup", ("ban", bans), "commit", "remaining")
    assert done[:3] == [None, None, committed(bans)]
    # The kernel's time left, whole seconds: set entries only.
    assert [[n, scope] for n, scope, _ in done[3]] == sorted(target(b) for b in bans)
    assert [left for _, _, left in done[3]] == [done[3][0][2], done[3][1][2], None, None]
    assert 1 <= done[3][0][2] <= 3 and 1 <= done[3][1][2] <= 3
    assert [e.split(" timeout ")[1].split()[0] for e in set_entries(lab, "floodd-ban4net")] == \
        ["0"]
    assert not ask("198.51.100.7") and not ask("2001:db8:1::7")
    assert wait_for(lambda: ask("198.51.100.7") and ask("2001:db8:1::7"), timeout=6.0)
    assert run(lab, "list") == [sorted([[*b, 0, 0] for b in bans[2:]])]


def test_a_ban_rule_of_an_older_floodd_moves_into_its_set(
        lab: Lab, send_queries: Send, wait_for: WaitFor) -> None:
    lab.add_client_address("198.51.100.7")
    assert run(lab, "setup") == [None]
    legacy(lab, "iptables-legacy", "-A", "FLOODD", "-s", "198.51.100.7/32", "-m", "comment",
           "--comment", f"floodd since={NOW:.0f} expires={NOW + 600:.0f} rule=older",
           "-j", "DROP")
    send_queries("198.51.100.7", 4)
    older = ["198.51.100.7/32", "older", NOW, NOW + 600, "all"]
    assert wait_for(lambda: run(lab, "list") == [[[*older, 4, 4 * V4_PACKET]]])

    again = [*older[:1], "query-flood", NOW, NOW + 900, "all"]
    assert run(lab, ("ban", [again]), "commit", "list") == [
        None, committed([again]), [[*again, 4, 4 * V4_PACKET]]]
    assert "-s 198.51.100.7" not in legacy(lab, "iptables-legacy", "-S", "FLOODD")
    send_queries("198.51.100.7", 1)
    assert wait_for(lambda: counters(lab, "198.51.100.7/32") == (5, 5 * V4_PACKET))


def test_an_entry_added_by_hand_is_a_ban_of_its_sets_scope(lab: Lab) -> None:
    assert run(lab, "setup") == [None]
    legacy(lab, "ipset", "add", "floodd-udp4net", "203.0.113.0/24", "timeout", "60")
    [[network, rule, since, expires, scope, packets, nbytes]] = run(lab, "list")[0]
    assert (network, rule, scope, packets, nbytes) == ("203.0.113.0/24", "(unknown)", "udp",
                                                       0, 0)
    assert 58 <= expires - since <= 60
    assert run(lab, ("unban", [[network, scope]]), "commit", "list") == [
        None, committed(removed=[[network, "", 0, 0, scope]]), []]


SCOPES = ["all", "udp", "udp,qtype=255", "udp,except=64", "udp,qtype=255,except=63+64"]


def test_every_scope_round_trips_with_its_counters(lab: Lab, ask: Ask,
                                                   wait_for: WaitFor) -> None:
    sources = [f"198.51.100.{11 + i}" for i in range(len(SCOPES))] + \
              [f"2001:db8:1::{11 + i}" for i in range(len(SCOPES))]
    for address in sources:
        lab.add_client_address(address)
    bans: list[list[Any]] = [
        [f"{address}/{128 if ':' in address else 32}", f"rule-{i}", NOW, NOW + 600,
         SCOPES[i % len(SCOPES)]] for i, address in enumerate(sources)]
    bans.append(["203.0.113.0/24", "prefix-flood", NOW, NOW + 600, "udp,except=64"])
    assert run(lab, "setup", ("ban", bans), "commit", "list") == [
        None, None, committed(bans), sorted([*b, 0, 0] for b in bans)]

    # From every source 3 A and 2 ANY queries, all with a hop value none of the bans
    # lets through: each ban counts what its scope drops.
    for address in sources:
        for qtype in (1, 1, 1, ANY, ANY):
            ask(address, qtype=qtype, hop=50, timeout=0.05)
    dropped = {"all": 5, "udp": 5, "udp,qtype=255": 2, "udp,except=64": 5,
               "udp,qtype=255,except=63+64": 2}
    expected = sorted([*b[:5], dropped[b[4]],
                       dropped[b[4]] * (V6_PACKET if ":" in b[0] else V4_PACKET)]
                      for b in bans[:-1]) + [[*bans[-1], 0, 0]]
    assert wait_for(lambda: sorted(run(lab, "list")[0]) == sorted(expected))

    # A new ban of a target replaces its rule and keeps its counters; another scope of
    # the same network is a ban of its own, and unbanning one scope leaves the other.
    scoped = bans[2]  # 198.51.100.13, udp,qtype=255
    again = [*scoped[:1], "any-queries", NOW + 60, NOW + 3600, scoped[4]]
    other = [*scoped[:4], "udp,except=64"]
    assert run(lab, ("ban", [again, other]), "commit", ("unban", [target(bans[0])]), "commit",
               "list") == [
        None, committed([again, other]), None, committed(removed=[bans[0]]),
        sorted([*[e for e in expected if e[0] not in (bans[0][0], scoped[0])],
                [*again, 2, 2 * V4_PACKET], [*other, 0, 0]])]
    assert legacy(lab, "iptables-legacy", "-S", "FLOODD").count(f"-s {scoped[0]} ") == 2


def test_udp_only_ban_drops_udp_and_passes_tcp(dns_lab: Lab, send_queries: Send,
                                               wait_for: WaitFor) -> None:
    lab = dns_lab
    for address in ("198.51.100.7", "198.51.100.8", "2001:db8:1::7"):
        lab.add_client_address(address)
    assert lab.dig(NAME, source="2001:db8:1::7", qtype="AAAA")  # neighbour entry
    bans = [["198.51.100.7/32", "query-flood", NOW, NOW + 600, "udp"],
            ["2001:db8:1::7/128", "query-flood", NOW, NOW + 600, "udp"]]
    assert run(lab, "setup", ("ban", bans), "commit") == [None, None, committed(bans)]

    for source in ("198.51.100.7", "2001:db8:1::7"):
        assert not dig(lab, "udp", NAME, source)
        assert dig(lab, "tcp", NAME, source)
        assert tcp_connects(lab, source)
    assert lab.dig(NAME, source="198.51.100.8")
    send_queries("198.51.100.7", 10)
    assert wait_for(lambda: counters(lab, "198.51.100.7/32", "udp")[0] == 11)


def test_hop_ban_drops_other_hop_values_and_passes_the_usual_one(
        dns_lab: Lab, ask: Ask, wait_for: WaitFor) -> None:
    lab = dns_lab
    for address in ("203.0.113.10", "203.0.113.11", "2001:db8:1::10"):
        lab.add_client_address(address)
    # The client namespace is next to the server's: packets arrive with the hop value
    # they were sent with, 64 by default.
    assert ask("2001:db8:1::10")
    bans = [["203.0.113.10/32", "query-flood", NOW, NOW + 600, "udp,except=64"],
            ["2001:db8:1::10/128", "query-flood", NOW, NOW + 600, "udp,except=64"],
            ["203.0.113.11/32", "any-queries", NOW, NOW + 600, "udp,qtype=255,except=64"]]
    assert run(lab, "setup", ("ban", bans), "commit") == [None, None, committed(bans)]

    for source in ("203.0.113.10", "2001:db8:1::10"):
        assert ask(source) and ask(source, hop=64)
        assert not ask(source, hop=50)
        assert not ask(source, hop=63)
        assert not ask(source, hop=255)
        assert dig(lab, "tcp", NAME, source)  # TCP is not the ban's
    # Both: ANY queries are dropped unless they come with the usual hop value.
    assert ask("203.0.113.11", qtype=ANY, hop=64)
    assert not ask("203.0.113.11", qtype=ANY, hop=50)
    assert ask("203.0.113.11", hop=50)
    assert wait_for(lambda: [b[5] for b in sorted(run(lab, "list")[0])] == [3, 3, 1])


def test_qtype_ban_drops_that_type_and_passes_the_others(
        dns_lab: Lab, ask: Ask, wait_for: WaitFor) -> None:
    lab = dns_lab
    for address in ("198.51.100.7", "198.51.100.8", "2001:db8:1::7"):
        lab.add_client_address(address)
    assert ask("2001:db8:1::7")
    bans = [["198.51.100.7/32", "any-queries", NOW, NOW + 600, "udp,qtype=255"],
            ["2001:db8:1::7/128", "any-queries", NOW, NOW + 600, "udp,qtype=255"]]
    assert run(lab, "setup", ("ban", bans), "commit") == [None, None, committed(bans)]

    for source in ("198.51.100.7", "2001:db8:1::7"):
        # dig's queries carry EDNS (an OPT record after the question).
        assert not dig(lab, "udp", NAME, source, qtype="ANY")
        assert not dig(lab, "udp", "lab.example", source, qtype="ANY")
        assert dig(lab, "udp", NAME, source, qtype="A")
        assert dig(lab, "udp", "lab.example", source, qtype="TXT")
        assert dig(lab, "tcp", NAME, source, qtype="ANY")  # TCP is not the ban's
        # The shortest and the longest question name.
        assert not ask(source, name=LONG_NAME, qtype=ANY)
        assert ask(source, name=LONG_NAME, qtype=1)
        assert not ask(source, name="", qtype=ANY)
        assert ask(source, name="", qtype=TXT)
    assert dig(lab, "udp", NAME, "198.51.100.8", qtype="ANY")
    assert wait_for(lambda: [b[5] for b in sorted(run(lab, "list")[0])] == [4, 4])


def test_rules_floodd_does_not_write_are_not_bans(lab: Lab) -> None:
    """A rule in FLOODD with a ban comment is a ban only when its matches are exactly
    those of the comment's scope; others are the operator's and stay as they are."""
    head = f"floodd since={NOW:.0f} expires={NOW + 600:.0f}"
    foreign = [
        ("iptables-legacy", "192.0.2.2", ["-p", "tcp"], "all"),
        ("iptables-legacy", "192.0.2.3", ["-p", "udp", "-m", "ttl", "--ttl-eq", "64"],
         "udp,except=64"),
        ("iptables-legacy", "192.0.2.4", ["-p", "udp", "-m", "string", "--hex-string",
                                          "|0000ff0001|", "--algo", "bm", "--from", "40",
                                          "--to", "300"], "udp,qtype=255"),
        ("iptables-legacy", "192.0.2.5", ["-p", "udp", "-m", "string", "--hex-string",
                                          "|0000ff0001|", "--algo", "kmp", "--from", "40",
                                          "--to", "339"], "udp,qtype=255"),
        ("iptables-legacy", "192.0.2.6", ["-p", "udp", "-m", "limit", "--limit", "5/s"],
         "udp"),
        ("iptables-legacy", "192.0.2.7", ["-p", "udp", "-m", "ttl", "!", "--ttl-eq", "64"],
         "udp"),
        ("iptables-legacy", "192.0.2.8", ["-d", "192.0.2.53"], "all"),
        ("ip6tables-legacy", "2001:db8:1::2", ["-p", "udp", "-m", "hl", "--hl-eq", "64"],
         "udp,except=64"),
        ("ip6tables-legacy", "2001:db8:1::3", ["-p", "udp", "-m", "hl", "!", "--hl-eq", "64"],
         "udp,except=63+64"),
    ]
    assert run(lab, "setup") == [None]
    for tool, source, matches, scope in foreign:
        legacy(lab, tool, "-A", "FLOODD", "-s", source, *matches, "-m", "comment",
               "--comment", f"{head} scope={scope} rule=operator", "-j", "DROP")
    legacy(lab, "iptables-legacy", "-A", "FLOODD", "-s", "192.0.2.9", "-p", "udp", "-m",
           "comment", "--comment", f"{head} scope=udp rule=operator", "-j", "ACCEPT")
    # floodd's own rules, written by hand: one as an older floodd wrote it (no scope:
    # the whole source).
    legacy(lab, "iptables-legacy", "-A", "FLOODD", "-s", "192.0.2.1", "-m", "comment",
           "--comment", f"{head} rule=older", "-j", "DROP")
    legacy(lab, "ip6tables-legacy", "-A", "FLOODD", "-s", "2001:db8:1::4", "-p", "udp",
           "-m", "hl", "!", "--hl-eq", "63", "-m", "hl", "!", "--hl-eq", "64", "-m",
           "comment", "--comment", f"{head} scope=udp,except=63+64 rule=by-hand", "-j", "DROP")
    before = filter_table(lab)

    adopted = [["192.0.2.1/32", "older", NOW, NOW + 600, "all"],
               ["2001:db8:1::4/128", "by-hand", NOW, NOW + 600, "udp,except=63+64"]]
    assert run(lab, "list") == [sorted([*b, 0, 0] for b in adopted)]
    unban = [[f"{source}/{128 if ':' in source else 32}", scope]
             for _, source, _, scope in foreign]
    assert run(lab, ("unban", unban), "commit", "setup") == [None, committed(), None]
    assert filter_table(lab) == before
    assert run(lab, ("unban", [target(b) for b in adopted]), "commit", "list") == [
        None, committed(removed=adopted), []]
    # The operator's rules and floodd's set rules.
    assert len([line for line in filter_table(lab) if " -A FLOODD " in line]) == \
        len(foreign) + 1 + len(SETS)


def test_refusal_by_the_kernel_is_one_line(lab: Lab) -> None:
    # root without CAP_NET_ADMIN: the kernel refuses to change the sets or hand out
    # the table.
    no_admin = ("setpriv", "--bounding-set=-net_admin")
    assert run(lab, "setup", prefix=no_admin) == [
        {"error": "ipset create: Kernel error received: Operation not permitted "
                  "(create floodd-ban4 hash:ip)"}]
    assert run(lab, "list", prefix=no_admin) == [
        {"error": "iptables-legacy list: can't initialize filter: "
                  "Permission denied (you must be root)"}]


@pytest.mark.parametrize("options", [
    {"scope": "everything"},
    {"protocols": ["icmp"]},
    {"protocols": []},
    {"ports": list(range(1, 17))},
    {"ports": [0]},
    {"chain": "FLOOD D"},
])
def test_invalid_settings_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(FlooddError):
        IptablesBackend(**{"ports": [53], "protocols": ["udp", "tcp"], **options})
