"""The ban owner: one mirror of the kernel, every change through it, failures that leave
the mirror equal to the kernel.

The pure parts run on the dry-run backend with an injected clock; the failures on the real
kernel in a lab namespace, with an ``nft`` that fails or hangs on purpose (tests/faults.py)
or the xtables lock held by someone else (iptables).
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

import floodd.command
import floodd.enforce.clock
import floodd.enforce.firewall.iptables as iptables_backend
from conftest import backend_problem
from faults import FaultyCommand
from floodd.config import FirewallConfig
from floodd.enforce.banset import RETRY_AFTER, BanFailure, BanSet, NewBan
from floodd.enforce.clock import Instant
from floodd.enforce.firewall.base import Ban
from floodd.enforce.firewall.dryrun import DryRunBackend
from floodd.enforce.firewall.nftables import NftablesBackend
from floodd.config import Network
from floodd.scope import UDP_ONLY, WHOLE, Scope, Target

net = ipaddress.ip_network
T0 = 1_700_000_000.0
HOUR = 3600.0
A, B, C = net("198.51.100.7/32"), net("198.51.100.8/32"), net("2001:db8:1::9/128")
WIDE, INSIDE = net("198.51.0.0/16"), net("198.51.100.0/24")
FW = FirewallConfig(rescan_interval=60, stale_after=300)


class Clock:
    """A monotonic clock the test moves; the wall clock ``step`` seconds off it, or the
    real wall clock (``real_wall``: what the kernel's nftables timeouts are computed
    from)."""

    def __init__(self, real_wall: bool = False) -> None:
        self.mono = 1000.0
        self.step = 0.0
        self.real_wall = real_wall

    def __call__(self) -> Instant:
        wall = time.time() if self.real_wall else T0 + self.mono + self.step
        return Instant(self.mono, wall)


def dry_run(clock: Clock, firewall: FirewallConfig = FW) -> tuple[BanSet, DryRunBackend]:
    backend = DryRunBackend(log=lambda _: None)
    bans = BanSet(firewall)
    bans.start(clock(), backend)
    return bans, backend


def banned_networks(bans: BanSet) -> set[Network]:
    return {t.network for t in bans.targets()}


# --- on the dry-run backend, with an injected clock ---------------------------------------
def rescan_until(bans: BanSet, clock: Clock, network: Network, until: float) -> float | None:
    """Rescan every 60 s up to ``until`` (monotonic); when ``network`` was unbanned."""
    while clock.mono < until:
        clock.mono += 60
        bans.rescan(clock())
        if Target(network, WHOLE) not in bans:
            return clock.mono
    return None


@pytest.mark.parametrize("step", [HOUR, -HOUR])
def test_a_wall_clock_step_neither_ends_nor_prolongs_a_ban(step: float) -> None:
    clock = Clock()
    bans, backend = dry_run(clock)
    bans.ban(clock(), [NewBan(A, "query-flood", 600)])
    banned_at = clock.mono
    clock.mono += 30
    clock.step = step  # NTP, or an operator's date -s
    # idle: it ends at its ban time plus stale_after-or-less, whatever the wall clock says
    ended = rescan_until(bans, clock, A, banned_at + 3 * HOUR)
    assert ended is not None and banned_at + 600 <= ended <= banned_at + 600 + 60
    assert backend.list() == [] and len(bans) == 0


def test_bans_found_in_the_kernel_are_in_the_one_ban_set() -> None:
    clock = Clock()
    bans, backend = dry_run(clock)
    bans.ban(clock(), [NewBan(A, "query-flood", 600)])
    # `floodd ban --backend ...` while the daemon runs: straight into the kernel
    backend.ban([Ban(B, "manual", clock().wall, clock().wall + 3600)])
    backend.commit()
    clock.mono += 60
    done = bans.rescan(clock())
    assert done is not None and [ib.network for ib in done.adopted] == [B]
    assert len(bans) == 2 and banned_networks(bans) == {A, B}  # the status count, max_bans
    assert bans.addresses == {A.network_address.packed, B.network_address.packed}
    assert {t.network for t in bans.unban(clock(), None)} == {A, B}
    assert backend.list() == [] and len(bans) == 0


class ReadsRecorded:
    """A backend that records the reads the ban owner asks of it (``survey``, ``list``);
    those the backend makes of itself are not its caller's."""

    def __init__(self, backend: DryRunBackend) -> None:
        self.backend = backend
        self.reads: list[str] = []

    def __getattr__(self, name: str) -> Any:
        if name in ("survey", "list"):
            self.reads.append(name)
        return getattr(self.backend, name)


