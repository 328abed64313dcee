"""Sliding-window packet counters with bounded memory: floodd's rate table.

Clock.  Every method takes the time as ``now``, in seconds of the caller's
clock: the daemon passes ``time.monotonic()``, ``floodd analyze`` the
capture's own timestamps.  Time is cut into buckets of ``bucket`` seconds
aligned to multiples of ``bucket`` (bucket number ``floor(t / bucket)``).  The
table's time ``t`` is the latest ``now`` it was given: a call with an earlier
``now`` counts at ``t`` (into the current bucket); a later one moves ``t`` on
and closes buckets, and a jump longer than the window clears the table,
whatever its length.

Window.  With ``S = window / bucket``, the table holds the current bucket
(number ``cur``, of which the part ``p = t / bucket - cur`` has elapsed) and
the ``S`` buckets before it.  The window ``(t - window, t]`` covers the
buckets ``cur - S + 1 .. cur`` and the last ``1 - p`` of the oldest bucket,
``cur - S``.  A key's count is::

    count = its packets in buckets cur-S+1 .. cur
            + floor((1 - p) * its packets in bucket cur-S)

the oldest bucket weighted by the share of it still inside the window;
``total`` is the same sum over every packet.

Error bound.  A packet counted at time ``u`` belongs to bucket
``floor(u / bucket)``.  The true number of a key's packets counted at times in
``(t - window, t]`` and its count both lie between its packets in the newer
buckets and those plus its packets in the oldest bucket, so

    |count - truth| <= the key's packets in one bucket (the oldest),

whatever the phase ``p`` at which the table is read; equivalently, the count
lies between the truth over the last ``window - bucket`` and the last
``window + bucket`` seconds.  For a source sending at a steady rate the error
is at most a few packets (rounding) at every phase: with ``window = bucket``,
a 3,000/s source reads 3,000 whether the table is read 0.05 s or 0.95 s into a
bucket.  (Exact edges inside a bucket would need every packet's time; weighting
the oldest bucket needs nothing but that bucket, held one bucket longer.)

State, per tracked key: its running total over the ``S + 1`` buckets held, its
running total when the current bucket began (its packets in the current bucket are
the difference: a batch updates one dict) and, once a bucket it was seen in has
closed, a ring of ``S`` per-bucket counts (1 byte per bucket while each count is
below 256, 2 below 65,536, else 8).  Per table: the packets of each bucket held.
A batch costs one C-level counting pass over its keys (the running totals);
closing a bucket costs a few C passes over the tracked keys (to find those seen
in it, and to take the bucket leaving the window off the totals); a query reads
the oldest bucket of each key it returns, and ``over`` selects in C the keys
whose running total exceeds the threshold before counting those.

Bound (lossy counting): when more than ``capacity`` keys are tracked, one pass
drops every key whose running total is at or below a cut level ``c``: the
smallest count such that at most ``capacity // 2`` keys count more.  Under a
spoofed flood of one-packet sources ``c`` is 1.  Survivors keep their counts
untouched.  A prune costs O(keys) and comes at most once per ``capacity / 2``
new keys.  Guarantees, with C the capacity and N the packets in the buckets
held (the last window plus at most one bucket):

* counts never exceed a key's packets in the buckets held; ``total`` counts
  every packet, dropped and forgotten keys included;
* at most C keys are tracked after every call: memory is bounded whatever the
  traffic, by about C * (S + 350) bytes per table (see bench/bench_memory.py);
* since more than C/2 keys count at least ``c``, ``c < 2N/C``: a key is never
  dropped while its running total is at least 2N/C.  A key that receives at
  least 2/C of every batch is therefore never dropped, and its count is
  within the bound above;
* a tracked key's running total is exact since it was last (re)admitted: each
  drop loses at most the cut, fewer than 2N/C of its packets.  A source
  sending steadily at a rate r above 2/C of the total rate R can be dropped
  only in the first 2R/(rC) of a window after admission; from then on it is
  tracked and, a window and a bucket after admission, counted within the
  bound.  Among 500,000 one-packet sources per second (C = 100,000) the cut
  is 1, so a 50 packets/s source is kept from its second packet on.
"""

from __future__ import annotations

