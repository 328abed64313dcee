"""``floodd top``: the busiest sources, once, or as a view refreshed every interval.

``floodd top --watch`` asks the running daemon's control socket for ``status`` and
``top`` every interval and shows, like ``top``: a header (version, uptime, backend,
capture rate, kernel drops in all and per second, bans and their cap), the bans per rule,
the busiest sources with their query types, and the newest bans.  The bans come with the
``top`` reply, from the daemon's mirror of the kernel, their packet counters as of the
last rescan: a refresh never has the daemon's main loop read the kernel, which takes a
quarter of a second with 10,000 bans and would hold up its next ban.  What is shown is made
by pure functions from the replies (plain dicts) to lines cut to the terminal's size;
the terminal loop (curses, in the alternate screen) only reads keys and puts the lines
on the screen.  When stdout is not a terminal, each refresh prints one block of plain
lines instead, its first line stamped with the date and time.

A daemon that stops answering is shown in the view and asked again at the next refresh;
``q``, Ctrl-C, SIGTERM and SIGHUP end the view, and the terminal is always restored.
"""

from __future__ import annotations

import argparse
import curses
import ipaddress
import json
import math
import os
import signal
import sys
import time
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, TextIO

from floodd.cli.bans import human_duration, show_source
from floodd.cli.common import add_config_option, config_from_args
from floodd.errors import Failure, FlooddError
from floodd.service.control import request
from floodd.service.requests import MAX_TOP

QTYPES_SHOWN = 4  # query types named in a source's mix; the rest are summed as "other"
NEWEST_BANS = 10  # bans listed, newest first
MIN_INTERVAL = 0.1  # seconds
MAX_INTERVAL = 3600.0
TERMINAL_STAMP = "%H:%M:%S"
PLAIN_STAMP = "%Y-%m-%d %H:%M:%S"
SOURCE_COLUMN = 22  # where the source starts in a line of the sources table


# --- the busiest sources: shared with ``floodd status`` ------------------------------------
def qtype_mix(qtypes: Mapping[str, int] | None) -> str:
    """A source's query types as shares of the counts given, busiest first:
    ``{"A": 120, "ANY": 30}`` -> ``A 80% ANY 20%``; empty without counts."""
    total = sum(qtypes.values()) if qtypes else 0
    if not qtypes or total <= 0:
        return ""
    ranked = sorted(qtypes.items(), key=lambda item: (-item[1], item[0]))
    parts = [f"{name} {_share(count, total)}" for name, count in ranked[:QTYPES_SHOWN]]
    rest = sum(count for _, count in ranked[QTYPES_SHOWN:])
    if rest > 0:
        parts.append(f"other {_share(rest, total)}")
    return " ".join(parts)


def _share(count: int, total: int) -> str:
    percent = 100 * count / total
    return "<1%" if 0 < percent < 0.5 else f"{percent:.0f}%"


