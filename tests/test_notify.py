"""The notify protocol's datagrams, received on a socket bound the way systemd binds it."""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path
from typing import Iterator

import pytest

from floodd.service.notify import Notifier


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A unix datagram socket as systemd's NOTIFY_SOCKET, asking for sender credentials."""
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sock.settimeout(2)
    yield sock, path
    sock.close()


def receive(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def test_messages_are_key_value_lines(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    notifier = Notifier({"NOTIFY_SOCKET": path})
    notifier.ready("0 packets/s, 0 kernel drops, 0 bans")
    assert receive(sock) == "READY=1\nSTATUS=0 packets/s, 0 kernel drops, 0 bans"
    notifier.status("12 packets/s, 0 kernel drops, 1 bans")
    assert receive(sock) == "STATUS=12 packets/s, 0 kernel drops, 1 bans"
    notifier.watchdog()
    assert receive(sock) == "WATCHDOG=1"
    notifier.stopping()
    assert receive(sock) == "STOPPING=1"


def test_reloading_carries_the_monotonic_clock(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    Notifier({"NOTIFY_SOCKET": path}).reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines = receive(sock).split("\n")
    assert lines[0] == "RELOADING=1"
    key, value = lines[1].split("=")
    assert key == "MONOTONIC_USEC" and before <= int(value) <= after


def test_sender_credentials_name_this_process(listener: tuple[socket.socket, str]) -> None:
    """systemd (NotifyAccess=main) accepts a message only from the main pid, which it reads
    from the SCM_CREDENTIALS the kernel attaches."""
    sock, path = listener
    Notifier({"NOTIFY_SOCKET": path}).watchdog()
    data, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(12))
    assert data == b"WATCHDOG=1"
    creds = [d for level, kind, d in ancillary
             if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS]
    pid, uid, gid = struct.unpack("iII", creds[0])
    assert (pid, uid, gid) == (os.getpid(), os.getuid(), os.getgid())


def test_abstract_socket() -> None:
    name = f"floodd-test-notify-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        Notifier({"NOTIFY_SOCKET": "@" + name}).ready("up")
        assert receive(sock) == "READY=1\nSTATUS=up"


def test_without_a_socket_nothing_is_sent_and_nothing_fails(tmp_path: Path) -> None:
    for environ in ({}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": str(tmp_path / "gone")}):
        notifier = Notifier(environ)
        notifier.ready("x")
        notifier.watchdog()
        notifier.stopping()


@pytest.mark.parametrize("usec, pid, interval", [
    ("30000000", None, 30.0),
    ("1000000", "self", 1.0),
    ("1000000", "1", None),  # the watchdog is meant for another process
    ("soon", None, None),
    (None, None, None),
])
def test_watchdog_interval(usec: str | None, pid: str | None, interval: float | None) -> None:
    environ = {"NOTIFY_SOCKET": "/nonexistent"}
    if usec is not None:
        environ["WATCHDOG_USEC"] = usec
    if pid is not None:
        environ["WATCHDOG_PID"] = str(os.getpid()) if pid == "self" else pid
    assert Notifier(environ).watchdog_interval == interval
