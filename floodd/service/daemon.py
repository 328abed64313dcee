"""``floodd run``: capture threads feed the rate tables; one main loop does everything else.

Startup: firewall set up, bans already in the kernel adopted (never unbanned and
re-banned), capture started, control socket opened, then ``READY=1``.  The main
loop wakes every ``tick`` (or at once for a signal or a control request):
evaluates the rules, bans in one batch, every ``rescan_interval`` reads the ban
counters back, expires stale bans and repairs a vanished table; it pings the
watchdog only while every capture thread is alive and making progress.
Signal handlers only set flags: SIGHUP reloads, SIGTERM/SIGINT stop.
"""

from __future__ import annotations

import ipaddress
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass
from types import FrameType
from typing import Any, Callable

from floodd import __version__
from floodd.detect.capture import CaptureStats, LiveCapture, PacketSource
from floodd.config import Config, load_config
from floodd.service.control import ControlServer
from floodd.errors import FlooddError
from floodd.enforce.expiry import BanTracker
from floodd.enforce.firewall import make_backend
from floodd.enforce.firewall.base import Backend, Ban, Network
from floodd.service.journal import EventLog
from floodd.service.notify import Notifier
from floodd.decide.policy import Offence, Trigger, evaluate, plan, remembered
from floodd.decide.safety import own_networks, protected_reason
from floodd.enforce.state import load_offences, save_offences
from floodd.detect.traffic import Traffic, address_network

# A capture thread that has not come round its read loop for this long is wedged.
CAPTURE_STALL = 5.0
READ_TIMEOUT = 0.25


class CaptureWorker(threading.Thread):
    """Reads one packet source and counts every batch into the shared tables."""

    def __init__(self, source: PacketSource, name: str, count: Callable[[Any], None]) -> None:
        super().__init__(name=f"floodd-capture-{name}", daemon=True)
        self.source = source
        self.interface = name
        self.count = count
        self.heartbeat = time.monotonic()
        self.error: str | None = None
        self._stop_event = threading.Event()
        self._source_lock = threading.Lock()
        self._closed = False
        self._stats = CaptureStats(0, 0, 0)

    def run(self) -> None:
        try:
            while not self._stop_event.is_set():
                batch = self.source.read(READ_TIMEOUT)
                if batch is None:
                    break
                if batch.records:
                    self.count(batch)
                self.heartbeat = time.monotonic()
        except FlooddError as exc:
            self.error = str(exc)
        except Exception as exc:  # a capture failure must reach the log, not kill silently
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            with self._source_lock:
                self._closed = True
                self.source.close()

    def stats(self) -> CaptureStats:
        """The source's counters; the last ones read once it failed or was closed."""
        with self._source_lock:
            if not self._closed:
                try:
                    self._stats = self.source.stats()
                except Exception:  # a failing capture keeps its last figures
                    pass
            return self._stats

    def stop(self) -> None:
        self._stop_event.set()

    def healthy(self, now: float) -> bool:
        return self.is_alive() and self.error is None and now - self.heartbeat < CAPTURE_STALL


