"""Running the external commands floodd needs (``nft``, ``iptables``, ``ip``).

Always an argv list, never a shell, and always with a timeout: a command that hangs is
killed after ``TIMEOUT`` seconds and reported as one line, so it can never stall
floodd's main loop for longer than that.
"""

from __future__ import annotations

import os
import subprocess

from floodd.errors import Failure

# Seconds any one command may take.  The slowest command floodd runs, a transaction or a
# listing of 10,000 nftables bans, takes a quarter of a second.
TIMEOUT = 5.0


class CommandTimeout(Failure):
    """A command did not finish in time and was killed."""


def run(argv: list[str], input: str | None = None,
        timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` (``input`` on its stdin) and return it finished, its output captured
    as text; a one-line Failure if it cannot start, CommandTimeout if it takes longer
    than ``timeout`` (default ``TIMEOUT``)."""
    if timeout is None:
        timeout = TIMEOUT
    name = " ".join([os.path.basename(argv[0]), *argv[1:3]])
    try:
        return subprocess.run(argv, input=input, capture_output=True, text=True,
                              check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        # subprocess.run has killed the process and waited for it by now.
        raise CommandTimeout(f"{name} did not finish within {timeout:g} s "
                             "(killed)") from None
    except OSError as exc:
        raise Failure(f"cannot run {argv[0]}: {exc.strerror or exc}") from None
