"""The control socket: a unix stream socket (mode 0600) speaking one JSON line each way.

Request: ``{"cmd": "status"}`` (or ``top``, ``bans``, ``ban``, ``unban`` with
their arguments).  Reply: ``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``.
One request per connection.  The CLI's ``status``, ``top``, ``bans``, ``ban`` and
``unban`` use it when the daemon runs.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import threading
from typing import Any, Callable

from floodd.errors import FlooddError

Handler = Callable[[dict[str, Any]], dict[str, Any]]
MAX_REQUEST = 64 * 1024


class NotRunning(FlooddError):
    """No daemon listens on the control socket."""


def request(path: str, cmd: str, timeout: float = 10.0, **args: Any) -> dict[str, Any]:
    """Send one request to the daemon; NotRunning if none listens, FlooddError on refusal."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise NotRunning(f"floodd is not running (no daemon on {path})") from None
        except PermissionError:
            raise FlooddError(f"cannot open the control socket {path}: permission denied "
                              "(it is root's only)") from None
        sock.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            data += chunk
    except socket.timeout:
        raise FlooddError(f"floodd did not answer on {path} within {timeout:g} s") from None
    except OSError as exc:
        raise FlooddError(f"control socket {path}: {exc.strerror or exc}") from None
    finally:
        sock.close()
    try:
        reply: dict[str, Any] = json.loads(data)
    except ValueError:
        raise FlooddError(f"floodd sent an unreadable reply on {path}") from None
    if not reply.get("ok"):
        raise FlooddError(str(reply.get("error", "request refused")))
    return reply


class ControlServer:
    """Accepts requests in a thread of its own and answers them with ``handler``."""

    def __init__(self, path: str, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._closing = False

    def start(self) -> None:
        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, mode=0o755, exist_ok=True)
        self._remove_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o177)  # the socket is created 0600: root only
        try:
            sock.bind(self.path)
        except OSError as exc:
            sock.close()
            raise FlooddError(f"cannot create the control socket {self.path}: "
                              f"{exc.strerror}") from None
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
        sock.listen(16)
        sock.settimeout(0.5)
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name="floodd-control", daemon=True)
        self._thread.start()

    def _remove_stale(self) -> None:
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise FlooddError(f"{self.path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(self.path)
        except OSError as exc:
            if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
                os.unlink(self.path)  # left behind by a floodd that died
                return
            raise FlooddError(f"control socket {self.path}: {exc.strerror}") from None
        finally:
            probe.close()
        raise FlooddError(f"another floodd is already running (it answers on {self.path})")

    def _serve(self) -> None:
        assert self._sock is not None
        while not self._closing:
            try:
                conn, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                break
            with conn:
                self._answer(conn)

    def _answer(self, conn: socket.socket) -> None:
        conn.settimeout(5.0)
        try:
            data = b""
            while not data.endswith(b"\n") and len(data) < MAX_REQUEST:
                chunk = conn.recv(1 << 16)
                if not chunk:
                    break
                data += chunk
            try:
                req = json.loads(data)
                if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
                    raise ValueError
            except ValueError:
                reply: dict[str, Any] = {"ok": False, "error": "bad request"}
            else:
                try:
                    reply = self.handler(req)
                except FlooddError as exc:
                    reply = {"ok": False, "error": str(exc)}
                except Exception as exc:  # a failed request must not end the control thread
                    reply = {"ok": False,
                             "error": f"internal error: {type(exc).__name__}: {exc}"}
            conn.sendall(json.dumps(reply).encode() + b"\n")
        except OSError:
            pass  # the client went away

    def close(self) -> None:
        if self._sock is None:
            return  # never bound: the path may be another daemon's socket
        self._closing = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() waiting in _serve
        except OSError:
            pass
        self._sock.close()
        if self._thread is not None:
            self._thread.join(timeout=2)
        try:
            os.unlink(self.path)
        except OSError:
            pass

