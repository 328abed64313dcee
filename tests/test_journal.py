"""The event log: stderr lines, journal fields (a recording stand-in for systemd.journal as
a unit test, and a real journald read back with journalctl), levels, fallbacks."""

from __future__ import annotations

import io
import ipaddress
import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

import floodd.service.journal
from floodd.service.journal import EventLog

from daemon_helpers import wait_until

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d floodd\[(\d+)\] (\w+): (.*)$")


class RecordingJournal:
    """Stands in for ``systemd.journal``: remembers what ``send`` was given."""

    def __init__(self, fail: bool = False) -> None:
        self.sent: list[tuple[str, dict[str, str]]] = []
        self.fail = fail

    def send(self, message: str, **fields: str) -> None:
        if self.fail:
            raise ConnectionRefusedError(111, "Connection refused")
        self.sent.append((message, fields))


def test_stderr_lines() -> None:
    out = io.StringIO()
    log = EventLog("info", journal=False, stream=out)
    log.notice("ban 198.51.100.7/32 for 600 s", action="ban")
    log.info("summary")
    log.warning("careful")
    log.error("broken")
    lines = out.getvalue().splitlines()
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), lines
    assert {int(m.group(1)) for m in parsed if m} == {os.getpid()}
    assert [(m.group(2), m.group(3)) for m in parsed if m] == [
        ("notice", "ban 198.51.100.7/32 for 600 s"), ("info", "summary"),
        ("warning", "careful"), ("error", "broken")]


def test_levels_filter_and_change() -> None:
    out = io.StringIO()
    log = EventLog("warning", journal=False, stream=out)
    log.debug("d")
    log.info("i")
    log.notice("n")
    log.warning("w")
    log.error("e")
    log.set_level("debug")
    log.debug("d2")
    assert [LINE.match(x).group(3) for x in out.getvalue().splitlines()] == [  # type: ignore[union-attr]
        "w", "e", "d2"]


def test_journal_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    journal = RecordingJournal()
    monkeypatch.setattr(floodd.service.journal, "_journal", journal)
    log = EventLog("info", journal=True)
    assert log.stream is None  # not a terminal: the journal has it all
    net = ipaddress.ip_network("198.51.100.7/32")
    log.notice("ban 198.51.100.7/32 for 600 s", action="ban", source=net, rule="query-flood",
               rate=1076.5, packets=2153, ban_time=600.0, extra=None)
    log.info("no fields")
    assert journal.sent == [
        ("ban 198.51.100.7/32 for 600 s",
         {"PRIORITY": "5", "SYSLOG_IDENTIFIER": "floodd", "FLOODD_ACTION": "ban",
          "FLOODD_SOURCE": "198.51.100.7/32", "FLOODD_RULE": "query-flood",
          "FLOODD_RATE": "1076.5", "FLOODD_PACKETS": "2153", "FLOODD_BAN_TIME": "600.0"}),
        ("no fields", {"PRIORITY": "6", "SYSLOG_IDENTIFIER": "floodd"}),
    ]


def test_journal_failure_falls_back_to_stderr(monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(floodd.service.journal, "_journal", RecordingJournal(fail=True))
    log = EventLog("info", journal=True)
    log.error("capture stopped: eth0: PcapError: The interface went down", action="capture")
    err = capsys.readouterr().err
    assert LINE.match(err.rstrip("\n"))
    assert err.rstrip("\n").endswith("error: capture stopped: eth0: PcapError: The interface "
                                     "went down")


def test_journal_chosen_by_its_socket(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(floodd.service.journal, "_journal", RecordingJournal())
    monkeypatch.setattr(floodd.service.journal, "JOURNAL_SOCKET", str(tmp_path / "socket"))
    without = EventLog()
    assert not without.journal and without.stream is not None
    (tmp_path / "socket").touch()
    assert EventLog().journal
    monkeypatch.setattr(floodd.service.journal, "_journal", None)  # systemd-python not installed
    assert not EventLog().journal




def test_real_journal_entry(journald: None) -> None:
    """What ``journalctl -o json`` shows for an event written by a process of its own."""
    marker = f"test {uuid.uuid4()}"
    program = ("import ipaddress; from floodd.service.journal import EventLog; "
               f"EventLog('info').warning({marker!r}, action='refuse', "
               "source=ipaddress.ip_network('198.51.100.7/32'), rule='query-flood', "
               "rate=12.5)")
    subprocess.run([sys.executable, "-c", program], check=True, timeout=30)

    def entries() -> list[dict[str, Any]]:
        proc = subprocess.run(["journalctl", "--no-pager", "-o", "json",
                               "SYSLOG_IDENTIFIER=floodd", f"MESSAGE={marker}"],
                              capture_output=True, text=True, timeout=30, check=False)
        return [json.loads(x) for x in proc.stdout.splitlines() if x.strip()]
    entry = wait_until(entries, 10, interval=0.1, what="the entry in the journal")[0]
    assert entry["PRIORITY"] == "4"
    assert entry["FLOODD_ACTION"] == "refuse"
    assert entry["FLOODD_SOURCE"] == "198.51.100.7/32"
    assert entry["FLOODD_RULE"] == "query-flood"
    assert entry["FLOODD_RATE"] == "12.5"
    assert "FLOODD_PACKETS" not in entry
