"""When a ban ends: ban time over and its drop counter idle for ``stale_after``.

The rule: a ban is removed when its ban time has passed AND its counter has not grown for
``firewall.stale_after``; a ban whose counter still grows is kept, and with
``firewall.extend_active`` given a new full term.  Counters are read every
``firewall.rescan_interval``, so "grew" means "grew between two rescans".

How this meets kernel timeouts: a backend gives each ban a kernel timeout equal to its expiry
(nftables), so the kernel alone ends every ban, also when floodd is gone.  To keep an active
ban the tracker therefore extends it *before* the kernel would end it: at each rescan, a ban
whose counter grew within ``stale_after`` and that expires before the rescan after next
(``now + 2 * rescan_interval``) is re-added with a later expiry:

- ``extend_active: true``: ``now + max(term, 2 * rescan_interval)``, where ``term`` is the
  ban's length as first seen (``expires - since``, at most ``max_ban_time``);
- ``extend_active: false``: ``now + 2 * rescan_interval``: kept only while it stays active,
  so it ends between ``stale_after`` and ``stale_after + 2 * rescan_interval`` after the last
  growth seen.

A ban that is not extended ends at its expiry in the kernel (reported as ``expired``); a
backend without kernel timeouts (iptables) is told to ``unban`` once its expiry has passed
and its counter has been idle for ``stale_after``.  A ban the tracker knows that is missing
from the firewall before its expiry was removed by someone else: ``vanished``, to repair.

Adoption: bans first seen in a listing (after a restart, or banned by another process) are
taken as they are, nothing is unbanned or re-added; their idle time counts from the moment
they were first seen, and only growth this tracker saw makes a ban active.

Pure logic: the clock is the ``now`` argument, the firewall is the listing passed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from floodd.config import FirewallConfig
from floodd.enforce.firewall.base import Ban, InstalledBan, Network

# A ban gone from the firewall up to this long before its recorded expiry ended normally:
# the recorded times are whole seconds, the kernel timeout starts a moment after `since`.
EXPIRY_SLACK = 2.0


@dataclass(frozen=True)
class Decisions:
    """What one rescan found: apply ``unban`` and ``extend`` (re-add) in one commit."""

    unban: tuple[InstalledBan, ...]  # ban time over and idle for stale_after
    extend: tuple[Ban, ...]  # active bans with their new expiry
    vanished: tuple[Ban, ...]  # gone from the firewall before their expiry: repair
    expired: tuple[Ban, ...]  # ended by the kernel's timeout at their expiry


@dataclass
class _Watch:
    ban: Ban
    term: float  # seconds a full ban lasts (for extensions)
    packets: int
    grew_at: float | None  # last rescan that saw the counter grow; None: not seen yet
    watched_from: float


class BanTracker:
    """Counter history of every ban floodd knows, fed with listings of the firewall."""

    def __init__(self, firewall: FirewallConfig) -> None:
        self._watch: dict[Network, _Watch] = {}
        self.configure(firewall)

    def configure(self, firewall: FirewallConfig) -> None:
        self.stale_after = firewall.stale_after
        self.horizon = 2 * firewall.rescan_interval
        self.extend_active = firewall.extend_active
        self.max_ban_time = firewall.max_ban_time

    def __len__(self) -> int:
        return len(self._watch)

    def _term(self, ban: Ban) -> float:
        return min(max(ban.expires - ban.since, 0.0), self.max_ban_time)

    def adopt(self, now: float, installed: Iterable[InstalledBan]) -> None:
        """Start from what the firewall holds (startup); changes nothing."""
        for ib in installed:
            if ib.network not in self._watch:
                ban = Ban(ib.network, ib.rule, ib.since, ib.expires)
                self._watch[ib.network] = _Watch(ban, self._term(ban), ib.packets, None, now)

    def banned(self, now: float, bans: Iterable[Ban]) -> None:
        """floodd installed (or replaced) these bans; a new element's counter starts at 0."""
        for ban in bans:
            w = self._watch.get(ban.network)
            if w is None:
                self._watch[ban.network] = _Watch(ban, self._term(ban), 0, None, now)
            else:
                w.ban = ban
                w.term = self._term(ban)

    def forget(self, networks: Iterable[Network]) -> None:
        """floodd removed these bans itself (operator unban, flush)."""
        for net in networks:
            self._watch.pop(net, None)

    def observe(self, now: float, installed: Sequence[InstalledBan]) -> Decisions:
        """Compare a fresh listing with the history; the caller applies the decisions.

        The tracker assumes they are applied: unbanned and expired bans are forgotten,
        extended ones remembered with their new expiry.  Vanished ones stay known until
        they are re-added (:meth:`banned`) or forgotten, or their expiry passes.
        """
        unban: list[InstalledBan] = []
        extend: list[Ban] = []
        present: set[Network] = set()
        for ib in installed:
            present.add(ib.network)
            w = self._watch.get(ib.network)
            ban = Ban(ib.network, ib.rule, ib.since, ib.expires)
            if w is None:
                self._watch[ib.network] = _Watch(ban, self._term(ban), ib.packets, None, now)
                continue
            if ib.packets > w.packets:
                w.grew_at = now
            w.packets = ib.packets  # a smaller value: the element was re-added, new baseline
            w.ban = ban
            active = w.grew_at is not None and now - w.grew_at < self.stale_after
            idle_from = w.grew_at if w.grew_at is not None else w.watched_from
            if active and ib.expires <= now + self.horizon:
                length = max(w.term, self.horizon) if self.extend_active else self.horizon
                w.ban = Ban(ib.network, ib.rule, ib.since, max(ib.expires, now + length))
                extend.append(w.ban)
            elif ib.expires <= now and now - idle_from >= self.stale_after:
                unban.append(ib)
                del self._watch[ib.network]
        vanished: list[Ban] = []
        expired: list[Ban] = []
        for net, w in list(self._watch.items()):
            if net in present:
                continue
            if w.ban.expires > now + EXPIRY_SLACK:
                vanished.append(w.ban)
            else:
                expired.append(w.ban)
                del self._watch[net]
        return Decisions(tuple(unban), tuple(extend), tuple(vanished), tuple(expired))
