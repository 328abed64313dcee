"""The control socket: a real server with a handler function, the client, the stale socket a
crashed daemon leaves, a second daemon, and ``floodd status``/``top`` printing replies."""

from __future__ import annotations

import json
import os
import random
import socket
import stat
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from floodd import cli
from floodd.service.control import (CLIENT_DEADLINE, MAX_CLIENTS, MAX_REQUEST, ControlServer,
                                    NotRunning, request)
from floodd.errors import Failure, FlooddError

from daemon_helpers import wait_until

Handler = Callable[[Any], dict[str, Any]]


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


def echo(req: Any) -> dict[str, Any]:
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


def exchange(path: str, raw: bytes, shut: bool = True) -> dict[str, Any]:
    """Send ``raw`` as it is and read the one-line reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(raw)
        if shut:
            sock.shutdown(socket.SHUT_WR)
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(4096)
            assert chunk, f"no reply to {raw[:40]!r}"
            data += chunk
    reply: dict[str, Any] = json.loads(data)
    return reply


@pytest.mark.parametrize("raw, error", [
    (b"not json\n", "bad request: not JSON"),
    (b"{\"cmd\": \"status\"\n", "bad request: not JSON"),
    (b"\xff\xfe{}\n", "bad request: not UTF-8"),
    (b"\n", "bad request: empty"),
    (b"", "bad request: empty"),
    (b"{" + b" " * MAX_REQUEST + b"}\n", f"bad request: longer than {MAX_REQUEST} bytes"),
])
def test_bad_lines(serve: Callable[[Handler], str], raw: bytes, error: str) -> None:
    path = serve(echo)
    assert exchange(path, raw) == {"ok": False, "error": error}
    assert request(path, "status")["ok"]


def test_any_json_value_reaches_the_handler(serve: Callable[[Handler], str]) -> None:
    path = serve(echo)
    assert exchange(path, b"[1, 2]\n") == {"ok": True, "got": [1, 2]}
    assert exchange(path, b"{\"cmd\": 5}") == {"ok": True, "got": {"cmd": 5}}


def test_a_slow_client_is_cut_off_and_blocks_no_one(serve: Callable[[Handler], str]) -> None:
    path = serve(echo)
    slow = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(3)]
    try:
        for sock in slow:
            sock.settimeout(CLIENT_DEADLINE + 5)
            sock.connect(path)
            sock.sendall(b"{\"cmd\": ")  # half a line, then silence
        started = time.monotonic()
        assert request(path, "status", timeout=2)["ok"]  # others are served meanwhile
        assert time.monotonic() - started < 2
        for sock in slow:
            reply = json.loads(sock.recv(4096))
            assert reply == {"ok": False, "error": "bad request: no complete line within "
                                                   f"{CLIENT_DEADLINE:g} s"}
    finally:
        for sock in slow:
            sock.close()


def test_more_clients_than_the_cap_are_told_to_try_again(
        serve: Callable[[Handler], str]) -> None:
    path = serve(echo)
    held = []
    try:
        for _ in range(MAX_CLIENTS):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(path)
            held.append(sock)
        time.sleep(0.3)  # let the server take them all up
        busy = rf"^floodd is busy \({MAX_CLIENTS} clients connected\); try again$"
        with pytest.raises(FlooddError, match=busy):
            request(path, "status", timeout=2)
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 5
    while True:  # the slots come back once the held clients are gone
        try:
            assert request(path, "status", timeout=2)["ok"]
            break
        except FlooddError:
            assert time.monotonic() < deadline
            time.sleep(0.1)


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
                       match=rf"^another floodd is already running \(it holds {path}\.lock\)$"):
        second.start()
    second.close()
    assert os.path.exists(path)
    assert request(path, "status")["ok"]


def test_servers_started_together_one_wins(tmp_path: Path) -> None:
    """The lock makes the start race-free: of many started at once, exactly one serves."""
    path = str(tmp_path / "control.sock")
    servers = [ControlServer(path, echo) for _ in range(8)]
    results: list[str] = []
    gate = threading.Barrier(len(servers))

    def start(server: ControlServer) -> None:
        gate.wait()
        try:
            server.start()
            results.append("started")
        except FlooddError as exc:
            results.append(str(exc))
    threads = [threading.Thread(target=start, args=(s,)) for s in servers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert results.count("started") == 1
        assert all(r.startswith("another floodd is already running") for r in results
                   if r != "started")
        assert request(path, "status")["ok"]
    finally:
        for server in servers:
            server.close()


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
    assert cli.main(["status", "-c", config_for(path)]) == 1  # could not be done, not bad input
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err == f"floodd: floodd is not running (no daemon on {path})\n"


# --- a real daemon's socket, fuzzed -------------------------------------------------------
def _junk(rng: random.Random, depth: int = 0) -> Any:
    """A random JSON value, small."""
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 1, 2 ** 64, 10 ** 400, rng.randrange(-10 ** 6, 10 ** 6)])
    if kind == 3:
        return rng.choice([0.5, -0.0, 1e308, float("inf"), float("nan"), rng.random()])
    if kind == 4:
        return rng.choice(["", "ban", "198.51.100.7/24", "x" * rng.randrange(200), "\u2028",
                           "192.0.2.53", "1h", "\x00", "\ud800"])
    if kind == 5:
        return [_junk(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(["cmd", "source", "seconds", "n", "all", "force", "reason", "z"]):
            _junk(rng, depth + 1) for _ in range(rng.randrange(5))}


def _fuzz_line(rng: random.Random) -> bytes:
    """A request line that must change nothing: junk JSON, a ban or unban with one bad
    field, bytes that are not JSON or not UTF-8, or a line too long."""
    kind = rng.randrange(6)
    if kind == 0:
        body = _junk(rng)
    elif kind == 1:  # well-formed but for one field
        body = rng.choice([
            {"cmd": "ban", "source": "198.51.100.7", "seconds": _junk(rng) or "x"},
            {"cmd": "ban", "source": "198.51.100.7", "seconds": 60, "force": "yes"},
            {"cmd": "ban", "source": "198.51.100.7/24"},
            {"cmd": "ban", "source": _junk(rng), "seconds": float("nan")},
            {"cmd": "unban", "source": "198.51.100.7", "all": True},
            {"cmd": "unban", "all": rng.choice([1, "true", None, [], {}])},
            {"cmd": "ban", "source": "198.51.100.7", "reason": "a\nb"},
            {"cmd": "top", "n": _junk(rng) or 0},
            {"cmd": _junk(rng) or 5},
        ])
    elif kind == 2:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))) + b"\n"
    elif kind == 3:
        return b"\xff" + json.dumps({"cmd": "status"}).encode() + b"\n"
    elif kind == 4:
        return b"[" + b"1," * rng.randrange(MAX_REQUEST // 2, MAX_REQUEST) + b"1]\n"
    else:
        return b'{"cmd": "ban", "source": "198.51.100.7", "seconds": ' + b"9" * 500 + b"}\n"
    return json.dumps(body, allow_nan=True).encode() + b"\n"


def test_fuzzed_control_socket_changes_nothing(dns_lab: Any, tmp_path: Path) -> None:
    """Random JSON, wrong types, huge lines, bytes, slow clients, many clients at once and
    clients that hang up: every reply is one line saying no, the daemon still answers
    ``status``, and the firewall is as it was."""
    from daemon_helpers import Floodd, daemon_config, nft_table, write_config

    cfg = write_config(tmp_path / "floodd.yaml", daemon_config(tmp_path))
    daemon = Floodd(dns_lab, cfg).start()
    try:
        daemon.wait_ready()
        before = nft_table(dns_lab)
        assert before is not None
        rng = random.Random(8)
        lines = [_fuzz_line(rng) for _ in range(400)]
        errors: list[str] = []
        slow: list[socket.socket] = []
        for _ in range(MAX_CLIENTS // 2):  # half a line each, then silence, during the fuzz
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(daemon.control_socket)
            sock.sendall(b'{"cmd": "ban", "source": ')
            slow.append(sock)

        def client(part: list[bytes]) -> None:
            for i, raw in enumerate(part):
                try:
                    if i % 7 == 3:  # hang up halfway through
                        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                            sock.connect(daemon.control_socket)
                            sock.sendall(raw[:len(raw) // 2])
                        continue
                    reply = exchange(daemon.control_socket, raw)
                except OSError as exc:  # the daemon may cut off a huge line mid-send
                    if len(raw) <= MAX_REQUEST:
                        errors.append(f"{raw[:60]!r}: {exc}")
                    continue
                except (AssertionError, ValueError) as exc:
                    if "busy" not in str(exc):
                        errors.append(f"{raw[:60]!r}: {exc}")
                    continue
                if reply.get("ok") is True:  # a read-only request can come out valid
                    if reply.get("banned") or reply.get("unbanned"):
                        errors.append(f"{raw[:60]!r} changed the bans: {reply}")
                elif not isinstance(reply.get("error"), str) or "\n" in reply["error"] \
                        or "internal error" in reply["error"]:
                    errors.append(f"{raw[:60]!r} -> {reply}")
        threads = [threading.Thread(target=client, args=(lines[k::6],)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads)
        for sock in slow:
            sock.close()
        assert errors == []
        assert daemon.running()
        status = daemon.request("status")
        assert status["ok"] and status["bans"] == 0
        assert daemon.request("bans")["bans"] == []
        assert nft_table(dns_lab) == before
    finally:
        daemon.close()


def test_a_change_given_up_as_busy_is_never_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """The client hears "busy, nothing was done" and nothing is done later; a request the
    main loop takes up in time is answered."""
    import io

    from floodd.config import default_config
    from floodd.service import daemon as daemon_module
    from floodd.service.journal import EventLog

    monkeypatch.setattr(daemon_module, "REQUEST_TIMEOUT", 0.2)
    daemon = daemon_module.Daemon(default_config(), None,
                                  EventLog("info", journal=False, stream=io.StringIO()))
    ran: list[object] = []

    def change(req: object) -> dict[str, Any]:
        ran.append(req)
        return {"ok": True, "banned": "198.51.100.7/32"}
    monkeypatch.setattr(daemon, "_change", change)
    ban = {"cmd": "ban", "source": "198.51.100.7"}
    assert daemon._handle_request(ban) == {
        "ok": False, "error": "floodd is busy (no answer within 0.2 s); nothing was done, "
                              "try again", "failed": True}
    daemon._serve_requests()  # the main loop comes round too late
    assert ran == []

    replies: list[dict[str, Any]] = []
    client = threading.Thread(target=lambda: replies.append(daemon._handle_request(ban)))
    client.start()
    wait_until(lambda: not daemon.requests.empty(), 2)
    daemon._serve_requests()
    client.join(timeout=2)
    assert replies == [{"ok": True, "banned": "198.51.100.7/32"}] and len(ran) == 1


def test_exit_status_convention(tmp_path: Path, config_for: Callable[[str], str],
                                capsys: pytest.CaptureFixture[str],
                                serve: Callable[[Handler], str]) -> None:
    """0 done, 1 could not be done, 2 bad input: the same for every command."""
    cfg = config_for(str(tmp_path / "none.sock"))
    assert cli.main(["top", "-n", "0", "-c", cfg]) == 2  # a bad argument
    assert cli.main(["status", "--bogus"]) == 2  # a usage error
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules: 5\n")
    assert cli.main(["check-config", "-c", str(bad)]) == 2  # a configuration that fails
    assert cli.main(["status", "-c", cfg]) == 1  # nothing runs
    assert "exit status" in cli.build_parser().format_help()

    def handler(req: Any) -> dict[str, Any]:
        if req["cmd"] == "top":
            raise FlooddError("top: refused")
        raise Failure("nft did not finish within 5 s (killed)")
    path = serve(handler)
    with pytest.raises(Failure, match=r"^nft did not finish"):
        request(path, "bans")
    with pytest.raises(FlooddError, match="^top: refused$") as refused:
        request(path, "top")
    assert refused.value.exit_status == 2
    capsys.readouterr()
