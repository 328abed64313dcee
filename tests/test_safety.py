"""Networks floodd refuses to ban."""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path
from typing import Any

import pytest

import floodd.command
from faults import FaultyCommand
from floodd.decide.safety import own_networks, parse_ip_addr, protected_reason
from floodd.errors import FlooddError

net = ipaddress.ip_network
WHITELIST = (net("127.0.0.0/8"), net("::1/128"), net("198.51.100.0/28"))
OWN = [net("192.0.2.53/32"), net("2001:db8::53/128")]

# `ip -j addr show` (iproute2 6.1) on a host with loopback, a down interface and eth0.
SAMPLE = json.loads("""[
{"ifindex":1,"ifname":"lo","flags":["LOOPBACK","UP","LOWER_UP"],"mtu":65536,
 "qdisc":"noqueue","operstate":"UNKNOWN","group":"default","txqlen":1000,
 "link_type":"loopback","address":"00:00:00:00:00:00","broadcast":"00:00:00:00:00:00",
 "addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8,"scope":"host","label":"lo",
 "valid_life_time":4294967295,"preferred_life_time":4294967295},{"family":"inet6",
 "local":"::1","prefixlen":128,"scope":"host","valid_life_time":4294967295,
 "preferred_life_time":4294967295}]},
{"ifindex":2,"ifname":"ifb0","flags":["BROADCAST","NOARP"],"mtu":1500,"qdisc":"noop",
 "operstate":"DOWN","group":"default","txqlen":32,"link_type":"ether",
 "address":"9e:7d:2c:47:15:d7","broadcast":"ff:ff:ff:ff:ff:ff","addr_info":[]},
{"ifindex":4,"ifname":"eth0","flags":["BROADCAST","MULTICAST","UP","LOWER_UP"],"mtu":1400,
 "qdisc":"pfifo_fast","operstate":"UP","group":"default","txqlen":1000,"link_type":"ether",
 "address":"02:fc:00:00:00:01","broadcast":"ff:ff:ff:ff:ff:ff","addr_info":[{"family":"inet",
 "local":"192.0.2.2","prefixlen":24,"broadcast":"192.0.2.255","scope":"global",
 "label":"eth0","valid_life_time":4294967295,"preferred_life_time":4294967295},
 {"family":"inet6","local":"fd00::2","prefixlen":64,"scope":"global","nodad":true,
 "valid_life_time":4294967295,"preferred_life_time":4294967295},{"family":"inet6",
 "local":"fe80::fc:ff:fe00:1","prefixlen":64,"scope":"link",
 "valid_life_time":4294967295,"preferred_life_time":4294967295}]}]""")


def test_parse_ip_addr_sample() -> None:
    assert parse_ip_addr(SAMPLE) == [net("127.0.0.1/32"), net("::1/128"), net("192.0.2.2/32"),
                                     net("fd00::2/128"), net("fe80::fc:ff:fe00:1/128")]
    assert parse_ip_addr([]) == []


@pytest.mark.parametrize("network, reason", [
    ("127.0.0.1/32", "whitelisted by 127.0.0.0/8"),
    ("::1/128", "whitelisted by ::1/128"),
    ("198.51.100.5/32", "whitelisted by 198.51.100.0/28"),
    ("198.51.100.0/28", "whitelisted by 198.51.100.0/28"),
    ("192.0.2.53/32", "this host's address"),
    ("2001:db8::53/128", "this host's address"),
    ("192.0.2.0/24", "contains this host's address 192.0.2.53"),
    ("2001:db8::/32", "contains this host's address 2001:db8::53"),
    ("198.51.100.0/24", "contains a whitelisted network (198.51.100.0/28)"),
    ("0.0.0.0/0", "contains this host's address 192.0.2.53"),
    ("::/0", "contains this host's address 2001:db8::53"),
])
def test_protected(network: str, reason: str) -> None:
    assert protected_reason(net(network), WHITELIST, OWN) == reason


def test_loopback_is_protected_even_with_an_empty_whitelist() -> None:
    assert protected_reason(net("127.0.0.2/32"), (), []) == "loopback"
    assert protected_reason(net("126.0.0.0/7"), (), []) == "loopback"
    assert protected_reason(net("::1/128"), (), []) == "loopback"


@pytest.mark.parametrize("network", ["198.51.100.16/28", "198.51.100.17/32", "203.0.113.0/24",
                                     "2001:db8:1::/64", "192.0.2.54/32"])
def test_not_protected(network: str) -> None:
    assert protected_reason(net(network), WHITELIST, OWN) is None


def test_own_networks_in_a_namespace(lab: Any, in_server: Any) -> None:
    own = in_server(own_networks)
    assert {net("127.0.0.1/32"), net("::1/128"), net(f"{lab.server_v4}/32"),
            net(f"{lab.server_v6}/128")} <= set(own)
    assert all(n.prefixlen == n.max_prefixlen for n in own)


def test_a_hung_ip_is_one_line_after_the_timeout(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    ip = FaultyCommand(tmp_path / "bin", "ip")
    ip.hang()
    monkeypatch.setenv("PATH", f"{ip.dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(floodd.command, "TIMEOUT", 0.5)
    with pytest.raises(FlooddError) as exc:
        own_networks()
    assert str(exc.value) == "ip -j addr did not finish within 0.5 s (killed)"
