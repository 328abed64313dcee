"""The mirror of the kernel's bans, and when a ban ends: ban time over and idle.

The rule: a ban is removed when its ban time has passed AND its counter has not grown for
``firewall.stale_after``; a ban whose counter still grows is kept, and with
``firewall.extend_active`` given a new full term.  Counters are read every
``firewall.rescan_interval``, so "grew" means "grew between two rescans".

How this meets kernel timeouts: a backend gives each ban a kernel timeout equal to its expiry
(nftables), so the kernel alone ends every ban, also when floodd is gone.  To keep an active
ban the tracker therefore extends it *before* the kernel would end it: at each rescan, a ban
whose counter grew within ``stale_after`` and that ends before the rescan after next
(``now + 2 * rescan_interval``) is re-added with a later end:

- ``extend_active: true``: ``now + max(term, 2 * rescan_interval)``, where ``term`` is the
  ban's length as first seen (``expires - since``, at most ``max_ban_time``);
- ``extend_active: false``: ``now + 2 * rescan_interval``: kept only while it stays active,
  so it ends between ``stale_after`` and ``stale_after + 2 * rescan_interval`` after the last
  growth seen.

A ban that is not extended ends at its expiry in the kernel (reported as ``expired``); a
backend without kernel timeouts (iptables) is told to ``unban`` once its expiry has passed
and its counter has been idle for ``stale_after``.  A ban missing from a listing before its
expiry was removed by someone else: ``vanished``, to repair.

Time: every deadline and idle time is on the monotonic clock (``Instant.mono``), so a
wall-clock step neither ends nor prolongs a ban.  A ban's deadline is taken once, when it
is first seen or installed: from the time the kernel says is left (nftables' element
timeout runs on the kernel's own clock, and is read again at every listing), else from the
unix expiry recorded in the kernel, converted at that moment.

Adoption: bans first seen in a listing (after a restart, or banned by another process) are
taken as they are, nothing is unbanned or re-added; their idle time counts from the moment
they were first seen, and only growth this tracker saw makes a ban active.

Pure logic: the clock is the ``now`` argument, the firewall is the listing passed in.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Iterator, Sequence

from floodd.config import FirewallConfig
from floodd.enforce.clock import Instant
from floodd.enforce.firewall.base import Ban, InstalledBan
from floodd.scope import Target

# A ban gone from the firewall up to this long before its deadline ended normally: the
# kernel keeps whole seconds, its timeout starts a moment after floodd's deadline.
EXPIRY_SLACK = 2.0


@dataclass(frozen=True)
class Decisions:
    """What one listing showed and what the rule wants done about it.

    ``unban`` and ``extend`` are proposals: the mirror changes only when floodd reports
    them applied (:meth:`BanTracker.banned`, :meth:`BanTracker.forget`).  ``vanished``,
    ``expired`` and ``adopted`` are facts already in the mirror.
    """

    unban: tuple[InstalledBan, ...]  # ban time over and idle for stale_after
    extend: tuple[Ban, ...]  # active bans with their new expiry
    vanished: tuple[Ban, ...]  # gone from the firewall before their end: to repair
    expired: tuple[Ban, ...]  # ended by the kernel's timeout
    adopted: tuple[InstalledBan, ...]  # first seen in this listing


@dataclass
class _Watch:
    ban: Ban  # as the kernel records it (unix times)
    deadline: float  # monotonic time the ban ends
    term: float  # seconds a full ban lasts (for extensions)
    packets: int
    grew_at: float | None  # last rescan that saw the counter grow; None: not seen yet
    watched_from: float


class BanTracker:
    """Every ban the kernel holds, as last listed or as floodd last changed it, with its
    deadline and counter history, by :class:`~floodd.scope.Target`."""

    def __init__(self, firewall: FirewallConfig) -> None:
        self._watch: dict[Target, _Watch] = {}
        self.configure(firewall)

    def configure(self, firewall: FirewallConfig) -> None:
        self.stale_after = firewall.stale_after
        self.horizon = 2 * firewall.rescan_interval
        self.extend_active = firewall.extend_active
        self.max_ban_time = firewall.max_ban_time

    def __len__(self) -> int:
        return len(self._watch)

    def __contains__(self, target: object) -> bool:
        return target in self._watch

    def __iter__(self) -> Iterator[Target]:
        return iter(list(self._watch))

    def ban(self, target: Target) -> Ban:
        """The ban of ``target`` as the kernel records it."""
        return self._watch[target].ban

    def packets(self, target: Target) -> int:
        """The ban's dropped packets, as last listed (0 for one floodd just made)."""
        return self._watch[target].packets

    def deadline(self, target: Target) -> float:
        """When the ban of ``target`` ends (monotonic)."""
        return self._watch[target].deadline

    def _term(self, ban: Ban) -> float:
        return min(max(ban.expires - ban.since, 0.0), self.max_ban_time)

    def banned(self, now: Instant, bans: Iterable[Ban]) -> None:
        """floodd installed (or replaced) these bans, made at ``now``; a new element's
        counter starts at 0, an extension (same start) keeps the ban's term."""
        for ban in bans:
            deadline = now.to_mono(ban.expires)
            w = self._watch.get(ban.target)
            if w is None:
                self._watch[ban.target] = _Watch(ban, deadline, self._term(ban), 0, None,
                                                  now.mono)
                continue
            if ban.since != w.ban.since:
                w.term = self._term(ban)
            w.ban, w.deadline = ban, deadline

    def forget(self, targets: Iterable[Target]) -> None:
        """These bans are no longer in the kernel (removed by floodd)."""
        for target in targets:
            self._watch.pop(target, None)

    def observe(self, now: Instant, installed: Sequence[InstalledBan]) -> Decisions:
        """Make the mirror the listing ``installed`` and say what the rule wants done."""
        unban: list[InstalledBan] = []
        extend: list[Ban] = []
        adopted: list[InstalledBan] = []
        present: set[Target] = set()
        t = now.mono
        for ib in installed:
            present.add(ib.target)
            w = self._watch.get(ib.target)
            ban = Ban(ib.network, ib.rule, ib.since, ib.expires, ib.scope)
            if w is None:
                deadline = t + ib.remaining if ib.remaining is not None else \
                    now.to_mono(ib.expires)
                self._watch[ib.target] = _Watch(ban, deadline, self._term(ban), ib.packets,
                                                 None, t)
                adopted.append(ib)
                continue
            if ib.packets > w.packets:
                w.grew_at = t
            w.packets = ib.packets  # a smaller value: the element was re-added, new baseline
            if ib.remaining is not None:
                w.deadline = t + ib.remaining
            elif abs(ib.expires - w.ban.expires) >= 1:  # replaced from outside
                w.deadline = now.to_mono(ib.expires)
                w.term = self._term(ban)
            w.ban = ban
            active = w.grew_at is not None and t - w.grew_at < self.stale_after
            idle_from = w.grew_at if w.grew_at is not None else w.watched_from
            if active and w.deadline <= t + self.horizon:
                length = max(w.term, self.horizon) if self.extend_active else self.horizon
                extend.append(replace(ban, expires=now.to_wall(max(w.deadline, t + length))))
            elif w.deadline <= t and t - idle_from >= self.stale_after:
                unban.append(ib)
        vanished: list[Ban] = []
        expired: list[Ban] = []
        for target, w in list(self._watch.items()):
            if target in present:
                continue
            del self._watch[target]
            if w.deadline > t + EXPIRY_SLACK:
                vanished.append(replace(w.ban, expires=now.to_wall(w.deadline)))
            else:
                expired.append(w.ban)
        return Decisions(tuple(unban), tuple(extend), tuple(vanished), tuple(expired),
                         tuple(adopted))
