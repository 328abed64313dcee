"""The mirror and the expiry rule with a fake clock and plain listings.

``at(t)`` is the moment ``t`` on both clocks; ``at(t, step)`` has the wall clock ``step``
seconds off the monotonic one, as after a wall-clock step.
"""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from floodd.config import FirewallConfig
from floodd.enforce.clock import Instant
from floodd.enforce.expiry import BanTracker
from floodd.enforce.firewall.base import Ban, InstalledBan
from floodd.scope import WHOLE, Target

T0 = 1_700_000_000.0
HOUR = 3600.0
NET = ipaddress.ip_network("198.51.100.7/32")
PREFIX = ipaddress.ip_network("203.0.113.0/24")
# rescans every 60 s; a ban expires 600 s after it started; stale after 300 s idle
FW = FirewallConfig(rescan_interval=60, stale_after=300, extend_active=True,
                    max_ban_time=86_400)


def at(t: float, step: float = 0.0) -> Instant:
    return Instant(t, t + step)


def listing(ban: Ban, packets: int, remaining: float | None = None) -> InstalledBan:
    return InstalledBan(ban.network, ban.rule, ban.since, ban.expires, packets, packets * 60,
                        remaining)


def run(tracker: BanTracker, ban: Ban, counts: dict[float, int], until: float,
        kernel_timeouts: bool = True, step: float = 0.0) -> tuple[Ban | None, float | None]:
    """Rescan every 60 s from T0+60 to ``until`` (inclusive), applying the decisions as
    the ban owner does.  The ban's unix times are kept as the kernel records them; with
    ``kernel_timeouts`` it ends at its deadline (monotonic), which the listing reports.

    ``counts`` gives the counter from a time on; ``step`` shifts the wall clock from T0+60
    on.  Returns the ban at the end (None once it ended) and when it ended.
    """
    current: Ban | None = ban
    deadline = tracker.deadline(ban.target)  # when the kernel ends it (monotonic)
    t = T0 + 60
    while t <= until:
        now = at(t, step)
        if current is not None and kernel_timeouts and deadline <= t:
            current_listing = []  # the kernel's timeout removed it
        elif current is not None:
            packets = max(c for since, c in counts.items() if since <= t)
            left = deadline - t if kernel_timeouts else None
            current_listing = [listing(current, packets, left)]
        else:
            current_listing = []
        d = tracker.observe(now, current_listing)
        assert not d.vanished
        for extended in d.extend:
            tracker.banned(now, [extended])
            current = extended
            deadline = now.to_mono(extended.expires)
        if current is not None and (d.unban or d.expired):
            tracker.forget([Target(NET, WHOLE)])
            return None, t
        t += 60
    return current, None


def test_idle_ban_ends_at_its_expiry() -> None:
    tracker = BanTracker(FW)
    ban = Ban(NET, "query-flood", T0, T0 + 600)
    tracker.banned(at(T0), [ban])
    # counter grew only before the first rescans: idle long before the expiry
    left, ended = run(tracker, ban, {T0: 50}, T0 + 3600)
    assert left is None and ended == T0 + 600
    assert len(tracker) == 0


def test_growing_counter_keeps_and_extends_the_ban() -> None:
    tracker = BanTracker(FW)
    ban = Ban(NET, "query-flood", T0, T0 + 600)
    tracker.banned(at(T0), [ban])
    # the flood goes on for 30 minutes, then stops
    counts = {T0 + 60 * i: 100 * i for i in range(31)}
    left, ended = run(tracker, ban, counts, T0 + 1800)
    assert left is not None and left.since == T0 and left.expires > T0 + 1800
    # after the last growth (T0+1800) the ban runs out one full term later at the latest
    left, ended = run(tracker, left, {T0: 3000}, T0 + 4 * 3600)
    assert ended is not None and T0 + 1800 + 300 <= ended <= T0 + 1800 + 600 + 120


def test_extension_happens_before_the_kernel_would_end_it() -> None:
    tracker = BanTracker(FW)
    ban = Ban(NET, "query-flood", T0, T0 + 600)
    tracker.banned(at(T0), [ban])
    assert not tracker.observe(at(T0 + 60), [listing(ban, 10)]).extend  # far from expiry
    d = tracker.observe(at(T0 + 480), [listing(ban, 20)])  # expires within two rescans
    assert d.extend == (Ban(NET, "query-flood", T0, T0 + 480 + 600),)


def test_decisions_are_proposals_until_applied() -> None:
    tracker = BanTracker(FW)
    ban = Ban(NET, "query-flood", T0, T0 + 600)
    tracker.banned(at(T0), [ban])
    tracker.observe(at(T0 + 60), [listing(ban, 10)])
    first = tracker.observe(at(T0 + 480), [listing(ban, 20)])
    assert first.extend
    # The extension was not applied (the commit failed): the ban still ends at T0+600,
    # so the next rescan proposes it again, before the kernel would end it.
    assert tracker.deadline(Target(NET, WHOLE)) == T0 + 600
    again = tracker.observe(at(T0 + 540), [listing(ban, 30)])
    assert [b.expires for b in again.extend] == [T0 + 540 + 600]
    tracker.banned(at(T0 + 540), again.extend)
    assert tracker.deadline(Target(NET, WHOLE)) == T0 + 540 + 600


