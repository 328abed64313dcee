"""What floodd did and why: journald entries with fields, or plain stderr lines.

With journald (its socket exists and systemd-python is installed) every event is
one structured entry: a sentence a person can read in MESSAGE plus fields such
as FLOODD_ACTION (start, stop, ban, unban, expire, warn, repair, reload, refuse,
capture, summary), FLOODD_SOURCE, FLOODD_RULE, FLOODD_RATE and FLOODD_PACKETS, so
that ``journalctl -u floodd FLOODD_ACTION=ban`` finds every ban.  Without it, or
when journald does not answer, the same sentences go to stderr.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

try:
    from systemd import journal as _journal  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - depends on the host
    _journal = None

JOURNAL_SOCKET = "/run/systemd/journal/socket"

# syslog priorities, as journald uses them.
ERROR, WARNING, NOTICE, INFO, DEBUG = 3, 4, 5, 6, 7
LEVELS = {"error": ERROR, "warning": WARNING, "info": INFO, "debug": DEBUG}
_NAMES = {ERROR: "error", WARNING: "warning", NOTICE: "notice", INFO: "info", DEBUG: "debug"}


class EventLog:
    def __init__(self, level: str = "info", journal: bool | None = None,
                 stream: TextIO | None = None) -> None:
        self.max_priority = LEVELS[level]
        if journal is None:
            journal = _journal is not None and os.path.exists(JOURNAL_SOCKET)
        self.journal = journal and _journal is not None
        # Under systemd stderr already goes to the journal: write it only when
        # there is no journal, or when a person is watching a terminal.
        self.stream = stream if stream is not None else (
            sys.stderr if not self.journal or sys.stderr.isatty() else None)

    def set_level(self, level: str) -> None:
        self.max_priority = LEVELS[level]

    def event(self, priority: int, message: str, action: str | None = None,
              **fields: Any) -> None:
        """Log ``message``; ``fields`` become FLOODD_<NAME> journal fields."""
        if priority > self.max_priority:
            return
        stream = self.stream
        if self.journal and _journal is not None:
            extra = {f"FLOODD_{k.upper()}": str(v) for k, v in fields.items() if v is not None}
            if action:
                extra["FLOODD_ACTION"] = action
            try:
                _journal.send(message, PRIORITY=str(priority), SYSLOG_IDENTIFIER="floodd",
                              **extra)
            except OSError:  # journald is not answering (restarting, gone): keep the event
                stream = stream or sys.stderr
        if stream is not None:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            stream.write(f"{stamp} floodd[{os.getpid()}] {_NAMES[priority]}: {message}\n")
            stream.flush()

    def info(self, message: str, action: str | None = None, **fields: Any) -> None:
        self.event(INFO, message, action, **fields)

    def notice(self, message: str, action: str | None = None, **fields: Any) -> None:
        self.event(NOTICE, message, action, **fields)

    def warning(self, message: str, action: str | None = None, **fields: Any) -> None:
        self.event(WARNING, message, action, **fields)

    def error(self, message: str, action: str | None = None, **fields: Any) -> None:
        self.event(ERROR, message, action, **fields)

    def debug(self, message: str, action: str | None = None, **fields: Any) -> None:
        self.event(DEBUG, message, action, **fields)
