"""A firewall command that fails or hangs on purpose, for the failure tests.

:class:`FaultyCommand` writes ``DIR/NAME``, a wrapper of the real ``NAME`` (e.g. ``nft``):
put ``DIR`` first on ``PATH`` and floodd runs the wrapper, which execs the real command
unless a flag file tells it to fail (exit 1, an nft-style ``Error:`` line) or to hang (sleep
until it is killed).  A fault can be limited to calls with a given argument (``-f``: nft's
changes, not its listings).  Every call is recorded, one line of arguments each.
"""

from __future__ import annotations

import shutil
from pathlib import Path

_SCRIPT = """#!/bin/sh
# A test wrapper of {real}: fails or hangs while a flag file in {dir} says so.
echo "$*" >> "{dir}/calls"
on() {{
    [ -e "{dir}/$1" ] || return 1
    want=$(cat "{dir}/$1")
    shift
    [ -z "$want" ] && return 0
    for arg in "$@"; do [ "$arg" = "$want" ] && return 0; done
    return 1
}}
if on fail "$@"; then echo "Error: failing on purpose (floodd test)" >&2; exit 1; fi
if on hang "$@"; then exec sleep 600; fi
exec "{real}" "$@"
"""


class FaultyCommand:
    """``directory/name`` wrapping the real ``name`` found on PATH now."""

    def __init__(self, directory: Path, name: str) -> None:
        real = shutil.which(name)
        assert real is not None, f"{name} is not installed"
        directory.mkdir(parents=True, exist_ok=True)
        self.dir = directory
        self.real = real
        self.path = directory / name
        self.path.write_text(_SCRIPT.format(real=real, dir=directory))
        self.path.chmod(0o755)

    def fail(self, only: str = "") -> None:
        """From now on, fail (every call, or those with the argument ``only``)."""
        (self.dir / "fail").write_text(only)

    def hang(self, only: str = "") -> None:
        """From now on, hang until killed (every call, or those with ``only``)."""
        (self.dir / "hang").write_text(only)

    def heal(self) -> None:
        """Run the real command again."""
        for flag in ("fail", "hang"):
            (self.dir / flag).unlink(missing_ok=True)

    def calls(self) -> list[str]:
        """The arguments of every call so far."""
        log = self.dir / "calls"
        return log.read_text().splitlines() if log.exists() else []
