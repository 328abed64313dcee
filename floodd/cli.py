"""Command line: ``floodd COMMAND [options]``.

Each command lives in its own module, which exposes ``register(subparsers)``; the
parser it adds sets ``handler`` to a function ``(args) -> exit status``.  Every
operator error ends as one ``floodd: ...`` line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from floodd import __version__
from floodd.config import DEFAULT_PATH, Config, load_config, summary
from floodd.errors import FlooddError

Handler = Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
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


def _check_config(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    print("\n".join(summary(config)))
    print("configuration OK")
    return 0


def _register_check_config(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser("check-config", help="validate the configuration and print a summary",
                       description="Validate the configuration file and print the effective "
                                   "settings. Never touches the firewall.")
    add_config_option(p)
    p.set_defaults(handler=_check_config)


def build_parser() -> argparse.ArgumentParser:
    from floodd import analyze, banctl, control, daemon

    parser = _Parser(prog="floodd",
                     description="Auto-ban daemon that protects DNS servers from packet floods.")
    parser.add_argument("--version", action="version", version=f"floodd {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=_Parser)
    _register_check_config(sub)
    for module in (daemon, analyze, control, banctl):
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
