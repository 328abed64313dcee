"""Errors that reach the operator as one line, never a traceback.

Exit status, for every command: 0 done; 1 floodd could not do it (a failure at run
time: the daemon cannot start, a firewall command failed or hung, the daemon is not
running or did not answer, the source to unban is not banned); 2 bad input (a usage
error, a bad argument, a configuration that does not validate, a file that is not a
capture, a request refused as unsafe).
"""


class FlooddError(Exception):
    """A problem the operator can fix in what they asked: bad input or a refused action."""

    exit_status = 2


class Failure(FlooddError):
    """What was asked is fine but could not be done right now (exit status 1)."""

    exit_status = 1


class ConfigError(FlooddError):
    """A configuration file or value that does not validate.

    Rendered as ``config error: FILE: KEY.PATH: what was expected, got X``.
    """

    def __init__(self, source: str, path: str, message: str) -> None:
        self.source = source
        self.path = path
        self.message = message
        where = f"{source}: {path}: " if path else f"{source}: "
        super().__init__(f"config error: {where}{message}")
