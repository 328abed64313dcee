"""``floodd run``: capture threads feed the rate tables; one main loop does everything else.

Startup: firewall set up, bans already in the kernel adopted (never unbanned and
re-banned), capture started, control socket opened, then ``READY=1``.  The main
loop wakes every ``tick`` (or at once for a signal or a control request):
evaluates the rules, bans in one batch, every ``rescan_interval`` reads the ban
counters back, expires stale bans and repairs a vanished table; it pings the
watchdog only while every capture thread is alive and making progress.  Every
change of the bans goes through one owner (floodd.enforce.banset), whose firewall
commands are bounded in time.
Signal handlers only set flags: SIGHUP reloads, SIGTERM/SIGINT stop.
"""

from __future__ import annotations

import heapq
import ipaddress
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from types import FrameType
from typing import AbstractSet, Any, Callable, Sequence

from prometheus_client import Histogram

from floodd import __version__
from floodd.detect.capture import LiveCapture, PacketSource
from floodd.detect.parse import Batch
from floodd.config import Config, load_config
from floodd.service.control import ControlServer, refusal
from floodd.errors import Failure, FlooddError
from floodd.enforce.banset import BanFailure, BanSet, FirewallWaiting, NewBan
from floodd.enforce.clock import Instant
from floodd.enforce.clock import now as clock_now
from floodd.enforce.firewall import make_backend
from floodd.enforce.firewall.base import Backend, Network
from floodd.scope import WHOLE, Target
from floodd.service.captures import Captures, CaptureWorker
from floodd.service.journal import EventLog
from floodd.service.metrics import (OPERATOR, Metrics, Snapshot, qtype_metric_label,
                                    refusal_label, scope_label)
from floodd.service.notify import Notifier
from floodd.service.throttle import Throttle
from floodd.decide.policy import Offences, Trigger, evaluate, plan
from floodd.decide.safety import own_networks, protected_reason
from floodd.enforce.firewall.fastdrop import meters
from floodd.decide.fleet import (FLEET, FleetBook, PushBan, Withdraw, is_fleet_rule,
                                 own_claims, push_ban)
from floodd.service.fastdrop import FastDrop
from floodd.service.fleet import FleetLink
from floodd.enforce.state import StateWriter, load_offences
from floodd.service.requests import (BanRequest, ListBans, Request, Status, Top, UnbanRequest,
                                     parse_request)
from floodd.detect.traffic import Candidates, Traffic, address_network, qtype_label

# Networks remembered for logging a warning or a refusal once per interval.
LOG_KEYS = 10_000
# A change request not taken up by the main loop within this long is dropped, not run;
# shorter than the command line's wait, so the client hears why.
REQUEST_TIMEOUT = 8.0
# Once taken up, a change ends within a few firewall command timeouts.
CHANGE_TIMEOUT = 30.0
SWITCH_INTERVAL = 0.001  # seconds: the interpreter's thread switch interval in the daemon
NEWEST_BANS = 50  # the newest bans a ``top`` reply lists


@dataclass(frozen=True)
class BanView:
    """The bans as ``top`` shows them, from the mirror (counters of the last rescan):
    per rule (or operator's reason) how many and the packets they dropped, and the
    newest bans.  Made by the main loop each tick and read by the control thread, so
    that ``top --watch`` never has the main loop read the kernel."""

    by_rule: dict[str, tuple[int, int]] = field(default_factory=dict)
    newest: tuple[dict[str, Any], ...] = ()


class _Pending:
    """A change request handed from the control thread to the main loop.

    Exactly one of two things happens, decided under ``_lock``: the main loop
    claims it and runs it (the control thread then waits for the reply), or the
    control thread gives up at its deadline and the request is never run.
    """

    def __init__(self, request: Request) -> None:
        self.request = request
        self.reply: queue.Queue[dict[str, Any]] = queue.Queue(maxsize=1)
        self._lock = threading.Lock()
        self._state = "waiting"  # -> "claimed" (main loop) or "abandoned" (control thread)

    def claim(self) -> bool:
        with self._lock:
            if self._state == "waiting":
                self._state = "claimed"
            return self._state == "claimed"

    def abandon(self) -> bool:
        """Give up unless the main loop already runs it; True if given up."""
        with self._lock:
            if self._state == "waiting":
                self._state = "abandoned"
            return self._state == "abandoned"