def test_a_rescan_reads_the_kernel_once_and_sets_up_what_is_missing() -> None:
    clock = Clock()
    backend = ReadsRecorded(DryRunBackend(log=lambda _: None))
    bans = BanSet(FW)
    bans.start(clock(), backend)  # type: ignore[arg-type]
    bans.ban(clock(), [NewBan(A, "query-flood", 600)])
    backend.reads.clear()
    clock.mono += 60
    done = bans.rescan(clock())
    assert done is not None and not done.set_up and backend.reads == ["survey"]
    backend.backend.teardown()  # someone removed floodd's table: set up again, and read after
    backend.reads.clear()
    clock.mono += 60
    done = bans.rescan(clock())
    assert done is not None and done.set_up and backend.reads == ["survey", "list"]
    assert banned_networks(bans) == {A} and [ib.network for ib in backend.backend.list()] == [A]


def test_unban_all_removes_what_the_kernel_holds_right_now() -> None:
    clock = Clock()
    bans, backend = dry_run(clock)
    backend.ban([Ban(C, "manual", clock().wall, clock().wall + 60)])  # no rescan since
    backend.commit()
    assert bans.unban(clock(), None) == (Target(C, WHOLE),)
    assert backend.list() == []


def test_one_network_holds_bans_of_several_scopes_and_unban_removes_them_all() -> None:
    clock = Clock()
    bans, backend = dry_run(clock)
    any_only, forged = Scope(True, 255), Scope(True, None, (64,))
    done = bans.ban(clock(), [NewBan(A, "any-queries", 600, any_only),
                              NewBan(A, "query-flood", 600, forged)])
    assert {b.target for b in done.added} == {Target(A, any_only), Target(A, forged)}
    assert len(bans) == 2 and banned_networks(bans) == {A}
    # the real client's traffic still flows: the capture keeps counting it
    assert bans.addresses == frozenset()
    bans.ban(clock(), [NewBan(B, "query-flood", 600, UDP_ONLY)])
    assert bans.addresses == {B.network_address.packed}
    assert set(bans.unban(clock(), [A])) == {Target(A, any_only), Target(A, forged)}
    assert {ib.target for ib in backend.list()} == {Target(B, UDP_ONLY)}


def test_listing_shows_the_deadline_in_unix_time_now() -> None:
    clock = Clock()
    bans, _ = dry_run(clock)
    bans.ban(clock(), [NewBan(A, "query-flood", 600)])
    clock.mono += 100
    [shown] = bans.listing(clock())
    assert shown.expires == T0 + 1000 + 600  # as recorded in the kernel
    clock.step = -HOUR
    [shown] = bans.listing(clock())
    assert shown.expires == clock().wall + 500  # 500 s left, as people read it now
    assert shown.since == T0 + 1000  # as recorded in the kernel


def test_operator_ban_replaces_a_ban_of_the_same_network() -> None:
    clock = Clock()
    bans, backend = dry_run(clock)
    bans.ban(clock(), [NewBan(A, "query-flood", 600)])
    done = bans.ban(clock(), [NewBan(A, "manual", 60)])
    assert [b.rule for b in done.added] == ["manual"]
    assert [b.rule for b in backend.list()] == ["manual"] and len(bans) == 1


