"""``floodd status`` and ``floodd top``: what the running daemon sees, over its control socket."""

from __future__ import annotations

import argparse
import json
from typing import Any

from floodd.cli.common import add_config_option, config_from_args
from floodd.errors import FlooddError
from floodd.service.control import request


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
    _print_top(reply["top"])
    return 0


def _print_top(top: list[dict[str, Any]]) -> None:
    if not top:
        print("no traffic in the window")
        return
    print(f"{'packets':>10} {'per s':>9}  source")
    for row in top:
        banned = "  (banned)" if row.get("banned") else ""
        print(f"{row['packets']:>10} {row['rate']:>9.1f}  {row['source']}{banned}")


def _top(args: argparse.Namespace) -> int:
    if args.n < 1:
        raise FlooddError(f"top: -n: expected a positive number, got {args.n}")
    reply = request(_socket_path(args), "top", n=args.n)
    if args.json:
        print(json.dumps(reply["top"], indent=1))
    else:
        _print_top(reply["top"])
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("status", help="what the running daemon sees and does",
                       description="Ask the running floodd for its uptime, firewall backend, "
                                   "capture rate, kernel drops, ban count and top sources.")
    p.add_argument("--json", action="store_true", help="print the raw JSON reply")
    add_config_option(p)
    p.set_defaults(handler=_status)
    p = sub.add_parser("top", help="the busiest sources right now",
                       description="The sources sending the most queries in the rate "
                                   "table's window, from the running floodd.")
    p.add_argument("-n", type=int, default=20, metavar="N", help="how many (default 20)")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_config_option(p)
    p.set_defaults(handler=_top)
