from __future__ import annotations

import math
import random
import tracemalloc
from collections import Counter, defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from floodd.detect.ratetable import RateTable


class Reference:
    """Exact counting from the list of every packet, for comparison with RateTable."""

    def __init__(self, window: float, bucket: float) -> None:
        self.bucket = bucket
        self.span = round(window / bucket)
        self.cur: int | None = None
        self.events: list[tuple[int, str, int]] = []   # (bucket number, key, packets)
        self.packets: list[tuple[int, int]] = []       # every packet, forgotten keys too
        self.runs: dict[str, Counter[int]] = {}        # key -> packets per bucket until forgotten

    def advance(self, now: float) -> None:
        target = math.floor(now / self.bucket)
        self.cur = target if self.cur is None else max(self.cur, target)

    def add(self, now: float, key: str, n: int) -> None:
        self.advance(now)
        assert self.cur is not None
        self.events.append((self.cur, key, n))
        self.packets.append((self.cur, n))
        self.runs.setdefault(key, Counter())[self.cur] += n

    def forget(self, key: str) -> None:
        self.events = [e for e in self.events if e[1] != key]
        self.runs.pop(key, None)

    def _since(self, span: int | None) -> int:
        assert self.cur is not None
        return self.cur - (span or self.span) + 1

    def count(self, key: str, span: int | None = None) -> int:
        since = self._since(span)
        return sum(n for j, k, n in self.events if k == key and j >= since)

    def total(self, span: int | None = None) -> int:
        since = self._since(span)
        return sum(n for j, n in self.packets if j >= since)

    def counts(self, span: int | None = None) -> dict[str, int]:
        since = self._since(span)
        out: defaultdict[str, int] = defaultdict(int)
        for j, k, n in self.events:
            if j >= since:
                out[k] += n
        return dict(out)

    def peak(self, key: str) -> int:
        run = self.runs.get(key)
        return max(run.values()) if run else 0


def make(window: float = 3.0, bucket: float = 1.0, capacity: int = 1000,
         track_peak: bool = False) -> RateTable[str]:
    return RateTable(window, bucket, capacity, track_peak)


def test_counts_slide_out_of_the_window() -> None:
    table = make()
    table.add(10.2, "a")
    table.add(11.5, "a", 2)
    table.add(12.9, "a", 3)
    assert table.count(12.9, "a") == 6
    assert table.count(13.0, "a") == 5
    assert table.count(14.0, "a") == 3
    assert table.count(14.99, "a") == 3
    assert table.count(15.0, "a") == 0
    assert len(table) == 0


def test_buckets_align_to_multiples_of_bucket() -> None:
    table = make(window=4.0, bucket=2.0)
    table.add(2.0, "a")
    table.add(3.99, "a")
    table.add(4.0, "a")
    assert table.count(5.99, "a", window=2.0) == 1
    assert table.count(5.99, "a") == 3
    assert table.count(6.0, "a") == 1
    assert table.count(8.0, "a") == 0


def test_sub_windows_cover_the_newest_buckets() -> None:
    table = make(window=6.0)
    table.add(100.1, "old", 7)
    for i in range(6):
        table.add(100 + i + 0.5, "a", i + 1)
    now = 105.7
    assert [table.count(now, "a", float(w)) for w in range(1, 7)] == [6, 11, 15, 18, 20, 21]
    assert [table.count(now, "old", float(w)) for w in range(1, 7)] == [0, 0, 0, 0, 0, 7]
    assert table.count(now, "a", None) == 21
    assert [table.total(now, float(w)) for w in range(1, 7)] == [6, 11, 15, 18, 20, 28]


def test_time_jump_longer_than_the_window_clears_everything() -> None:
    table = make(window=60.0, capacity=100_000, track_peak=True)
    table.add_counts(1000.0, {f"k{i}": 1 + i % 3 for i in range(5000)})
    table.add(1001.0, "k1")
    assert table.count(1030.0, "k1") == 3
    table.add(1059.0, "a")
    assert len(table) == 5001
    assert table.count(1060.0, "k1") == 1
    assert table.count(1060.0, "a") == 1
    assert len(table) == 2
    assert table.count(1e12, "a") == 0
    assert len(table) == 0
    assert table.total(1e12) == 0
    assert table.peak("a") == 1
    table.add(1e12 + 0.5, "a", 4)
    assert table.count(1e12 + 0.5, "a") == 4