def test_without_extend_active_an_active_ban_is_only_kept() -> None:
    tracker = BanTracker(FirewallConfig(rescan_interval=60, stale_after=300,
                                        extend_active=False))
    ban = Ban(NET, "query-flood", T0, T0 + 600)
    tracker.banned(at(T0), [ban])
    d = tracker.observe(at(T0 + 540), [listing(ban, 5)])
    assert d.extend == (Ban(NET, "query-flood", T0, T0 + 540 + 120),)
    tracker.banned(at(T0 + 540), d.extend)
    # growth at T0+540 was the last: kept until idle for stale_after, then left to expire
    left, ended = run(tracker, d.extend[0], {T0: 5}, T0 + 3600)
    assert ended is not None and T0 + 540 + 300 <= ended <= T0 + 540 + 300 + 120


def test_backend_without_kernel_timeouts_is_told_to_unban() -> None:
    tracker = BanTracker(FW)
    ban = Ban(NET, "query-flood", T0, T0 + 600)
    tracker.banned(at(T0), [ban])
    d = tracker.observe(at(T0 + 400), [listing(ban, 0)])
    assert not d.unban and not d.extend
    d = tracker.observe(at(T0 + 660), [listing(ban, 0)])  # past expiry, never grew
    assert [ib.network for ib in d.unban] == [NET]
    fresh = BanTracker(FW)
    fresh.banned(at(T0), [ban])
    left, ended = run(fresh, ban, {T0: 0}, T0 + 3600, kernel_timeouts=False)
    assert ended == T0 + 600


def test_counter_grown_recently_delays_the_unban_past_expiry() -> None:
    tracker = BanTracker(FirewallConfig(rescan_interval=60, stale_after=300,
                                        extend_active=False))
    ban = Ban(NET, "r", T0, T0 + 600)
    tracker.banned(at(T0), [ban])
    tracker.observe(at(T0 + 300), [listing(ban, 1)])  # grew at T0+300
    assert not tracker.observe(at(T0 + 590), [listing(ban, 1)]).unban
    assert tracker.observe(at(T0 + 600), [listing(ban, 1)]).unban  # idle exactly 300 s


def test_adoption_changes_nothing() -> None:
    tracker = BanTracker(FW)
    # after a restart: one ban long past its expiry (no kernel timeout), one still running
    old = InstalledBan(NET, "query-flood", T0 - 7200, T0 - 3600, 900, 54000)
    new = InstalledBan(PREFIX, "prefix-flood", T0 - 60, T0 + 540, 10, 600)
    d = tracker.observe(at(T0), [old, new])
    assert d.unban == d.extend == d.vanished == d.expired == ()
    assert d.adopted == (old, new)
    d = tracker.observe(at(T0), [old, new])
    assert d.unban == d.extend == d.vanished == d.expired == d.adopted == ()
    # idle since adoption: the expired one goes once stale_after has passed
    d = tracker.observe(at(T0 + 300), [old, new])
    assert [ib.network for ib in d.unban] == [NET]
    # growth seen after adoption counts
    grown = InstalledBan(PREFIX, "prefix-flood", T0 - 60, T0 + 540, 20, 1200)
    d = tracker.observe(at(T0 + 420), [old, grown])  # expires before the rescan after next
    assert [b.network for b in d.extend] == [PREFIX]


def test_bans_seen_first_in_a_listing_are_adopted() -> None:
    tracker = BanTracker(FW)
    other = InstalledBan(PREFIX, "manual", T0, T0 + 3600, 0, 0)  # `floodd ban` elsewhere
    assert tracker.observe(at(T0 + 60), [other]).adopted == (other,)
    assert tracker.observe(at(T0 + 120), [other]) == tracker.observe(at(T0 + 180), [other])
    assert len(tracker) == 1 and Target(PREFIX, WHOLE) in tracker


def test_the_mirror_becomes_the_listing() -> None:
    tracker = BanTracker(FW)
    a = Ban(NET, "query-flood", T0, T0 + 600)
    b = Ban(PREFIX, "prefix-flood", T0, T0 + 120)
    tracker.banned(at(T0), [a, b])
    tracker.observe(at(T0 + 60), [listing(a, 0), listing(b, 0)])
    d = tracker.observe(at(T0 + 121), [])  # both gone: b at its expiry, a long before
    assert d.vanished == (a,) and d.expired == (b,)
    assert len(tracker) == 0  # the kernel holds neither: the mirror neither
    assert tracker.observe(at(T0 + 180), []).vanished == ()
    tracker.banned(at(T0 + 180), [a])  # repaired
    assert tracker.observe(at(T0 + 240), [listing(a, 0)]).vanished == ()
    tracker.forget([Target(NET, WHOLE)])  # the operator unbanned it
    assert tracker.observe(at(T0 + 300), []).vanished == ()


