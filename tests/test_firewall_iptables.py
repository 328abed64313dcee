"""floodd.enforce.firewall.iptables against the real kernel, in the namespaces of conftest's lab.

Every backend step runs in a child ``python`` started with ``ip netns exec`` in the
lab's server namespace (python-iptables acts on the namespace of its process), so each
step is a fresh floodd process that knows only what the kernel holds.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any, Callable

import pytest

from floodd.errors import FlooddError
from floodd.enforce.firewall.iptables import IptablesBackend
from lab.netns import Lab

Send = Callable[[str, int], None]
WaitFor = Callable[..., bool]

NOW = 1764000000.0
NAME = "www.lab.example"
# conftest's send_queries: DNS queries for www.lab.example/A (header, name, type, class),
# counted by the kernel with their IP and UDP headers.
QUERY_SIZE = 12 + len(b"\x03www\x03lab\x07example\x00") + 4
V4_PACKET = 20 + 8 + QUERY_SIZE
V6_PACKET = 40 + 8 + QUERY_SIZE
_COUNTERS = re.compile(r" \[\d+:\d+\]$")  # a chain's [packets:bytes] in iptables-save

# Runs backend steps given as JSON; prints one JSON result per step, and stops at
# the first FlooddError with {"error": message}.
_DRIVER = r"""
import ipaddress, json, sys
from floodd.errors import FlooddError
from floodd.enforce.firewall.base import Ban
from floodd.enforce.firewall.iptables import IptablesBackend

spec = json.loads(sys.argv[1])
results = []
try:
    backend = IptablesBackend(**spec["backend"])
    for step in spec["steps"]:
        op, arg = (step, None) if isinstance(step, str) else step
        if op == "ban":
            result = backend.ban([Ban(ipaddress.ip_network(n), rule, since, expires)
                                  for n, rule, since, expires in arg])
        elif op == "unban":
            result = backend.unban([ipaddress.ip_network(n) for n in arg])
        elif op == "list":
            result = sorted([str(b.network), b.rule, b.since, b.expires, b.packets, b.bytes]
                            for b in backend.list())
        elif op == "commit":
            done = backend.commit()
            result = {"added": sorted(str(b.network) for b in done.added),
                      "removed": sorted(str(n) for n in done.removed)}
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


def committed(added: tuple[str, ...] = (), removed: tuple[str, ...] = ()) -> dict[str, Any]:
    """What the driver shows for a commit."""
    return {"added": sorted(added), "removed": sorted(removed)}


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


def tcp_connects(lab: Lab, source: str) -> bool:
    server = lab.server_v6 if ":" in source else lab.server_v4
    proc = lab.run(lab.client_ns, [sys.executable, "-c", _TCP_CONNECT, source, server],
                   check=False)
    return proc.returncode == 0


def counters(lab: Lab, network: str) -> tuple[int, int]:
    """The (packets, bytes) of the ban of ``network``, read by a new process."""
    return {ban[0]: (ban[4], ban[5]) for ban in run(lab, "list")[0]}[network]


def test_setup_is_idempotent_and_leaves_other_rules_alone(lab: Lab) -> None:
    for tool, source in (("iptables-legacy", "203.0.113.99"),
                         ("ip6tables-legacy", "2001:db8:1::99")):
        legacy(lab, tool, "-A", "INPUT", "-s", source, "-j", "ACCEPT")
        legacy(lab, tool, "-N", "OPERATOR")
        legacy(lab, tool, "-A", "OPERATOR", "-p", "udp", "--dport", "53", "-j", "DROP")
        legacy(lab, tool, "-A", "INPUT", "-j", "OPERATOR")
    before = filter_table(lab)

    assert run(lab, "present", "setup", "setup", "present") == [False, None, None, True]
    after = filter_table(lab)
    assert [line for line in after if "FLOODD" not in line] == before
    jumps = [line for line in after if "-j FLOODD" in line]
    assert jumps == [
        f"{v} -A INPUT -p {p} -m multiport --dports 53 -m comment "
        f'--comment "floodd {p} dports=53" -j FLOODD'
        for v in "46" for p in ("udp", "tcp")]
    # floodd's jumps come first in INPUT, before the operator's rules.
    assert [line for line in after if " -A INPUT " in line][:2] == jumps[:2]

    assert run(lab, "setup", "present", scope="all") == [None, True]
    assert [line for line in filter_table(lab) if "-j FLOODD" in line] == [
        f'{v} -A INPUT -m comment --comment "floodd all" -j FLOODD' for v in "46"]
    assert run(lab, "present") == [False]  # scope dns expects its own jumps

    ban = ["198.51.100.7/32", "query-flood", NOW, NOW + 600]
    assert run(lab, "setup", ("ban", [ban]), "commit", "teardown", "present") == [
        None, None, committed((ban[0],)), None, False]
    assert filter_table(lab) == before


