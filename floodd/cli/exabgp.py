"""``floodd exabgp``: the API process ExaBGP runs to push floods upstream over BGP.

ExaBGP starts it (``process floodd { run /usr/local/bin/floodd exabgp -c CONFIG;
encoder text; }``) and reads its stdout: one text-API command a line, ``announce flow
route ...``, ``withdraw flow route ...``, ``announce route ... community [65535:666]``.
ExaBGP answers each on the feeder's stdin with ``done`` or ``error`` (api.ack, on by
default in 4.x); an error is logged on stderr, one line, which ExaBGP 4.2 passes on to
its own stderr (the journal, under systemd).

Each ``upstream.poll_interval`` the feeder reads the capture interfaces' inbound
counters (/sys/class/net/IFACE/statistics/rx_bytes and rx_packets, those of the network
namespace it runs in) and floodd's bans over the control socket, asks
floodd.decide.upstream which routes should be announced, and writes the difference.

The set announced is kept in ``<daemon.state_dir>/upstream.json``: ExaBGP restarts its
API process with itself, and the peer forgets every route when the session drops, so a
new feeder announces the whole set again at once.  End of stdin (ExaBGP gone) or SIGTERM
ends the feeder quietly, with status 0.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import signal
import sys
import time
from collections import deque
from types import FrameType
from typing import Any, Callable, TextIO

from floodd.cli.common import add_config_option
from floodd.config import Config, Network, load_config
from floodd.decide.safety import LOOPBACK, own_networks
from floodd.decide.upstream import (BannedSource, LinkCounters, Route, Upstream, announce,
                                    banned_sources, link_rate, ordered, withdraw)
from floodd.enforce.state import write_json
from floodd.errors import Failure, FlooddError
from floodd.service.control import request

SYS_NET = "/sys/class/net"
STATE_FILE = "upstream.json"
MAX_LINE = 4096  # bytes of one line from ExaBGP that are kept; acks are a word
# Commands remembered until acked: with api.ack off no ack ever comes, and the oldest go.
MAX_PENDING = 100_000

Log = Callable[[str], None]


def log_line(message: str) -> None:
    """One line on stderr (ExaBGP passes it on)."""
    print(f"floodd exabgp: {message}", file=sys.stderr, flush=True)


# --- the inbound counters -----------------------------------------------------------------
def interface_names(configured: tuple[str, ...], sys_net: str = SYS_NET) -> list[str]:
    """The interfaces whose counters are summed: the configured ones, or for ``any``
    every interface but loopback; FlooddError for one that does not exist."""
    if "any" in configured:
        return sorted(n for n in os.listdir(sys_net) if n != "lo")
    for name in configured:
        if not os.path.isdir(os.path.join(sys_net, name)):
            raise FlooddError(f"no interface {name} here ({sys_net}/{name} does not exist)")
    return list(configured)


def read_counters(names: list[str], now: float, sys_net: str = SYS_NET) -> LinkCounters:
    """The inbound bytes and packets of ``names`` summed; OSError when one is gone."""
    rx_bytes = rx_packets = 0
    for name in names:
        base = os.path.join(sys_net, name, "statistics")
        with open(os.path.join(base, "rx_bytes")) as f:
            rx_bytes += int(f.read())
        with open(os.path.join(base, "rx_packets")) as f:
            rx_packets += int(f.read())
    return LinkCounters(now, rx_bytes, rx_packets)


def own_destinations(own: list[Network]) -> list[Network]:
    """This host's addresses that a flood can be sent to: not loopback, link-local or
    multicast."""
    return [n for n in own
            if not n.network_address.is_link_local and not n.network_address.is_multicast
            and not any(n.overlaps(lo) for lo in LOOPBACK)]


# --- the feeder ---------------------------------------------------------------------------
class Feeder:
    """One poll at a time (:meth:`poll`) and ExaBGP's acks (:meth:`take_input`); the
    clock, the counters and floodd are passed in."""

    def __init__(self, planner: Upstream, counters: Callable[[float], LinkCounters],
                 ask_floodd: Callable[[], Any], out: TextIO, log: Log = log_line,
                 dry_run: bool = False, state_path: str | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.planner = planner
        self.counters = counters
        self.ask_floodd = ask_floodd
        self.out = out
        self.log = log
        self.dry_run = dry_run
        self.state_path = state_path
        self.clock = clock
        self.wall = wall
        self.announced: set[Route] = set()
        # commands written, oldest first, not acked yet
        self.pending: deque[str] = deque(maxlen=MAX_PENDING)
        self._last: LinkCounters | None = None
        self._counters_lost = False
        self._floodd_answers = True
        self._saved: object = None
        self._input = b""

    # --- start and poll -------------------------------------------------------------
    def start(self) -> None:
        """Take up the set a feeder before this one had announced, and announce it."""
        now = self.clock()
        saved = self._load_state()
        if saved is not None:
            try:
                gap = self.wall() - float(saved["saved_at"])
                events = self.planner.restore(saved["upstream"], now, gap)
            except (KeyError, TypeError, ValueError):
                self.log(f"{self.state_path} is unreadable: starting with nothing announced")
                events = []
            for event in events:
                self.log(event)
        self._sync(self.planner.routes())
        self._save(now)

    def poll(self) -> None:
        now = self.clock()
        rate = None
        try:
            current = self.counters(now)
        except (OSError, ValueError) as exc:
            if not self._counters_lost:
                self.log(f"cannot read the inbound counters: {exc}")
            self._counters_lost = True
            self._last = None
        else:
            self._counters_lost = False
            if self._last is not None:
                rate = link_rate(self._last, current)
            self._last = current
        plan = self.planner.step(now, rate, self._bans())
        for event in plan.events:
            self.log(event)
        self._sync(plan.routes)
        self._save(now)

    def _bans(self) -> list[BannedSource] | None:
        try:
            bans = banned_sources(self.ask_floodd())
        except (FlooddError, ValueError) as exc:
            if self._floodd_answers:
                self.log(f"no bans from floodd: {exc}")
            self._floodd_answers = False
            return None
        self._floodd_answers = True
        return bans

    # --- what ExaBGP is told ----------------------------------------------------------
    def _sync(self, routes: frozenset[Route]) -> None:
        """Withdraw what should no longer be announced, then announce what is missing."""
        gone = ordered(frozenset(self.announced - routes))
        new = ordered(frozenset(routes - self.announced))
        for line in [withdraw(r) for r in gone] + [announce(r) for r in new]:
            if self.dry_run:
                self.log(f"would send: {line}")
            else:
                self.pending.append(line)
                self.out.write(line + "\n")
        if gone or new:
            self.out.flush()
        self.announced = set(routes)

    def take_input(self, data: bytes) -> bool:
        """Read ExaBGP's lines (``data``; b"" at the end of stdin); False when ExaBGP is
        gone or shutting down."""
        if not data:
            return False
        self._input += data
        *lines, self._input = self._input.split(b"\n")
        self._input = self._input[-MAX_LINE:]
        for raw in lines:
            line = raw.decode(errors="replace").strip()
            if line == "shutdown":
                return False
            if line in ("done", "error"):
                command = self.pending.popleft() if self.pending else "(a command)"
                if line == "error":
                    self.log(f"ExaBGP refused: {command}")
            # Anything else (neighbor messages, when ExaBGP is told to send them) is not
            # for the feeder.
        return True

    # --- across restarts ---------------------------------------------------------------
    def _load_state(self) -> Any:
        if self.state_path is None or self.dry_run:
            return None
        try:
            with open(self.state_path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            self.log(f"cannot read {self.state_path}: {exc}; starting with nothing announced")
            return None

    def _save(self, now: float) -> None:
        """Write the set when it changed, or the flood began or calmed (atomically)."""
        if self.state_path is None or self.dry_run:
            return
        snapshot = self.planner.snapshot(now)
        mark = (snapshot["flooding"], snapshot["calm_for"] is None, snapshot["sources"],
                snapshot["blackhole"])
        if mark == self._saved:
            return
        try:
            write_json(self.state_path, {"saved_at": self.wall(), "upstream": snapshot})
        except OSError as exc:
            self.log(f"cannot write {self.state_path}: {exc.strerror or exc}")
        self._saved = mark

    # --- the loop ---------------------------------------------------------------------
    def run(self, stdin_fd: int, interval: float) -> int:
        """Poll every ``interval`` s and read ExaBGP's acks between polls, until stdin
        ends (status 0)."""
        os.set_blocking(stdin_fd, False)
        with selectors.DefaultSelector() as selector:
            selector.register(stdin_fd, selectors.EVENT_READ)
            self.start()
            next_poll = self.clock()
            while True:
                now = self.clock()
                if now >= next_poll:
                    self.poll()
                    next_poll = max(next_poll + interval, self.clock())
                    continue
                for _ in selector.select(next_poll - now):
                    try:
                        data = os.read(stdin_fd, 65536)
                    except BlockingIOError:
                        continue
                    if not self.take_input(data):
                        return 0


# --- the command ------------------------------------------------------------------------
def build_feeder(config: Config, interfaces: tuple[str, ...] | None,
                 dry_run: bool) -> tuple[Feeder, float]:
    up = config.upstream
    if not up.enabled:
        raise FlooddError(f"upstream.enabled is not true in {config.source}: nothing would "
                          "be announced")
    names = interface_names(interfaces or config.capture.interfaces)
    own = own_networks()
    destinations = list(up.destinations) or own_destinations(own)
    if not destinations:
        raise FlooddError("this host has no address to protect: set upstream.destinations")
    planner = Upstream(up, config.capture.ports, destinations, config.whitelist, own)
    socket_path = config.daemon.control_socket
    timeout = min(5.0, max(1.0, 2 * up.poll_interval))

    def ask_floodd() -> Any:
        return request(socket_path, "bans", timeout=timeout).get("bans")

    feeder = Feeder(planner, lambda now: read_counters(names, now), ask_floodd, sys.stdout,
                    dry_run=dry_run or up.dry_run,
                    state_path=os.path.join(config.daemon.state_dir, STATE_FILE))
    what = ", ".join(str(d) for d in destinations)
    feeder.log(f"watching {', '.join(names)} inbound; FlowSpec {up.action} of banned "
               f"sources to {what}" + (" (dry run: nothing is sent)" if feeder.dry_run else ""))
    return feeder, up.poll_interval


def _stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def _exabgp(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
        feeder, interval = build_feeder(config, tuple(args.interface or ()) or None,
                                        args.dry_run)
    except FlooddError as exc:
        kind = Failure if exc.exit_status == Failure.exit_status else FlooddError
        raise kind(f"exabgp: {exc}") from None
    signal.signal(signal.SIGTERM, _stop)
    try:
        return feeder.run(sys.stdin.fileno(), interval)
    except BrokenPipeError:  # ExaBGP went away while a line was written
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "exabgp", help="ExaBGP's API process: push floods upstream (FlowSpec, blackhole)",
        description="Run by ExaBGP as its API process (process floodd { run floodd exabgp "
                    "-c CONFIG; encoder text; }). Follows the running floodd over its "
                    "control socket and the capture interfaces' inbound rate; when the "
                    "rate stays over upstream.trigger of upstream.link_capacity, writes "
                    "FlowSpec announcements for the heaviest banned sources (and, with "
                    "upstream.blackhole, a blackhole route) on stdout, and withdraws them "
                    "upstream.hold after the flood. Logs on stderr; ends when stdin ends.")
    add_config_option(p)
    p.add_argument("-i", "--interface", action="append", metavar="IFACE",
                   help="measure this interface instead of the configured ones (repeat "
                        "for several)")
    p.add_argument("--dry-run", action="store_true",
                   help="log what would be announced and withdrawn; write nothing on stdout")
    p.set_defaults(handler=_exabgp)
