"""``floodd bans``, ``floodd ban`` and ``floodd unban``: the operator's hand on the bans.

When the daemon runs (it answers on ``daemon.control_socket``) the request goes through
it, so its own record of the bans stays right.  Otherwise, or with ``--backend``, the
command works on the kernel directly, through the same ban owner the daemon uses
(floodd.enforce.banset) on the configured firewall backend.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import sys
import time
from dataclasses import replace
from typing import Any

from floodd.cli.common import add_config_option, config_from_args
from floodd.config import Config, parse_duration, parse_network
from floodd.service.control import NotRunning, request
from floodd.errors import Failure, FlooddError
from floodd.enforce.banset import BanSet, NewBan, holder
from floodd.enforce.clock import now as clock_now
from floodd.enforce.firewall import BACKENDS, make_backend
from floodd.enforce.firewall.base import Backend, Network
from floodd.scope import WHOLE
from floodd.decide.safety import own_networks, protected_reason
from floodd.service.requests import DEFAULT_BAN_TIME, DEFAULT_REASON, MAX_BAN_TIME, check_reason


def source_network(text: str) -> Network:
    """The address or prefix an operator typed, or a one-line FlooddError."""
    try:
        return parse_network(text)
    except ValueError:
        pass
    try:
        iface = ipaddress.ip_interface(text.strip())
    except ValueError:
        raise FlooddError(f"not an address or prefix: {text!r} (expected e.g. 198.51.100.7, "
                          "198.51.100.0/24 or 2001:db8::/48)") from None
    raise FlooddError(f"{text} has host bits set (did you mean {iface.network}?)")


def ban_duration(text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError:
        raise FlooddError(f"--for: expected a duration such as 90s, 10m, 1h or 2d, "
                          f"got {text!r}") from None
    if seconds > MAX_BAN_TIME:
        raise FlooddError(f"--for: at most 365d, got {text!r}")
    return seconds


def human_duration(seconds: float) -> str:
    """``3600`` -> ``1h``, ``5430`` -> ``1h30m30s``; whole seconds."""
    if math.isinf(seconds):
        return "never"
    left = max(0, round(seconds))
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if left >= size or (unit == "s" and not parts):
            parts.append(f"{left // size}{unit}")
            left %= size
    return "".join(parts)


def show_source(network: Network) -> str:
    """A network as an operator writes it: an address without its /32 or /128."""
    if network.prefixlen == network.max_prefixlen:
        return str(network.network_address)
    return str(network)


def format_bans(records: list[dict[str, Any]], now: float) -> list[str]:
    """The ``floodd bans`` table of control-socket records (:meth:`InstalledBan.as_json`);
    one network may show several bans, one per scope."""
    if not records:
        return ["no bans"]
    rows = [("SOURCE", "SCOPE", "RULE", "BANNED SINCE", "EXPIRES IN", "PACKETS", "BYTES")]
    for r in records:
        rows.append((show_source(ipaddress.ip_network(r["source"])), r["scope"]["text"],
                     r["rule"], time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["since"])),
                     "never" if r["expires"] is None else human_duration(r["expires"] - now),
                     str(r["packets"]), str(r["bytes"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.rjust(w) if i >= 5 else cell.ljust(w)
                      for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
            for row in rows]


def _sort_key(record: dict[str, Any]) -> tuple[int, Any, str]:
    net = ipaddress.ip_network(record["source"])
    return net.version, net, record["scope"]["text"]


def _backend(args: argparse.Namespace, config: Config) -> Backend:
    firewall = config.firewall
    if args.backend is not None:
        firewall = replace(firewall, backend=args.backend)
    backend, _ = make_backend(firewall, config.capture.ports, config.capture.protocols)
    return backend


def _kernel_bans(args: argparse.Namespace, config: Config, set_up: bool) -> BanSet:
    """The bans in the kernel, to change them directly (no daemon)."""
    bans = BanSet(config.firewall)
    bans.start(clock_now(), _backend(args, config), set_up=set_up)
    return bans


def _daemon(args: argparse.Namespace, config: Config, cmd: str,
            **body: Any) -> dict[str, Any] | None:
    """The running daemon's reply, or None when it does not run (or --backend was given)."""
    if args.backend is not None:
        return None
    try:
        return request(config.daemon.control_socket, cmd, **body)
    except NotRunning:
        return None