import heapq
import math
from array import array
from collections import Counter
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from itertools import compress, islice, repeat
from operator import add, itemgetter, lt, mul, not_, setitem, sub
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


def _merge(into: dict[K, int], counts: Mapping[K, int]) -> None:
    """Add ``counts`` to ``into``, key by key, with every step in C (``dict.update``
    called as such: ``Counter.update`` would count the pairs)."""
    dict.update(into, zip(counts, map(add, map(into.get, counts, repeat(0)),
                                      counts.values())))


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
        # Invariants, for every tracked key k (and only those):
        #   _totals[k] = (k's packets in the current bucket) + sum(_rings[k]) >= 1;
        #   _base[k] = sum(_rings[k]), for the keys tracked when the current bucket
        #   began (a key's packets in it are _totals[k] - _base.get(k, 0), so that a
        #   batch updates one dict only); _base's keys are the first of _totals, in
        #   the same order;
        #   _rings[k][j % span] = k's packets in bucket j, cur - span <= j < cur,
        #   for the keys seen in a bucket that has closed since their admission;
        #   _peaks[k] = k's busiest closed bucket, for every tracked key seen in
        #   one and for at most 2 * capacity keys in all.
        # Bucket j's packets (every key) are in _packets[j % (span + 1)],
        # cur - span <= j <= cur.
        self._base: dict[K, int] = {}
        self._totals: Counter[K] = Counter()
        self._rings: dict[K, array[int]] = {}
        self._empty_ring = array("B", bytes(span))  # widened when a count overflows
        self._packets = [0] * (span + 1)
        self._peaks: dict[K, int] | None = {} if track_peak else None
        self._cur = -(1 << 62)
        self._now = -math.inf

    def add(self, now: float, key: K, n: int = 1) -> None:
        self.add_counts(now, {key: n})

    def add_counts(self, now: float, counts: Mapping[K, int]) -> None:
        """Count a batch (``key -> packets``, all >= 1) into the bucket of ``now``."""
        self._advance(now)
        if not counts:
            return
        values = counts.values()
        if min(values) < 1:
            raise ValueError("packet counts must be at least 1")
        self._packets[self._cur % (self._span + 1)] += sum(values)
        _merge(self._totals, counts)
        if len(self._totals) > self.capacity:
            self._prune()

    def add_keys(self, now: float, keys: Sequence[K], weight: int = 1) -> None:
        """Count ``weight`` packets per item of ``keys`` (repeats allowed) into the bucket
        of ``now`` (``weight`` > 1: the keys are a 1-in-``weight`` sample).

        The same as ``add_counts(now, Counter(keys))`` (times ``weight``), counted by
        ``Counter.update`` straight into the current bucket and the totals, every
        per-key step in C: the daemon's hot path under a flood of many sources.
        """
        self._advance(now)
        if not keys:
            return
        if weight != 1:
            if weight < 1:
                raise ValueError("packet counts must be at least 1")
            counts = Counter(keys)
            self.add_counts(now, dict(zip(counts, map(mul, counts.values(), repeat(weight)))))
            return
        self._packets[self._cur % (self._span + 1)] += len(keys)
        self._totals.update(keys)
        if len(self._totals) > self.capacity:
            self._prune()

    def crossed(self, keys: Sequence[K], threshold: int, weight: int = 1) -> list[K]:
        """Of ``keys`` just counted (:meth:`add_keys` with this ``weight``), the distinct
        ones whose running total (an upper bound of the window count) went over
        ``threshold`` with that count: at most ``threshold`` before, more after.

        One C pass over ``keys`` when none is over; more only for those over.
        """
        totals = self._totals
        news = list(map(totals.__getitem__, keys))
        if not news or max(news) <= threshold:
            return []
        over = Counter(compress(keys, map(lt, repeat(threshold), news)))
        return [key for key, n in over.items() if totals[key] - n * weight <= threshold]

    def crossed_counts(self, counts: Mapping[K, int], threshold: int,
                       weight: int = 1) -> list[K]:
        """:meth:`crossed` for a batch counted as ``key -> packets`` (distinct keys, each
        count ``weight`` times: :meth:`add_counts` of the weighted counts).

        One C pass over the batch's distinct keys when none is over."""
        totals = self._totals
        if not counts or max(map(totals.__getitem__, counts)) <= threshold:
            return []
        return [key for key, n in counts.items()
                if threshold < totals[key] <= threshold + n * weight]

    def running_over(self, threshold: int) -> list[K]:
        """The keys whose running total (an upper bound of the window count) exceeds
        ``threshold``, selected in C: the candidates of :meth:`over`."""
        totals = self._totals
        return list(compress(totals, map(lt, repeat(threshold), totals.values())))

    def count(self, now: float, key: K) -> int:
        """Packets from ``key`` in the window (see the module docstring for the bound)."""
        self._advance(now)
        return self._count(key)

    def _count(self, key: K) -> int:
        total = self._totals.get(key, 0)
        ring = self._rings.get(key)
        if ring is None or not total:
            return total
        oldest = ring[self._cur % self._span]
        return total - oldest + int(self._keep() * oldest)

    def over(self, now: float, threshold: int) -> list[tuple[K, int]]:
        """Keys with more than ``threshold`` packets in the window, most first.

        The keys whose running total exceeds ``threshold`` are selected in C; only
        those are counted exactly (a key's count never exceeds its running total).
        """
        self._advance(now)
        return self.over_among(now, self.running_over(threshold), threshold)

    def over_among(self, now: float, keys: Iterable[K], threshold: int) -> list[tuple[K, int]]:
        """Of ``keys`` (distinct), those with more than ``threshold`` packets in the
        window, most first."""
        self._advance(now)
        # _count inlined, the share of the oldest bucket read once: a key over a
        # threshold costs a few lookups (the policy reads every one at every tick).
        totals_get, rings_get = self._totals.get, self._rings.get
        keep, slot = self._keep(), self._cur % self._span
        hits = []
        for key in keys:
            n = totals_get(key, 0)
            ring = rings_get(key)
            if ring is not None and n:
                oldest = ring[slot]
                n += int(keep * oldest) - oldest
            if n > threshold:
                hits.append((key, n))
        hits.sort(key=_by_count, reverse=True)
        return hits

    def top(self, now: float, n: int) -> list[tuple[K, int]]:
        """The ``n`` keys with the most packets in the window, most first."""
        self._advance(now)
        if not self._rings:  # no bucket closed on a tracked key: counts are the totals
            return heapq.nlargest(n, self._totals.items(), key=_by_count)
        return heapq.nlargest(n, (kc for kc in self._counts(0) if kc[1]), key=_by_count)

    def total(self, now: float) -> int:
        """All packets in the window, dropped and forgotten keys included."""
        self._advance(now)
        packets = self._packets
        oldest = packets[(self._cur + 1) % (self._span + 1)]  # bucket cur - span
        return sum(packets) - oldest + int(self._keep() * oldest)

    def peak(self, key: K) -> int:
        """The most packets ``key`` sent in one bucket (0 if unknown).

        A key that leaves the window keeps its peak; when more than
        2 * capacity peaks are held, the lowest of keys no longer tracked go.
        Keys dropped by the bound or forgotten lose theirs.
        """
        if self._peaks is None:
            raise ValueError("peak needs a RateTable created with track_peak=True")
        return max(self._peaks.get(key, 0), self._totals.get(key, 0) - self._base.get(key, 0))

    def forget(self, key: K) -> None:
        """Stop tracking ``key`` and drop its peak; its packets stay in ``total``."""
        self._totals.pop(key, None)
        self._base.pop(key, None)
        self._rings.pop(key, None)
        if self._peaks is not None:
            self._peaks.pop(key, None)

    def __len__(self) -> int:
        return len(self._totals)

    def _keep(self) -> float:
        """The share of the oldest bucket held that is still inside the window."""
        return min(max(self._cur + 1 - self._now / self.bucket, 0.0), 1.0)

    def _counts(self, floor: int) -> Iterator[tuple[K, int]]:
        """(key, packets in the window) for the keys with more than ``floor``
        packets in the buckets held (their running total)."""
        keep = self._keep()
        slot = self._cur % self._span
        rings_get = self._rings.get
        for key, total in self._totals.items():
            if total > floor:
                ring = rings_get(key)
                if ring is not None:
                    oldest = ring[slot]
                    if oldest:
                        total += int(keep * oldest) - oldest
                yield key, total

    def _advance(self, now: float) -> None:
        """Move the table's time to ``now`` if it is later, closing buckets."""
        if now > self._now:
            self._now = now
            target = math.floor(now / self.bucket)
            if target > self._cur:
                self._close(target)

    def _close(self, target: int) -> None:
        """Close the current bucket and move on to bucket ``target``.

        Every step is a C pass over the tracked keys or those seen in the closing
        bucket; Python steps only for counts too wide for a ring's type and for keys
        whose total drops to 0."""
        cur, span = self._cur, self._span
        totals, rings, base = self._totals, self._rings, self._base
        # The keys seen in the closing bucket and their packets in it.  The totals hold
        # the keys of _base in the same order, then the keys new in this bucket.
        keys = list(totals)
        counts = list(map(sub, totals.values(), base.values()))
        counts += islice(totals.values(), len(counts), None)
        live = list(compress(keys, counts))
        counts = list(compress(counts, counts))
        peaks = self._peaks
        if peaks is not None and live:
            dict.update(peaks, zip(live, map(max, counts, map(peaks.get, live, repeat(0)))))
        if target - cur > span:  # every bucket held leaves the window
            totals.clear()
            rings.clear()
            self._packets = [0] * (span + 1)
        else:
            # Buckets cur - span .. target - span - 1 leave the window; the first
            # one's slot is the one the closed bucket goes to.
            for j in range(cur - span, target - span):
                self._leave(j % span)
            slot = cur % span
            fresh = list(compress(live, map(not_, map(rings.__contains__, live))))
            if fresh:
                empty = self._empty_ring
                dict.update(rings, zip(fresh, map(array.__copy__, repeat(empty, len(fresh)))))
            held = list(map(rings.__getitem__, live))
            if counts and max(counts) > 0xFF:  # may not fit a ring of bytes
                for i in compress(range(len(counts)), map(lt, repeat(0xFF), counts)):
                    ring, n = held[i], counts[i]
                    if ring.typecode == "B" or (ring.typecode == "H" and n >= 1 << 16):
                        ring = held[i] = rings[live[i]] = array(
                            "H" if n < 1 << 16 else "Q", ring)
            list(map(setitem, held, repeat(slot), counts))
            packets, size = self._packets, span + 1
            for j in range(cur + 1, target + 1):
                packets[j % size] = 0
        self._base = dict(totals)
        self._cur = target
        if peaks is not None and len(peaks) > 2 * self.capacity:
            self._trim_peaks(peaks)

    def _leave(self, slot: int) -> None:
        """Take the bucket held in ``slot`` off the totals and empty the slot."""
        totals, rings = self._totals, self._rings
        counts = list(map(itemgetter(slot), rings.values()))
        keys = list(compress(rings, counts))
        if not keys:
            return
        held = list(map(rings.__getitem__, keys))
        counts = list(compress(counts, counts))
        left = list(map(sub, map(totals.__getitem__, keys), counts))
        dict.update(totals, zip(keys, left))
        list(map(setitem, held, repeat(slot), repeat(0, len(held))))
        if 0 in left:  # not seen in the closing bucket: its total would include that
            for key in compress(keys, map(not_, left)):
                del totals[key], rings[key]

    def _prune(self) -> None:
        """Drop every key counting at most the cut level (see the module docstring).

        The survivors are copied into new dicts: dicts never shrink in place.
        """
        totals = self._totals
        cut, kept = _cut_level(totals.values(), len(totals), self.capacity // 2)
        self.pruned += len(totals) - kept
        survivors = Counter({key: total for key, total in totals.items() if total > cut})
        self._totals = survivors
        self._base = {key: n for key, n in self._base.items() if key in survivors}
        self._rings = {key: ring for key, ring in self._rings.items() if key in survivors}
        peaks = self._peaks
        if peaks is not None:
            self._peaks = {key: peak for key, peak in peaks.items()
                           if key in survivors or key not in totals}

    def _trim_peaks(self, peaks: dict[K, int]) -> None:
        """Keep the highest ``capacity // 2`` peaks of keys no longer tracked."""
        totals = self._totals
        gone = [key for key in peaks if key not in totals]
        cut, _ = _cut_level(map(peaks.__getitem__, gone), len(gone), self.capacity // 2)
        for key in gone:
            if peaks[key] <= cut:
                del peaks[key]
