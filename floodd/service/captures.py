"""The capture threads: one per interface, each reading its packet source and counting
every batch into the shared tables; started, stopped and read as one group.

Only a worker's own thread touches its source (libpcap handles are not thread-safe):
the main loop hands in the kernel filter's exclusions, and reads the counters, which
take the source's lock.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Sequence

from floodd.config import Config
from floodd.detect.capture import CaptureStats, LiveCapture, PacketSource
from floodd.detect.parse import Batch
from floodd.detect.sampling import SamplingControl
from floodd.errors import FlooddError
from floodd.scope import Target
from floodd.service.metrics import InterfaceCounts

# A capture thread that has not come round its read loop for this long is wedged.
CAPTURE_STALL = 5.0
READ_TIMEOUT = 0.25

Count = Callable[[float, Batch, int], None]  # (monotonic time read, batch, sampling weight)


class CaptureWorker(threading.Thread):
    """Reads one packet source and counts every batch into the shared tables,
    stamped with ``time.monotonic()`` when it was read, with the weight of the
    source's kernel sampling (each packet read stands for ``weight`` packets).

    Only this thread touches the source (libpcap handles are not thread-safe): the
    kernel filter's exclusions are handed in with :meth:`exclude` and applied before
    the next read, and the sampling follows a :class:`SamplingControl` fed once a
    second with this thread's CPU time and the kernel's counters.
    """

    def __init__(self, source: PacketSource, name: str,
                 count: Count, max_sampling: int = 1) -> None:
        super().__init__(name=f"floodd-capture-{name}", daemon=True)
        self.source = source
        self.interface = name
        self.count = count
        self.heartbeat = time.monotonic()
        self.error: str | None = None
        self.packets = 0  # queries counted, scaled by the sampling
        self.excluded = 0  # banned targets the kernel filter keeps out now
        self.sampling = 1  # 1 in this many packets reaches floodd
        self._filterable = isinstance(source, LiveCapture)
        self._control = SamplingControl(max_sampling) if self._filterable and \
            max_sampling > 1 else None
        self._exclusions: tuple[Target, ...] | None = None  # to apply: see exclude()
        self._stop_event = threading.Event()
        self._source_lock = threading.Lock()
        self._closed = False
        self._stats = CaptureStats(0, 0, 0)

    def exclude(self, targets: Sequence[Target]) -> None:
        """Keep these bans' packets out of the capture from the next read on (heaviest
        first: the filter takes as many as it can)."""
        self._exclusions = tuple(targets)

    def run(self) -> None:
        try:
            next_sample = time.monotonic() + 1.0
            cpu = time.thread_time()
            while not self._stop_event.is_set():
                self._apply_exclusions()
                batch = self.source.read(READ_TIMEOUT)
                if batch is None:
                    break
                now = time.monotonic()
                if batch.records:
                    weight = self.source.weight if isinstance(self.source, LiveCapture) else 1
                    self.count(now, batch, weight)
                    self.packets += len(batch.records) * weight
                self.heartbeat = now
                if now >= next_sample and self._control is not None:
                    spent = time.thread_time()
                    self._resample(now, (spent - cpu) / (now - next_sample + 1.0))
                    cpu, next_sample = spent, now + 1.0
        except FlooddError as exc:
            self.error = str(exc)
        except Exception as exc:  # a capture failure must reach the log, not kill silently
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            with self._source_lock:
                self._closed = True
                self.source.close()

    def _apply_exclusions(self) -> None:
        targets, self._exclusions = self._exclusions, None
        if targets is not None and isinstance(self.source, LiveCapture):
            self.excluded = self.source.exclude(targets)

    def _resample(self, now: float, busy: float) -> None:
        """Follow the sampling controller, from the CPU share ``busy`` this thread used
        over the last second and the kernel's counters."""
        assert self._control is not None and isinstance(self.source, LiveCapture)
        stats = self.stats()
        wanted = self._control.update(now, busy, stats.dropped, stats.received)
        if wanted != self.sampling:
            self.source.sample(wanted)
            self.sampling = wanted

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


class Captures:
    """The running capture workers, one per interface, and the bans whose packets their
    kernel filters keep out."""

    def __init__(self) -> None:
        self.workers: list[CaptureWorker] = []
        self.exclusions: tuple[Target, ...] = ()

    @staticmethod
    def open(interfaces: Sequence[str], cfg: Config,
             factory: Callable[[str, Config], PacketSource],
             count: Count) -> list[CaptureWorker]:
        """Workers for ``interfaces``, sources open, not started yet; if one cannot
        open, none stays open."""
        workers: list[CaptureWorker] = []
        try:
            for iface in interfaces:
                workers.append(CaptureWorker(factory(iface, cfg), iface, count,
                                             cfg.capture.max_sampling))
        except BaseException:
            for w in workers:
                w.source.close()
            raise
        return workers

    def start(self, workers: list[CaptureWorker]) -> None:
        """Start ``workers`` (from :meth:`open`), with the current exclusions, in place
        of the running ones (stop those first)."""
        for w in workers:
            if self.exclusions:
                w.exclude(self.exclusions)
            w.start()
        self.workers = workers

    def stop(self) -> None:
        for w in self.workers:
            w.stop()
        for w in self.workers:
            w.join(timeout=1.0)
        self.workers = []

    def exclude(self, targets: tuple[Target, ...]) -> None:
        """Keep these bans' packets out of every capture (heaviest first)."""
        if targets == self.exclusions:
            return
        self.exclusions = targets
        for w in self.workers:
            w.exclude(targets)

    def healthy(self, mono: float) -> bool:
        return bool(self.workers) and all(w.healthy(mono) for w in self.workers)

    def problem(self, mono: float) -> str:
        """What is wrong, when not :meth:`healthy`."""
        for w in self.workers:
            if not w.healthy(mono):
                return f"{w.interface}: {w.error or 'not reading'}"
        return "no capture running"

    def stats(self) -> CaptureStats:
        """The kernel's counters, summed over the interfaces."""
        received = dropped = if_dropped = 0
        for w in self.workers:
            s = w.stats()
            received += s.received
            dropped += s.dropped
            if_dropped += s.if_dropped
        return CaptureStats(received, dropped, if_dropped)

    def counts(self) -> tuple[InterfaceCounts, ...]:
        """Each interface's queries counted and kernel counters, for the metrics."""
        out = []
        for w in self.workers:
            stats = w.stats()
            out.append(InterfaceCounts(w.interface, w.packets, stats.received, stats.dropped))
        return tuple(out)

    @property
    def sampling(self) -> int:
        """The sparsest kernel sampling of the captures: 1 in this many packets counted."""
        return max((w.sampling for w in self.workers), default=1)

    @property
    def excluded(self) -> int:
        """Banned targets the capture filters keep out (the most over the interfaces)."""
        return max((w.excluded for w in self.workers), default=0)
