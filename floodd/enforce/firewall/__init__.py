"""Firewall backends by name (``firewall.backend``) and the choice ``auto`` makes.

``auto`` takes nftables when the host's ``iptables`` is iptables-nft (nftables underneath:
rules written through python-iptables' legacy tables would be invisible to the operator's
``iptables -L``), when there is no ``iptables`` command, when legacy iptables is not
usable, or when there is no ``ipset`` command (the iptables backend keeps its bans in
ipset sets); python-iptables otherwise.
"""

from __future__ import annotations

import shutil
from typing import Callable, Sequence

from floodd.command import run
from floodd.config import FirewallConfig
from floodd.errors import FlooddError
from floodd.enforce.firewall.base import Backend
from floodd.enforce.firewall.dryrun import DryRunBackend

Factory = Callable[[Sequence[int], Sequence[str], str], Backend]


def _nftables(ports: Sequence[int], protocols: Sequence[str], scope: str) -> Backend:
    from floodd.enforce.firewall.nftables import NftablesBackend

    if shutil.which("nft") is None:
        raise FlooddError("firewall backend nftables: nft not found (install nftables)")
    return NftablesBackend(ports, protocols, scope)


def _iptables(ports: Sequence[int], protocols: Sequence[str], scope: str) -> Backend:
    from floodd.enforce.firewall.iptables import IptablesBackend

    return IptablesBackend(ports, protocols, scope)


BACKENDS: dict[str, Factory] = {
    "nftables": _nftables,
    "iptables": _iptables,
    "dry-run": DryRunBackend,
}


def auto_choice(iptables_version: str | None,
                legacy_problem: Callable[[], str | None]) -> tuple[str, str]:
    """``(backend name, why)`` for ``auto``.

    ``iptables_version`` is the output of ``iptables --version`` (None: no such command);
    ``legacy_problem`` says why legacy iptables is unusable (None: usable), asked only
    when iptables is legacy.
    """
    if iptables_version is None:
        return "nftables", "auto: no iptables command on this host"
    version = iptables_version.strip()
    if "nf_tables" in version:
        return "nftables", f"auto: iptables here is {version}, nftables underneath"
    problem = legacy_problem()
    if problem is not None:
        return "nftables", f"auto: legacy iptables is not usable ({problem})"
    return "iptables", f"auto: iptables here is {version}"


def _iptables_version() -> str | None:
    iptables = shutil.which("iptables")
    if iptables is None:
        return None
    proc = run([iptables, "--version"])
    return proc.stdout if proc.returncode == 0 else None


def legacy_iptables_problem() -> str | None:
    try:
        import iptc

        iptc.Table(iptc.Table.FILTER)
    except Exception as exc:  # python-iptables raises bare Exceptions and XTablesError
        return f"{type(exc).__name__}: {exc}"
    return None


def make_backend(firewall: FirewallConfig, ports: Sequence[int], protocols: Sequence[str],
                 dry_run: bool = False,
                 log: Callable[[str], None] | None = None) -> tuple[Backend, str]:
    """The configured backend and a few words on why it was chosen (for the log)."""
    if dry_run:
        return (DryRunBackend(ports, protocols, firewall.scope, log=log),
                "dry run: nothing is changed")
    name = firewall.backend
    why = "firewall.backend"
    if name == "auto":
        name, why = auto_choice(_iptables_version(), legacy_iptables_problem)
        if name == "iptables" and shutil.which("ipset") is None:
            name, why = "nftables", "auto: no ipset command, which the iptables backend needs"
    try:
        factory = BACKENDS[name]
    except KeyError:
        raise FlooddError(f"unknown firewall backend {name!r} "
                          f"(known: auto, {', '.join(BACKENDS)})") from None
    return factory(ports, protocols, firewall.scope), why
