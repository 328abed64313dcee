"""When floodd cannot count every packet, it counts 1 in n, chosen at random by the kernel
(:meth:`floodd.detect.capture.LiveCapture.sample`), and counts each n times: it degrades
by design, not by the kernel dropping whatever the capture was too slow to read.

:class:`SamplingControl` picks n from how busy the capture thread was and whether the
kernel dropped packets: it doubles n at once when the thread was busy over
:data:`HIGH` of the time or the kernel dropped packets, and halves it when the thread
stayed under :data:`LOW` for :data:`CALM` seconds.  Halving at most doubles the work, so
a rate under LOW stays under HIGH after it (no swinging to and fro).  After a change it
waits :data:`SETTLE` seconds before the next: what the capture measured meanwhile
still includes packets taken at the old rate.

The guarantee, at 1 in n: a source sending r packets a second is counted as ~r a
second; over t seconds its count is n times a binomial sample of r·t packets, so
its relative error is about ``1/sqrt(r·t/n)`` (one standard deviation).  A rule with
threshold T in its window sees about T/n sampled packets of a source at the
threshold, so:

* a source sending k times the threshold rate crosses it in about 1/k of the window,
  as without sampling: a 50,000 q/s flooder against a 5,000-in-10-s rule crosses after
  ~0.1 s of its traffic at any n up to 64 (then ~780 sampled packets a second);
* a source under ``1 - 3/sqrt(T/n)`` of the threshold rate is not banned, but one
  closer to it may be (three standard deviations): with T = 5,000 and n = 64, 66% of
  the threshold rate;
* rules whose threshold is under ~100·n packets (T/n under 100 samples) count coarsely
  while n is that high, and a threshold under n is crossed by a single sampled packet.

n changes only under overload, and the kernel's random choice cannot be steered by a
sender: a flood of forged random sources makes every source's share smaller, not a
real flooder's count.
"""

from __future__ import annotations

from floodd.errors import FlooddError
from floodd.detect.bpf import power_of_two

HIGH = 0.75  # busy over this fraction of the time: keep half as many packets
LOW = 0.25  # busy under this for CALM seconds: keep twice as many (LOW * 2 < HIGH)
SETTLE = 0.5  # seconds after a change before the next
CALM = 5.0  # seconds under LOW before keeping more


class SamplingControl:
    """The 1-in-n rate for one capture, from 1 (every packet) to ``max_sampling``."""

    def __init__(self, max_sampling: int) -> None:
        if isinstance(max_sampling, bool) or not isinstance(max_sampling, int) \
                or not power_of_two(max_sampling):
            raise FlooddError(f"capture sampling limit {max_sampling!r}: expected a power "
                              "of two, 1 or more")
        self.max_sampling = max_sampling
        self.n = 1
        self._changed: float | None = None  # when n last changed
        self._calm_since: float | None = None  # busy under LOW since then
        self._counts = (0, 0)  # the capture's (dropped, received) at the last update

    def update(self, now: float, busy: float, dropped: int, received: int) -> int:
        """The n to use from ``now`` (a monotonic clock), given the fraction of the time
        since the last update the capture thread was busy (not waiting for packets) and
        the capture's counters (:class:`floodd.detect.capture.CaptureStats`: packets
        dropped by the kernel and received, both since the capture opened; a count
        smaller than the last one is a new capture)."""
        last_dropped, last_received = self._counts
        new_capture = dropped < last_dropped or received < last_received
        new_drops = dropped > (0 if new_capture else last_dropped)
        self._counts = (dropped, received)
        if busy >= LOW:
            self._calm_since = None
        elif self._calm_since is None:
            self._calm_since = now
        if self._changed is not None and now - self._changed < SETTLE:
            return self.n
        if (busy > HIGH or new_drops) and self.n < self.max_sampling:
            self._set(now, self.n * 2)
        elif self.n > 1 and self._calm_since is not None and now - self._calm_since >= CALM:
            self._set(now, self.n // 2)
            self._calm_since = now
        return self.n

    def _set(self, now: float, n: int) -> None:
        self.n = n
        self._changed = now