@dataclass
class _Request:
    body: dict[str, Any]
    reply: queue.Queue[dict[str, Any]]


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
            lambda iface, cfg: LiveCapture(iface, cfg.capture))
        self.lock = threading.Lock()
        self.traffic = Traffic(config)
        self.workers: list[CaptureWorker] = []
        self.backend: Backend | None = None
        self.backend_note = ""
        self.bans: dict[Network, Ban] = {}
        self.banned_sources: set[bytes] = set()
        self.offences: dict[Network, Offence] = {}
        self.tracker: BanTracker | None = None
        self.own: list[Network] = []
        self.control: ControlServer | None = None
        self.requests: queue.Queue[_Request] = queue.Queue()
        self.started = time.time()
        self._stop = False
        self._reload = False
        self._wake = threading.Event()
        self._warned: dict[tuple[str, Network], float] = {}
        self._refused: dict[tuple[Network, str], float] = {}
        self._last_packets = 0
        self._last_rate_at = time.monotonic()
        self.pps = 0.0
        self._capture_problem_logged: str | None = None

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
            self._wake.wait(max(0.0, next_tick - time.monotonic()))
            self._wake.clear()
            if self._stop:
                break
            if self._reload:
                self._reload = False
                self._do_reload()
            self._serve_requests()
            mono = time.monotonic()
            if mono < next_tick:
                continue
            next_tick = max(next_tick + self.config.daemon.tick, mono)
            now = time.time()
            # A failing firewall command is logged and tried again next time; the
            # capture (and the watchdog) carry on.
            self._guarded("ban", self._policy_tick, now)
            if mono >= next_rescan:
                next_rescan += self.config.firewall.rescan_interval
                if next_rescan <= mono:  # fell behind (a slow tick): no burst of rescans
                    next_rescan = mono + self.config.firewall.rescan_interval
                self._guarded("rescan", self._rescan, now)
            if mono >= next_summary:
                next_summary = max(next_summary + self.config.daemon.summary_interval, mono)
                self._summary()
            self._measure_rate(mono)
            if self._captures_healthy(mono):
                if watchdog is not None and mono >= next_ping:
                    self.notifier.watchdog()
                    next_ping = mono + watchdog / 3
                self.notifier.status(self._status_line())
                if self._capture_problem_logged is not None:
                    self._capture_problem_logged = None
                    self.log.info("capture running again", action="capture")
            else:
                problem = self._capture_problem(mono)
                if problem != self._capture_problem_logged:
                    self._capture_problem_logged = problem
                    self.log.error(f"capture stopped: {problem}", action="capture")
                self.notifier.status("capture stopped: " + problem)

    def _guarded(self, what: str, step: Callable[[float], None], now: float) -> None:
        try:
            step(now)
        except FlooddError as exc:
            self.log.error(f"{what} failed, will try again: {exc}", action="error")

    def _startup(self) -> None:
        cfg = self.config
        # First, so that a second floodd stops before it touches the firewall or the state.
        self.control = ControlServer(cfg.daemon.control_socket, self._handle_request)
        self.control.start()
        self.own = own_networks()
        self.offences = load_offences(cfg.daemon.state_dir)
        self.backend, self.backend_note = self._make_backend(cfg)
        self.backend.setup()
        self.backend.commit()
        installed = self.backend.list()
        now = time.time()
        for ib in installed:
            self.bans[ib.network] = Ban(ib.network, ib.rule, ib.since, ib.expires)
        self._refresh_banned_sources()
        self.tracker = BanTracker(cfg.firewall)
        self.tracker.adopt(now, installed)
        self._start_captures(self._open_captures(cfg))

    def _make_backend(self, cfg: Config) -> tuple[Backend, str]:
        backend, why = make_backend(cfg.firewall, cfg.capture.ports, cfg.capture.protocols,
                                    dry_run=self.dry_run or cfg.firewall.backend == "dry-run",
                                    log=lambda text: self.log.info(text, action="dry-run"))
        return backend, f"{backend.name} ({why})"

    def _open_captures(self, cfg: Config) -> list[CaptureWorker]:
        """Workers for every interface of ``cfg``, sources open, not started yet; if one
        cannot open, none stays open."""
        workers: list[CaptureWorker] = []
        try:
            for iface in self.interfaces_override or cfg.capture.interfaces:
                workers.append(CaptureWorker(self.source_factory(iface, cfg), iface,
                                             self._count))
        except BaseException:
            for w in workers:
                w.source.close()
            raise
        return workers

    def _start_captures(self, workers: list[CaptureWorker]) -> None:
        for w in workers:
            w.start()
        self.workers = workers

    def _stop_captures(self) -> None:
        for w in self.workers:
            w.stop()
        for w in self.workers:
            w.join(timeout=1.0)
        self.workers = []

    def _shutdown(self, flush: bool) -> None:
        self.notifier.stopping()
        self._stop_captures()
        if self.control is not None:
            self.control.close()
        if self.backend is not None:
            if flush:
                self.backend.teardown()
                self.log.info(f"stopped; {len(self.bans)} bans flushed (on_exit: flush)",
                              action="stop")
            else:
                self.log.info(f"stopped; {len(self.bans)} bans kept in the firewall",
                              action="stop")
            self._save_state(time.time())

    # --- counting (capture threads) ---------------------------------------------
    def _count(self, batch: Any) -> None:
        with self.lock:
            self.traffic.add_batch(batch, skip=self.banned_sources)

    def _refresh_banned_sources(self) -> None:
        self.banned_sources = {n.network_address.packed for n in self.bans
                               if n.prefixlen == n.max_prefixlen}

    # --- the policy -------------------------------------------------------------
    def _protected(self, network: Network) -> str | None:
        return protected_reason(network, self.config.whitelist, self.own)

    def _policy_tick(self, now: float) -> None:
        cfg = self.config
        with self.lock:
            triggers = evaluate(now, self.traffic, cfg.rules)
        if not triggers:
            return
        fw = cfg.firewall
        decided = plan(now, triggers, list(self.bans), self._protected, fw.max_bans,
                       self.offences, fw.escalation_factor, fw.max_ban_time)
        for trig in decided.warnings:
            self._warn(now, trig)
        self._log_refusals(now, decided.refused)
        if not decided.bans:
            return
        new = [Ban(trig.network, trig.rule, now, now + seconds)
               for trig, seconds in decided.bans]
        assert self.backend is not None
        self.backend.ban(new)
        try:
            self.backend.commit()
        except FlooddError as exc:
            self.log.error(f"could not ban {len(new)} sources: {exc}", action="error")
            return
        with self.lock:
            for ban, (trig, seconds) in zip(new, decided.bans):
                self.bans[ban.network] = ban
                net = ban.network
                if net.prefixlen == net.max_prefixlen:
                    src = net.network_address.packed
                    self.banned_sources.add(src)
                    self.traffic.sources.forget(src)
        for ban, (trig, seconds) in zip(new, decided.bans):
            old = remembered(self.offences.get(ban.network), now, fw.max_ban_time)
            self.offences[ban.network] = Offence((old.count if old else 0) + 1, now)
            repeat = f", offence #{old.count + 1}" if old else ""
            self.log.notice(
                f"ban {ban.network} for {seconds:g} s: rule {trig.rule}, {trig.count} "
                f"packets in {trig.window:g} s ({trig.rate:.1f}/s){repeat}",
                action="ban", source=ban.network, rule=trig.rule, rate=round(trig.rate, 1),
                packets=trig.count, ban_time=seconds)
        if self.tracker is not None:
            self.tracker.banned(now, new)
        self._save_state(now)

    def _warn(self, now: float, trig: Trigger) -> None:
        key = (trig.rule, trig.network)
        if now - self._warned.get(key, -1e18) < trig.window:
            return
        self._warned[key] = now
        self.log.warning(f"warn {trig.network}: rule {trig.rule}, {trig.count} packets in "
                         f"{trig.window:g} s ({trig.rate:.1f}/s)", action="warn",
                         source=trig.network, rule=trig.rule, rate=round(trig.rate, 1),
                         packets=trig.count)

    def _log_refusals(self, now: float, refused: list[Any]) -> None:
        capped = [r for r in refused if r.reason.startswith("max_bans")]
        if capped:
            key = (ipaddress.ip_network("0.0.0.0/0"), "max_bans")
            if now - self._refused.get(key, -1e18) >= 60:
                self._refused[key] = now
                self.log.warning(
                    f"max_bans ({self.config.firewall.max_bans}) reached: {len(capped)} more "
                    f"sources over a threshold are not banned (highest {capped[0].trigger.network}"
                    f" at {capped[0].trigger.rate:.1f}/s)", action="refuse",
                    rule=capped[0].trigger.rule, packets=len(capped))
        for r in refused:
            if r in capped:
                continue
            key = (r.trigger.network, r.reason)
            if now - self._refused.get(key, -1e18) < 60:
                continue
            self._refused[key] = now
            self.log.warning(f"not banning {r.trigger.network} ({r.reason}): rule "
                             f"{r.trigger.rule}, {r.trigger.rate:.1f}/s", action="refuse",
                             source=r.trigger.network, rule=r.trigger.rule,
                             rate=round(r.trigger.rate, 1))
        if len(self._refused) > 10_000:
            self._refused = {k: t for k, t in self._refused.items() if now - t < 60}

    # --- rescan: counters, expiry, repair ---------------------------------------
    def _rescan(self, now: float) -> None:
        assert self.backend is not None and self.tracker is not None
        try:
            self.own = own_networks()  # addresses come and go (DHCP, failover)
        except FlooddError as exc:
            self.log.warning(f"cannot read this host's addresses, keeping the last ones: {exc}")
        if not self.backend.present():
            self._repair(now, "floodd's firewall table is gone", list(self.bans.values()))
        installed = self.backend.list()
        decision = self.tracker.observe(now, installed)
        if decision.vanished:
            self._repair(now, f"{len(decision.vanished)} bans vanished from the firewall",
                         list(decision.vanished))
        if decision.extend:
            self.backend.ban(decision.extend)
        if decision.unban:
            self.backend.unban([ib.network for ib in decision.unban])
        if decision.extend or decision.unban:
            self.backend.commit()
        with self.lock:
            for ban in decision.extend:
                self.bans[ban.network] = ban
            for ended in [*(ib.network for ib in decision.unban),
                          *(b.network for b in decision.expired)]:
                self.bans.pop(ended, None)
            self._refresh_banned_sources()
        stale = self.config.firewall.stale_after
        for ib in decision.unban:
            self.log.info(f"unban {ib.network}: ban time over and no packets for "
                          f"{stale:g} s ({ib.packets} packets dropped in all)",
                          action="expire", source=ib.network, rule=ib.rule,
                          packets=ib.packets)
        for ban in decision.expired:
            self.log.info(f"unban {ban.network}: ban time over (ended by the kernel)",
                          action="expire", source=ban.network, rule=ban.rule)

    def _repair(self, now: float, why: str, bans: list[Ban]) -> None:
        assert self.backend is not None and self.tracker is not None
        restore = [b for b in bans if b.expires > now]
        self.backend.setup()
        self.backend.ban(restore)
        self.backend.commit()
        self.tracker.banned(now, restore)
        self.log.warning(f"repair: {why}; re-created {len(restore)} bans",
                         action="repair", packets=len(restore))

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
        if new.rate_table != old.rate_table or new.rules != old.rules:
            with self.lock:
                self.traffic = Traffic(new)
            self._last_packets = 0  # the rate is measured against the new count
        if workers is not None:
            self._stop_captures()
            self._start_captures(workers)
        if self.tracker is not None:
            self.tracker.configure(new.firewall)
        self.log.info(f"reloaded {new.source}: {len(new.rules)} rules", action="reload")
        self.notifier.ready(self._status_line())

    # --- status and control -----------------------------------------------------
    def _measure_rate(self, mono: float) -> None:
        dt = mono - self._last_rate_at
        if dt >= 1.0:
            self.pps = (self.traffic.packets - self._last_packets) / dt
            self._last_packets = self.traffic.packets
            self._last_rate_at = mono

    def _captures_healthy(self, mono: float) -> bool:
        return bool(self.workers) and all(w.healthy(mono) for w in self.workers)

    def _capture_problem(self, mono: float) -> str:
        for w in self.workers:
            if not w.healthy(mono):
                return f"{w.interface}: {w.error or 'not reading'}"
        return "no capture running"

    def capture_stats(self) -> CaptureStats:
        received = dropped = if_dropped = 0
        for w in self.workers:
            s = w.stats()
            received += s.received
            dropped += s.dropped
            if_dropped += s.if_dropped
        return CaptureStats(received, dropped, if_dropped)

    def _status_line(self) -> str:
        stats = self.capture_stats()
        return (f"{self.pps:.0f} packets/s, {stats.dropped} kernel drops, "
                f"{len(self.bans)} bans")

    def _summary(self) -> None:
        stats = self.capture_stats()
        self.log.info(f"summary: {self.pps:.0f} packets/s, {self.traffic.packets} packets, "
                      f"{stats.dropped} kernel drops, {len(self.bans)} bans, "
                      f"{self.traffic.sources.pruned} keys pruned", action="summary",
                      packets=self.traffic.packets, rate=round(self.pps, 1),
                      bans=len(self.bans), drops=stats.dropped)

    def _top(self, n: int) -> list[dict[str, Any]]:
        now = time.time()
        with self.lock:
            window = self.traffic.sources.window
            rows = self.traffic.sources.top(now, n)
        return [{"source": str(address_network(src).network_address), "packets": c,
                 "rate": c / window,
                 "banned": src in self.banned_sources} for src, c in rows]

    def _handle_request(self, req: dict[str, Any]) -> dict[str, Any]:
        """Runs in the control thread: read-only answers here, changes via the main loop."""
        cmd = req["cmd"]
        if cmd == "status":
            stats = self.capture_stats()
            return {"ok": True, "version": __version__, "pid": os.getpid(),
                    "uptime": time.time() - self.started, "backend": self.backend_note,
                    "dry_run": self.dry_run, "interfaces": list(self.interfaces),
                    "pps": self.pps, "packets": self.traffic.packets,
                    "received": stats.received, "kernel_drops": stats.dropped,
                    "bans": len(self.bans), "max_bans": self.config.firewall.max_bans,
                    "top": self._top(10)}
        if cmd == "top":
            n = req.get("n", 20)
            if not isinstance(n, int) or n < 1:
                return {"ok": False, "error": "top: n must be a positive integer"}
            return {"ok": True, "top": self._top(n)}
        if cmd in ("bans", "ban", "unban"):
            reply: queue.Queue[dict[str, Any]] = queue.Queue(maxsize=1)
            self.requests.put(_Request(req, reply))
            self._wake.set()
            try:
                return reply.get(timeout=10)
            except queue.Empty:
                return {"ok": False, "error": "floodd is busy; try again"}
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    def _serve_requests(self) -> None:
        while True:
            try:
                req = self.requests.get_nowait()
            except queue.Empty:
                return
            try:
                req.reply.put(self._change(req.body))
            except FlooddError as exc:
                req.reply.put({"ok": False, "error": str(exc)})

    def _change(self, body: dict[str, Any]) -> dict[str, Any]:
        """``bans``, ``ban`` and ``unban`` from the control socket, in the main loop."""
        assert self.backend is not None
        now = time.time()
        cmd = body["cmd"]
        if cmd == "bans":
            installed = {ib.network: ib for ib in self.backend.list()}
            return {"ok": True, "bans": [ib.as_json() for ib in installed.values()]}
        try:
            network = ipaddress.ip_network(str(body.get("source", "")), strict=True)
        except ValueError:
            if cmd == "unban" and body.get("all"):
                network = None
            else:
                raise FlooddError(f"{cmd}: not an address or prefix: "
                                  f"{body.get('source')!r}") from None
        if cmd == "ban":
            assert network is not None
            reason = self._protected(network)
            if reason is not None and not body.get("force"):
                raise FlooddError(f"ban: refusing to ban {network}: {reason} "
                                  "(use --force to ban it anyway)")
            seconds = float(body.get("seconds", 3600))
            ban = Ban(network, str(body.get("reason") or "manual"), now, now + seconds)
            self.backend.ban([ban])
            self.backend.commit()
            with self.lock:
                self.bans[network] = ban
                self._refresh_banned_sources()
            if self.tracker is not None:
                self.tracker.banned(now, [ban])
            self.log.notice(f"ban {network} for {seconds:g} s by the operator: {ban.rule}",
                            action="ban", source=network, rule=ban.rule, ban_time=seconds)
            return {"ok": True, "banned": str(network), "expires": ban.expires}
        targets = list(self.bans) if network is None else [network]
        self.backend.unban(targets)
        self.backend.commit()
        if self.tracker is not None:
            self.tracker.forget(targets)
        with self.lock:
            for n in targets:
                self.bans.pop(n, None)
                self.traffic.sources.forget(n.network_address.packed)
            self._refresh_banned_sources()
        for n in targets:
            self.log.notice(f"unban {n} by the operator", action="unban", source=n)
        return {"ok": True, "unbanned": [str(n) for n in targets]}

    def _save_state(self, now: float) -> None:
        try:
            save_offences(self.config.daemon.state_dir, self.offences, now,
                          self.config.firewall.max_ban_time)
        except OSError as exc:
            self.log.warning(f"cannot save state in {self.config.daemon.state_dir}: "
                             f"{exc.strerror}")

