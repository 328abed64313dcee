"""What every command shares: the parser class and the configuration option."""

from __future__ import annotations

import argparse

from floodd.config import DEFAULT_PATH, Config, load_config
from floodd.errors import FlooddError


class Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one ``floodd: ...`` line, exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        # main() prints "floodd: " before every error; a subcommand adds its own name.
        command = self.prog.removeprefix("floodd").strip()
        raise FlooddError(f"{command + ': ' if command else ''}{message} "
                          f"(see '{self.prog} --help')")


def add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", metavar="FILE", default=None,
                        help=f"configuration file (default: {DEFAULT_PATH}; "
                             "built-in defaults if it does not exist)")


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.config)