# --- on the kernel: a firewall command that fails or hangs ---------------------------------
@pytest.fixture
def nft(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FaultyCommand:
    """An ``nft`` first on PATH that fails or hangs when told to."""
    if shutil.which("nft") is None:
        pytest.skip("needs nft")
    faulty = FaultyCommand(tmp_path / "bin", "nft")
    monkeypatch.setenv("PATH", f"{faulty.dir}{os.pathsep}{os.environ['PATH']}")
    return faulty


def kernel(lab: Any, nft: FaultyCommand) -> set[Network]:
    """The bans in floodd's table, read with the real nft."""
    out = lab.run(lab.server_ns, [nft.real, "-j", "list", "table", "inet", "floodd"],
                  text=True).stdout
    found: set[Network] = set()
    for obj in json.loads(out)["nftables"]:
        for item in obj.get("set", {}).get("elem", ()):
            val = item["elem"]["val"]
            found.add(net(f"{val['prefix']['addr']}/{val['prefix']['len']}"
                          if isinstance(val, dict) else val))
    return found


@pytest.fixture
def nft_bans(lab: Any, in_server: Any, nft: FaultyCommand) -> Iterator[tuple[BanSet, Clock]]:
    clock = Clock(real_wall=True)
    bans = BanSet(FirewallConfig(rescan_interval=1, stale_after=5))
    in_server(bans.start, clock(), NftablesBackend([53], ["udp", "tcp"]))
    yield bans, clock


def test_a_failed_nftables_batch_leaves_the_mirror_equal_to_the_kernel(
        lab: Any, in_server: Any, nft: FaultyCommand,
        nft_bans: tuple[BanSet, Clock]) -> None:
    bans, clock = nft_bans
    in_server(bans.ban, clock(), [NewBan(A, "query-flood", 600)])
    nft.fail("-f")
    with pytest.raises(BanFailure) as exc:
        in_server(bans.ban, clock(), [NewBan(B, "manual", 600), NewBan(C, "manual", 600)])
    assert str(exc.value) == ("nft -f - failed: Error: failing on purpose (floodd test); the "
                              "bans were read back from the firewall (1 bans)")
    assert kernel(lab, nft) == banned_networks(bans) == {A}
    assert bans.addresses == {A.network_address.packed}
    nft.heal()
    # The failed bans are not applied by a later, unrelated commit.
    in_server(bans.ban, clock(), [NewBan(C, "query-flood", 600)])
    assert kernel(lab, nft) == banned_networks(bans) == {A, C}


def test_a_failed_extension_is_made_again_before_the_kernel_ends_the_ban(
        lab: Any, in_server: Any, nft: FaultyCommand, nft_bans: tuple[BanSet, Clock],
        send_queries: Callable[[str, int], None], wait_for: Callable[..., bool]) -> None:
    bans, _ = nft_bans
    clock = floodd.enforce.clock.now  # real time: the kernel's timeout is what is tested
    lab.add_client_address(str(A.network_address))
    in_server(bans.ban, clock(), [NewBan(A, "query-flood", 4)])
    banned_at = time.monotonic()
    send_queries(str(A.network_address), 3)
    assert wait_for(lambda: in_server(bans.listing, clock())[0].packets == 3)
    in_server(bans.rescan, clock())  # the counter grew: active
    time.sleep(max(0.0, banned_at + 2.2 - time.monotonic()))  # ends within two rescans
    nft.fail("-f")
    with pytest.raises(BanFailure):
        in_server(bans.rescan, clock())  # the extension fails
    [shown] = in_server(bans.listing, clock())
    assert shown.expires - time.time() < 2.5, "the mirror believes an extension that failed"
    nft.heal()
    done = in_server(bans.rescan, clock())  # proposed again, and applied now
    assert done is not None and [b.network for b in done.extended] == [A]
    time.sleep(max(0.0, banned_at + 5.5 - time.monotonic()))
    assert kernel(lab, nft) == {A}, "the flooder's ban lapsed at its old expiry"


def test_a_repair_that_fails_is_made_at_the_next_rescan_unless_unbanned(
        lab: Any, in_server: Any, nft: FaultyCommand,
        nft_bans: tuple[BanSet, Clock]) -> None:
    bans, clock = nft_bans
    in_server(bans.ban, clock(), [NewBan(A, "query-flood", 600), NewBan(B, "manual", 600)])
    for gone in (A, B):  # removed from outside
        lab.run(lab.server_ns, [nft.real, "delete", "element", "inet", "floodd", "ban4",
                                f"{{ {gone.network_address} }}"])
    nft.fail("-f")
    clock.mono += 1
    with pytest.raises(BanFailure):
        in_server(bans.rescan, clock())  # the repair fails
    assert kernel(lab, nft) == banned_networks(bans) == set()
    assert in_server(bans.unban, clock(), [B]) == ()  # not in the kernel; not to come back
    nft.heal()
    clock.mono += 1
    done = in_server(bans.rescan, clock())
    assert done is not None and [b.network for b in done.restored] == [A]
    assert kernel(lab, nft) == banned_networks(bans) == {A}


def test_a_prefix_inside_a_banned_prefix_is_not_in_the_mirror(
        lab: Any, in_server: Any, nft: FaultyCommand,
        nft_bans: tuple[BanSet, Clock]) -> None:
    bans, clock = nft_bans
    in_server(bans.ban, clock(), [NewBan(WIDE, "manual", 600)])
    done = in_server(bans.ban, clock(), [NewBan(INSIDE, "manual", 600)])
    assert done.added == () and Target(INSIDE, WHOLE) not in bans
    assert bans.holder(INSIDE) == WIDE
    clock.mono += 1
    rescan = in_server(bans.rescan, clock())
    assert rescan is not None and rescan.restored == ()  # nothing to repair
    assert kernel(lab, nft) == banned_networks(bans) == {WIDE}


def test_a_hung_nft_costs_one_timeout_then_the_firewall_is_left_alone(
        lab: Any, in_server: Any, nft: FaultyCommand, nft_bans: tuple[BanSet, Clock],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(floodd.command, "TIMEOUT", 0.5)
    bans, clock = nft_bans
    in_server(bans.ban, clock(), [NewBan(A, "query-flood", 600)])
    nft.hang()
    started = time.monotonic()
    with pytest.raises(BanFailure) as exc:
        in_server(bans.ban, clock(), [NewBan(B, "manual", 600)])
    assert time.monotonic() - started < 2  # one timeout, no second try, no re-read
    # the change itself (planned against the mirror, no listing before it) hung
    assert str(exc.value) == ("nft -f - did not finish within 0.5 s (killed); floodd "
                              "reads the firewall again in 10 s")
    calls = len(nft.calls())
    clock.mono += RETRY_AFTER / 2
    assert not bans.usable(clock())
    with pytest.raises(BanFailure, match=r"^the firewall did not answer \(nft -f - did "
                                         r"not finish within 0\.5 s \(killed\)\); floodd "
                                         r"reads it again in [56] s$"):
        in_server(bans.ban, clock(), [NewBan(B, "manual", 600)])
    with pytest.raises(BanFailure):
        in_server(bans.unban, clock(), None)
    with pytest.raises(BanFailure):
        in_server(bans.listing, clock())
    assert in_server(bans.rescan, clock()) is None
    assert len(nft.calls()) == calls, "the firewall was not left alone"
    nft.heal()
    clock.mono += RETRY_AFTER / 2 + 1  # counted from the failure on
    in_server(bans.ban, clock(), [NewBan(C, "manual", 600)])  # read back first, then bans
    assert kernel(lab, nft) == banned_networks(bans) == {A, C}


def test_a_failed_iptables_commit_leaves_the_mirror_equal_to_the_kernel(
        lab: Any, in_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    problem = backend_problem("iptables")
    if problem:
        pytest.skip(f"iptables backend: {problem}")
    lock = tmp_path / "xtables.lock"
    lock.touch()
    monkeypatch.setenv("XTABLES_LOCKFILE", str(lock))
    monkeypatch.setattr(iptables_backend, "LOCK_WAIT", 0.3)
    clock = Clock(real_wall=True)
    bans = BanSet(FW)
    in_server(bans.start, clock(), iptables_backend.IptablesBackend([53], ["udp", "tcp"]))
    in_server(bans.ban, clock(), [NewBan(A, "query-flood", 600)])
    # A ban of one query type is an iptables rule (whole-source bans are ipset entries,
    # which take no xtables lock).
    any_only = Scope(udp_only=True, qtype=255)
    with open(lock) as held:  # another program changes the tables meanwhile
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(BanFailure) as exc:
            in_server(bans.ban, clock(), [NewBan(B, "manual", 600, any_only)])
    held_by_another = f"another program holds the xtables lock {lock} (waited 0.3 s)"
    assert str(exc.value) == f"{held_by_another}; cannot read the bans: {held_by_another}"
    clock.mono += RETRY_AFTER + 1
    in_server(bans.ban, clock(), [NewBan(C, "query-flood", 600)])
    listed = {ib.network for ib in in_server(bans.backend.list)}
    assert listed == banned_networks(bans) == {A, C}  # B, which failed, never applied
    in_server(bans.flush)