def test_time_going_backwards_counts_into_the_current_bucket() -> None:
    table = make()
    table.add(5.5, "a")
    table.add(3.0, "a")
    table.add(4.9, "b")
    assert table.count(5.5, "a", window=1.0) == 2
    assert table.count(0.0, "a", window=1.0) == 2
    assert table.over(2.0, 0, window=1.0) == [("a", 2), ("b", 1)]
    assert table.total(1.0, window=1.0) == 3
    assert table.count(7.9, "a") == 2
    assert table.count(8.0, "a") == 0
    assert table.total(8.0) == 0


def test_over_and_top_rank_most_first() -> None:
    table = make()
    table.add_counts(1.0, {"a": 5, "b": 3, "c": 1})
    table.add_counts(2.0, {"c": 7, "d": 1})
    assert table.over(2.0, 2) == [("c", 8), ("a", 5), ("b", 3)]
    assert table.over(2.0, 8) == []
    assert table.over(2.0, 0, window=1.0) == [("c", 7), ("d", 1)]
    assert table.top(2.0, 2) == [("c", 8), ("a", 5)]
    assert table.top(2.0, 10, window=1.0) == [("c", 7), ("d", 1)]
    assert table.top(2.0, 0) == []


def test_total_counts_pruned_and_forgotten_keys() -> None:
    table = make(window=2.0, capacity=4)
    for i in range(100):
        table.add(10.0 + i / 100, f"k{i}")
    table.add(11.0, "x", 5)
    table.forget("x")
    assert len(table) <= 4
    assert table.pruned >= 96
    assert table.total(11.5) == 105
    assert table.total(11.5, window=1.0) == 5
    assert table.total(12.0) == 5


def test_forget_removes_every_bucket_of_a_key() -> None:
    table = make(window=4.0)
    for i in range(4):
        table.add(float(i), "a", 2)
        table.add(float(i), "b")
    table.forget("a")
    table.forget("nobody")
    assert len(table) == 1
    assert [table.count(3.0, "a", float(w)) for w in range(1, 5)] == [0, 0, 0, 0]
    assert table.count(3.0, "b") == 4
    assert table.total(3.0) == 12
    table.add(3.0, "a")
    assert [table.count(3.0, "a", float(w)) for w in range(1, 5)] == [1, 1, 1, 1]
    assert table.count(6.0, "a") == 1
    assert table.count(7.0, "a") == 0


def test_peak_is_the_busiest_bucket_until_forgotten() -> None:
    table = make(track_peak=True)
    table.add(0.0, "a", 3)
    table.add(1.0, "a", 2)
    table.add(1.5, "a", 3)
    table.add(2.0, "a", 1)
    assert table.peak("a") == 5
    assert table.peak("unknown") == 0
    table.forget("a")
    assert table.peak("a") == 0
    table.add(3.0, "a", 2)
    assert table.count(100.0, "a") == 0
    assert table.peak("a") == 2
    table.add(100.0, "a", 1)
    assert table.peak("a") == 2
    table.add(100.0, "a", 2)
    assert table.peak("a") == 3


def test_peaks_of_keys_gone_from_the_window_are_bounded_keeping_the_highest() -> None:
    table = make(window=1.0, capacity=10, track_peak=True)
    for i in range(100):
        table.add(float(i), f"k{i}", 1 + i % 50)
    table.count(100.0, "k0")
    held = [key for key in (f"k{i}" for i in range(100)) if table.peak(key)]
    assert 5 <= len(held) <= 20
    assert {"k49", "k99"} <= set(held)
    assert min(table.peak(key) for key in held) > 25
    equal = make(window=1.0, capacity=10, track_peak=True)
    for i in range(100):
        equal.add(float(i), f"e{i}")
    assert sum(1 for i in range(100) if equal.peak(f"e{i}")) <= 20


def test_keys_dropped_by_the_bound_lose_their_peak() -> None:
    table = make(window=2.0, capacity=4, track_peak=True)
    table.add(0.0, "gone", 7)
    table.add(2.0, "heavy", 9)
    for i in range(10):
        table.add(3.0, f"k{i}")
    assert table.pruned > 0
    assert table.peak("heavy") == 9
    assert table.peak("gone") == 7
    assert sum(1 for i in range(10) if table.peak(f"k{i}")) == len(table) - 1


def test_peak_needs_track_peak() -> None:
    with pytest.raises(ValueError, match="track_peak"):
        make().peak("a")


@pytest.mark.parametrize("window, bucket, capacity", [
    (10.0, 0.0, 10), (10.0, -1.0, 10), (10.0, math.inf, 10), (10.0, math.nan, 10),
    (2.5, 1.0, 10), (0.5, 1.0, 10), (0.0, 1.0, 10), (math.inf, 1.0, 10), (10.0, 1.0, 1),
])
def test_bad_table_settings_are_refused(window: float, bucket: float, capacity: int) -> None:
    with pytest.raises(ValueError):
        RateTable[str](window, bucket, capacity)


