"""The one owner of floodd's bans: a mirror of the kernel's ban set, changed only here.

The kernel is the truth about what is banned.  :class:`BanSet` holds a mirror of it (a
:class:`~floodd.enforce.expiry.BanTracker`: every ban with its deadline and counter
history) and every path that changes bans goes through it: the rules and the operator
(:meth:`BanSet.ban`), adoption of bans found in the kernel (:meth:`BanSet.start`,
:meth:`BanSet.rescan`), expiry and repair (:meth:`BanSet.rescan`), the operator's unban
and unban of everything (:meth:`BanSet.unban`).

Invariants:

- The mirror changes only to what the kernel was seen to hold: to a listing, or after a
  commit to what the backend reports it applied.  A ban the kernel did not take (nftables
  skips a prefix inside a banned prefix) is not in the mirror either, and the caller is
  told.
- A failed change leaves nothing buffered in the backend (a later commit never applies
  it) and the mirror equal to the kernel: the kernel is listed again and the mirror rebuilt
  from the listing.
- What floodd still owes the kernel is kept apart from the mirror: bans that vanished
  before their end (an ``nft flush ruleset``), and extensions whose commit failed.  Each
  rescan puts back those the kernel does not hold, until their end; an operator's unban
  cancels them.
- When the kernel cannot be read (a command that fails, or hangs and is killed after its
  timeout), or a change failed slowly (a timeout, a lock another program holds), the
  mirror may be out of date: the firewall is then left alone for ``RETRY_AFTER`` seconds
  (bans by the rules wait, operator requests get an error at once) and re-read before the
  next change.  A hung firewall costs the main loop at most one command timeout per
  ``RETRY_AFTER``.
- Deadlines are on the monotonic clock; unix times only in what goes to the kernel and to
  people (see floodd.enforce.clock).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Iterable, Sequence

from floodd.command import CommandTimeout
from floodd.config import FirewallConfig
from floodd.enforce.clock import Instant
from floodd.enforce.expiry import EXPIRY_SLACK, BanTracker, Decisions
from floodd.enforce.firewall.base import Backend, Ban, Committed, InstalledBan, Network
from floodd.errors import Failure, FlooddError
from floodd.scope import WHOLE, Scope, Target

# Seconds floodd leaves a firewall alone after it could not be read.
RETRY_AFTER = 10.0
# A failed change that took this long is not followed at once by a listing, which would
# likely wait as long: a change of 10,000 bans takes a quarter of a second.
SLOW = 1.0


class BanFailure(Failure):
    """A change or reading the firewall did not take; the text says what floodd did
    about it (one line)."""


class FirewallWaiting(BanFailure):
    """Refused without trying: the firewall is left alone after a failure (reported
    when it happened)."""


@dataclass(frozen=True)
class NewBan:
    """A ban to make: ``network``'s traffic within ``scope``, for ``seconds`` from now,
    shown with ``rule``."""

    network: Network
    rule: str  # the rule name or the operator's reason
    seconds: float
    scope: Scope = WHOLE


@dataclass(frozen=True)
class Rescan:
    """What one rescan found and did."""

    set_up: bool  # floodd's table/chain or its drop rules were missing and are re-created
    restored: tuple[Ban, ...]  # owed bans (vanished, or a failed extension) re-created
    extended: tuple[Ban, ...]  # active bans given a later end
    unbanned: tuple[InstalledBan, ...]  # ban time over and idle: removed
    expired: tuple[Ban, ...]  # ended by the kernel's timeout
    adopted: tuple[InstalledBan, ...]  # found in the kernel, made by someone else


class BanSet:
    """floodd's bans: the kernel's, mirrored, and changed only through this object.

    Bans are identified by their :class:`~floodd.scope.Target` (network and scope).
    Empty until :meth:`start` gives it its backend.  Read from any thread: ``len()``,
    ``in``, :meth:`targets`, :attr:`addresses`.  Everything else runs in one thread (the
    daemon's main loop).
    """

    def __init__(self, firewall: FirewallConfig) -> None:
        self._backend: Backend | None = None
        self._mirror = BanTracker(firewall)
        # The single addresses (packed) whose queries are all dropped, for the capture to
        # skip; replaced whole.
        self.addresses: frozenset[bytes] = frozenset()
        self._owed: dict[Target, tuple[Ban, float]] = {}  # ban, its deadline (monotonic)
        self._down: str | None = None  # why the mirror may be out of date
        self._retry_at = 0.0  # (monotonic) when to read the firewall again
        self._needs_setup = False

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            raise FlooddError("the firewall is not set up yet")
        return self._backend

    @property
    def started(self) -> bool:
        return self._backend is not None

    # --- reading the mirror ------------------------------------------------------
    def __len__(self) -> int:
        return len(self._mirror)

    def __contains__(self, target: object) -> bool:
        return target in self._mirror

    def targets(self) -> list[Target]:
        return list(self._mirror)

    def deadline(self, target: Target) -> float:
        """When ``target``'s ban ends (monotonic), as floodd last set or listed it."""
        return self._mirror.deadline(target)

    def packets(self, target: Target) -> int:
        """``target``'s dropped packets at the last listing."""
        return self._mirror.packets(target)

    def rule(self, target: Target) -> str:
        """The rule (or the operator's reason) that made ``target``'s ban."""
        return self._mirror.ban(target).rule

    def since(self, target: Target) -> float:
        """When ``target``'s ban was made (unix time, as the kernel records it)."""
        return self._mirror.ban(target).since

    def holder(self, network: Network) -> Network | None:
        """The banned prefix ``network`` lies in, if any."""
        return holder(network, (t.network for t in self._mirror))

    def usable(self, now: Instant) -> bool:
        """False while the firewall is left alone after it could not be read."""
        return self._down is None or now.mono >= self._retry_at

    # --- adoption ----------------------------------------------------------------
    def start(self, now: Instant, backend: Backend,
              set_up: bool = True) -> tuple[InstalledBan, ...]:
        """Work on ``backend``: set up floodd's table/chain (unless ``set_up`` is False)
        and adopt every ban the kernel holds.  The bans adopted."""
        if set_up:
            backend.setup()
        self._backend = backend
        return self.load(now)

    def load(self, now: Instant) -> tuple[InstalledBan, ...]:
        """Mirror what the kernel holds now; nothing is unbanned or re-added.  The bans
        first seen."""
        return self._observe(now, self._read(now)).adopted

    def _observe(self, now: Instant, listed: Sequence[InstalledBan]) -> Decisions:
        """The mirror becomes ``listed``; what vanished is owed until the kernel has it
        again or its end has come."""
        d = self._mirror.observe(now, listed)
        self._owe(now, d.vanished)
        there = {ib.target for ib in listed}
        for target, (_, deadline) in list(self._owed.items()):
            if target in there or deadline <= now.mono + EXPIRY_SLACK:
                del self._owed[target]
        self._down = None
        self._refresh()
        return d

    def _owe(self, now: Instant, bans: Iterable[Ban]) -> None:
        for ban in bans:
            self._owed[ban.target] = (ban, now.to_mono(ban.expires))

    # --- changes -----------------------------------------------------------------
    def ban(self, now: Instant, bans: Sequence[NewBan]) -> Committed:
        """Install ``bans`` in one commit (replacing a ban of the same target).  The
        result's ``added`` are the ones the kernel took; ``removed``, bans they replaced
        (nftables: bans a new one covers, such as prefixes inside a new prefix)."""
        self._ready(now)
        self.backend.ban([Ban(b.network, b.rule, now.wall, now.wall + b.seconds, b.scope)
                          for b in bans])
        return self._commit(now)

    def unban(self, now: Instant, networks: Sequence[Network] | None) -> tuple[Target, ...]:
        """Remove every ban of ``networks``, whatever its scope (None: every ban the kernel
        holds, read just before) in one commit; the bans that were there."""
        self._ready(now)
        if networks is None:
            self.load(now)
        wanted = None if networks is None else set(networks)
        targets = [t for t in [*self._mirror, *self._owed]
                   if wanted is None or t.network in wanted]
        targets = list(dict.fromkeys(targets))
        for target in targets:
            self._owed.pop(target, None)  # never put back what the operator removes
        if not targets:
            return ()
        known = [t for t in targets if t in self._mirror]
        self.backend.unban(targets)
        done = self._commit(now, removing=targets)
        self._mirror.forget(targets)
        self._refresh()
        return tuple(dict.fromkeys([*known, *(t for t in done.removed if t in targets)]))

    def rescan(self, now: Instant) -> Rescan | None:
        """Read the kernel, put back what is owed, extend active bans and remove ended
        ones, in one commit.  None while the firewall is left alone."""
        if not self.usable(now):
            return None
        set_up = False
        started = time.monotonic()
        try:
            listed = None if self._needs_setup else self.backend.survey()
            if listed is None:
                set_up = True
                self._needs_setup = True
                self.backend.setup()
                self._needs_setup = False
                listed = self.backend.list()
        except FlooddError as exc:
            self._lose(now, str(exc), started)
            raise BanFailure(f"{exc}; floodd reads the firewall again in "
                             f"{RETRY_AFTER:g} s") from exc
        d = self._observe(now, listed)
        restore = [replace(ban, expires=now.to_wall(deadline))
                   for ban, deadline in self._owed.values()]
        expired = tuple(b for b in d.expired if b.target not in self._owed)
        if not (restore or d.extend or d.unban):
            return Rescan(set_up, (), (), (), expired, d.adopted)
        self.backend.ban([*restore, *d.extend])
        self.backend.unban([ib.target for ib in d.unban])
        try:
            done = self._commit(now, removing=[ib.target for ib in d.unban])
        except BanFailure:
            self._owe(now, d.extend)  # put back at the next rescan if the kernel ends them
            raise
        for ban in restore:
            self._owed.pop(ban.target, None)  # put back, or refused by the kernel
        added = {b.target for b in done.added}
        return Rescan(set_up, _taken(restore, added), _taken(d.extend, added),
                      tuple(ib for ib in d.unban if ib.target in done.removed),
                      expired, d.adopted)

    def configure(self, firewall: FirewallConfig, ports: Sequence[int],
                  protocols: Sequence[str]) -> None:
        """Follow a new configuration: expiry settings, and drop rules matching ``ports``
        and ``protocols`` (set up at once; if that fails, at the next rescan)."""
        self._mirror.configure(firewall)
        self.backend.configure(ports, protocols)
        self._needs_setup = True
        try:
            self.backend.setup()
        except FlooddError as exc:
            raise BanFailure(f"{exc}; floodd sets up the drop rules again at the next "
                             "rescan") from exc
        self._needs_setup = False

    def flush(self) -> int:
        """Remove floodd's table/chain and every ban in it; how many bans the mirror had."""
        count = len(self._mirror)
        self.backend.teardown()
        self._mirror.forget(list(self._mirror))
        self._owed.clear()
        self._refresh()
        return count

    def listing(self, now: Instant) -> list[InstalledBan]:
        """Every ban in the kernel with fresh counters, for people.  The expiry is the one
        the kernel records, unless the wall clock stepped since: then it is the ban's
        deadline in unix time now (whole seconds, rounded down).  Changes nothing."""
        if not self.usable(now):
            raise self._waiting(now)
        return [self._shown(now, ib) for ib in self._read(now)]

    def _shown(self, now: Instant, ib: InstalledBan) -> InstalledBan:
        if ib.target not in self._mirror or math.isinf(ib.expires):
            return ib
        expires = now.to_wall(self._mirror.deadline(ib.target))
        if abs(expires - ib.expires) < EXPIRY_SLACK:  # the kernel keeps whole seconds
            return ib
        return replace(ib, expires=math.floor(expires))

    # --- failures ----------------------------------------------------------------
    def _ready(self, now: Instant) -> None:
        """Before a change: the mirror must be trusted, or re-read now."""
        if self._down is None:
            return
        if not self.usable(now):
            raise self._waiting(now)
        self.load(now)

    def _waiting(self, now: Instant) -> FirewallWaiting:
        return FirewallWaiting(f"the firewall did not answer ({self._down}); floodd reads it "
                          f"again in {max(1, round(self._retry_at - now.mono))} s")

    def _commit(self, now: Instant, removing: Sequence[Target] = ()) -> Committed:
        """Commit what is buffered; on failure re-read the kernel (``removing``: the
        removals asked for, never owed even if the kernel took only some)."""
        started = time.monotonic()
        try:
            done = self.backend.commit()
        except FlooddError as exc:
            if isinstance(exc, CommandTimeout) or time.monotonic() - started >= SLOW:
                self._lose(now, str(exc), started)
                raise BanFailure(f"{exc}; floodd reads the firewall again in "
                                 f"{RETRY_AFTER:g} s") from exc
            try:
                self.load(now)
            except BanFailure as again:
                raise BanFailure(f"{exc}; {again}") from exc
            finally:
                for target in removing:
                    self._owed.pop(target, None)
            raise BanFailure(f"{exc}; the bans were read back from the firewall "
                             f"({len(self._mirror)} bans)") from exc
        self._mirror.forget(done.removed)
        self._mirror.banned(now, done.added)
        for target in [*done.removed, *(b.target for b in done.added)]:
            self._owed.pop(target, None)
        self._refresh()
        return done

    def _read(self, now: Instant) -> list[InstalledBan]:
        """The kernel's bans; BanFailure (and the firewall left alone) if it cannot say."""
        started = time.monotonic()
        try:
            return self.backend.list()
        except FlooddError as exc:
            self._lose(now, str(exc), started)
            raise BanFailure(f"cannot read the bans: {exc}") from exc

    def _lose(self, now: Instant, why: str, started: float) -> None:
        """The firewall failed (``why``) in a call begun at ``started`` (time.monotonic()):
        leave it alone for RETRY_AFTER from the failure on."""
        self._down = why
        self._retry_at = now.mono + (time.monotonic() - started) + RETRY_AFTER

    def _refresh(self) -> None:
        self.addresses = frozenset(n.network_address.packed for n, scope in self._mirror
                                   if n.prefixlen == n.max_prefixlen and scope.whole_source)


def holder(network: Network, banned: Iterable[Network]) -> Network | None:
    """The prefix among ``banned`` (other than ``network`` itself) that ``network`` lies in,
    if any."""
    return next((n for n in banned if n != network and n.version == network.version
                 and network.subnet_of(n)), None)  # type: ignore[arg-type]


def _taken(bans: Iterable[Ban], added: set[Target]) -> tuple[Ban, ...]:
    return tuple(b for b in bans if b.target in added)