def test_vanished_ban_is_reported_with_its_deadline_in_unix_time_now() -> None:
    tracker = BanTracker(FW)
    tracker.banned(at(T0), [Ban(NET, "r", T0, T0 + 600)])
    d = tracker.observe(at(T0 + 60, step=HOUR), [])  # the wall clock stepped meanwhile
    assert d.vanished == (Ban(NET, "r", T0, T0 + 600 + HOUR),)  # still 540 s to go


def test_readded_element_resets_the_baseline_without_counting_growth() -> None:
    tracker = BanTracker(FW)
    ban = Ban(NET, "r", T0, T0 + 600)
    tracker.banned(at(T0), [ban])
    tracker.observe(at(T0 + 60), [listing(ban, 500)])  # grew
    tracker.observe(at(T0 + 420), [listing(ban, 0)])  # re-added from outside: counter reset
    d = tracker.observe(at(T0 + 480), [listing(ban, 0)])
    assert not d.extend  # last growth at T0+60 is more than stale_after ago


def test_configure_takes_new_settings() -> None:
    tracker = BanTracker(FW)
    ban = Ban(NET, "r", T0, T0 + 600)
    tracker.banned(at(T0), [ban])
    tracker.observe(at(T0 + 60), [listing(ban, 1)])
    tracker.configure(FirewallConfig(rescan_interval=60, stale_after=30))
    tracker.observe(at(T0 + 120), [listing(ban, 1)])
    d = tracker.observe(at(T0 + 540), [listing(ban, 2)])
    assert d.extend[0].expires == T0 + 540 + 600


# --- wall-clock steps ---------------------------------------------------------------------
def test_a_wall_clock_step_neither_ends_nor_prolongs_a_ban() -> None:
    ban = Ban(NET, "query-flood", T0, T0 + 600)
    for kernel_timeouts in (True, False):
        for step in (HOUR, -HOUR):
            tracker = BanTracker(FW)
            tracker.banned(at(T0), [ban])
            left, ended = run(tracker, ban, {T0: 50}, T0 + 3 * HOUR,
                              kernel_timeouts=kernel_timeouts, step=step)
            assert (left, ended) == (None, T0 + 600), (kernel_timeouts, step)


def test_a_wall_clock_step_does_not_end_an_active_ban() -> None:
    for step in (HOUR, -HOUR):
        tracker = BanTracker(FW)
        ban = Ban(NET, "query-flood", T0, T0 + 600)
        tracker.banned(at(T0), [ban])
        counts = {T0 + 60 * i: 100 * i for i in range(31)}  # active for 30 minutes
        left, ended = run(tracker, ban, counts, T0 + 1800, step=step)
        assert left is not None and ended is None, step
        # extended on the monotonic clock: it ends after the flood, not an hour off
        left, ended = run(tracker, left, {T0: 3000}, T0 + 4 * HOUR, step=step)
        assert ended is not None and T0 + 1800 + 300 <= ended <= T0 + 1800 + 600 + 120


def test_adoption_converts_once_and_prefers_the_kernels_time_left() -> None:
    tracker = BanTracker(FW)
    # recorded in the kernel while the wall clock was an hour ahead; the kernel (nftables)
    # says 500 s are left: that is when it ends
    kernel = InstalledBan(NET, "r", T0 + HOUR - 100, T0 + HOUR + 500, 0, 0, 500.0)
    iptables = InstalledBan(PREFIX, "r", T0 - 100, T0 + 500, 0, 0)  # no kernel timeout
    tracker.observe(at(T0), [kernel, iptables])
    assert tracker.deadline(Target(NET, WHOLE)) == T0 + 500
    assert tracker.deadline(Target(PREFIX, WHOLE)) == T0 + 500
    # later listings with the wall clock an hour back: nothing moves
    tracker.observe(at(T0 + 60, -HOUR), [
        InstalledBan(NET, "r", T0 + HOUR - 100, T0 + HOUR + 500, 0, 0, 440.0), iptables])
    assert tracker.deadline(Target(NET, WHOLE)) == T0 + 500
    assert tracker.deadline(Target(PREFIX, WHOLE)) == T0 + 500


@given(st.lists(st.integers(min_value=0, max_value=5), min_size=1, max_size=60),
       st.booleans())
def test_never_ends_while_growing_and_always_ends_when_idle(increments: list[int],
                                                            extend_active: bool) -> None:
    fw = FirewallConfig(rescan_interval=60, stale_after=300, extend_active=extend_active)
    tracker = BanTracker(fw)
    current: Ban | None = Ban(NET, "r", T0, T0 + 600)
    assert current is not None
    tracker.banned(at(T0), [current])
    packets = 0
    last_growth = T0
    t = T0
    for step in increments + [0] * 40:  # then idle for 40 rescans
        t += 60
        assert current is not None
        if current.expires <= t:  # the kernel ends it: idle for stale_after by then
            assert current.expires - last_growth >= 300
            current = None
            break
        packets += step
        if step:
            last_growth = t
        d = tracker.observe(at(t), [listing(current, packets)])
        if d.extend:
            assert t - last_growth < 300
            current = d.extend[0]
            tracker.banned(at(t), d.extend)
        assert not d.unban
    assert current is None  # idle for 40 rescans: gone