class Daemon:
    def __init__(self, config: Config, config_path: str | None, log: EventLog,
                 interfaces: tuple[str, ...] | None = None, dry_run: bool = False,
                 notifier: Notifier | None = None,
                 source_factory: Callable[[str, Config], PacketSource] | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.interfaces_override = interfaces
        self.dry_run = dry_run
        self.log = log
        self.notifier = notifier or Notifier()
        self.source_factory = source_factory or (
            lambda iface, cfg: LiveCapture(iface, cfg.capture,
                                           exclude_max=cfg.capture.exclude_banned))
        self.lock = threading.Lock()
        self.traffic = Traffic(config)
        self.captures = Captures()
        self.ban_view = BanView()  # replaced whole by the main loop (see BanView)
        self.backend_note = ""
        # The one owner of the bans (the kernel's, mirrored); every ban and unban goes
        # through it.  Its deadlines, like the offences, are on the monotonic clock.
        self.clock: Callable[[], Instant] = clock_now
        self.bans = BanSet(config.firewall)
        self.offences = Offences(config.firewall.max_ban_time)
        self.state: StateWriter | None = None  # saves the offences off the main loop
        # Set by a capture thread when a key crossed a ban threshold: the main loop
        # decides at once (at most every daemon.react_delay) instead of at the tick.
        self._crossed = threading.Event()
        self._crossed_at: float | None = None  # (monotonic) the first crossing not decided on
        self._last_react = 0.0
        # How busy each ban is (packets/s: its rule's rate when made, then its kernel
        # counter's growth between rescans), for choosing the heaviest ones to keep out of
        # the capture; and its counter at the last rescan (monotonic time, packets).
        self._heat: dict[Target, float] = {}
        self._drops: dict[Target, tuple[float, int]] = {}
        self._dropped = 0  # packets the bans dropped since start, from those counters
        self.metrics = Metrics()
        self.own: list[Network] = []
        self.control: ControlServer | None = None
        self.requests: queue.Queue[_Pending] = queue.Queue()
        self.started = time.monotonic()
        self._stop = False
        self._reload = False
        self._wake = threading.Event()
        # Networks warned about or refused lately: each is logged once per interval.
        self._warned: Throttle[tuple[str, Network]] = Throttle(LOG_KEYS)
        self._refused: Throttle[tuple[Network, str]] = Throttle(LOG_KEYS)
        self._last_packets = 0
        self._last_rate_at = time.monotonic()
        self.pps = 0.0
        self._capture_problem_logged: str | None = None
        self._sampling_logged = 1
        # The fleet link (crowdsec:) and the fleet's decisions floodd enforces (main loop).
        self.fleet: FleetLink | None = None
        self.fleet_book = FleetBook()
        self._fleet_planned = 0.0  # (monotonic) when the kernel last followed the book
        self._fleet_claimed = False  # the first startup reply was searched for own decisions
        self.fast = FastDrop(log)  # the kernel's own first response (fast_drop:)

    # --- signals: flags only --------------------------------------------------
    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self._reload = True
        else:
            self._stop = True
        self._wake.set()

    @property
    def interfaces(self) -> tuple[str, ...]:
        return self.interfaces_override or self.config.capture.interfaces

    # --- lifecycle -------------------------------------------------------------
    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        # The main loop waits for the GIL each time it wakes (a crossing, a firewall
        # command's end) while a capture thread counts: 1 ms slices instead of 5 keep a
        # crossing's ban within milliseconds; no cost while the main loop sleeps.
        sys.setswitchinterval(SWITCH_INTERVAL)
        try:
            self._startup()
        except FlooddError as exc:
            self.log.error(f"cannot start: {exc}")
            self._shutdown(flush=False)
            return 1
        self.notifier.ready(self._status_line())
        self.log.info(f"floodd {__version__} running: capturing on {', '.join(self.interfaces)}, "
                      f"firewall {self.backend_note}, {len(self.bans)} bans adopted, "
                      f"{len(self.config.rules)} rules", action="start")
        try:
            self._main_loop()
        finally:
            self._shutdown(flush=self.config.firewall.on_exit == "flush")
        return 0

    def _main_loop(self) -> None:
        tick = self.config.daemon.tick
        next_tick = time.monotonic() + tick
        next_rescan = time.monotonic() + self.config.firewall.rescan_interval
        next_summary = time.monotonic() + self.config.daemon.summary_interval
        watchdog = self.notifier.watchdog_interval
        next_ping = time.monotonic()
        while not self._stop:
            wake_at = next_tick
            if self._crossed.is_set():
                wake_at = min(wake_at, self._last_react + self.config.daemon.react_delay)
            self._wake.wait(max(0.0, wake_at - time.monotonic()))
            self._wake.clear()
            if self._stop:
                break
            if self._reload:
                self._reload = False
                self._do_reload()
            self._serve_requests()
            mono = time.monotonic()
            if mono < next_tick:
                if self._crossed.is_set() and \
                        mono >= self._last_react + self.config.daemon.react_delay:
                    self._crossed.clear()
                    self._last_react = mono
                    self._guarded("ban", self._react, self.clock(),
                                  self.metrics.tick_duration)
                continue
            next_tick = max(next_tick + self.config.daemon.tick, mono)
            at = self.clock()
            # A failing firewall command is logged and tried again next time; the
            # capture (and the watchdog) carry on.
            self._crossed.clear()
            self._guarded("ban", self._policy_tick, at, self.metrics.tick_duration)
            if self.fleet is not None:
                self._guarded("fleet ban", self._fleet_tick, at)
            if mono >= next_rescan:
                next_rescan += self.config.firewall.rescan_interval
                if next_rescan <= mono:  # fell behind (a slow tick): no burst of rescans
                    next_rescan = mono + self.config.firewall.rescan_interval
                self._guarded("rescan", self._rescan, at, self.metrics.rescan_duration)
            if mono >= next_summary:
                next_summary = max(next_summary + self.config.daemon.summary_interval, mono)
                self._summary()
            self._measure_rate(mono)
            self._publish()
            self._log_sampling()
            if self.captures.healthy(mono):
                if watchdog is not None and mono >= next_ping:
                    self.notifier.watchdog()
                    next_ping = mono + watchdog / 3
                self.notifier.status(self._status_line())
                if self._capture_problem_logged is not None:
                    self._capture_problem_logged = None
                    self.log.info("capture running again", action="capture")
            else:
                problem = self.captures.problem(mono)
                if problem != self._capture_problem_logged:
                    self._capture_problem_logged = problem
                    self.log.error(f"capture stopped: {problem}", action="capture")
                self.notifier.status("capture stopped: " + problem)

    def _guarded(self, what: str, step: Callable[[Instant], None], at: Instant,
                 duration: Histogram | None = None) -> None:
        """``step(at)``, a failure logged (it runs again next time); its time observed in
        ``duration``, if given."""
        started = time.monotonic()
        try:
            step(at)
        except FlooddError as exc:
            self.log.error(f"{what} failed, will try again: {exc}", action="error")
        finally:
            if duration is not None:
                duration.observe(time.monotonic() - started)

    def _startup(self) -> None:
        cfg = self.config
        # First, so that a second floodd stops before it touches the firewall or the state.
        self.control = ControlServer(cfg.daemon.control_socket, self._handle_request)
        self.control.start()
        address = cfg.metrics.address
        if address is not None:
            self.metrics.serve(*address)
        self.own = own_networks()
        at = self.clock()
        self.offences = load_offences(cfg.daemon.state_dir, at, cfg.firewall.max_ban_time)
        self.state = StateWriter(cfg.daemon.state_dir, cfg.firewall.max_ban_time,
                                 self._state_failed)
        backend, self.backend_note = self._make_backend(cfg)
        self.bans.start(at, backend)  # adopts the bans in the kernel, changes none
        try:
            self.fast.start(cfg, backend.name == "dry-run", self.own)
        except FlooddError as exc:  # floodd's own bans still work: run without it
            self.log.error(f"fast drop: cannot set up the kernel's meters, running "
                           f"without them: {exc}", action="fast-drop")
        if cfg.crowdsec.enabled:
            self.fleet = FleetLink(cfg.crowdsec, self.log)
            self.fleet.start()
        self._update_exclusions(at.mono)
        self.captures.start(self._open_captures(cfg))
        self._publish()

    def _make_backend(self, cfg: Config) -> tuple[Backend, str]:
        backend, why = make_backend(cfg.firewall, cfg.capture.ports, cfg.capture.protocols,
                                    dry_run=self.dry_run or cfg.firewall.backend == "dry-run",
                                    log=lambda text: self.log.info(text, action="dry-run"))
        return backend, f"{backend.name} ({why})"

    def _open_captures(self, cfg: Config) -> list[CaptureWorker]:
        return Captures.open(self.interfaces_override or cfg.capture.interfaces, cfg,
                             self.source_factory, self._count)

    def _shutdown(self, flush: bool) -> None:
        self.notifier.stopping()
        if self.fleet is not None:
            self.fleet.stop()
        self.fast.stop()
        self.captures.stop()
        if self.control is not None:
            self.control.close()
        self.metrics.close()
        if self.bans.started:
            if not flush:
                self.log.info(f"stopped; {len(self.bans)} bans kept in the firewall",
                              action="stop")
            else:
                try:
                    flushed = self.bans.flush()
                    self.metrics.unbans.labels("flushed").inc(flushed)
                    self.log.info(f"stopped; {flushed} bans flushed (on_exit: flush)",
                                  action="stop")
                except FlooddError as exc:
                    self.log.error(f"stopped; could not flush the bans: {exc}", action="stop")
            self._save_state(self.clock())
        if self.state is not None:
            self.state.close()

    # --- counting (capture threads) ---------------------------------------------
    def _count(self, now: float, batch: Batch, weight: int) -> None:
        """Count a batch read at ``now`` (monotonic: the tables' clock), a 1-in-``weight``
        sample of the packets; wake the main loop when a key crossed a ban threshold."""
        with self.lock:
            crossed = self.traffic.add_batch(now, batch.records, skip=self.banned_sources,
                                             weight=weight)
            if crossed and self._crossed_at is None:
                self._crossed_at = now
        if crossed:
            self._crossed.set()
            self._wake.set()

    @property
    def banned_sources(self) -> AbstractSet[bytes]:
        """The banned single addresses (packed): counted in the totals only."""
        return self.bans.addresses

    # --- the policy -------------------------------------------------------------
    def _protected(self, network: Network) -> str | None:
        return protected_reason(network, self.config.whitelist, self.own)

    def _react(self, at: Instant) -> None:
        """Between ticks: decide on the keys the capture saw cross a ban threshold."""
        with self.lock:
            candidates = self.traffic.take_candidates()
        self._policy_tick(at, candidates)

    def _policy_tick(self, at: Instant, candidates: Candidates | None = None) -> None:
        """Evaluate the rules (only on ``candidates``, when given) and ban."""
        cfg = self.config
        with self.lock:  # the tables run on the capture's clock: time.monotonic()
            if candidates is None:
                self.traffic.take_candidates()  # every key is looked at now
            crossed_at, self._crossed_at = self._crossed_at, None
            triggers = evaluate(at.mono, self.traffic, cfg.rules, cfg.trust, candidates)
            rules = {rule.name: rule for rule in cfg.rules}
            for trig in triggers:  # a flood must not teach its own hop values
                self.traffic.suspect(at.mono, rules[trig.rule], trig.key)
        if not triggers:
            return
        fw = cfg.firewall
        decided = plan(at.mono, triggers, self.bans.targets(), self._protected, fw.max_bans,
                       self.offences, fw.escalation_factor, fw.max_ban_time)
        for trig in decided.warnings:
            self._warn(at.mono, trig)
        self._log_refusals(at.mono, decided.refused)
        if not decided.bans or not self.bans.usable(at):
            return  # a firewall that did not answer was logged; it is read again soon
        try:
            done = self.bans.ban(at, [NewBan(trig.network, trig.rule, seconds, trig.scope)
                                      for trig, seconds in decided.bans])
        except BanFailure as exc:
            self.log.error(f"could not ban {len(decided.bans)} sources: {exc}", action="error")
            return
        landed = time.monotonic()
        added = {ban.target for ban in done.added}
        self._count_changes(done.removed, "replaced")
        self._tell_fleet([push_ban(trig.network, trig.scope, trig.rule, seconds,
                                   f"{trig.count} packets in {trig.window:g} s "
                                   f"({trig.rate:.1f}/s)")
                          for trig, seconds in decided.bans if trig.target in added],
                         done.removed)
        for trig, _ in decided.bans:
            if trig.target in added:
                self._heat[trig.target] = trig.rate
        self._update_exclusions(at.mono)
        with self.lock:  # the evidence is used up: a ban that ends is not made again on it
            for net, _ in added:
                if net.prefixlen == net.max_prefixlen:
                    self.traffic.forget(net.network_address.packed)
        escalated = False
        for trig, seconds in decided.bans:
            if trig.target not in added:
                continue
            self.metrics.bans_added.labels(trig.rule).inc()
            if crossed_at is not None:  # from the first crossing this decision woke for
                self.metrics.ban_latency.observe(landed - crossed_at)
            repeat = ""
            if trig.scope.whole_source:  # only bans of all its queries count as offences
                escalated = True
                offence = self.offences.record(trig.network, at.mono)
                repeat = f", offence #{offence.count}" if offence.count > 1 else ""
            if trig.narrowing is not None:
                self.log.notice(
                    f"narrow the ban of {trig.network} to traffic with other TTL/hop "
                    f"limits, as it looks forged: {trig.narrowing.describe()}",
                    action="narrow", source=trig.network, rule=trig.rule,
                    scope=trig.scope.text(), usual_hops="/".join(map(str, trig.narrowing.usual)),
                    packets=trig.count, packets_usual=trig.narrowing.at_usual)
            self.log.notice(
                f"ban {trig.target} for {seconds:g} s: rule {trig.rule}, {trig.count} "
                f"packets in {trig.window:g} s ({trig.rate:.1f}/s){repeat}",
                action="ban", source=trig.network, rule=trig.rule, rate=round(trig.rate, 1),
                packets=trig.count, ban_time=seconds, scope=trig.scope.text())
        if escalated:
            self._save_state(at)

    # --- the fleet (crowdsec:) ----------------------------------------------------
    def _tell_fleet(self, pushes: Sequence[PushBan | None], gone: Sequence[Target]) -> None:
        """Hand the fleet link floodd's new bans and the ends of its bans (fleet bans are
        never pushed; withdrawing a ban never pushed does nothing)."""
        if self.fleet is not None:
            self.fleet.submit([*(p for p in pushes if p is not None),
                               *(Withdraw(t) for t in gone)])

    def _fleet_tick(self, at: Instant) -> None:
        """Take in the fleet's decisions; make the kernel follow them when some came, and
        every rescan interval (a decision a ban of floodd's covered may be due now)."""
        assert self.fleet is not None
        updates = self.fleet.updates()
        if not updates and at.mono < self._fleet_planned + self.config.firewall.rescan_interval:
            return
        banned = {t: (self.bans.rule(t), self.bans.deadline(t)) for t in self.bans.targets()}
        for update in updates:
            own: tuple[int, ...] = ()
            if update.startup and not self._fleet_claimed:  # pushed before a restart
                self._fleet_claimed = True
                claims = own_claims(update, {t: rule for t, (rule, _) in banned.items()
                                             if not is_fleet_rule(rule)})
                self.fleet.submit(list(claims))
                own = tuple(i for c in claims for i in c.ids)
            self.fleet_book.apply(update, self.config.crowdsec, own)
        self._fleet_planned = at.mono
        if not self.bans.usable(at):
            return
        cfg = self.config
        todo = self.fleet_book.plan(at.mono, banned, self._protected, cfg.crowdsec.max_bans,
                                    cfg.firewall.max_bans - len(banned))
        for r in todo.refused:
            self.metrics.refused.labels(refusal_label(r.reason)).inc()
            if self._refused.allow(at.mono, (r.network, r.reason), 60):
                self.log.warning(f"not banning {r.network} ({r.reason}): {r.rule}",
                                 action="refuse", source=r.network, rule=r.rule)
        # A network floodd also bans on its own keeps all its bans until the kernel ends
        # them: an unban removes every ban of a network.
        mine = {t.network for t, (rule, _) in banned.items() if not is_fleet_rule(rule)}
        over = [t.network for t in todo.unbans if t.network not in mine]
        if over:
            gone = self.bans.unban(at, over)
            self._count_changes(gone, "expired")
            for t in gone:
                self.log.info(f"unban {t}: the fleet's decision is over", action="unban",
                              source=t.network, scope=t.scope.text())
        if todo.bans:
            done = self.bans.ban(at, [NewBan(b.network, b.rule, b.seconds, b.scope)
                                      for b in todo.bans])
            self._count_changes(done.removed, "replaced")
            for ban in done.added:
                extended = ban.target in banned
                if not extended:
                    self.metrics.bans_added.labels(FLEET).inc()
                self.log.notice(f"{'extend' if extended else 'ban'} {ban.target} for "
                                f"{ban.expires - at.wall:.0f} s: {ban.rule}",
                                action="ban", source=ban.network, rule=ban.rule,
                                ban_time=round(ban.expires - at.wall), scope=ban.scope.text())
        if over or todo.bans:
            self._update_exclusions(at.mono)

    def _fleet_status(self) -> dict[str, Any] | None:
        """The fleet link for ``floodd status`` (control thread: reads only)."""
        if self.fleet is None:
            return None
        bans = sum(n for (rule, _), n in self.metrics.snapshot.bans.items() if rule == FLEET)
        return {**self.fleet.state.as_json(), "decisions": len(self.fleet_book), "bans": bans}

    def _warn(self, mono: float, trig: Trigger) -> None:
        """Log a warn rule's trigger, once per rule window for each network."""
        if not self._warned.allow(mono, (trig.rule, trig.network), trig.window):
            return
        self.log.warning(f"warn {trig.network}: rule {trig.rule}, {trig.count} packets in "
                         f"{trig.window:g} s ({trig.rate:.1f}/s)", action="warn",
                         source=trig.network, rule=trig.rule, rate=round(trig.rate, 1),
                         packets=trig.count)

    def _log_refusals(self, mono: float, refused: list[Any]) -> None:
        """Log the refused bans, once a minute for each network and reason (the
        max_bans refusals together in one line)."""
        for r in refused:
            self.metrics.refused.labels(refusal_label(r.reason)).inc()
        capped = [r for r in refused if r.reason.startswith("max_bans")]
        if capped:
            key = (ipaddress.ip_network("0.0.0.0/0"), "max_bans")
            if self._refused.allow(mono, key, 60):
                self.log.warning(
                    f"max_bans ({self.config.firewall.max_bans}) reached: {len(capped)} more "
                    f"sources over a threshold are not banned (highest {capped[0].trigger.network}"
                    f" at {capped[0].trigger.rate:.1f}/s)", action="refuse",
                    rule=capped[0].trigger.rule, packets=len(capped))
        for r in refused:
            if r in capped:
                continue
            if not self._refused.allow(mono, (r.trigger.network, r.reason), 60):
                continue
            self.log.warning(f"not banning {r.trigger.network} ({r.reason}): rule "
                             f"{r.trigger.rule}, {r.trigger.rate:.1f}/s", action="refuse",
                             source=r.trigger.network, rule=r.trigger.rule,
                             rate=round(r.trigger.rate, 1))

    # --- rescan: counters, expiry, repair ---------------------------------------
    def _rescan(self, at: Instant) -> None:
        """Through the ban owner: read the counters back, repair, extend, expire."""
        try:
            self.own = own_networks()  # addresses come and go (DHCP, failover)
        except FlooddError as exc:
            self.log.warning(f"cannot read this host's addresses, keeping the last ones: {exc}")
        self.offences.forget_old(at.mono)
        done = self.bans.rescan(at)
        if done is None:
            return  # the firewall did not answer: left alone for a while (the fast drop too)
        self.fast.follow(self.config, self.own)
        self.fast.rescan()
        for ib in done.unbanned:  # their last packets, since the previous rescan
            last = self._drops.get(ib.target)
            self._dropped += max(0, ib.packets - (last[1] if last is not None else 0))
        self._measure_heat(at.mono)
        self._update_exclusions(at.mono)
        if done.set_up or done.restored:
            why = ("floodd's firewall table is gone" if done.set_up else
                   f"{len(done.restored)} bans vanished from the firewall")
            self.log.warning(f"repair: {why}; re-created {len(done.restored)} bans",
                             action="repair", packets=len(done.restored))
        if done.adopted:
            self.log.info(f"adopted {len(done.adopted)} bans found in the firewall: "
                          f"{', '.join(str(ib.network) for ib in done.adopted[:5])}"
                          f"{', ...' if len(done.adopted) > 5 else ''}", action="adopt",
                          packets=len(done.adopted))
        self._tell_fleet([push_ban(ban.network, ban.scope, ban.rule, ban.expires - at.wall,
                                   f"still dropping {self._heat.get(ban.target, 0.0):.1f} "
                                   "packets/s") for ban in done.extended],
                         [*(ib.target for ib in done.unbanned),
                          *(ban.target for ban in done.expired)])
        stale = self.config.firewall.stale_after
        self._count_changes([ib.target for ib in done.unbanned], "expired")
        self._count_changes([ban.target for ban in done.expired], "expired")
        for ib in done.unbanned:
            self.log.info(f"unban {ib.target}: ban time over and no packets for "
                          f"{stale:g} s ({ib.packets} packets dropped in all)",
                          action="expire", source=ib.network, rule=ib.rule,
                          packets=ib.packets, scope=ib.scope.text())
        for ban in done.expired:
            self.log.info(f"unban {ban.target}: ban time over (ended by the kernel)",
                          action="expire", source=ban.network, rule=ban.rule,
                          scope=ban.scope.text())

    # --- reload -----------------------------------------------------------------
    def _do_reload(self) -> None:
        self.notifier.reloading()
        try:
            new = load_config(self.config_path)
            # A capture that cannot open (bad filter, missing interface) refuses the reload.
            workers = self._open_captures(new) if new.capture != self.config.capture else None
        except FlooddError as exc:
            self.log.error(f"reload failed, keeping the old configuration: {exc}",
                           action="reload")
            self.notifier.ready(self._status_line())
            return
        old = self.config
        self.config = new
        self.log.set_level(new.daemon.log_level)
        if new.firewall.backend != old.firewall.backend or \
                new.firewall.scope != old.firewall.scope or \
                new.daemon.control_socket != old.daemon.control_socket:
            self.log.warning("firewall.backend, firewall.scope and daemon.control_socket "
                             "changes take effect on restart", action="reload")
        if new.crowdsec != old.crowdsec:
            self.log.warning("crowdsec changes take effect on restart", action="reload")
        with self.lock:  # the tables of unchanged rules keep their counts
            self.traffic.reconfigure(new)
        if workers is not None:
            self.captures.stop()
            self.captures.start(workers)
        self.offences.forget_after = new.firewall.max_ban_time
        if self.state is not None:
            self.state.state_dir = new.daemon.state_dir
            self.state.forget_after = new.firewall.max_ban_time
        self._update_exclusions(time.monotonic())
        if self.bans.started and (self.fast.active or new.fast_drop.enabled):
            try:  # the meters follow the rules, the ports and the whitelist
                if (meters(new), new.fast_drop, new.capture.ports) != \
                        (meters(old), old.fast_drop, old.capture.ports):
                    self.fast.start(new, self.bans.backend.name == "dry-run", self.own)
                else:
                    self.fast.follow(new, self.own)
            except FlooddError as exc:
                self.log.error(f"reload: the fast drop does not follow the new "
                               f"configuration: {exc}", action="reload")
        if self.bans.started:
            try:  # the drop rules follow capture.ports and capture.protocols
                self.bans.configure(new.firewall, new.capture.ports, new.capture.protocols)
            except FlooddError as exc:
                self.log.error(f"reload: the drop rules do not follow the new configuration: "
                               f"{exc}", action="reload")
        self.log.info(f"reloaded {new.source}: {len(new.rules)} rules", action="reload")
        self.notifier.ready(self._status_line())

    # --- status and control -----------------------------------------------------
    def _measure_rate(self, mono: float) -> None:
        dt = mono - self._last_rate_at
        if dt >= 1.0:
            self.pps = (self.traffic.packets - self._last_packets) / dt
            self._last_packets = self.traffic.packets
            self._last_rate_at = mono

    def _log_sampling(self) -> None:
        """Say when the capture starts, changes or stops sampling."""
        now = self.captures.sampling
        if now == self._sampling_logged:
            return
        if now > 1:
            self.log.warning(f"capture overloaded: counting 1 in {now} packets, counts "
                             f"scaled by {now} (was 1 in {self._sampling_logged})",
                             action="capture", rate=round(self.pps, 1))
        else:
            self.log.info("capture keeps up again: counting every packet", action="capture")
        self._sampling_logged = now

    def _capture_note(self) -> str:
        sampling, excluded_bans = self.captures.sampling, self.captures.excluded
        sampled = f", counting 1 in {sampling} packets" if sampling > 1 else ""
        excluded = f", {excluded_bans} bans kept out of the capture" if excluded_bans else ""
        return sampled + excluded

    def _status_line(self) -> str:
        snap = self.metrics.snapshot
        return (f"{self.pps:.0f} packets/s, {snap.dropped} kernel drops, "
                f"{sum(snap.bans.values())} bans{self._capture_note()}")

    def _summary(self) -> None:
        snap = self.metrics.snapshot
        bans = sum(snap.bans.values())
        self.log.info(f"summary: {self.pps:.0f} packets/s, {snap.packets} packets, "
                      f"{snap.dropped} kernel drops, {bans} bans, "
                      f"{snap.dropped_packets} packets dropped by them, "
                      f"{self.traffic.sources.pruned} keys pruned{self._capture_note()}",
                      action="summary", packets=snap.packets, rate=round(self.pps, 1),
                      bans=bans, drops=snap.dropped)

    def _publish(self) -> None:
        """Replace the metrics' snapshot with the numbers of now (main loop only)."""
        with self.lock:
            queries = list(self.traffic.queries.items())
            keys = self.traffic.table_keys()
        by_qtype: dict[str, int] = {}
        for code, n in queries:
            name = qtype_metric_label(code)
            by_qtype[name] = by_qtype.get(name, 0) + n
        names = {rule.name for rule in self.config.rules}
        bans: dict[tuple[str, str], int] = {}
        by_rule: dict[str, tuple[int, int]] = {}
        targets = self.bans.targets()
        for target in targets:
            rule = self.bans.rule(target)
            kind = rule if rule in names else FLEET if is_fleet_rule(rule) else OPERATOR
            label = (kind, scope_label(target.scope))
            bans[label] = bans.get(label, 0) + 1
            count, dropped = by_rule.get(rule, (0, 0))
            by_rule[rule] = (count + 1, dropped + self.bans.packets(target))
        newest = heapq.nlargest(NEWEST_BANS, targets, key=self.bans.since)
        self.ban_view = BanView(by_rule, tuple(
            {"source": str(t.network), "rule": self.bans.rule(t), "since": self.bans.since(t),
             "packets": self.bans.packets(t), "scope": t.scope.as_json()} for t in newest))
        self.metrics.snapshot = Snapshot(
            interfaces=self.captures.counts(),
            sampling=self.captures.sampling, queries=by_qtype, bans=bans,
            max_bans=self.config.firewall.max_bans, dropped_packets=self._dropped,
            table_keys=keys, fast_drop=self.fast.counts)

    def _count_changes(self, targets: Sequence[Target], reason: str) -> None:
        if targets:
            self.metrics.unbans.labels(reason).inc(len(targets))

    def _top(self, n: int) -> list[dict[str, Any]]:
        with self.lock:
            window = self.traffic.sources.window
            now = time.monotonic()
            rows = self.traffic.sources.top(now, n)
            mixes = self.traffic.qtype_mixes(now, [src for src, _ in rows])
        return [{"source": str(address_network(src).network_address), "packets": c,
                 "rate": c / window, "banned": src in self.banned_sources,
                 "qtypes": {qtype_label(qt): k for qt, k in mix.items()}}
                for (src, c), mix in zip(rows, mixes)]

    def _handle_request(self, body: Any) -> dict[str, Any]:
        """Runs in the control thread: validates, answers read-only requests here and
        hands changes to the main loop, waiting at most ``REQUEST_TIMEOUT``."""
        req = parse_request(body)
        if isinstance(req, Status):
            stats = self.captures.stats()
            return {"ok": True, "version": __version__, "pid": os.getpid(),
                    "uptime": time.monotonic() - self.started, "backend": self.backend_note,
                    "dry_run": self.dry_run, "interfaces": list(self.interfaces),
                    "pps": self.pps, "packets": self.traffic.packets,
                    "received": stats.received, "kernel_drops": stats.dropped,
                    "bans": len(self.bans), "max_bans": self.config.firewall.max_bans,
                    "sampling": self.captures.sampling,
                    "excluded": self.captures.excluded,
                    "top": self._top(10), "fleet": self._fleet_status(),
                    "fast_drop": self.fast.status()}
        if isinstance(req, Top):
            view = self.ban_view
            return {"ok": True, "top": self._top(req.n),
                    "bans_by_rule": {rule: list(n) for rule, n in view.by_rule.items()},
                    "newest_bans": list(view.newest)}
        pending = _Pending(req)
        self.requests.put(pending)
        self._wake.set()
        try:
            return pending.reply.get(timeout=REQUEST_TIMEOUT)
        except queue.Empty:
            if pending.abandon():
                return {"ok": False, "error": f"floodd is busy (no answer within "
                                              f"{REQUEST_TIMEOUT:g} s); nothing was done, "
                                              "try again", "failed": True}
        try:  # the main loop is running it now: its answer follows
            return pending.reply.get(timeout=CHANGE_TIMEOUT)
        except queue.Empty:
            return {"ok": False, "error": f"floodd did not finish the request within "
                                          f"{REQUEST_TIMEOUT + CHANGE_TIMEOUT:g} s; see the "
                                          "journal", "failed": True}

    def _serve_requests(self) -> None:
        while True:
            try:
                pending = self.requests.get_nowait()
            except queue.Empty:
                return
            if not pending.claim():
                continue  # its client was told nothing was done
            try:
                reply = self._change(pending.request)
                if not isinstance(pending.request, ListBans):
                    self._publish()  # a ban or unban shows in status, top and metrics at once
                pending.reply.put(reply)
            except FlooddError as exc:
                pending.reply.put(refusal(exc))
            except Exception as exc:  # a bug in one request must not end the main loop
                self.log.error(f"internal error in a control request: "
                               f"{type(exc).__name__}: {exc}", action="error")
                pending.reply.put({"ok": False, "failed": True,
                                   "error": f"internal error: {type(exc).__name__}: {exc}"})

    def _change(self, req: Request) -> dict[str, Any]:
        """List, ban and unban for the control socket, in the main loop, through the ban
        owner; a refusal or a firewall failure is a FlooddError (the reply's error)."""
        if isinstance(req, BanRequest):
            what = f"ban {req.network}"
        elif isinstance(req, UnbanRequest):
            what = "unban --all" if req.network is None else f"unban {req.network}"
        elif isinstance(req, ListBans):
            what = "listing the bans"
        else:
            raise FlooddError(f"not a change of the bans: {type(req).__name__}")
        at = self.clock()
        try:
            if isinstance(req, ListBans):
                return {"ok": True, "bans": [ib.as_json() for ib in self.bans.listing(at)]}
            if isinstance(req, BanRequest):
                return self._operator_ban(at, req)
            return self._operator_unban(at, req)
        except BanFailure as exc:
            if not isinstance(exc, FirewallWaiting):  # that failure is logged already
                self.log.error(f"{what} by the operator failed: {exc}", action="error")
            raise Failure(f"{what} failed: {exc}") from exc

    def _operator_ban(self, at: Instant, req: BanRequest) -> dict[str, Any]:
        network = req.network
        reason = self._protected(network)
        if reason is not None and not req.force:
            raise FlooddError(f"ban: refusing to ban {network}: {reason} "
                              "(use --force to ban it anyway)")
        done = self.bans.ban(at, [NewBan(network, req.reason, req.seconds)])
        self._count_changes(done.removed, "replaced")
        self._update_exclusions(at.mono)
        ban = next((b for b in done.added if b.target == (network, WHOLE)), None)
        if ban is None:
            holder = self.bans.holder(network)
            raise Failure(f"ban: {network} was not added: it lies inside the banned "
                              f"prefix {holder}" if holder else f"ban: {network} was not added")
        self.metrics.bans_added.labels(OPERATOR).inc()
        replaced = "".join(f", replacing the ban of {n}" for n in done.removed)
        self.log.notice(f"ban {network} for {req.seconds:g} s by the operator: "
                        f"{req.reason}{replaced}", action="ban", source=network, rule=req.reason,
                        ban_time=req.seconds)
        return {"ok": True, "banned": str(network), "expires": ban.expires}

    def _operator_unban(self, at: Instant, req: UnbanRequest) -> dict[str, Any]:
        gone = self.bans.unban(at, None if req.network is None else [req.network])
        self._count_changes(gone, "operator")
        self.fleet_book.dismiss(None if req.network is None else [req.network])
        self._tell_fleet([], gone)
        self._update_exclusions(at.mono)
        if req.network is not None and not gone:
            raise Failure(f"unban: {req.network} is not banned")
        with self.lock:
            for n in dict.fromkeys(t.network for t in gone):
                self.traffic.forget(n.network_address.packed)
        for t in gone:
            self.log.notice(f"unban {t} by the operator", action="unban", source=t.network,
                            scope=t.scope.text())
        return {"ok": True, "unbanned": list(dict.fromkeys(str(t.network) for t in gone)),
                "bans": [{"source": str(t.network), "scope": t.scope.as_json()}
                         for t in gone]}

    def _save_state(self, now: Instant) -> None:
        if self.state is not None:
            self.state.submit(self.offences, now)

    def _state_failed(self, exc: OSError) -> None:
        """The state writer could not save (called in its thread)."""
        self.log.warning(f"cannot save state in {self.config.daemon.state_dir}: "
                         f"{exc.strerror or exc}")

    def _measure_heat(self, mono: float) -> None:
        """After a listing: each ban's packets/s dropped since the previous rescan."""
        drops: dict[Target, tuple[float, int]] = {}
        for target in self.bans.targets():
            packets = self.bans.packets(target)
            last = self._drops.get(target)
            if last is not None and mono > last[0] and packets >= last[1]:
                self._heat[target] = (packets - last[1]) / (mono - last[0])
            # A counter first seen, or reset (re-created), counts from zero.
            self._dropped += packets - last[1] if last is not None and packets >= last[1] \
                else packets
            drops[target] = (mono, packets)
        self._drops = drops

    def _update_exclusions(self, mono: float) -> None:
        """Hand the capture threads the heaviest bans whose packets the kernel drops
        whatever their content (all of a source's queries, or its UDP ones, at any or at
        unusual TTL/hop limits): counting those packets teaches floodd nothing the ban
        counters do not say.  Bans of one query type stay in the capture.

        Only bans that a rescan will see again before they end are left out: the kernel
        may end a ban by its timeout, and its packets must then be counted again; each
        rescan extends active bans and comes here again."""
        cfg = self.config
        # A dry run's bans drop nothing: their packets must still be counted.  Only the
        # nftables backend is shown to drop exactly what is left out (see the README).
        limit = cfg.capture.exclude_banned if self.backend_note.startswith("nftables") else 0
        horizon = mono + cfg.firewall.rescan_interval + cfg.daemon.tick + 1.0
        banned = [t for t in self.bans.targets() if t.scope.qtype is None]
        self._heat = {t: self._heat.get(t, 0.0) for t in banned}
        lasting = [t for t in banned if self.bans.deadline(t) > horizon]
        self.captures.exclude(
            tuple(sorted(lasting, key=self._heat.__getitem__, reverse=True)[:limit])
            if limit else ())

