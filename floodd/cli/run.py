"""``floodd run``: the daemon in the foreground, as systemd starts it."""

from __future__ import annotations

import argparse
from typing import Any

from floodd.cli.common import add_config_option
from floodd.config import load_config
from floodd.service.daemon import Daemon
from floodd.service.journal import EventLog


def _run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    log = EventLog(config.daemon.log_level)
    interfaces = tuple(args.interface) if args.interface else None
    daemon = Daemon(config, args.config, log, interfaces=interfaces,
                    dry_run=args.dry_run or config.firewall.dry_run)
    return daemon.run()


def register(sub: Any) -> None:
    p = sub.add_parser(
        "run", help="run the daemon in the foreground (as systemd does)",
        description="Capture DNS queries, ban sources that cross the configured rules, "
                    "expire stale bans. Runs in the foreground; SIGHUP reloads the "
                    "configuration, SIGTERM stops (bans are kept unless on_exit: flush).")
    add_config_option(p)
    p.add_argument("-i", "--interface", action="append", metavar="IFACE",
                   help="capture on this interface instead of the configured ones "
                        "(repeat for several)")
    p.add_argument("--dry-run", action="store_true",
                   help="do everything but change the firewall (log what would be done)")
    p.set_defaults(handler=_run)
