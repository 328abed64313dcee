"""Networks floodd must never ban: the whitelist, this host's own addresses, loopback."""

from __future__ import annotations

import ipaddress
import json
import shutil
from typing import Any, Sequence

from floodd.command import run
from floodd.config import Network
from floodd.errors import Failure, FlooddError

LOOPBACK: tuple[Network, ...] = (ipaddress.ip_network("127.0.0.0/8"),
                                 ipaddress.ip_network("::1/128"))


def parse_ip_addr(data: Any) -> list[Network]:
    """This host's addresses (each a /32 or /128) from the JSON of ``ip -j addr show``.

    The format: a list of interfaces, each with ``addr_info``: ``[{"family": "inet" |
    "inet6", "local": ADDRESS, "prefixlen": N, ...}]``.
    """
    own: dict[Network, None] = {}
    for iface in data:
        for info in iface.get("addr_info", ()):
            if info.get("family") in ("inet", "inet6") and "local" in info:
                own[ipaddress.ip_network(info["local"].split("%")[0])] = None
    return list(own)


def own_networks() -> list[Network]:
    """This host's addresses in the current network namespace (one ``ip -j addr show``)."""
    ip = shutil.which("ip")
    if ip is None:
        raise FlooddError("ip not found: install iproute2 (floodd needs it to know this "
                          "host's own addresses)")
    proc = run([ip, "-j", "addr", "show"])
    if proc.returncode != 0:
        raise Failure(f"ip -j addr show failed: {proc.stderr.strip()[:200]}")
    try:
        return parse_ip_addr(json.loads(proc.stdout))
    except (ValueError, TypeError, AttributeError):
        raise Failure("ip -j addr show printed something unreadable") from None


def _within(inner: Network, outer: Network) -> bool:
    return inner.version == outer.version and inner.subnet_of(outer)  # type: ignore[arg-type]


def protected_reason(network: Network, whitelist: Sequence[Network],
                     own: Sequence[Network]) -> str | None:
    """Why ``network`` must not be banned, or None when it may be.

    A prefix is protected too when it would cover a whitelisted network, one of this
    host's addresses or loopback.
    """
    for w in whitelist:
        if _within(network, w):
            return f"whitelisted by {w}"
    for o in own:
        if _within(o, network):
            return "this host's address" if o == network else \
                f"contains this host's address {o.network_address}"
    if any(network.overlaps(lo) for lo in LOOPBACK):
        return "loopback"
    for w in whitelist:
        if _within(w, network):
            return f"contains a whitelisted network ({w})"
    return None
