"""Errors that reach the operator as one line and exit status 2, never a traceback."""


class FlooddError(Exception):
    """A problem the operator can fix: bad input, missing file, refused action."""

    exit_status = 2


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
