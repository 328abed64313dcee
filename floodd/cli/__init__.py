"""Command line: ``floodd COMMAND [options]``.

Each command group lives in a module of its own, which exposes
``register(subparsers)``; the parser it adds sets ``handler`` to a function
``(args) -> exit status``.  Every error ends as one ``floodd: ...`` line on
stderr and the exit status of its kind (see floodd.errors: 1 could not be done, 2 bad
input).
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from floodd import __version__
from floodd.cli import analyze, bans, check_config, exabgp, run, status, top
from floodd.cli.common import Parser
from floodd.errors import FlooddError

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="floodd",
                    description="Auto-ban daemon that protects DNS servers from packet floods.",
                    epilog="exit status: 0 done; 1 floodd could not do it (the daemon cannot "
                           "start, a firewall command failed, the daemon is not running or "
                           "did not answer, the source is not banned); 2 bad input (usage, "
                           "argument, configuration, capture file, a refused request). "
                           "'floodd COMMAND --help' tells more of each command.")
    parser.add_argument("--version", action="version", version=f"floodd {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=Parser)
    for module in (check_config, run, analyze, status, top, bans, exabgp):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        handler: Handler | None = getattr(args, "handler", None)
        if handler is None:
            parser.print_help(sys.stderr)
            return 2
        return handler(args)
    except FlooddError as exc:
        print(f"floodd: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print("floodd: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