@pytest.mark.parametrize("window", [0.0, 0.5, 1.5, 4.0, -1.0, math.nan])
def test_bad_query_window_is_refused(window: float) -> None:
    table = make()
    with pytest.raises(ValueError, match="window"):
        table.count(0.0, "a", window)
    with pytest.raises(ValueError, match="window"):
        table.over(0.0, 1, window)
    with pytest.raises(ValueError, match="window"):
        table.total(0.0, window)


def test_packet_counts_below_one_are_refused() -> None:
    table = make()
    with pytest.raises(ValueError, match="at least 1"):
        table.add(0.0, "a", 0)
    with pytest.raises(ValueError, match="at least 1"):
        table.add_counts(0.0, {"a": 2, "b": -1})


def test_prune_keeps_keys_spread_over_many_buckets_exact() -> None:
    # Survivors hold most bucket entries: dropped keys are removed one by one.
    table = make(window=10.0, capacity=10)
    for i in range(10):
        table.add_counts(float(i), {f"s{j}": 3 for j in range(5)})
        if i in (3, 8):
            table.add(float(i), "x")
    table.add_counts(9.0, {f"one{j}": 1 for j in range(5)})
    assert table.pruned == 6
    assert len(table) == 5
    for w in range(1, 11):
        assert table.count(9.0, "s0", float(w)) == 3 * w
        assert table.count(9.0, "x", float(w)) == 0
    table.add(9.0, "x")
    assert [table.count(9.0, "x", float(w)) for w in range(1, 11)] == [1] * 10
    assert table.total(9.0) == 158
    assert table.count(10.0, "s4") == 27
    assert table.total(10.0) == 143


def test_spoofed_flood_keeps_memory_bounded() -> None:
    rng = random.Random(7)
    table: RateTable[bytes] = RateTable(10.0, 1.0, 1000)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(200):
            raw = rng.randbytes(4 * 1000)
            table.add_counts(i / 20, Counter(raw[j:j + 4] for j in range(0, len(raw), 4)))
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert len(table) <= 1000
    # The batches included; 200,000 keys held unbounded take over 15 MB.
    assert peak < 1_000_000


def test_heavy_hitter_hidden_among_one_packet_sources_is_found() -> None:
    rng = random.Random(1)
    capacity, sources, rate, batch = 10_000, 200_000, 20_000, 1024
    table: RateTable[bytes] = RateTable(10.0, 1.0, capacity)
    hitter = bytes([203, 0, 113, 7])
    now = 0.0
    sent = 0
    for first in range(0, sources, batch):
        size = min(batch, sources - first)
        raw = rng.randbytes(4 * size)
        counts = Counter(raw[j:j + 4] for j in range(0, len(raw), 4))
        # Ten seconds of traffic ending just inside the window (buckets 1000 to 1009).
        now = 1000.0 + (first + size) / rate - 0.001
        due = (first + size) * 50 // rate
        if due > sent:
            counts[hitter] += due - sent
            sent = due
        table.add_counts(now, counts)
    assert sent == 500
    assert len(table) <= capacity
    assert table.pruned > sources // 2
    reported = table.count(now, hitter)
    assert sent - 2 <= reported <= sent
    assert table.top(now, 1) == [(hitter, reported)]
    assert [key for key, _ in table.over(now, 250)] == [hitter]
    assert table.total(now) == sources + sent


KEYS = "abcdefgh"
WINDOWS = st.sampled_from([(1.0, 0.25), (2.0, 2.0), (2.0, 0.5), (3.0, 1.0), (5.0, 1.0),
                           (12.0, 2.0)])
# Clock steps in quarters of a bucket, backwards too; now and then a jump of 250 buckets.
STEP = st.integers(-5, 13).map(lambda q: 1000 if q == 13 else q)


def _op(keys: str, forget: bool) -> st.SearchStrategy[tuple[object, ...]]:
    key = st.sampled_from(keys)
    ops = [
        st.tuples(st.just("add"), key, st.integers(1, 4)),
        st.tuples(st.just("batch"), st.dictionaries(key, st.integers(1, 4), max_size=6)),
        st.tuples(st.just("query")),
    ]
    if forget:
        ops.append(st.tuples(st.just("forget"), key))
    return st.one_of(ops)


