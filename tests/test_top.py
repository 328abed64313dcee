"""``floodd top`` and ``floodd top --watch``: the drawing from plain replies, the command
line, and the view on a real terminal (tmux) and on a pipe, against a real daemon."""

from __future__ import annotations

import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from floodd import __version__, cli
from floodd.cli.top import (Reading, cut, drop_rate, header_lines, newest_bans, qtype_mix,
                            render, rule_line, source_table)

from daemon_helpers import FLOODD, Floodd, daemon_config, wait_until, write_config

NOW = 1_700_000_000.0
STATUS: dict[str, Any] = {
    "ok": True, "version": "0.1.0", "pid": 4242, "uptime": 3725.2,
    "backend": "nftables (firewall.backend)", "dry_run": False, "interfaces": ["eth0"],
    "pps": 1234.4, "packets": 99000, "received": 99100, "kernel_drops": 30, "bans": 3,
    "max_bans": 10000, "sampling": 1, "excluded": 0}
TOP = [{"source": "198.51.100.7", "packets": 52000, "rate": 866.7, "banned": True,
        "qtypes": {"A": 41600, "ANY": 10400}},
       {"source": "203.0.113.9", "packets": 400, "rate": 6.7, "banned": False}]
WHOLE: dict[str, Any] = {"protocols": "all", "qtype": None, "except_hops": [],
                         "text": "whole source"}
ANY_ONLY: dict[str, Any] = {"protocols": "udp", "qtype": "ANY", "except_hops": [],
                            "text": "UDP, ANY queries"}
BANS = [{"source": "198.51.100.7/32", "rule": "query-flood", "since": NOW - 600,
         "expires": NOW + 300, "packets": 120000, "bytes": 7_000_000, "scope": WHOLE},
        {"source": "203.0.113.0/24", "rule": "manual", "since": NOW - 5, "expires": None,
         "packets": 0, "bytes": 0, "scope": WHOLE},
        {"source": "2001:db8:1::7/128", "rule": "query-flood", "since": NOW - 65,
         "expires": NOW + 535, "packets": 40, "bytes": 2400, "scope": ANY_ONLY}]
BY_RULE = {"query-flood": [2, 120040], "manual": [1, 0]}
LONG = "2001:db8:ffff:ffff:ffff:ffff:ffff:fff1"


def reading(**kw: Any) -> Reading:
    fields: dict[str, Any] = {"status": STATUS, "top": TOP, "bans": BANS, "by_rule": BY_RULE,
                              "drops_per_s": 2.5}
    fields.update(kw)
    return Reading(NOW, 100.0, **fields)


# --- the drawing, from plain replies ---------------------------------------------------------
def test_qtype_mix_is_the_share_of_each_type_busiest_first() -> None:
    assert qtype_mix({"A": 120, "ANY": 30}) == "A 80% ANY 20%"
    assert qtype_mix({"ANY": 30, "A": 120}) == "A 80% ANY 20%"
    assert qtype_mix({"TXT": 1, "A": 999}) == "A 100% TXT <1%"
    assert qtype_mix({"A": 10, "AAAA": 10, "MX": 5, "TXT": 5, "ANY": 4, "SRV": 6}) == \
        "A 25% AAAA 25% SRV 15% MX 12% other 22%"
    for nothing in (None, {}, {"A": 0}):
        assert qtype_mix(nothing) == ""


def test_source_table_without_qtypes_is_the_plain_table() -> None:
    rows = [{k: v for k, v in row.items() if k != "qtypes"} for row in TOP]
    assert source_table(rows) == [
        "   packets     per s  source",
        "     52000     866.7  198.51.100.7  (banned)",
        "       400       6.7  203.0.113.9",
    ]
    assert source_table([]) == ["no traffic in the window"]