def test_banned_source_gets_no_answer_until_unbanned(dns_lab: Lab, send_queries: Send,
                                                     wait_for: WaitFor) -> None:
    lab = dns_lab
    for address in ("198.51.100.7", "198.51.100.8"):
        lab.add_client_address(address)
    ban = ["198.51.100.7/32", "query-flood", NOW, NOW + 600]
    assert run(lab, "setup", ("ban", [ban]), "commit", "list") == [
        None, None, committed((ban[0],)), [[*ban, 0, 0]]]

    send_queries("198.51.100.7", 25)
    assert wait_for(lambda: counters(lab, "198.51.100.7/32") == (25, 25 * V4_PACKET))
    assert not lab.dig(NAME, source="198.51.100.7")
    assert lab.dig(NAME, source="198.51.100.8")
    assert not tcp_connects(lab, "198.51.100.7")
    assert tcp_connects(lab, "198.51.100.8")

    # Unbanning a network that is not banned is not an error.
    assert run(lab, ("unban", ["198.51.100.7/32", "203.0.113.0/24"]), "commit", "list") == [
        None, committed(removed=("198.51.100.7/32",)), []]
    assert lab.dig(NAME, source="198.51.100.7")
    assert tcp_connects(lab, "198.51.100.7")


def test_prefix_and_ipv6_bans(dns_lab: Lab, send_queries: Send, wait_for: WaitFor) -> None:
    lab = dns_lab
    for address in ("203.0.113.5", "198.51.100.8", "2001:db8:1::7", "2001:db8:1::8"):
        lab.add_client_address(address)
    # Answered before the ban (this also resolves the server's IPv6 neighbour entry).
    assert lab.dig(NAME, source="2001:db8:1::7", qtype="AAAA")
    bans = [["203.0.113.0/24", "prefix-flood", NOW, NOW + 600],
            ["2001:db8:1::7/128", "query-flood", NOW, NOW + 600]]
    assert run(lab, "setup", ("ban", bans), "commit") == [
        None, None, committed(tuple(b[0] for b in bans))]

    send_queries("2001:db8:1::7", 25)
    assert wait_for(lambda: counters(lab, "2001:db8:1::7/128") == (25, 25 * V6_PACKET))
    assert not lab.dig(NAME, source="2001:db8:1::7", qtype="AAAA")
    assert lab.dig(NAME, source="2001:db8:1::8", qtype="AAAA")
    assert not lab.dig(NAME, source="203.0.113.5")
    assert lab.dig(NAME, source="198.51.100.8")


def test_a_new_process_adopts_the_bans_and_a_re_ban_keeps_counters(
        lab: Lab, send_queries: Send, wait_for: WaitFor) -> None:
    lab.add_client_address("198.51.100.7")
    bans = [["198.51.100.7/32", "query-flood", NOW + 0.4, NOW + 600.6],
            ["2001:db8:1::/64", "prefix-flood", NOW, NOW + 3600],
            ["203.0.113.0/24", 'manual: "abuse" desk\tticket \u00e9 100%', NOW, NOW + 86400],
            ["203.0.113.99/32", "x" * 300, NOW, NOW + 600]]
    assert run(lab, "setup", ("ban", bans), "commit") == [
        None, None, committed(tuple(b[0] for b in bans))]

    # Times are kept in whole seconds (the expiry rounded down); a rule name comes back
    # as given, cut to fit the comment (the same one the nftables backend writes).
    head = "floodd since=1764000000 expires=1764000600 rule="
    assert run(lab, "list") == [sorted([
        ["198.51.100.7/32", "query-flood", NOW, NOW + 600, 0, 0],
        [*bans[1], 0, 0],
        [*bans[2], 0, 0],
        [*bans[3][:1], "x" * (128 - len(head)), *bans[3][2:], 0, 0]])]

    send_queries("198.51.100.7", 10)
    assert wait_for(lambda: counters(lab, "198.51.100.7/32") == (10, 10 * V4_PACKET))
    again = ["198.51.100.7/32", "any-queries", NOW + 300, NOW + 3900]
    listed = run(lab, ("ban", [again]), "commit", "list")[2]
    assert [*again, 10, 10 * V4_PACKET] in listed
    assert len(listed) == 4
    assert legacy(lab, "iptables-legacy", "-S", "FLOODD").count("-s 198.51.100.7/32") == 1


def test_rules_removed_from_outside_are_noticed_and_restored(
        lab: Lab, send_queries: Send, wait_for: WaitFor) -> None:
    lab.add_client_address("198.51.100.7")
    ban = ["198.51.100.7/32", "query-flood", NOW, NOW + 600]
    assert run(lab, "setup", ("ban", [ban]), "commit") == [None, None, committed((ban[0],))]

    legacy(lab, "iptables-legacy", "-F", "FLOODD")
    assert run(lab, "present", "list") == [True, []]

    legacy(lab, "iptables-legacy", "-F")
    legacy(lab, "iptables-legacy", "-X")
    assert run(lab, "present", "list", ("unban", [ban[0]]), "commit") == [
        False, [], None, committed()]
    refused = run(lab, ("ban", [ban]), "commit")
    assert refused[0] is None
    assert "chain FLOODD is missing" in refused[1]["error"]

    assert run(lab, "setup", ("ban", [ban]), "commit", "present", "list") == [
        None, None, committed((ban[0],)), True, [[*ban, 0, 0]]]
    send_queries("198.51.100.7", 5)
    assert wait_for(lambda: counters(lab, "198.51.100.7/32") == (5, 5 * V4_PACKET))


def test_refusal_by_the_kernel_is_one_line(lab: Lab) -> None:
    # root without CAP_NET_ADMIN: the kernel refuses to hand out the table.
    result = run(lab, "setup", prefix=("setpriv", "--bounding-set=-net_admin"))
    assert result == [{"error": "iptables-legacy setup: can't initialize filter: "
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
