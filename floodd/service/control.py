"""The control socket: a unix stream socket (mode 0600) speaking one JSON line each way.

Request: one JSON object on one line (see floodd.service.requests for what it may
ask).  Reply: ``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``, one line,
with ``"failed": true`` when the request was fine but could not be done (a firewall
failure, floodd busy) rather than refused.
One request per connection.  The CLI's ``status``, ``top``, ``bans``, ``ban`` and
``unban`` use it when the daemon runs.

Whatever a client sends, or fails to send, costs the daemon a bounded amount: at
most ``MAX_CLIENTS`` connections are served at once (more are told so and closed),
each has ``CLIENT_DEADLINE`` seconds to send its line of at most ``MAX_REQUEST``
bytes, and every malformed line gets a one-line error.

Only one floodd runs per socket: ``<socket>.lock`` is locked (``flock``) before the
socket is touched and stays locked for the daemon's life, so two daemons starting
together cannot both remove and bind it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import stat
import threading
import time
from typing import Any, Callable

from floodd.errors import Failure, FlooddError

Handler = Callable[[Any], dict[str, Any]]  # a decoded JSON value -> the reply
MAX_REQUEST = 64 * 1024  # bytes in a request line, newline included
MAX_CLIENTS = 32  # connections served at the same time
CLIENT_DEADLINE = 5.0  # seconds a client has to send its request line


class NotRunning(Failure):
    """No daemon listens on the control socket."""


def request(path: str, cmd: str, timeout: float = 10.0, **args: Any) -> dict[str, Any]:
    """Send one request to the daemon: its reply; NotRunning if none listens, Failure if
    it could not answer or do it, FlooddError if it refused."""
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
        try:
            sock.sendall(_line({"cmd": cmd, **args}))
        except (BrokenPipeError, ConnectionResetError):
            pass  # a daemon that refuses at once (too many clients) has sent why
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            data += chunk
    except socket.timeout:
        raise Failure(f"floodd did not answer on {path} within {timeout:g} s") from None
    except OSError as exc:
        raise Failure(f"control socket {path}: {exc.strerror or exc}") from None
    finally:
        sock.close()
    try:
        reply: dict[str, Any] = json.loads(data)
    except ValueError:
        raise Failure(f"floodd sent an unreadable reply on {path}") from None
    if not reply.get("ok"):
        error = str(reply.get("error", "request refused"))
        raise Failure(error) if reply.get("failed") else FlooddError(error)
    return reply


class ControlServer:
    """Accepts requests in a thread of its own and answers each connection, in a
    thread of its own (at most ``MAX_CLIENTS``), with ``handler``."""

    def __init__(self, path: str, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self._sock: socket.socket | None = None
        self._lock_fd: int | None = None
        self._thread: threading.Thread | None = None
        self._closing = False
        self._slots = threading.BoundedSemaphore(MAX_CLIENTS)

    def start(self) -> None:
        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, mode=0o755, exist_ok=True)
        self._take_lock()
        try:
            self._remove_stale()
            self._bind()
        except BaseException:
            self._release_lock()
            raise
        self._thread = threading.Thread(target=self._serve, name="floodd-control", daemon=True)
        self._thread.start()

    def _take_lock(self) -> None:
        lock_path = self.path + ".lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise FlooddError(f"cannot open the lock file {lock_path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FlooddError(f"another floodd is already running (it holds {lock_path})"
                              ) from None
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # the lock file stays: unlinking it would race a starter
            self._lock_fd = None

    def _bind(self) -> None:
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
        sock.listen(64)
        sock.settimeout(0.5)
        self._sock = sock

    def _remove_stale(self) -> None:
        """Remove a socket left by a floodd that died (we hold the lock: none runs)."""
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise FlooddError(f"{self.path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(self.path)
        except OSError as exc:
            if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
                os.unlink(self.path)
                return
            raise FlooddError(f"control socket {self.path}: {exc.strerror or exc}") from None
        finally:
            probe.close()
        # Something answers without holding the lock: a floodd of another version.
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
            if not self._slots.acquire(blocking=False):
                self._refuse(conn)
                continue
            try:
                threading.Thread(target=self._client, args=(conn,), name="floodd-control-client",
                                 daemon=True).start()
            except RuntimeError:  # no thread to be had: refuse rather than stop serving
                self._slots.release()
                self._refuse(conn)

    @staticmethod
    def _refuse(conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(0.5)
                conn.sendall(_line({"ok": False, "error": f"floodd is busy ({MAX_CLIENTS} "
                                                          "clients connected); try again",
                                    "failed": True}))
            except OSError:
                pass

    def _client(self, conn: socket.socket) -> None:
        try:
            with conn:
                self._answer(conn)
        finally:
            self._slots.release()

    def _answer(self, conn: socket.socket) -> None:
        try:
            data, problem = _read_line(conn, time.monotonic() + CLIENT_DEADLINE)
            reply = self._reply(data) if problem is None else {"ok": False, "error": problem}
            conn.settimeout(CLIENT_DEADLINE)
            conn.sendall(_line(reply))
        except OSError:
            pass  # the client went away

    def _reply(self, data: bytes) -> dict[str, Any]:
        if not data.strip():
            return {"ok": False, "error": "bad request: empty"}
        try:
            body = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError:
            return {"ok": False, "error": "bad request: not UTF-8"}
        except ValueError:
            return {"ok": False, "error": "bad request: not JSON"}
        try:
            return self.handler(body)
        except FlooddError as exc:
            return refusal(exc)
        except Exception as exc:  # a failed request must not end the control thread
            return {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}",
                    "failed": True}

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
        self._release_lock()


def refusal(exc: FlooddError) -> dict[str, Any]:
    """The reply for a request that was not done: ``failed`` marks a failure at run time
    (the client exits 1), its absence a refused request (exit 2)."""
    reply: dict[str, Any] = {"ok": False, "error": str(exc)}
    if isinstance(exc, Failure):
        reply["failed"] = True
    return reply


def _read_line(conn: socket.socket, deadline: float) -> tuple[bytes, str | None]:
    """The request line (without its newline; a last line may end the stream instead)
    and None, or what went wrong, as the error to reply."""
    data = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return data, f"bad request: no complete line within {CLIENT_DEADLINE:g} s"
        conn.settimeout(left)
        try:
            chunk = conn.recv(MAX_REQUEST + 1 - len(data))
        except socket.timeout:
            continue
        if not chunk:
            return data, None if data.strip() else "bad request: empty"
        data += chunk
        end = data.find(b"\n")
        if end >= 0:
            return data[:end], None
        if len(data) > MAX_REQUEST:
            return data, f"bad request: longer than {MAX_REQUEST} bytes"


def _line(reply: dict[str, Any]) -> bytes:
    return json.dumps(reply).encode() + b"\n"