def _apply(table: RateTable[str], ref: Reference, now: float,
           op: tuple[object, ...]) -> Counter[str]:
    """Run ``op`` on both; the packets it added per key."""
    added: Counter[str] = Counter()
    if op[0] == "add":
        key, n = op[1], op[2]
        assert isinstance(key, str) and isinstance(n, int)
        table.add(now, key, n)
        added[key] = n
    elif op[0] == "batch":
        assert isinstance(op[1], dict)
        added.update(op[1])
        table.add_counts(now, op[1])
    elif op[0] == "forget":
        key = op[1]
        assert isinstance(key, str)
        table.forget(key)
        ref.forget(key)
    ref.advance(now)
    for key, n in added.items():
        ref.add(now, key, n)
    return added


@settings(max_examples=300, deadline=None)
@given(WINDOWS, st.integers(-400, 400),
       st.lists(st.tuples(STEP, _op(KEYS, forget=True)), max_size=40))
def test_matches_exact_counting_below_capacity(
        shape: tuple[float, float], start: int, steps: list[tuple[int, tuple[object, ...]]]) -> None:
    window, bucket = shape
    table = make(window, bucket, capacity=len(KEYS), track_peak=True)
    ref = Reference(window, bucket)
    quarters = start * 4
    for step, op in steps:
        quarters += step
        now = quarters * bucket / 4
        _apply(table, ref, now, op)
        for span in range(1, ref.span + 1):
            w = span * bucket
            for key in KEYS:
                assert table.count(now, key, w) == ref.count(key, span)
            assert table.total(now, w) == ref.total(span)
            expected = ref.counts(span)
            assert dict(table.over(now, 0, w)) == expected
            over = table.over(now, 2, w)
            assert dict(over) == {k: c for k, c in expected.items() if c > 2}
            assert [c for _, c in over] == sorted((c for _, c in over), reverse=True)
            top = table.top(now, 3, w)
            assert [c for _, c in top] == sorted(expected.values(), reverse=True)[:3]
            assert all(expected[k] == c for k, c in top)
        assert len(table) == len(ref.counts())
        for key in KEYS:
            assert table.peak(key) == ref.peak(key)
        assert table.pruned == 0


@settings(max_examples=300, deadline=None)
@given(WINDOWS, st.integers(2, 6),
       st.lists(st.tuples(STEP, _op("abcdefghijklmnop", forget=False)), max_size=40))
def test_over_capacity_drops_only_light_keys_and_keeps_the_rest_exact(
        shape: tuple[float, float], capacity: int,
        steps: list[tuple[int, tuple[object, ...]]]) -> None:
    window, bucket = shape
    keys = "abcdefghijklmnop"
    table = make(window, bucket, capacity)
    truth = Reference(window, bucket)
    kept = Reference(window, bucket)   # the truth minus the keys the table dropped
    quarters = 0
    for step, op in steps:
        quarters += step
        now = quarters * bucket / 4
        pruned = table.pruned
        added = _apply(table, truth, now, op)
        kept.advance(now)
        for key, n in added.items():
            kept.add(now, key, n)
        n = table.total(now)
        assert n == truth.total()
        dropped = [key for key in keys if table.count(now, key) != kept.count(key)]
        for key in dropped:
            # Dropped by the bound: only a key holding under 2N/C packets.
            assert table.count(now, key) == 0 and kept.count(key) * capacity < 2 * n
            kept.forget(key)
        assert table.pruned - pruned == len(dropped)
        assert len(table) <= capacity
        for span in range(1, truth.span + 1):
            w = span * bucket
            for key in keys:
                assert table.count(now, key, w) == kept.count(key, span) <= truth.count(key, span)
            assert dict(table.over(now, 0, w)) == kept.counts(span)


@settings(max_examples=300, deadline=None)
@given(WINDOWS, st.integers(3, 8),
       st.lists(st.tuples(STEP, st.dictionaries(st.sampled_from("abcdefghijklmnop"),
                                                st.integers(1, 4), max_size=8)),
                max_size=40))
def test_key_with_a_large_share_of_every_batch_is_counted_exactly(
        shape: tuple[float, float], capacity: int,
        steps: list[tuple[int, dict[str, int]]]) -> None:
    window, bucket = shape
    table = make(window, bucket, capacity)
    ref = Reference(window, bucket)
    quarters = 0
    for step, batch in steps:
        quarters += step
        now = quarters * bucket / 4
        # "H" gets at least 2/capacity of the batch: H >= 2 * (H + others) / capacity.
        others = sum(batch.values())
        _apply(table, ref, now, ("batch", {**batch, "H": max(1, -(-2 * others // (capacity - 2)))}))
        for span in range(1, ref.span + 1):
            assert table.count(now, "H", span * bucket) == ref.count("H", span)
        assert len(table) <= capacity