def source_table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The busiest sources (rows of the ``top`` reply: source, packets, rate, banned and,
    when the daemon sends it, qtypes): a heading and one line per source, the query
    type mix in a column of its own when any row has one."""
    if not rows:
        return ["no traffic in the window"]
    names = [f"{row['source']}{'  (banned)' if row.get('banned') else ''}" for row in rows]
    mixes = [qtype_mix(row.get("qtypes")) for row in rows]
    width = max(len("source"), *map(len, names))
    heading = f"{'packets':>10} {'per s':>9}  source"
    if any(mixes):
        heading = f"{heading:<{SOURCE_COLUMN + width}}  query types"
    return [heading] + [f"{row['packets']:>10} {row['rate']:>9.1f}  {name:<{width}}  {mix}"
                        .rstrip() for row, name, mix in zip(rows, names, mixes)]


# --- one refresh ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Reading:
    """What one refresh got from the daemon (its ``status``; the ``top`` reply's rows,
    newest bans and bans per rule: rule -> [bans, packets dropped]), or why it got
    nothing (``error``), and when: ``wall`` in unix seconds, ``mono`` on the monotonic
    clock."""

    wall: float
    mono: float
    status: Mapping[str, Any] | None = None
    top: Sequence[Mapping[str, Any]] = ()
    bans: Sequence[Mapping[str, Any]] = ()
    by_rule: Mapping[str, Sequence[int]] = field(default_factory=dict)
    drops_per_s: float | None = None  # None: no earlier reading of the same daemon
    error: str | None = None


def drop_rate(before: Reading | None, status: Mapping[str, Any], mono: float) -> float | None:
    """Kernel capture drops per second since ``before`` (the last reading that had a
    status); None for the first reading, another daemon (pid), or counters that went
    back (captures reopened)."""
    if before is None or before.status is None or before.status.get("pid") != status.get("pid"):
        return None
    dropped = status["kernel_drops"] - before.status["kernel_drops"]
    seconds = mono - before.mono
    if seconds <= 0 or dropped < 0:
        return None
    rate: float = dropped / seconds
    return rate


def read(socket_path: str, n: int, before: Reading | None, wall: float,
         mono: float, timeout: float) -> Reading:
    """Ask the daemon for a refresh.  A daemon that does not run or answer gives a
    reading with its error; a refusal (e.g. the socket is root's only) is raised."""
    try:
        status = request(socket_path, "status", timeout=timeout)
        reply = request(socket_path, "top", timeout=timeout, n=n)
    except Failure as exc:
        return Reading(wall, mono, error=str(exc))
    # A daemon older than this command sends no bans with ``top``: shown as none.
    return Reading(wall, mono, status, reply["top"], reply.get("newest_bans", []),
                   reply.get("bans_by_rule", {}), drop_rate(before, status, mono))


# --- what a reading shows --------------------------------------------------------------------
def header_lines(status: Mapping[str, Any], drops_per_s: float | None) -> list[str]:
    """Version, uptime and backend; the capture; the notes on overload, when any."""
    lines = [f"floodd {status['version']}  up {human_duration(status['uptime'])}  "
             f"backend {status['backend']}{', dry run' if status.get('dry_run') else ''}"]
    drops = f"kernel drops {status['kernel_drops']}"
    if drops_per_s is not None:
        drops += f" ({drops_per_s:.0f}/s)" if drops_per_s >= 10 else f" ({drops_per_s:.1f}/s)"
    lines.append(f"capture {', '.join(status['interfaces'])}: {status['pps']:.0f} packets/s, "
                 f"{drops}  bans {status['bans']} / {status['max_bans']}")
    notes = []
    if status.get("sampling", 1) > 1:
        notes.append(f"overloaded: counting 1 in {status['sampling']} packets (counts scaled)")
    if status.get("excluded"):
        notes.append(f"{status['excluded']} bans kept out of the capture")
    if notes:
        lines.append("; ".join(notes))
    return lines


def rule_line(by_rule: Mapping[str, Sequence[int]]) -> str:
    """The bans per rule (or operator's reason: rule -> [bans, packets dropped]), most
    first, with the packets they dropped by the last rescan."""
    if not by_rule:
        return "bans by rule: none"
    ranked = sorted(by_rule.items(), key=lambda item: (-item[1][0], item[0]))
    return "bans by rule: " + ", ".join(f"{rule} {n} ({dropped} dropped)"
                                        for rule, (n, dropped) in ranked)


def newest_bans(bans: Sequence[Mapping[str, Any]], now: float, count: int) -> list[str]:
    """The ``count`` newest bans (by ``since``): a heading and a line each; none without bans."""
    newest = sorted(bans, key=lambda ban: ban["since"], reverse=True)[:count]
    if not newest:
        return []
    rows = [("banned", "source", "rule", "dropped", "scope")]
    rows += [(f"{human_duration(now - ban['since'])} ago", show_source(ipaddress.ip_network(ban["source"])), ban["rule"],
              str(ban["packets"]), ban["scope"]["text"]) for ban in newest]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return [f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:<{widths[2]}}  "
            f"{row[3]:>{widths[3]}}  {row[4]}" for row in rows]