def test_source_table_puts_the_qtype_mix_in_a_column() -> None:
    rows = [*TOP, {"source": LONG, "packets": 90, "rate": 9.0, "banned": False,
                   "qtypes": {"AAAA": 90}}]
    lines = source_table(rows)
    at = lines[0].index("query types")
    assert lines[0].startswith("   packets     per s  source ")
    assert lines[1] == f"{'52000':>10} {'866.7':>9}  {'198.51.100.7  (banned)':<{len(LONG)}}" \
                       "  A 80% ANY 20%"
    assert lines[1].index("A 80%") == at and lines[3].index("AAAA 100%") == at
    assert lines[2].rstrip() == lines[2] and lines[2].endswith("203.0.113.9")  # no qtypes
    assert lines[3].startswith(f"{'90':>10} {'9.0':>9}  {LONG}  ")


def test_header_shows_the_capture_bans_and_notes() -> None:
    assert header_lines(STATUS, None) == [
        "floodd 0.1.0  up 1h2m5s  backend nftables (firewall.backend)",
        "capture eth0: 1234 packets/s, kernel drops 30  bans 3 / 10000"]
    busy = {**STATUS, "sampling": 4, "excluded": 12, "dry_run": True,
            "interfaces": ["eth0", "eth1"]}
    lines = header_lines(busy, 1234.4)
    assert lines[0].endswith("backend nftables (firewall.backend), dry run")
    assert lines[1] == ("capture eth0, eth1: 1234 packets/s, kernel drops 30 (1234/s)  "
                        "bans 3 / 10000")
    assert lines[2] == ("overloaded: counting 1 in 4 packets (counts scaled); "
                        "12 bans kept out of the capture")
    assert header_lines(STATUS, 0.25)[1].endswith("kernel drops 30 (0.2/s)  bans 3 / 10000")


def test_drop_rate_differences_readings_of_one_daemon() -> None:
    first = Reading(NOW, 100.0, STATUS)
    assert drop_rate(None, STATUS, 100.0) is None
    assert drop_rate(first, {**STATUS, "kernel_drops": 60}, 102.0) == 15.0
    assert drop_rate(first, {**STATUS, "kernel_drops": 30}, 100.5) == 0.0
    assert drop_rate(first, {**STATUS, "kernel_drops": 60, "pid": 1}, 102.0) is None
    assert drop_rate(first, {**STATUS, "kernel_drops": 5}, 102.0) is None  # counters reset
    assert drop_rate(Reading(NOW, 99.0, error="gone"), STATUS, 100.0) is None


def test_bans_by_rule_and_the_newest_bans() -> None:
    assert rule_line(BY_RULE) == ("bans by rule: query-flood 2 (120040 dropped), "
                                  "manual 1 (0 dropped)")
    assert rule_line({"b": [1, 5], "a": [1, 0], "c": [3, 0]}) == \
        "bans by rule: c 3 (0 dropped), a 1 (0 dropped), b 1 (5 dropped)"
    assert rule_line({}) == "bans by rule: none"
    lines = newest_bans(BANS, NOW, 10)
    assert [line.split()[:4] for line in lines] == [
        ["banned", "source", "rule", "dropped"],
        ["5s", "ago", "203.0.113.0/24", "manual"],
        ["1m5s", "ago", "2001:db8:1::7", "query-flood"],
        ["10m", "ago", "198.51.100.7", "query-flood"]]
    assert lines[2].endswith("  40  UDP, ANY queries")
    assert lines[3].endswith("  120000  whole source")
    at = lines[0].index("scope")
    assert {line.index("U" if "UDP" in line else "w", at - 1) for line in lines[1:]} == {at}
    assert [line.split() for line in newest_bans(BANS, NOW, 1)] == \
        [line.split() for line in lines[:2]]
    assert newest_bans([], NOW, 10) == []


def test_view_in_a_large_terminal_shows_every_section() -> None:
    lines = render(reading(), 1.0, "%H:%M:%S", 120, 40)
    stamp = time.strftime("%H:%M:%S", time.localtime(NOW))
    assert lines[0] == f"{stamp}  floodd 0.1.0  up 1h2m5s  backend nftables (firewall.backend)"
    assert lines[1] == "capture eth0: 1234 packets/s, kernel drops 30 (2.5/s)  bans 3 / 10000"
    assert lines[2].startswith("bans by rule: query-flood 2 ")
    assert lines[3] == ""
    assert lines[4:7] == source_table(TOP)
    assert lines[7] == ""
    assert lines[8:] == newest_bans(BANS, NOW, 10)


