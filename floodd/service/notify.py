"""systemd's notify protocol: READY, STATUS, WATCHDOG, RELOADING, STOPPING.

The protocol is one datagram of ``KEY=VALUE`` lines to the unix socket named by
``$NOTIFY_SOCKET`` (a leading ``@`` means the abstract namespace); systemd learns the
sender's pid from the socket credentials.  The socket is the one named in the
environment the Notifier is given.  Without ``$NOTIFY_SOCKET`` (not started by
systemd) nothing is sent.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Callable, Mapping


def _datagram(path: str) -> Callable[[str], None]:
    address = "\0" + path[1:] if path.startswith("@") else path

    def send(message: str) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    return send


class Notifier:
    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        path = environ.get("NOTIFY_SOCKET", "")
        self._send: Callable[[str], None] | None = _datagram(path) if path else None
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        watchdog_on = usec.isdigit() and (not pid or pid == str(os.getpid()))
        # Seconds between watchdog pings systemd expects, or None when it wants none.
        self.watchdog_interval: float | None = int(usec) / 1e6 if watchdog_on else None

    def send(self, **fields: str) -> None:
        if self._send is None:
            return
        message = "\n".join(f"{key}={value}" for key, value in fields.items())
        try:
            self._send(message)
        except OSError:
            pass  # systemd went away; nothing useful to do about it

    def ready(self, status: str) -> None:
        self.send(READY="1", STATUS=status)

    def status(self, status: str) -> None:
        self.send(STATUS=status)

    def watchdog(self) -> None:
        self.send(WATCHDOG="1")

    def reloading(self) -> None:
        self.send(RELOADING="1", MONOTONIC_USEC=str(time.monotonic_ns() // 1000))

    def stopping(self) -> None:
        self.send(STOPPING="1")