def render(reading: Reading, interval: float, stamp: str, width: int | None = None,
           height: int | None = None) -> list[str]:
    """The lines showing ``reading``, the first stamped with its time (``stamp``, a
    strftime format), at most ``height`` lines of at most ``width`` columns (None: no
    limit).  The sources get the room first; the newest bans get at least a third of
    what is left when they need it."""
    clock = time.strftime(stamp, time.localtime(reading.wall))
    if reading.status is None:
        lines = [f"{clock}  floodd not answering: {reading.error}; "
                 f"trying again every {interval:g} s"]
        return fit(lines, width, height)
    head = header_lines(reading.status, reading.drops_per_s)
    head[0] = f"{clock}  {head[0]}"
    head += [rule_line(reading.by_rule), ""]
    sources = source_table(reading.top)
    bans = newest_bans(reading.bans, reading.wall, NEWEST_BANS)
    if bans:
        bans.insert(0, "")
    if height is not None:
        room = max(0, height - len(head))
        kept = min(len(bans), max(room // 3, min(room, 3)))
        shown_sources = min(len(sources), room - (kept if kept >= 3 else 0))
        shown_bans = min(len(bans), room - shown_sources)
        # A blank line and the heading alone say nothing: at least one ban, or none.
        sources, bans = sources[:shown_sources], bans[:shown_bans if shown_bans >= 3 else 0]
    return fit(head + sources + bans, width, height)


def fit(lines: Sequence[str], width: int | None, height: int | None) -> list[str]:
    """The first ``height`` lines, each cut to ``width`` columns (never wrapped)."""
    shown = list(lines if height is None else lines[:max(0, height)])
    return shown if width is None else [cut(line, width) for line in shown]


def cut(text: str, width: int) -> str:
    """``text`` cut to ``width`` terminal columns; East Asian wide characters take two,
    combining marks none."""
    used = 0
    for i, char in enumerate(text):
        used += (0 if unicodedata.combining(char) else
                 2 if unicodedata.east_asian_width(char) in "WF" else 1)
        if used > width:
            return text[:i]
    return text


# --- the loops -------------------------------------------------------------------------------
class _Stop(BaseException):
    """SIGTERM or SIGHUP arrived: end the view as ``q`` does."""


def _stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop


def _request_timeout(interval: float) -> float:
    """How long one request may take: the view waits for it before it reads a key."""
    return min(10.0, max(2.0, interval))


def _terminal(socket_path: str, n: int, interval: float) -> None:
    """The full-screen view until ``q`` (curses.wrapper restores the terminal: alternate
    screen, tty mode, keypad; the cursor is put back here)."""
    def view(screen: curses.window) -> None:
        try:
            curses.curs_set(0)
        except curses.error:
            pass  # a terminal that cannot hide its cursor
        try:
            _view(screen, socket_path, n, interval)
        finally:
            try:
                curses.curs_set(1)
            except curses.error:
                pass
    # ncurses takes LINES and COLUMNS from the environment over the terminal's own size
    # (at the start and at each resize); exported ones are stale after any resize.
    for name in ("LINES", "COLUMNS"):
        os.environ.pop(name, None)
    try:
        curses.wrapper(view)
    except curses.error as exc:
        raise FlooddError(f"cannot use the terminal (TERM={os.environ.get('TERM', '')!r}): "
                          f"{exc}") from None


def _view(screen: curses.window, socket_path: str, n: int, interval: float) -> None:
    for reading in _readings(socket_path, n, interval):
        due = reading.mono + interval
        while True:  # draw, and again on every key but q (a resize is a key)
            height, width = screen.getmaxyx()
            screen.erase()
            for y, line in enumerate(render(reading, interval, TERMINAL_STAMP, width, height)):
                try:
                    screen.addstr(y, 0, line)
                except curses.error:
                    pass  # the bottom right cell: curses cannot move the cursor past it
            screen.refresh()
            left = due - time.monotonic()
            if left <= 0:
                break
            screen.timeout(max(1, math.ceil(left * 1000)))
            key = screen.getch()
            if key in (ord("q"), ord("Q")):
                return
            if key == -1:  # the interval is over, or stdin gives no keys (/dev/null)
                time.sleep(max(0.0, due - time.monotonic()))
                break


def _plain(socket_path: str, n: int, interval: float, out: TextIO) -> None:
    """One block of lines per interval, flushed, until a signal ends it."""
    for reading in _readings(socket_path, n, interval):
        out.write("\n".join(render(reading, interval, PLAIN_STAMP)) + "\n\n")
        out.flush()
        time.sleep(max(0.0, reading.mono + interval - time.monotonic()))


def _readings(socket_path: str, n: int, interval: float) -> Iterator[Reading]:
    """A reading each time the caller asks, the drops per second differenced against the
    last one that had a status."""
    before: Reading | None = None
    while True:
        reading = read(socket_path, n, before, time.time(), time.monotonic(),
                       _request_timeout(interval))
        if reading.status is not None:
            before = reading
        yield reading


def _watch(socket_path: str, n: int, interval: float) -> int:
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _stop)
    try:
        if sys.stdout.isatty():
            _terminal(socket_path, n, interval)
        else:
            _plain(socket_path, n, interval, sys.stdout)
    except (KeyboardInterrupt, _Stop):
        pass
    except BrokenPipeError:
        # The reader went away (``floodd top -w | head``): stdout goes nowhere from now
        # on, so what is left in its buffer is dropped at exit instead of failing again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _top(args: argparse.Namespace) -> int:
    if not 1 <= args.n <= MAX_TOP:
        raise FlooddError(f"top: -n: expected a number from 1 to {MAX_TOP}, got {args.n}")
    if args.interval is not None and not args.watch:
        raise FlooddError("top: --interval needs --watch (see 'floodd top --help')")
    try:
        socket_path = config_from_args(args).daemon.control_socket
        if args.watch:
            return _watch(socket_path, args.n, args.interval or 1.0)
        rows = request(socket_path, "top", n=args.n)["top"]
    except FlooddError as exc:  # one "top: ..." line, the exit status of its kind
        raise (Failure if isinstance(exc, Failure) else FlooddError)(f"top: {exc}") from None
    print(json.dumps(rows, indent=1) if args.json else "\n".join(source_table(rows)))
    return 0


def _interval(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not MIN_INTERVAL <= seconds <= MAX_INTERVAL:
        raise argparse.ArgumentTypeError(f"expected seconds from {MIN_INTERVAL:g} to "
                                         f"{MAX_INTERVAL:g}, got {text!r}")
    return seconds


def register(sub: Any) -> None:
    p = sub.add_parser("top", help="the busiest sources right now",
                       description="The sources sending the most queries in the rate "
                                   "table's window, from the running floodd. With --watch, "
                                   "a full-screen view refreshed every interval: the "
                                   "daemon's capture and bans, the bans per rule, the "
                                   "busiest sources with their query types and the newest "
                                   "bans; q or Ctrl-C quits. When stdout is not a terminal, "
                                   "--watch prints one block of lines per interval.")
    p.add_argument("-n", type=int, default=20, metavar="N", help="how many (default 20)")
    output = p.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print JSON")
    output.add_argument("-w", "--watch", action="store_true",
                        help="refresh every interval until q, Ctrl-C or SIGTERM")
    p.add_argument("--interval", type=_interval, default=None, metavar="SECONDS",
                   help=f"with --watch: seconds between refreshes (default 1, at least "
                        f"{MIN_INTERVAL:g})")
    add_config_option(p)
    p.set_defaults(handler=_top)
