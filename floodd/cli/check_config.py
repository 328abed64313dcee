"""``floodd check-config``: validate the configuration, print what takes effect."""

from __future__ import annotations

import argparse
from typing import Any

from floodd.cli.common import add_config_option, config_from_args
from floodd.config import summary


def _check_config(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    print("\n".join(summary(config)))
    print("configuration OK")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("check-config", help="validate the configuration and print a summary",
                       description="Validate the configuration file and print the effective "
                                   "settings. Never touches the firewall.")
    add_config_option(p)
    p.set_defaults(handler=_check_config)
