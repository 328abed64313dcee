"""Sliding-window packet counters with bounded memory: floodd's rate table.

Time is cut into buckets of ``bucket`` seconds aligned to multiples of
``bucket`` (bucket number ``floor(now / bucket)``).  A window of W seconds
covers the bucket holding ``now`` and the ``W / bucket - 1`` buckets before it.
The table answers any window that is a multiple of ``bucket`` up to its own
``window``.  Every method takes the clock as ``now``; time moving forward
expires old buckets (a jump longer than the window clears the table at once,
whatever its length), time moving backwards counts into the current bucket.

State: a ring of per-bucket dicts ``key -> packets``, a running window total
per key, the newest bucket each key was seen in, the exact packet total of
each bucket and, with ``track_peak``, each key's busiest bucket.  A batch costs three dict writes per distinct key; expiring a
bucket costs one step per entry it holds; a sub-window query reads at most
half the ring per key.

Bound (lossy counting): when more than ``capacity`` keys are tracked, one pass
drops every key whose window count is at or below a cut level ``c``: the
smallest count such that at most ``capacity // 2`` keys count more.  Under a
spoofed flood of one-packet sources ``c`` is 1.  Survivors keep their counts
untouched.  A prune costs O(keys) plus, per dropped key, the buckets between
its oldest and newest entry, and comes at most once per ``capacity / 2`` new
keys.  Guarantees, with N the packets in the window and C the capacity:

* counts never exceed the truth; ``total`` is exact, dropped keys included;
* at most C keys are tracked after every call, with at most one entry per key
  and bucket: memory is bounded whatever the traffic, by C * window / bucket
  entries when C sources each send in every bucket, by about C entries under
  one-packet-per-source spoofing;
* since more than C/2 keys count at least ``c``, ``c < 2N/C``: a key is never
  dropped while its count is at least 2N/C.  A key that receives at least
  2/C of every batch is therefore never dropped and its counts are exact;
* the count of a tracked key is exact since it was last (re)admitted: each
  drop loses at most the cut, fewer than 2N/C of its packets.  A source
  sending steadily at a rate r above 2/C of the total rate R can be dropped
  only in the first 2R/(rC) of a window after admission; from then on it is
  tracked and, a window after admission, counted exactly.  Among 500,000
  one-packet sources per second (C = 100,000) the cut is 1, so a 50 packets/s
  source is kept from its second packet in the window on.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from collections import _count_elements  # type: ignore[attr-defined]  # Counter's C helper
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from itertools import repeat
from operator import add, itemgetter, sub
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

_by_count = itemgetter(1)


def _buckets_in(window: float, bucket: float) -> int:
    """How many buckets make ``window``; 0 if it is not a positive multiple."""
    if not math.isfinite(window):
        return 0
    span = round(window / bucket)
    return span if span >= 1 and abs(window / bucket - span) < 1e-9 else 0


def _cut_level(counts: Iterable[int], size: int, keep: int) -> tuple[int, int]:
    """The smallest cut such that at most ``keep`` of the ``size`` counts exceed
    it (0 if ``size <= keep``), and how many exceed it."""
    above = size
    cut = 0
    if size > keep:
        for cut, n in sorted(Counter(counts).items()):
            above -= n
            if above <= keep:
                break
    return cut, above


class RateTable(Generic[K]):
    """Packets per key over a sliding window, at most ``capacity`` keys tracked.

    Not thread-safe: one thread at a time may call it.  ``peak`` reads the
    state as of the last call that took ``now``.
    """

    def __init__(self, window: float, bucket: float, capacity: int,
                 track_peak: bool = False) -> None:
        if not (math.isfinite(bucket) and bucket > 0):
            raise ValueError(f"bucket must be a positive number of seconds, got {bucket!r}")
        span = _buckets_in(window, bucket)
        if not span:
            raise ValueError(f"window must be a positive multiple of bucket ({bucket:g} s), "
                             f"got {window!r}")
        if capacity < 2:
            raise ValueError(f"capacity must be at least 2, got {capacity!r}")
        self.window = window
        self.bucket = bucket
        self.capacity = capacity
        self.pruned = 0
        self._span = span
        # Invariants, for every tracked key k:
        #   _totals[k] = sum of k's entries in _buckets (all >= 1) and is >= 1;
        #   _last[k] = the newest bucket number holding an entry for k;
        #   untracked keys have no entry in _buckets or _last;
        #   _peaks[k] = k's busiest bucket before the current one, for every
        #   tracked key seen before it and at most 2 * capacity keys in all.
        # Bucket number j lives in slot j % span while cur - span < j <= cur.
        self._buckets: list[dict[K, int]] = [{} for _ in range(span)]
        self._packets = [0] * span
        # Most entries each slot's dict has held since it was last rebuilt:
        # dicts never shrink in place, so sparse ones are copied after a prune.
        self._high = [0] * span
        self._totals: dict[K, int] = {}
        self._last: dict[K, int] = {}
        self._peaks: dict[K, int] | None = {} if track_peak else None
        self._cur = -(1 << 62)

    def add(self, now: float, key: K, n: int = 1) -> None:
        self.add_counts(now, {key: n})

    def add_counts(self, now: float, counts: Mapping[K, int]) -> None:
        """Count a batch (``key -> packets``, all >= 1) into the bucket of ``now``."""
        slot = self._advance(now)
        if not counts:
            return
        values = counts.values()
        if min(values) < 1:
            raise ValueError("packet counts must be at least 1")
        bucket = self._buckets[slot]
        totals = self._totals
        self._packets[slot] += sum(values)
        bucket_get, totals_get, last, cur = bucket.get, totals.get, self._last, self._cur
        for key, n in counts.items():
            bucket[key] = bucket_get(key, 0) + n
            totals[key] = totals_get(key, 0) + n
            last[key] = cur
        if len(bucket) > self._high[slot]:
            self._high[slot] = len(bucket)
        if len(totals) > self.capacity:
            self._prune()

    def add_keys(self, now: float, keys: Sequence[K]) -> None:
        """Count one packet per item of ``keys`` (repeats allowed) into the bucket of ``now``.

        The same as ``add_counts(now, Counter(keys))``, with every per-key step done
        by C code: the daemon's hot path under a flood of many sources.
        """
        slot = self._advance(now)
        if not keys:
            return
        bucket = self._buckets[slot]
        self._packets[slot] += len(keys)
        _count_elements(bucket, keys)
        _count_elements(self._totals, keys)
        self._last.update(dict.fromkeys(keys, self._cur))
        if len(bucket) > self._high[slot]:
            self._high[slot] = len(bucket)
        if len(self._totals) > self.capacity:
            self._prune()

    def count(self, now: float, key: K, window: float | None = None) -> int:
        """Packets from ``key`` in the last ``window`` seconds (None: the table window)."""
        self._advance(now)
        span = self._window_span(window)
        total = self._totals.get(key, 0)
        if not total or span == self._span:
            return total
        return self._recent([key], span)[0]

    def over(self, now: float, threshold: int,
             window: float | None = None) -> list[tuple[K, int]]:
        """Keys with more than ``threshold`` packets in the window, most first."""
        self._advance(now)
        hits = [kc for kc in self._counts(self._window_span(window), threshold)
                if kc[1] > threshold]
        hits.sort(key=_by_count, reverse=True)
        return hits

    def top(self, now: float, n: int, window: float | None = None) -> list[tuple[K, int]]:
        """The ``n`` keys with the most packets in the window, most first."""
        self._advance(now)
        counts = self._counts(self._window_span(window), 0)
        return heapq.nlargest(n, (kc for kc in counts if kc[1]), key=_by_count)

    def total(self, now: float, window: float | None = None) -> int:
        """All packets counted in the window, dropped and forgotten keys included."""
        self._advance(now)
        ring, packets, cur = self._span, self._packets, self._cur
        since = cur - self._window_span(window) + 1
        return sum(packets[j % ring] for j in range(since, cur + 1))

    def peak(self, key: K) -> int:
        """The most packets ``key`` sent in one bucket (0 if unknown).

        A key that leaves the window keeps its peak; when more than
        2 * capacity peaks are held, the lowest of keys no longer tracked go.
        Keys dropped by the bound or forgotten lose theirs.
        """
        if self._peaks is None:
            raise ValueError("peak needs a RateTable created with track_peak=True")
        return max(self._peaks.get(key, 0), self._buckets[self._cur % self._span].get(key, 0))

    def forget(self, key: K) -> None:
        """Stop tracking ``key`` and drop its peak; its packets stay in ``total``."""
        if key in self._totals:
            self._remove(key)
        elif self._peaks is not None:
            self._peaks.pop(key, None)

    def __len__(self) -> int:
        return len(self._totals)

    def _window_span(self, window: float | None) -> int:
        if window is None:
            return self._span
        span = _buckets_in(window, self.bucket)
        if not 1 <= span <= self._span:
            raise ValueError(f"window must be a multiple of {self.bucket:g} s "
                             f"up to {self.window:g} s, got {window!r}")
        return span

    def _advance(self, now: float) -> int:
        """Move the current bucket to ``now`` (never backwards); its slot."""
        target = math.floor(now / self.bucket)
        cur = self._cur
        if target > cur:
            peaks = self._peaks
            if peaks is not None:
                peaks_get = peaks.get
                for key, n in self._buckets[cur % self._span].items():
                    if n > peaks_get(key, 0):
                        peaks[key] = n
            if target - cur >= self._span:
                for bucket in self._buckets:
                    bucket.clear()
                self._packets = [0] * self._span
                self._high = [0] * self._span
                self._totals.clear()
                self._last.clear()
            else:
                for j in range(cur + 1, target + 1):
                    self._expire(j % self._span)
            self._cur = target
            if peaks is not None and len(peaks) > 2 * self.capacity:
                self._trim_peaks(peaks)
        return self._cur % self._span

    def _expire(self, slot: int) -> None:
        bucket = self._buckets[slot]
        totals, last = self._totals, self._last
        for key, n in bucket.items():
            left = totals[key] - n
            if left:
                totals[key] = left
            else:
                del totals[key], last[key]
        bucket.clear()
        self._packets[slot] = 0
        self._high[slot] = 0

    def _counts(self, span: int, floor: int) -> Iterable[tuple[K, int]]:
        """(key, packets in the newest ``span`` buckets) for keys with more than
        ``floor`` packets in the table window."""
        totals = self._totals
        if span == self._span:
            return totals.items()
        keys = [key for key, total in totals.items() if total > floor]
        return zip(keys, self._recent(keys, span))

    def _recent(self, keys: list[K], span: int) -> list[int]:
        """Packets of each tracked key in the newest ``span`` buckets.

        Reads at most half the ring: the newest buckets, or the window totals
        minus the oldest buckets.
        """
        buckets, ring, cur = self._buckets, self._span, self._cur
        step: Callable[[int, int], int]
        if 2 * span <= ring:
            counts, step = [0] * len(keys), add
            slots = range(cur - span + 1, cur + 1)
        else:
            counts, step = list(map(self._totals.__getitem__, keys)), sub
            slots = range(cur - ring + 1, cur - span + 1)
        for j in slots:
            counts = list(map(step, counts, map(buckets[j % ring].get, keys, repeat(0))))
        return counts

    def _remove(self, key: K) -> None:
        left = self._totals.pop(key)
        newest = self._last.pop(key)
        if self._peaks is not None:
            self._peaks.pop(key, None)
        buckets, ring = self._buckets, self._span
        for j in range(newest, newest - ring, -1):
            left -= buckets[j % ring].pop(key, 0)
            if not left:
                return

    def _prune(self) -> None:
        """Drop every key counting at most the cut level (see the module docstring).

        When the dropped keys hold most bucket entries, as under a spoofed
        flood, rebuilding the dicts from the survivors beats removing each key.
        """
        totals = self._totals
        cut, kept = _cut_level(totals.values(), len(totals), self.capacity // 2)
        dropped = len(totals) - kept
        self.pruned += dropped
        if sum(map(len, self._buckets)) <= 2 * dropped:
            survivors = {key: total for key, total in totals.items() if total > cut}
            last, peaks = self._last, self._peaks
            self._totals = survivors
            self._last = {key: last[key] for key in survivors}
            if peaks is not None:
                self._peaks = {key: peak for key, peak in peaks.items()
                               if key in survivors or key not in totals}
            self._buckets = [{key: n for key, n in bucket.items() if key in survivors}
                             for bucket in self._buckets]
            self._high = list(map(len, self._buckets))
            return
        for key in [key for key, total in totals.items() if total <= cut]:
            self._remove(key)
        for slot, bucket in enumerate(self._buckets):
            if 2 * len(bucket) < self._high[slot]:
                self._buckets[slot] = bucket.copy()
                self._high[slot] = len(bucket)

    def _trim_peaks(self, peaks: dict[K, int]) -> None:
        """Keep the highest ``capacity // 2`` peaks of keys no longer tracked."""
        totals = self._totals
        gone = [key for key in peaks if key not in totals]
        cut, _ = _cut_level(map(peaks.__getitem__, gone), len(gone), self.capacity // 2)
        for key in gone:
            if peaks[key] <= cut:
                del peaks[key]
