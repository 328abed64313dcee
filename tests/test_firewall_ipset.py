"""floodd.enforce.firewall.ipset: the restore batches it writes and the ``ipset save``
output it reads (plain data), then a round trip through the real kernel in a namespace
of conftest's lab."""

from __future__ import annotations

import ipaddress
import json
import math
import sys

from floodd.enforce.firewall.base import Ban, InstalledBan
from floodd.enforce.firewall.comment import UNKNOWN_RULE
from floodd.enforce.firewall.ipset import MAX_TIMEOUT, BanSets, set_scope, timeout
from floodd.scope import UDP_ONLY, WHOLE, Scope, Target
from lab.netns import Lab

NOW = 1_800_000_000.0
SETS = BanSets("floodd", "ipset")


def net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


def test_each_set_scope_and_network_kind_has_its_set() -> None:
    assert [s.name for s in SETS.sets] == [
        "floodd-ban4", "floodd-ban4net", "floodd-udp4", "floodd-udp4net",
        "floodd-ban6", "floodd-ban6net", "floodd-udp6", "floodd-udp6net"]
    assert SETS.of(Target(net("198.51.100.7/32"), WHOLE)).name == "floodd-ban4"
    assert SETS.of(Target(net("203.0.113.0/24"), UDP_ONLY)).name == "floodd-udp4net"
    assert SETS.of(Target(net("2001:db8::7/128"), UDP_ONLY)).name == "floodd-udp6"
    assert SETS.of(Target(net("2001:db8::/64"), WHOLE)).name == "floodd-ban6net"
    assert SETS.sets[1].create == ("create floodd-ban4net hash:net family inet "
                                   "maxelem 1048576 timeout 0 counters comment")
    assert set_scope(WHOLE) and set_scope(UDP_ONLY)
    assert not set_scope(Scope(True, 255)) and not set_scope(Scope(True, None, (64,)))


def test_timeout_is_the_time_left_rounded_up_or_none_beyond_ipsets_longest() -> None:
    assert timeout(NOW + 600, NOW) == 600
    assert timeout(NOW + 599.2, NOW) == 600
    assert timeout(NOW - 5, NOW) == 1
    assert timeout(NOW + MAX_TIMEOUT, NOW) == MAX_TIMEOUT
    assert timeout(NOW + MAX_TIMEOUT + 1, NOW) == 0
    assert timeout(math.inf, NOW) == 0


def test_a_batch_adds_removes_and_carries_counters() -> None:
    bans = [Ban(net("198.51.100.7/32"), "query-flood", NOW, NOW + 600),
            Ban(net("2001:db8::/64"), 'say "hi"', NOW, NOW + 60.5, UDP_ONLY),
            Ban(net("0.0.0.0/0"), "everything", NOW, NOW + 60)]
    batch, added = SETS.changes([(bans[0].target, bans[0], None),
                                 (bans[1].target, bans[1], (7, 700)),
                                 (bans[2].target, bans[2], None),
                                 (Target(net("203.0.113.0/24"), WHOLE), None, None)], NOW)
    assert batch.splitlines() == [
        'add floodd-ban4 198.51.100.7 timeout 600 comment '
        f'"floodd since={NOW:.0f} expires={NOW + 600:.0f} scope=all rule=query-flood"',
        'add floodd-udp6net 2001:db8::/64 timeout 61 packets 7 bytes 700 comment '
        f'"floodd since={NOW:.0f} expires={NOW + 60:.0f} scope=udp rule=say %22hi%22"',
        "del floodd-ban4net 203.0.113.0/24"]
    assert added == bans[:2]  # a /0 is no hash:net entry
    assert SETS.changes([], NOW) == ("", [])


def test_saved_entries_are_read_back_as_bans() -> None:
    comment = f"floodd since={NOW - 10:.0f} expires={NOW + 590:.0f} scope=all rule=query-flood"
    saved = "\n".join([
        "create floodd-ban4 hash:ip family inet hashsize 1024 maxelem 1048576 timeout 0 "
        "counters comment bucketsize 12 initval 0xc6db8e9a",
        f'add floodd-ban4 198.51.100.7 timeout 589 packets 25 bytes 1550 comment "{comment}"',
        # no timeout: floodd ends it at its expiry
        f'add floodd-ban4net 203.0.113.0/24 timeout 0 packets 0 bytes 0 comment "{comment}"',
        # added by hand, or with another scope's comment: the set says what it drops
        "add floodd-udp6 2001:db8::7 timeout 30 packets 1 bytes 80",
        f'add floodd-udp4 192.0.2.9 timeout 30 packets 0 bytes 0 comment "{comment}"',
        # not floodd's, or not an entry floodd can read
        "add operator 198.51.100.8 timeout 30",
        "add floodd-ban4 2001:db8::9 timeout 30",
        "add floodd-ban4net 198.51.100.0/24 timeout 30 nomatch",
    ])
    assert SETS.parse(saved, NOW) == [
        InstalledBan(net("198.51.100.7/32"), "query-flood", NOW - 10, NOW + 590, 25, 1550,
                     589.0),
        InstalledBan(net("203.0.113.0/24"), "query-flood", NOW - 10, NOW + 590, 0, 0, None),
        InstalledBan(net("2001:db8::7/128"), UNKNOWN_RULE, NOW, NOW + 30, 1, 80, 30.0,
                     UDP_ONLY),
        InstalledBan(net("192.0.2.9/32"), UNKNOWN_RULE, NOW, NOW + 30, 0, 0, 30.0, UDP_ONLY)]
    assert [b.remaining for b in SETS.parse(saved, NOW)] == [589.0, None, 30.0, 30.0]


_ROUND_TRIP = r"""
import ipaddress, json, sys, time
from floodd.errors import FlooddError
from floodd.enforce.firewall.base import Ban
from floodd.enforce.firewall.ipset import BanSets
from floodd.scope import UDP_ONLY

sets = BanSets("fltest", "ipset")
now = time.time()
ban = Ban(ipaddress.ip_network("2001:db8::/64"), "r", now, now + 600, UDP_ONLY)
out = {}
out["missing"] = [b.rule for b in sets.read(now)]  # no sets yet: nothing, no error
sets.create()
sets.create()
sets.apply(sets.changes([(ban.target, ban, (3, 300))], now)[0])
out["read"] = [[str(b.network), b.packets, b.bytes, b.remaining] for b in sets.read(now)]
try:
    sets.apply("add fltest-ban4 198.51.100.7 timeout 3000000\n")
except FlooddError as exc:
    out["refused"] = str(exc)
sets.destroy()
out["after"] = sorted(sets.existing())
print(json.dumps(out))
"""


def test_sets_round_trip_through_the_kernel(lab: Lab) -> None:
    proc = lab.run(lab.server_ns, [sys.executable, "-c", _ROUND_TRIP], text=True)
    out = json.loads(proc.stdout)
    assert out["missing"] == []
    [[network, packets, nbytes, remaining]] = out["read"]
    assert (network, packets, nbytes) == ("2001:db8::/64", 3, 300)
    assert 598 <= remaining <= 600
    assert out["refused"] == ("ipset restore: Syntax error: '3000000' is out of range "
                              "0-2147483 (add fltest-ban4 198.51.100.7)")
    assert out["after"] == []
