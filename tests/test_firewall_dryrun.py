"""The dry-run backend: it remembers and reports, the kernel stays untouched."""

from __future__ import annotations

import ipaddress
from typing import Any, Callable

from floodd.enforce.firewall.base import Ban, Committed, InstalledBan
from floodd.enforce.firewall.dryrun import DryRunBackend
from floodd.scope import UDP_ONLY, WHOLE, Scope, Target

net = ipaddress.ip_network
T0 = 1_700_000_000.0


def test_dry_run_records_and_reports() -> None:
    said: list[str] = []
    backend = DryRunBackend([53], ["udp", "tcp"], log=said.append)
    assert backend.survey() is None
    backend.setup()
    assert backend.survey() == []
    backend.ban([Ban(net("198.51.100.7/32"), "query-flood", T0, T0 + 600),
                 Ban(net("203.0.113.0/24"), "prefix-flood", T0, T0 + 60)])
    assert backend.list() == []  # buffered until commit
    backend.commit()
    backend.unban([Target(net("203.0.113.0/24"), WHOLE), Target(net("192.0.2.9/32"), WHOLE)])
    backend.commit()
    assert backend.list() == [InstalledBan(net("198.51.100.7/32"), "query-flood", T0,
                                           T0 + 600, 0, 0)]
    backend.teardown()
    assert backend.list() == [] and backend.survey() is None
    assert said == [
        "dry run: would set up the firewall to drop udp/tcp to port 53 from banned sources",
        "dry run: would ban 198.51.100.7/32 for 600 s (query-flood)",
        "dry run: would ban 203.0.113.0/24 for 60 s (prefix-flood)",
        "dry run: would unban 203.0.113.0/24",
        "dry run: would remove the firewall table and its 1 bans",
    ]


def test_dry_run_keeps_each_target() -> None:
    """One network may hold several bans of different scopes; each is its own."""
    said: list[str] = []
    backend = DryRunBackend(log=said.append)
    source = net("203.0.113.10/32")
    any_queries = Ban(source, "any-queries", T0, T0 + 600, Scope(True, 255))
    forged = Ban(source, "query-flood", T0, T0 + 60, Scope(True, None, (64,)))
    backend.ban([any_queries, forged, Ban(source, "manual", T0, T0 + 60, UDP_ONLY)])
    backend.unban([Target(source, UDP_ONLY), Target(source, WHOLE)])
    assert backend.commit() == Committed((any_queries, forged), ())
    assert {b.target: b.rule for b in backend.list()} == {
        forged.target: "query-flood", any_queries.target: "any-queries"}
    assert backend.list()[0] == InstalledBan(source, "any-queries", T0, T0 + 600, 0, 0,
                                             scope=Scope(True, 255))
    backend.unban([forged.target])
    assert backend.commit() == Committed((), (forged.target,))
    assert [b.target for b in backend.list()] == [any_queries.target]
    assert said == [
        "dry run: would ban 203.0.113.10/32 (UDP, ANY queries) for 600 s (any-queries)",
        "dry run: would ban 203.0.113.10/32 (UDP, TTL/hop limit not 64) for 60 s "
        "(query-flood)",
        "dry run: would unban 203.0.113.10/32 (UDP, TTL/hop limit not 64)",
    ]


def test_dry_run_through_the_cli_changes_nothing(
        lab: Any, floodd_cli: Callable[..., Any]) -> None:
    ruleset = lab.run(lab.server_ns, ["nft", "list", "ruleset"], text=True).stdout
    proc = floodd_cli("ban", "198.51.100.7", backend="dry-run")
    assert proc.returncode == 0 and proc.stdout == "banned 198.51.100.7 for 1h (manual)\n"
    assert lab.run(lab.server_ns, ["nft", "list", "ruleset"], text=True).stdout == ruleset
    assert floodd_cli("bans", backend="dry-run").stdout == "no bans\n"  # a new process