def test_plain_blocks_have_no_size_limit() -> None:
    many = [{"source": f"198.51.100.{i}", "packets": 100 - i, "rate": 1.0, "banned": False}
            for i in range(60)]
    lines = render(reading(top=many), 1.0, "%Y-%m-%d %H:%M:%S")
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d  floodd 0\.1\.0  ", lines[0])
    assert sum(bool(re.match(r" +\d+ +1\.0  198\.51\.100\.", line)) for line in lines) == 60
    assert lines[-4:] == newest_bans(BANS, NOW, 10)  # the newest bans last


@pytest.mark.parametrize("width, height", [(1, 1), (10, 3), (20, 5), (40, 8), (80, 24),
                                           (200, 12), (30, 60), (0, 0)])
def test_view_fits_any_terminal(width: int, height: int) -> None:
    many = [{"source": LONG[:-1] + f"{i:x}", "packets": 1000 - i, "rate": 100.0 - i,
             "banned": i % 2 == 0, "qtypes": {"ANY": 10, "A": i}} for i in range(40)]
    bans = [{**BANS[0], "source": f"198.51.100.{i}/32", "since": NOW - i} for i in range(30)]
    for r in (reading(top=many, bans=bans), reading(), reading(top=[], bans=[]),
              Reading(NOW, 1.0, error="floodd is not running (no daemon on " + "/x" * 80 + ")")):
        lines = render(r, 0.5, "%H:%M:%S", width, height)
        assert len(lines) <= height
        assert all(len(line) <= width for line in lines), lines
        assert all("\n" not in line for line in lines)
        if height and width >= 10:
            assert re.match(r"\d\d:\d\d:\d\d", lines[0])  # the header comes first


def test_view_shares_the_height_between_sources_and_bans() -> None:
    many = [{"source": f"198.51.100.{i}", "packets": 1000 - i, "rate": 1.0, "banned": False}
            for i in range(40)]
    bans = [{**BANS[0], "source": f"203.0.113.{i}/32", "since": NOW - i} for i in range(30)]
    lines = render(reading(top=many, bans=bans), 1.0, "%H:%M:%S", 80, 24)
    assert len(lines) == 24
    sources = [line for line in lines if " 198.51.100." in line]
    banned = [line for line in lines if line.endswith("whole source")]
    assert len(sources) >= 10 and len(banned) >= 3
    assert sources[0].split()[2] == "198.51.100.0"  # the busiest first
    assert banned[0].startswith("0s ago  203.0.113.0 ")  # the newest first
    # Few bans: the sources get the rest of the room.
    lines = render(reading(top=many, bans=bans[:1]), 1.0, "%H:%M:%S", 80, 24)
    assert sum(" 198.51.100." in line for line in lines) == 24 - 4 - 1 - 3
    # Room for only the blank line and the heading of the bans: the sources take it.
    lines = render(reading(top=many, bans=bans), 1.0, "%H:%M:%S", 80, 6)
    assert lines[4:] == source_table(many)[:2]


def test_a_daemon_not_answering_is_one_line() -> None:
    gone = Reading(NOW, 1.0, error="floodd is not running (no daemon on /run/floodd.sock)")
    stamp = time.strftime("%H:%M:%S", time.localtime(NOW))
    assert render(gone, 0.5, "%H:%M:%S", 200, 40) == [
        f"{stamp}  floodd not answering: floodd is not running (no daemon on "
        "/run/floodd.sock); trying again every 0.5 s"]
    assert render(gone, 1, "%H:%M:%S", 26, 40) == [f"{stamp}  floodd not answe"]


