"""The firewall stage's one interface, shared by every backend.

A backend owns exactly one table/chain of its own (nftables table ``inet floodd``,
iptables chain ``FLOODD``) and never touches anything else.  Changes are buffered
by :meth:`Backend.ban` / :meth:`Backend.unban` and applied in one batch by
:meth:`Backend.commit`, never one process per element; a commit, applied or failed,
always empties the buffer.  The kernel is the record of what is banned: every ban
carries its rule, start and expiry in the kernel (set element comment / rule comment)
so a restarted floodd can adopt it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

from floodd.config import Network as Network  # re-exported: the backends' address type
from floodd.scope import WHOLE, Scope, Target


@dataclass(frozen=True)
class Ban:
    """A ban to install: ``network`` is a /32 or /128 for one address, shorter for a prefix."""

    network: Network
    rule: str  # the rule name or the operator's --reason
    since: float  # unix time the ban started
    expires: float  # unix time the ban ends
    scope: Scope = WHOLE  # what of the network's traffic it drops

    @property
    def target(self) -> Target:
        return Target(self.network, self.scope)


@dataclass(frozen=True)
class InstalledBan:
    """A ban as read back from the kernel, with its counters."""

    network: Network
    rule: str
    since: float
    expires: float
    packets: int
    bytes: int
    # Seconds until the kernel itself ends the ban (nftables' element timeout, read on
    # the kernel's own clock); None when the kernel has no timeout for it (iptables).
    remaining: float | None = field(default=None, compare=False)
    scope: Scope = WHOLE

    @property
    def target(self) -> Target:
        return Target(self.network, self.scope)

    def as_json(self) -> dict[str, Any]:
        """The ban as JSON: what ``floodd bans --json`` prints and the control socket sends."""
        return {"source": str(self.network), "rule": self.rule, "since": self.since,
                "expires": None if math.isinf(self.expires) else self.expires,
                "packets": self.packets, "bytes": self.bytes,
                "scope": self.scope.as_json()}


@dataclass(frozen=True)
class Committed:
    """What a commit changed in the kernel."""

    added: tuple[Ban, ...]  # bans now in the kernel as given (new or replacing one)
    removed: tuple[Target, ...]  # bans no longer in the kernel


class Buffered:
    """``ban`` and ``unban`` only buffer; a backend's ``commit`` applies what
    :meth:`_take` hands it.

    ``_pending`` maps a ban's target to its new ban, or to None for a removal; the
    last change of a target wins.
    """

    def __init__(self) -> None:
        self._pending: dict[Target, Ban | None] = {}

    def _take(self) -> dict[Target, Ban | None]:
        """The buffered changes, the buffer emptied: a failed commit is never applied
        later by an unrelated one."""
        pending, self._pending = self._pending, {}
        return pending

    def ban(self, bans: Sequence[Ban]) -> None:
        for ban in bans:
            self._pending[ban.target] = ban

    def unban(self, targets: Sequence[Target]) -> None:
        for target in targets:
            self._pending[target] = None


class Backend(Protocol):
    name: str

    def setup(self) -> None:
        """Create floodd's own table/chain if missing and make its drop rules match the
        configuration (idempotent); never touches anything else."""

    def ban(self, bans: Sequence[Ban]) -> None:
        """Buffer bans (an existing ban of the same target is replaced)."""

    def unban(self, targets: Sequence[Target]) -> None:
        """Buffer removals; removing a ban that is not there is not an error."""

    def configure(self, ports: Sequence[int], protocols: Sequence[str]) -> None:
        """The DNS ports and protocols the drop rules match (scope ``dns``), from the
        next :meth:`setup` on; FlooddError if this backend cannot match them."""

    def commit(self) -> Committed:
        """Apply everything buffered in one batch; the buffer is empty afterwards,
        also when it fails (FlooddError)."""

    def survey(self) -> list[InstalledBan] | None:
        """:meth:`list`, when floodd's table/chain and its drop rules are all in place;
        None when any is missing (:meth:`setup` is due).  One read of the kernel where
        the firewall allows it: a rescan reads 10,000 bans once, not twice."""

    def list(self) -> list[InstalledBan]:
        """Every ban floodd has in the kernel, with counters, in one call."""

    def teardown(self) -> None:
        """Remove floodd's table/chain and every ban in it."""
