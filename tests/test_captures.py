"""The capture group: workers stamp batches with the monotonic clock, fail alone, and a
group that cannot open every interface leaves none open."""

from __future__ import annotations

import ipaddress
import time
from typing import Any

import pytest

from floodd.config import default_config
from floodd.detect.capture import CaptureStats
from floodd.detect.parse import Batch
from floodd.errors import FlooddError
from floodd.scope import WHOLE, Target
from floodd.service.captures import Captures, CaptureWorker


class _Batches:
    """A packet source that hands out the given batches, then ends."""

    linktype = 1

    def __init__(self, batches: list[Batch]) -> None:
        self.batches = list(batches)

    def read(self, timeout: float) -> Batch | None:
        return self.batches.pop(0) if self.batches else None

    def stats(self) -> CaptureStats:
        return CaptureStats(0, 0, 0)

    def close(self) -> None:
        pass


def test_capture_worker_stamps_what_it_counts_with_the_monotonic_clock() -> None:
    # Records carry the kernel's wall-clock stamps, which may step; the tables' clock
    # is the monotonic one, read when the batch is counted.
    wall = time.time()
    src = bytes([198, 51, 100, 7])
    batches = [Batch([(wall - 3600.0, src, 17, 1, 0, 64)], 1, 0), Batch([], 0, 0),
               Batch([(wall + 3600.0, src, 17, 1, 0, 64)], 1, 0)]
    counted: list[tuple[float, Batch]] = []
    worker = CaptureWorker(_Batches(batches), "test",
                           lambda now, batch, weight: counted.append((now, batch)))
    started = time.monotonic()
    worker.start()
    worker.join(timeout=5)
    assert not worker.is_alive() and worker.error is None
    assert [batch for _, batch in counted] == [batches[0], batches[2]]
    assert all(started <= now <= time.monotonic() for now, _ in counted)
    assert counted[0][0] <= counted[1][0]


class _Failing(_Batches):
    """A source whose reads fail."""

    def read(self, timeout: float) -> Batch | None:
        raise FlooddError("the interface went down")


def test_a_group_that_cannot_open_every_interface_leaves_none_open() -> None:
    opened: list[_Batches] = []
    closed: list[str] = []

    class Closing(_Batches):
        def close(self) -> None:
            closed.append("x")

    def factory(iface: str, cfg: Any) -> _Batches:
        if iface == "eth9":
            raise FlooddError("eth9: no such device")
        source = Closing([])
        opened.append(source)
        return source

    with pytest.raises(FlooddError, match="eth9"):
        Captures.open(["eth0", "eth1", "eth9"], default_config(), factory,
                      lambda now, batch, weight: None)
    assert len(opened) == 2 and len(closed) == 2


def test_the_group_reports_a_failed_capture_and_sums_the_counters() -> None:
    ok, bad = _Batches([]), _Failing([])
    captures = Captures()
    workers = [CaptureWorker(ok, "eth0", lambda now, batch, weight: None),
               CaptureWorker(bad, "eth1", lambda now, batch, weight: None)]
    target = Target(ipaddress.ip_network("198.51.100.7/32"), WHOLE)
    captures.exclude((target,))
    captures.start(workers)
    assert captures.workers == workers and captures.exclusions == (target,)
    for w in workers:
        w.join(timeout=5)
    assert not captures.healthy(time.monotonic())
    assert captures.problem(time.monotonic()) == "eth0: not reading"  # its source ended
    assert workers[1].error == "the interface went down"
    assert captures.stats() == CaptureStats(0, 0, 0) and captures.sampling == 1
    assert [c.interface for c in captures.counts()] == ["eth0", "eth1"]
    captures.stop()
    assert captures.workers == [] and captures.problem(0.0) == "no capture running"