def test_cut_counts_terminal_columns() -> None:
    assert cut("198.51.100.7", 6) == "198.51"
    assert cut("abc", 10) == "abc"
    assert cut("", 0) == ""
    assert cut("\u65e5\u672c\u8a9e", 5) == "\u65e5\u672c"  # wide: two columns each
    assert cut("e\u0301te", 2) == "e\u0301t"  # a combining accent takes none


# --- the command line --------------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["top", "-w", "--json"], "floodd: top: argument --json: not allowed with argument "
                              "-w/--watch"),
    (["top", "--json", "--watch"], "floodd: top: argument -w/--watch: not allowed with "
                                   "argument --json"),
    (["top", "-w", "--interval", "0"], "floodd: top: argument --interval: expected seconds "
                                       "from 0.1 to 3600, got '0'"),
    (["top", "-w", "--interval", "soon"], "floodd: top: argument --interval: "),
    (["top", "-w", "--interval", "nan"], "floodd: top: argument --interval: "),
    (["top", "--interval", "1"], "floodd: top: --interval needs --watch"),
    (["top", "-n", "0"], "floodd: top: -n: expected a number from 1 to 10000, got 0"),
    (["top", "-w", "-n", "10001"], "floodd: top: -n: expected a number from 1 to 10000"),
])
def test_usage_errors_are_one_line(argv: list[str], message: str,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith(message) and out.err.count("\n") == 1, out.err


def test_top_without_a_daemon_is_one_line(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "floodd.yaml"
    cfg.write_text(f"daemon:\n  control_socket: {tmp_path / 'control.sock'}\n")
    assert cli.main(["top", "-c", str(cfg)]) == 1
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err == f"floodd: top: floodd is not running (no daemon on " \
                      f"{tmp_path / 'control.sock'})\n"
    cfg.write_text("daemon:\n  control_socket: 5\n")
    assert cli.main(["top", "-w", "-c", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("floodd: top: config error: ") and err.count("\n") == 1, err


# --- the view as plain lines on a pipe ---------------------------------------------------------
STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d  "


def watch_on_a_pipe(cfg: Path, interval: str = "0.3") -> subprocess.Popen[str]:
    proc: subprocess.Popen[str] = subprocess.Popen(
        [*FLOODD, "top", "-w", "--interval", interval, "-c", str(cfg)], text=True,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return proc


def read_blocks(proc: subprocess.Popen[str], count: int, timeout: float = 20) -> str:
    """What the view printed until ``count`` blocks were complete (each ends with a blank
    line followed by the next block's stamp, or is the last block, ended by a blank line)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    text = ""
    deadline = time.monotonic() + timeout
    while len(re.findall(rf"(?m)^{STAMP}", text)) < count or not text.endswith("\n\n"):
        left = deadline - time.monotonic()
        assert left > 0, f"no {count} blocks within {timeout} s: {text!r}"
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 65536)
            assert chunk, f"the view ended: {proc.wait(5)}, {text!r}"
            text += chunk.decode()
    return text


def blocks(text: str) -> list[list[str]]:
    """The blocks of the plain view: each from a stamped line to the next, blank lines
    between sections kept, the blank line ending it dropped."""
    parts = re.split(rf"(?m)^(?={STAMP})", text)
    return [part.removesuffix("\n\n").split("\n") for part in parts if part]


@pytest.fixture
def no_daemon(tmp_path: Path) -> Path:
    cfg = tmp_path / "floodd.yaml"
    cfg.write_text(f"daemon:\n  control_socket: {tmp_path / 'control.sock'}\n")
    return cfg


@pytest.mark.parametrize("end", ["SIGINT", "SIGTERM", "closed pipe"])
def test_without_a_daemon_each_block_is_one_line(no_daemon: Path, end: str) -> None:
    proc = watch_on_a_pipe(no_daemon)
    try:
        text = read_blocks(proc, 3)
        assert proc.poll() is None  # still trying
        if end == "closed pipe":
            assert proc.stdout is not None
            proc.stdout.close()  # the next block meets EPIPE
        else:
            proc.send_signal(getattr(signal, end))
        assert proc.wait(timeout=10) == 0
        assert proc.stderr is not None and proc.stderr.read() == ""
    finally:
        proc.kill()
        proc.wait()
    expected = (rf"{STAMP}floodd not answering: floodd is not running \(no daemon on "
                rf"{re.escape(str(no_daemon.parent / 'control.sock'))}\); trying again every "
                r"0\.3 s")
    found = blocks(text)
    assert len(found) >= 3
    assert all(len(block) == 1 and re.fullmatch(expected, block[0]) for block in found), found


# --- a real daemon: the view on a pipe and in a terminal ---------------------------------------
VIEWER = "203.0.113.9"  # sends queries before the view starts
BANNED = "203.0.113.50"  # banned by hand before the view starts
LATER = "198.51.100.20"  # sends queries while the view runs
QTYPES = r"(  +A 100%)?"  # send_queries asks for A only; shown when the daemon sends the mix


@pytest.fixture
def daemon(lab: Any, tmp_path: Path,
           send_queries: Callable[[str, int], None]) -> Iterator[Floodd]:
    """A dry-run ``floodd run`` in the lab that has counted 300 queries from VIEWER and
    holds a ban of BANNED made by hand; it is stopped at the end."""
    for source in (VIEWER, LATER):
        lab.add_client_address(source)
    # A rule window that keeps the queries sent before and during the view in the table.
    rules = [{"name": "query-flood", "match": "all", "threshold": 100000, "window": 60,
              "ban_time": 30}]
    cfg = write_config(tmp_path / "floodd.yaml", daemon_config(tmp_path, rules=rules,
                                                                rate_table={"window": 60}))
    running = Floodd(lab, cfg, args=("--dry-run",))
    try:
        running.start().wait_ready()
        send_queries(VIEWER, 300)
        wait_until(lambda: any(r["source"] == VIEWER for r in running.request("top")["top"]),
                   10, what=f"{VIEWER} in top")
        running.request("ban", source=BANNED, seconds=600, reason="by-hand")
        yield running
        assert running.stop() == 0
        assert "Traceback" not in running.log()
    finally:
        running.close()


def test_view_on_a_pipe_prints_a_block_per_interval(daemon: Floodd) -> None:
    proc = watch_on_a_pipe(daemon.config)
    try:
        text = read_blocks(proc, 3)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
        assert proc.stderr is not None and proc.stderr.read() == ""
    finally:
        proc.kill()
        proc.wait()
    found = blocks(text)
    assert len(found) >= 3
    for block in found:
        assert re.match(rf"{STAMP}floodd {re.escape(__version__)}  up \d\S*  backend dry-run "
                        r".*, dry run$", block[0]), block
        assert re.match(rf"capture {daemon.lab.server_if}: \d+ packets/s, kernel drops \d+"
                        r"( \([\d.]+/s\))?  bans 1 / 10000$", block[1]), block
        assert block[2] == "bans by rule: by-hand 1 (0 dropped)"
        assert block[4].split()[:4] == ["packets", "per", "s", "source"]
        assert re.fullmatch(rf" +300 +5\.0  {VIEWER}{QTYPES}", block[5]), block
        assert re.fullmatch(rf"\d\S* ago  {BANNED}  by-hand +0  whole source", block[-1]), block
    assert "(" in found[1][1]  # drops per second, from the second block on


class Tmux:
    """A tmux server of its own (its socket in ``tmp_path``, so that nothing is left
    behind), with a configuration that keeps a pane whose command ended (so its last
    screen can be read)."""

    def __init__(self, tmp_path: Path) -> None:
        self.socket = tmp_path / "tmux.sock"
        self.conf = tmp_path / "tmux.conf"
        self.conf.write_text("set -g remain-on-exit on\n")

    def __call__(self, *args: str) -> str:
        proc = subprocess.run(["tmux", "-S", str(self.socket), "-f", str(self.conf), *args],
                              capture_output=True, text=True, timeout=10, check=True)
        return proc.stdout

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "view")

    def screen_when(self, predicate: Callable[[str], bool], timeout: float, what: str) -> str:
        """The first screen that ``predicate`` accepts, waiting for it."""
        def accepted() -> str | None:
            screen = self.screen()
            return screen if predicate(screen) else None
        try:
            found: str = wait_until(accepted, timeout, what=what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the screen:\n{self.screen()}") from None
        return found

    def pane(self, fmt: str) -> str:
        return self("display-message", "-p", "-t", "view", fmt).strip()

    def close(self) -> None:
        subprocess.run(["tmux", "-S", str(self.socket), "kill-server"], capture_output=True,
                       timeout=10, check=False)


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    server = Tmux(tmp_path)
    yield server
    server.close()


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
@pytest.mark.parametrize("key", ["q", "C-c"])
def test_view_in_a_terminal_refreshes_and_restores_it(daemon: Floodd, tmux: Tmux, tmp_path: Path,
                                                     send_queries: Callable[[str, int], None],
                                                     key: str) -> None:
    view = shlex.join([*FLOODD, "top", "-w", "--interval", "0.5", "-c", str(daemon.config)])
    before, after = tmp_path / "stty.before", tmp_path / "stty.after"
    # A non-interactive sh dies of the Ctrl-C the view handles; a trap (reset to the
    # default in the view's process) keeps it to report the exit status and the tty mode.
    script = (f"trap : INT; stty -g > {shlex.quote(str(before))}; {view}; echo EXIT=$?; "
              f"stty -g > {shlex.quote(str(after))}; exec sleep 60")
    tmux("new-session", "-d", "-x", "120", "-y", "40", "-s", "view", "sh", "-c", script)

    header = re.compile(rf"^(\d\d:\d\d:\d\d)  floodd {re.escape(__version__)}  up \S+  "
                        r"backend dry-run .*, dry run$", re.M)
    row = re.compile(rf"^ +300 +5\.0  {re.escape(VIEWER)}{QTYPES}$", re.M)
    ban_row = re.compile(rf"^\d\S* ago  {re.escape(BANNED)}  by-hand +0  whole source$", re.M)
    first = tmux.screen_when(lambda s: bool(header.search(s) and row.search(s)), 15,
                             "the view's header and source row")
    assert "bans by rule: by-hand 1 (0 dropped)" in first
    assert ban_row.search(first), first
    assert tmux.pane("#{alternate_on} #{cursor_flag}") == "1 0"  # own screen, no cursor
    assert all(len(line) <= 120 for line in first.splitlines())

    # It refreshes: the clock moves, and a source that starts now appears.
    clock = header.findall(first)
    send_queries(LATER, 50)
    tmux.screen_when(lambda s: LATER in s and header.findall(s) not in ([], clock), 10,
                     f"{LATER} and a new time in the view")

    # It follows the terminal's size: drawn for 50x6, then whole again at 120x40 (a
    # terminal does not bring back what a smaller one cut).
    stamp = re.compile(r"(\d\d:\d\d:\d\d)  floodd ")
    drawn = stamp.findall(tmux.screen())
    tmux("resize-window", "-t", "view", "-x", "50", "-y", "6")
    small = tmux.screen_when(lambda s: len(s.splitlines()) == 6
                             and stamp.findall(s) not in ([], drawn), 10,
                             "the view redrawn for 50x6")
    assert small.splitlines()[2] == "bans by rule: by-hand 1 (0 dropped)", small
    assert all(len(line) <= 50 for line in small.splitlines()), small
    tmux("resize-window", "-t", "view", "-x", "120", "-y", "40")
    tmux.screen_when(lambda s: bool(header.search(s) and row.search(s) and ban_row.search(s)),
                     10, "the whole view again at 120x40")

    tmux("send-keys", "-t", "view", key)
    shown = tmux.screen_when(lambda s: "EXIT=" in s, 10, "the view to end")
    assert shown.split() == ["EXIT=0"], shown  # the shell's screen again, as it was
    assert tmux.pane("#{alternate_on} #{cursor_flag}") == "0 1"
    wait_until(after.exists, 5, what="stty after the view")
    assert after.read_text() == before.read_text()  # the tty mode as it was
