"""``floodd status``: what the running daemon sees, over its control socket (``floodd top``
is in floodd.cli.top)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from floodd.cli.common import add_config_option, config_from_args
from floodd.cli.top import source_table
from floodd.service.control import request
from floodd.service.fleet import fleet_line


def _socket_path(args: argparse.Namespace) -> str:
    return config_from_args(args).daemon.control_socket


def _status(args: argparse.Namespace) -> int:
    reply = request(_socket_path(args), "status")
    if args.json:
        print(json.dumps(reply, indent=1))
        return 0
    print(f"floodd {reply['version']} running for {reply['uptime']:.0f} s "
          f"(pid {reply['pid']}, firewall backend {reply['backend']}"
          f"{', dry run' if reply['dry_run'] else ''})")
    print(f"capture: {', '.join(reply['interfaces'])}: {reply['pps']:.0f} packets/s, "
          f"{reply['packets']} packets, {reply['kernel_drops']} kernel drops")
    if reply.get("sampling", 1) > 1:
        print(f"  overloaded: the kernel hands floodd 1 in {reply['sampling']} packets "
              "(counts scaled)")
    if reply.get("excluded"):
        print(f"  {reply['excluded']} bans kept out of the capture (their drops are in "
              "`floodd bans`)")
    print(f"bans: {reply['bans']} (max {reply['max_bans']})")
    fast = reply.get("fast_drop")
    if fast:
        meters = ", ".join(f"{m['rule']} over {m['rate']:,.0f} q/s" for m in fast["meters"])
        print(f"fast drop ({meters}): {fast['sources']} sources dropped by the kernel lately, "
              f"{fast['packets']} queries in all")
    if reply.get("fleet"):
        print(fleet_line(reply["fleet"]))
    print("\n".join(source_table(reply["top"])))
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("status", help="what the running daemon sees and does",
                       description="Ask the running floodd for its uptime, firewall backend, "
                                   "capture rate, kernel drops, ban count and top sources.")
    p.add_argument("--json", action="store_true", help="print the raw JSON reply")
    add_config_option(p)
    p.set_defaults(handler=_status)