def _bans(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    reply = _daemon(args, config, "bans")
    if reply is not None:
        records: list[dict[str, Any]] = reply["bans"]
    else:
        records = [ib.as_json() for ib in _backend(args, config).list()]
    records.sort(key=_sort_key)
    if args.json:
        print(json.dumps(records, indent=1))
    else:
        print("\n".join(format_bans(records, time.time())))
    return 0


def _ban(args: argparse.Namespace) -> int:
    network = source_network(args.source)
    seconds = ban_duration(args.duration) if args.duration is not None else DEFAULT_BAN_TIME
    reason = check_reason(args.reason.strip() or DEFAULT_REASON, "--reason")
    config = config_from_args(args)
    reply = _daemon(args, config, "ban", source=str(network), seconds=seconds, reason=reason,
                    force=args.force)
    if reply is None:
        why = protected_reason(network, config.whitelist, own_networks())
        if why is not None and not args.force:
            raise FlooddError(f"refusing to ban {show_source(network)}: {why} "
                              "(use --force to ban it anyway)")
        bans = _kernel_bans(args, config, set_up=True)
        done = bans.ban(clock_now(), [NewBan(network, reason, seconds)])
        if network not in {b.network for b in done.added}:
            inside = bans.holder(network)
            raise Failure(f"{network} was not added: it lies inside the banned prefix "
                              f"{inside}" if inside else f"{network} was not added")
    print(f"banned {show_source(network)} for {human_duration(seconds)} ({reason})")
    return 0


def _unban(args: argparse.Namespace) -> int:
    network = None if args.all else source_network(args.source)
    config = config_from_args(args)
    reply = _daemon(args, config, "bans")
    bans = None
    if reply is not None:
        banned = [ipaddress.ip_network(r["source"]) for r in reply["bans"]]
    else:
        bans = _kernel_bans(args, config, set_up=False)
        banned = [t.network for t in bans.targets()]
    if network is not None and network not in banned:
        inside = holder(network, banned)
        print(f"{show_source(network)} is not banned"
              + (f" (it lies inside the banned prefix {inside})" if inside else ""),
              file=sys.stderr)
        return 1
    # The scopes of the bans removed (every ban of the network, whatever its scope).
    if bans is None:
        done = _daemon(args, config, "unban",
                       **({"all": True} if network is None else {"source": str(network)}))
        if done is None:
            raise Failure("floodd stopped before it removed the bans; run the command again")
        scopes: list[dict[str, Any]] = [r["scope"] for r in done["bans"]]
    else:
        scopes = [t.scope.as_json() for t in
                  bans.unban(clock_now(), None if network is None else [network])]
    if network is None:
        print(f"unbanned {len(scopes)} {'ban' if len(scopes) == 1 else 'bans'}")
    elif scopes in ([], [WHOLE.as_json()]):
        print(f"unbanned {show_source(network)}")
    else:
        print(f"unbanned {show_source(network)} "
              f"({'; '.join(scope['text'] for scope in scopes)})")
    return 0


def _add_common(p: argparse.ArgumentParser) -> None:
    add_config_option(p)
    p.add_argument("--backend", choices=["auto", *BACKENDS], default=None,
                   help="firewall backend to use instead of firewall.backend; works on the "
                        "kernel directly, never through a running daemon")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "bans", help="list the bans in the firewall",
        description="List every ban in the firewall: source, scope (what of the source's "
                    "traffic it drops: the whole source, UDP only, one query type, or the "
                    "packets not arriving with the source's usual TTL/hop limit), rule (or "
                    "the operator's reason), when it started, when it expires, and the "
                    "packets and bytes dropped from it. One source may have several bans "
                    "of different scopes. Asks the running daemon, or reads the kernel.")
    p.add_argument("--json", action="store_true",
                   help="print JSON: a list of {source, scope, rule, since, expires, packets, "
                        "bytes}, times in unix seconds; scope is {protocols (udp or all), "
                        "qtype (a name or null), except_hops (TTL/hop-limit values that "
                        "pass), text}")
    _add_common(p)
    p.set_defaults(handler=_bans)

    p = sub.add_parser(
        "ban", help="ban a source address or prefix",
        description="Ban SOURCE (an address, or a prefix such as 198.51.100.0/24) now. "
                    "Whitelisted networks, this host's own addresses and loopback are "
                    "refused unless --force is given.")
    p.add_argument("source", metavar="SOURCE", help="address or prefix to ban")
    p.add_argument("--for", dest="duration", metavar="DURATION",
                   help="how long: 90s, 10m, 1h, 2d, 1h30m (default: 1h)")
    p.add_argument("--reason", default=DEFAULT_REASON, metavar="TEXT",
                   help="why, shown by 'floodd bans' in place of a rule name "
                        f"(default: {DEFAULT_REASON})")
    p.add_argument("--force", action="store_true",
                   help="ban even a whitelisted network, this host's address or loopback")
    _add_common(p)
    p.set_defaults(handler=_ban)

    p = sub.add_parser(
        "unban", help="lift a ban",
        description="Remove the bans of SOURCE (exactly as listed by 'floodd bans'; all "
                    "of them, whatever their scope), or every ban with --all. Exit status 1 "
                    "when SOURCE is not banned.")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("source", metavar="SOURCE", nargs="?", help="banned address or prefix")
    which.add_argument("--all", action="store_true", help="remove every ban")
    _add_common(p)
    p.set_defaults(handler=_unban)
