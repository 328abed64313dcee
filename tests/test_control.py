"""The control socket: a real server with a handler function, the client, the stale socket a
crashed daemon leaves, a second daemon, and ``floodd status``/``top`` printing replies."""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from floodd import cli
from floodd.service.control import ControlServer, NotRunning, request
from floodd.errors import FlooddError

Handler = Callable[[dict[str, Any]], dict[str, Any]]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[[Handler], str]]:
    """``serve(handler)``: a started ControlServer in tmp_path; its socket path."""
    servers: list[ControlServer] = []

    def start(handler: Handler, name: str = "control.sock") -> str:
        server = ControlServer(str(tmp_path / name), handler)
        server.start()
        servers.append(server)
        return server.path
    yield start
    for server in servers:
        server.close()


def echo(req: dict[str, Any]) -> dict[str, Any]:
    return {"ok": True, "got": req}


def test_request_and_reply(serve: Callable[[Handler], str]) -> None:
    path = serve(echo)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    reply = request(path, "top", n=5, source="198.51.100.7")
    assert reply == {"ok": True, "got": {"cmd": "top", "n": 5, "source": "198.51.100.7"}}


def test_refusals_become_one_line_errors(serve: Callable[[Handler], str]) -> None:
    def handler(req: dict[str, Any]) -> dict[str, Any]:
        if req["cmd"] == "ban":
            raise FlooddError("ban: refusing to ban 127.0.0.1/32: loopback")
        if req["cmd"] == "bans":
            return {"ok": False}
        raise KeyError("bug")
    path = serve(handler)
    with pytest.raises(FlooddError, match=r"^ban: refusing to ban 127\.0\.0\.1/32: loopback$"):
        request(path, "ban")
    with pytest.raises(FlooddError, match="^request refused$"):
        request(path, "bans")
    # A failing handler does not end the server.
    with pytest.raises(FlooddError, match=r"^internal error: KeyError: 'bug'$"):
        request(path, "status")
    with pytest.raises(FlooddError, match="^request refused$"):
        request(path, "bans")


@pytest.mark.parametrize("raw", [b"not json\n", b"[1, 2]\n", b"{\"cmd\": 5}\n", b"\n", b""])
def test_bad_requests(serve: Callable[[Handler], str], raw: bytes) -> None:
    path = serve(echo)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(path)
        sock.sendall(raw)
        sock.shutdown(socket.SHUT_WR)
        assert json.loads(sock.recv(4096)) == {"ok": False, "error": "bad request"}


def test_no_daemon(tmp_path: Path) -> None:
    path = str(tmp_path / "control.sock")
    with pytest.raises(NotRunning, match=rf"^floodd is not running \(no daemon on {path}\)$"):
        request(path, "status")


def test_stale_socket_is_replaced(tmp_path: Path, serve: Callable[[Handler], str]) -> None:
    path = tmp_path / "control.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))  # bound, never listening: what a killed daemon leaves
    with pytest.raises(NotRunning):
        request(str(path), "status")
    serve(echo)
    assert request(str(path), "status")["ok"]


def test_second_server_is_refused_and_leaves_the_first_alone(
        tmp_path: Path, serve: Callable[[Handler], str]) -> None:
    path = serve(echo)
    second = ControlServer(path, echo)
    with pytest.raises(FlooddError,
                       match=rf"^another floodd is already running \(it answers on {path}\)$"):
        second.start()
    second.close()
    assert os.path.exists(path)
    assert request(path, "status")["ok"]


def test_path_that_is_not_a_socket_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    path.write_text("precious")
    with pytest.raises(FlooddError, match="exists and is not a socket; refusing to replace"):
        ControlServer(str(path), echo).start()
    assert path.read_text() == "precious"


def test_directory_is_made_and_socket_removed_on_close(tmp_path: Path) -> None:
    path = tmp_path / "run" / "floodd" / "control.sock"
    server = ControlServer(str(path), echo)
    server.start()
    assert request(str(path), "status")["ok"]
    server.close()
    assert not path.exists()
    with pytest.raises(NotRunning):
        request(str(path), "status")


def test_slow_daemon_times_out(serve: Callable[[Handler], str]) -> None:
    release = threading.Event()

    def stuck(req: dict[str, Any]) -> dict[str, Any]:
        release.wait(10)
        return {"ok": True}
    path = serve(stuck)
    try:
        with pytest.raises(FlooddError, match=r"did not answer on .* within 0\.3 s$"):
            request(path, "status", timeout=0.3)
    finally:
        release.set()


def test_unreadable_reply(tmp_path: Path) -> None:
    path = str(tmp_path / "control.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(1)

        def answer() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(b"<html>\n")
        thread = threading.Thread(target=answer)
        thread.start()
        with pytest.raises(FlooddError, match="^floodd sent an unreadable reply on "):
            request(path, "status")
        thread.join(5)


STATUS = {"ok": True, "version": "0.1.0", "pid": 4242, "uptime": 3725.2,
          "backend": "nftables (firewall.backend)", "dry_run": False, "interfaces": ["eth0"],
          "pps": 1234.4, "packets": 99000, "received": 99100, "kernel_drops": 3, "bans": 2,
          "max_bans": 10000,
          "top": [{"source": "198.51.100.7", "packets": 52000, "rate": 866.7, "banned": True},
                  {"source": "203.0.113.9", "packets": 400, "rate": 6.7, "banned": False}]}


@pytest.fixture
def config_for(tmp_path: Path) -> Callable[[str], str]:
    def write(socket_path: str) -> str:
        cfg = tmp_path / "floodd.yaml"
        cfg.write_text(f"daemon:\n  control_socket: {socket_path}\n")
        return str(cfg)
    return write


def test_status_and_top_print_the_reply(serve: Callable[[Handler], str],
                                        config_for: Callable[[str], str],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    def handler(req: dict[str, Any]) -> dict[str, Any]:
        if req["cmd"] == "top":
            return {"ok": True, "top": STATUS["top"][:req["n"]]}  # type: ignore[index]
        return STATUS
    cfg = config_for(serve(handler))
    assert cli.main(["status", "-c", cfg]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "floodd 0.1.0 running for 3725 s (pid 4242, firewall backend nftables "
        "(firewall.backend))",
        "capture: eth0: 1234 packets/s, 99000 packets, 3 kernel drops",
        "bans: 2 (max 10000)",
        "   packets     per s  source",
        "     52000     866.7  198.51.100.7  (banned)",
        "       400       6.7  203.0.113.9",
    ]
    assert cli.main(["top", "-n", "1", "--json", "-c", cfg]) == 0
    assert json.loads(capsys.readouterr().out) == STATUS["top"][:1]  # type: ignore[index]
    assert cli.main(["status", "--json", "-c", cfg]) == 0
    assert json.loads(capsys.readouterr().out) == STATUS


def test_status_when_nothing_runs_is_one_line(tmp_path: Path,
                                              config_for: Callable[[str], str],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    path = str(tmp_path / "control.sock")
    assert cli.main(["status", "-c", config_for(path)]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err == f"floodd: floodd is not running (no daemon on {path})\n"
