"""A backend that changes nothing: it logs what it would do and remembers it in memory,
so :meth:`DryRunBackend.list` shows the bans a real backend would hold, each with its
target (network and scope); counters stay 0."""

from __future__ import annotations

import logging
from typing import Callable, Sequence

from floodd.enforce.firewall.base import Ban, Buffered, Committed, InstalledBan
from floodd.scope import Target


class DryRunBackend(Buffered):
    name = "dry-run"

    def __init__(self, ports: Sequence[int] = (53,), protocols: Sequence[str] = ("udp", "tcp"),
                 scope: str = "dns", log: Callable[[str], None] | None = None) -> None:
        self.log = log or logging.getLogger("floodd.enforce.firewall").info
        self.scope = scope
        self.configure(ports, protocols)
        self._bans: dict[Target, Ban] = {}
        super().__init__()
        self._set_up: str | None = None  # what the drop rules would match, once set up

    def configure(self, ports: Sequence[int], protocols: Sequence[str]) -> None:
        self.what = ("all traffic" if self.scope == "all" else
                     f"{'/'.join(protocols)} to port {', '.join(map(str, ports))}")

    def setup(self) -> None:
        if self._set_up != self.what:
            self.log(f"dry run: would set up the firewall to drop {self.what} "
                     "from banned sources")
        self._set_up = self.what

    def commit(self) -> Committed:
        added: list[Ban] = []
        removed: list[Target] = []
        for target, ban in self._take().items():
            if ban is not None:
                self.log(f"dry run: would ban {target} for {ban.expires - ban.since:g} s "
                         f"({ban.rule})")
                self._bans[target] = ban
                added.append(ban)
            elif self._bans.pop(target, None) is not None:
                self.log(f"dry run: would unban {target}")
                removed.append(target)
        return Committed(tuple(added), tuple(removed))

    def survey(self) -> list[InstalledBan] | None:
        return self.list() if self._set_up is not None else None

    def list(self) -> list[InstalledBan]:
        return [InstalledBan(b.network, b.rule, b.since, b.expires, 0, 0, scope=b.scope)
                for b in self._bans.values()]

    def teardown(self) -> None:
        if self._set_up is not None:
            self.log(f"dry run: would remove the firewall table and its {len(self._bans)} bans")
        self._bans.clear()
        self._set_up = None
