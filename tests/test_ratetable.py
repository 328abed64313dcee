from __future__ import annotations

import math
import random
import tracemalloc
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from floodd.detect.ratetable import RateTable


class Reference:
    """Every packet with the time it was counted at (a plain list), for comparison
    with RateTable: the truth over any span of time, and the table's formula."""

    def __init__(self, window: float, bucket: float) -> None:
        self.window = window
        self.bucket = bucket
        self.span = round(window / bucket)
        self.now = -math.inf
        # (time counted at, key or None once forgotten, packets); a packet given an
        # earlier time than the latest is counted at the latest.
        self.packets: list[tuple[float, str | None, int]] = []
        self.runs: dict[str, Counter[int]] = {}  # key -> packets per bucket until forgotten

    def advance(self, now: float) -> None:
        self.now = max(self.now, now)

    def add(self, now: float, key: str, n: int) -> None:
        self.advance(now)
        self.packets.append((self.now, key, n))
        self.runs.setdefault(key, Counter())[self.cur] += n

    def forget(self, key: str) -> None:
        self.packets = [(t, None if k == key else k, n) for t, k, n in self.packets]
        self.runs.pop(key, None)

    @property
    def cur(self) -> int:
        return math.floor(self.now / self.bucket)

    def _sum(self, key: str | None, since: int, until: int) -> int:
        """Packets of ``key`` (None: all) in buckets since .. until."""
        return sum(n for t, k, n in self.packets
                   if (key is None or k == key) and since <= math.floor(t / self.bucket) <= until)

    def oldest(self, key: str | None) -> int:
        """Packets in the oldest bucket the table holds."""
        return self._sum(key, self.cur - self.span, self.cur - self.span)

    def newer(self, key: str | None) -> int:
        return self._sum(key, self.cur - self.span + 1, self.cur)

    def expected(self, key: str | None) -> int:
        """The table's count: the newer buckets plus the oldest weighted by the share of
        it still inside the window."""
        keep = min(max(self.cur + 1 - self.now / self.bucket, 0.0), 1.0)
        return self.newer(key) + int(keep * self.oldest(key))

    def truth(self, key: str | None, seconds: float | None = None) -> int:
        """Packets counted at times in (now - seconds, now] (default: the window)."""
        since = self.now - (self.window if seconds is None else seconds)
        return sum(n for t, k, n in self.packets if (key is None or k == key) and t > since)

    def counts(self) -> dict[str, int]:
        keys = {k for _, k, _ in self.packets if k is not None}
        out = {key: self.expected(key) for key in keys}
        return {key: c for key, c in out.items() if c}

    def held(self) -> set[str]:
        """Keys with packets in the buckets held: the tracked ones."""
        return {k for t, k, _ in self.packets if k is not None
                and math.floor(t / self.bucket) >= self.cur - self.span}

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
    # (10, 13] still holds every packet; then the oldest bucket is weighted by the
    # share of it inside the window.
    assert table.count(13.0, "a") == 6
    assert table.count(13.5, "a") == 5 + int(0.5 * 1)
    assert table.count(14.0, "a") == 5
    assert table.count(14.75, "a") == 3 + int(0.25 * 2)
    assert table.count(15.0, "a") == 3
    assert table.count(15.99, "a") == 0
    assert len(table) == 1
    assert table.count(16.0, "a") == 0
    assert len(table) == 0


def test_buckets_align_to_multiples_of_bucket() -> None:
    table = make(window=4.0, bucket=2.0)
    table.add(2.0, "a")
    table.add(3.99, "a")
    table.add(4.0, "a")
    assert table.count(5.99, "a") == 3
    assert table.count(6.0, "a") == 3  # (2, 6]: bucket 1 (2..4) is the oldest, all inside
    assert table.count(7.0, "a") == 1 + int(0.5 * 2)
    assert table.count(8.0, "a") == 1
    assert table.count(10.0, "a") == 0


def test_the_count_does_not_depend_on_the_phase_of_the_reading() -> None:
    # The figure: with a window of one bucket, a 3,000/s source read 0.05 s
    # into a bucket showed 180.  Batches every 10 ms, like a capture.
    for window in (1.0, 10.0):
        table = make(window=window, capacity=10)
        rate, start = 3000, 5000.0
        readings = []
        for i in range(int(25 / 0.01)):
            now = start + i * 0.01
            table.add(now, "a", rate // 100)
            if now - start > window + 1 and round(now * 100) % 100 in (5, 25, 50, 75, 95):
                readings.append(table.count(now, "a"))
        assert len(readings) > 50
        assert all(abs(c - rate * window) <= rate // 100 for c in readings), readings


def test_time_jump_longer_than_the_window_clears_everything() -> None:
    table = make(window=60.0, capacity=100_000, track_peak=True)
    table.add_counts(1000.0, {f"k{i}": 1 + i % 3 for i in range(5000)})
    table.add(1001.0, "k1")
    assert table.count(1030.0, "k1") == 3
    table.add(1059.0, "a")
    assert len(table) == 5001
    assert table.count(1060.0, "k1") == 3  # the oldest bucket, wholly inside (1000, 1060]
    assert table.count(1061.0, "k1") == 1
    assert table.count(1061.0, "a") == 1
    assert len(table) == 2
    assert table.count(1e12, "a") == 0
    assert len(table) == 0
    assert table.total(1e12) == 0
    assert table.peak("a") == 1
    table.add(1e12 + 0.5, "a", 4)
    assert table.count(1e12 + 0.5, "a") == 4


def test_time_going_backwards_counts_at_the_latest_time() -> None:
    table = make(window=1.0)
    table.add(5.5, "a")
    table.add(3.0, "a")
    table.add(4.9, "b")
    assert table.count(5.5, "a") == 2
    assert table.count(0.0, "a") == 2
    assert table.over(2.0, 0) == [("a", 2), ("b", 1)]
    assert table.total(1.0) == 3
    assert table.count(6.0, "a") == 2
    assert table.count(6.5, "a") == 1
    assert table.count(6.99, "a") == 0
    assert table.total(7.0) == 0


def test_over_and_top_rank_most_first() -> None:
    table = make()
    table.add_counts(1.0, {"a": 5, "b": 3, "c": 1})
    table.add_counts(2.0, {"c": 7, "d": 1})
    assert table.over(2.0, 2) == [("c", 8), ("a", 5), ("b", 3)]
    assert table.over(2.0, 8) == []
    assert table.top(2.0, 2) == [("c", 8), ("a", 5)]
    assert table.top(2.0, 0) == []
    # At 4.5 bucket 1 is the oldest, half inside the window.
    assert table.over(4.5, 0) == [("c", 7 + 0), ("a", 2), ("b", 1), ("d", 1)]
    assert table.top(4.5, 1) == [("c", 7)]
    # Before any bucket closed (the counts are the running totals): ties keep the
    # order the keys came in, as later.
    fresh = make()
    fresh.add_counts(1.0, {"a": 2, "b": 5, "c": 2})
    assert fresh.top(1.5, 3) == [("b", 5), ("a", 2), ("c", 2)]
    assert fresh.top(1.5, 2) == [("b", 5), ("a", 2)]


def test_total_counts_pruned_and_forgotten_keys() -> None:
    table = make(window=2.0, capacity=4)
    for i in range(100):
        table.add(10.0 + i / 100, f"k{i}")
    table.add(11.0, "x", 5)
    table.forget("x")
    assert len(table) <= 4
    assert table.pruned >= 96
    assert table.total(11.5) == 105
    assert table.total(12.0) == 105
    assert table.total(12.5) == 5 + 50
    assert table.total(13.0) == 5
    assert table.total(14.0) == 0


def test_forget_removes_every_bucket_of_a_key() -> None:
    table = make(window=4.0)
    for i in range(4):
        table.add(float(i), "a", 2)
        table.add(float(i), "b")
    table.forget("a")
    table.forget("nobody")
    assert len(table) == 1
    assert table.count(3.0, "a") == 0
    assert table.count(3.0, "b") == 4
    assert table.total(3.0) == 12
    table.add(3.0, "a")
    assert table.count(3.0, "a") == 1
    assert table.count(7.0, "a") == 1
    assert table.count(8.0, "a") == 0


def test_counts_over_255_and_65535_in_a_bucket_are_kept() -> None:
    table = make(window=3.0)
    for j, n in enumerate((300, 70_000, 5, 1 << 40)):
        table.add(float(j), "a", n)
        table.add(float(j), "b")
    assert table.count(3.0, "a") == 300 + 70_000 + 5 + (1 << 40)
    assert table.count(4.0, "a") == 70_000 + 5 + (1 << 40)
    assert table.count(4.5, "a") == 35_000 + 5 + (1 << 40)
    assert table.count(5.5, "a") == (1 << 40) + int(0.5 * 5)
    assert table.count(5.5, "b") == 1 + int(0.5 * 1)


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
    table.count(101.0, "k0")
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


def test_packet_counts_below_one_are_refused() -> None:
    table = make()
    with pytest.raises(ValueError, match="at least 1"):
        table.add(0.0, "a", 0)
    with pytest.raises(ValueError, match="at least 1"):
        table.add_counts(0.0, {"a": 2, "b": -1})


def test_add_keys_counts_like_add_counts() -> None:
    by_keys, by_counts = make(capacity=6), make(capacity=6)
    rng = random.Random(3)
    for i in range(200):
        keys = [rng.choice("abcdefghij") for _ in range(rng.randint(0, 12))]
        now = i * 0.3
        by_keys.add_keys(now, keys)
        by_counts.add_counts(now, Counter(keys))
        assert by_keys.over(now, 0) == by_counts.over(now, 0)
        assert by_keys.total(now) == by_counts.total(now)
    assert by_keys.pruned == by_counts.pruned > 0


def test_prune_keeps_keys_spread_over_many_buckets_exact() -> None:
    table = make(window=10.0, capacity=10)
    for i in range(10):
        table.add_counts(float(i), {f"s{j}": 3 for j in range(5)})
        if i in (3, 8):
            table.add(float(i), "x")
    table.add_counts(9.0, {f"one{j}": 1 for j in range(5)})
    assert table.pruned == 6
    assert len(table) == 5
    assert table.count(9.0, "s0") == 30
    assert table.count(9.0, "x") == 0
    table.add(9.0, "x")
    assert table.count(9.0, "x") == 1
    assert table.total(9.0) == 158
    assert table.count(10.0, "s4") == 30
    assert table.count(11.0, "s4") == 27
    assert table.total(11.0) == 143


def test_spoofed_flood_keeps_memory_bounded() -> None:
    rng = random.Random(7)
    table: RateTable[bytes] = RateTable(10.0, 1.0, 1000)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(200):
            raw = rng.randbytes(4 * 1000)
            table.add_keys(i / 20, [raw[j:j + 4] for j in range(0, len(raw), 4)])
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
SHAPES = st.sampled_from([(1.0, 1.0), (1.0, 0.25), (2.0, 2.0), (2.0, 0.5), (3.0, 1.0),
                          (5.0, 1.0), (12.0, 2.0)])
# Clock steps in thousandths of a bucket, so at every phase against the bucket edges;
# backwards too, and now and then a jump of 250 buckets.
STEP = st.one_of(st.integers(-1500, 3000), st.just(250_000))


def _op(keys: str, forget: bool) -> st.SearchStrategy[tuple[object, ...]]:
    key = st.sampled_from(keys)
    ops = [
        st.tuples(st.just("add"), key, st.integers(1, 4)),
        st.tuples(st.just("batch"), st.dictionaries(key, st.integers(1, 4), max_size=6)),
        st.tuples(st.just("keys"), st.lists(key, max_size=8)),
        st.tuples(st.just("query")),
    ]
    if forget:
        ops.append(st.tuples(st.just("forget"), key))
    return st.one_of(ops)


def _apply(table: RateTable[str], refs: list[Reference], now: float,
           op: tuple[object, ...]) -> Counter[str]:
    """Run ``op`` on the table and the references; the packets it added per key."""
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
    elif op[0] == "keys":
        assert isinstance(op[1], list)
        added.update(op[1])
        table.add_keys(now, op[1])
    elif op[0] == "forget":
        key = op[1]
        assert isinstance(key, str)
        table.forget(key)
        for ref in refs:
            ref.forget(key)
    for ref in refs:
        ref.advance(now)
        for key, n in added.items():
            ref.add(now, key, n)
    return added


@settings(max_examples=300, deadline=None)
@given(SHAPES, st.integers(-400_000, 400_000),
       st.lists(st.tuples(STEP, _op(KEYS, forget=True)), max_size=40))
def test_matches_the_reference_below_capacity(
        shape: tuple[float, float], start: int,
        steps: list[tuple[int, tuple[object, ...]]]) -> None:
    window, bucket = shape
    table = make(window, bucket, capacity=len(KEYS), track_peak=True)
    ref = Reference(window, bucket)
    ticks = start
    for step, op in steps:
        ticks += step
        now = ticks * bucket / 1000
        _apply(table, [ref], now, op)
        for key in KEYS:
            assert table.count(now, key) == ref.expected(key)
        assert table.total(now) == ref.expected(None)
        expected = ref.counts()
        assert dict(table.over(now, 0)) == expected
        over = table.over(now, 2)
        assert dict(over) == {k: c for k, c in expected.items() if c > 2}
        assert [c for _, c in over] == sorted((c for _, c in over), reverse=True)
        top = table.top(now, 3)
        assert [c for _, c in top] == sorted(expected.values(), reverse=True)[:3]
        assert all(expected[k] == c for k, c in top)
        assert len(table) == len(ref.held())
        for key in KEYS:
            assert table.peak(key) == ref.peak(key)
        assert table.pruned == 0


@settings(max_examples=500, deadline=None)
@given(st.sampled_from([(1.0, 1.0), (0.5, 0.5), (3.0, 1.0), (10.0, 1.0)]),
       st.floats(0.0, 1.0, exclude_max=True),
       st.lists(st.tuples(st.floats(0.0, 2.5), st.sampled_from("ab"), st.integers(1, 50)),
                max_size=60),
       st.lists(st.floats(0.0, 1.0, exclude_max=True), min_size=1, max_size=5))
def test_window_count_is_within_one_bucket_of_the_truth_at_any_phase(
        shape: tuple[float, float], phase: float,
        packets: list[tuple[float, str, int]], readings: list[float]) -> None:
    """The truth is a plain list of timestamps; the tick phase against the bucket
    edges is arbitrary (window = 1 bucket included)."""
    window, bucket = shape
    table = make(window, bucket)
    ref = Reference(window, bucket)
    now = 1000 * bucket + phase * bucket
    for gap, key, n in packets:
        now += gap * bucket
        table.add(now, key, n)
        ref.add(now, key, n)
        for key in "ab":
            count = table.count(now, key)
            # Off by at most the key's packets in one bucket (the oldest held).
            assert abs(count - ref.truth(key)) <= ref.oldest(key)
            assert ref.truth(key, window - bucket) <= count <= ref.truth(key, window + bucket)
    for tick in readings:  # reads between packets, at other phases
        now += tick * bucket
        for key in "ab":
            count = table.count(now, key)
            ref.advance(now)
            assert abs(count - ref.truth(key)) <= ref.oldest(key)
        assert abs(table.total(now) - ref.truth(None)) <= ref.oldest(None)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([1, 2, 3, 10]), st.integers(20, 5000), st.floats(0.001, 0.05),
       st.floats(0.0, 1.0, exclude_max=True),
       st.lists(st.floats(0.0, 1.0, exclude_max=True), min_size=1, max_size=8))
def test_steady_source_reads_its_rate_times_the_window_at_any_phase(
        span: int, rate: int, every: float, start: float, phases: list[float]) -> None:
    """A source sending ``rate`` packets a bucket, counted in batches every ``every``
    bucket (like a capture), read at arbitrary phases against the bucket edges: the
    count is its rate times the window, give or take the packets of two batches."""
    table = make(float(span), 1.0, capacity=10)
    sent = 0
    now = 100.0 + start
    end = now + span + 1.0  # the whole window and its oldest bucket filled
    for phase in phases:
        read_at = math.floor(end) + 1 + phase
        while now <= read_at:
            due = math.floor((now - 100.0) * rate)
            if due > sent:
                table.add(now, "a", due - sent)
                sent = due
            now += every
        end = read_at
        count = table.count(read_at, "a")
        assert abs(count - rate * span) <= 2 * rate * every + 3, (read_at, count)


@settings(max_examples=300, deadline=None)
@given(SHAPES, st.integers(2, 6),
       st.lists(st.tuples(STEP, _op("abcdefghijklmnop", forget=False)), max_size=40))
def test_over_capacity_drops_only_light_keys_and_keeps_the_rest_exact(
        shape: tuple[float, float], capacity: int,
        steps: list[tuple[int, tuple[object, ...]]]) -> None:
    window, bucket = shape
    keys = "abcdefghijklmnop"
    table = make(window, bucket, capacity)
    truth = Reference(window, bucket)
    kept = Reference(window, bucket)   # the truth minus the keys the table dropped
    ticks = 0
    for step, op in steps:
        ticks += step
        now = ticks * bucket / 1000
        pruned = table.pruned
        _apply(table, [truth, kept], now, op)
        held = truth._sum(None, truth.cur - truth.span, truth.cur)  # N, packets held
        tracked = dict(table.over(now, -1))  # every tracked key, counts of 0 included
        assert set(tracked) <= kept.held()
        dropped = sorted(kept.held() - set(tracked))
        for key in dropped:
            # Dropped by the bound: only a key holding under 2N/C packets.
            in_table = kept._sum(key, kept.cur - kept.span, kept.cur)
            assert table.count(now, key) == 0 and in_table * capacity < 2 * held
            kept.forget(key)
        assert table.pruned - pruned == len(dropped)
        assert len(table) <= capacity
        assert table.total(now) == truth.expected(None)
        for key in keys:
            assert table.count(now, key) == kept.expected(key) <= truth.expected(key)
        assert dict(table.over(now, 0)) == kept.counts()


@settings(max_examples=300, deadline=None)
@given(SHAPES, st.integers(3, 8),
       st.lists(st.tuples(STEP, st.dictionaries(st.sampled_from("abcdefghijklmnop"),
                                                st.integers(1, 4), max_size=8)),
                max_size=40))
def test_key_with_a_large_share_of_every_batch_is_counted_exactly(
        shape: tuple[float, float], capacity: int,
        steps: list[tuple[int, dict[str, int]]]) -> None:
    window, bucket = shape
    table = make(window, bucket, capacity)
    ref = Reference(window, bucket)
    ticks = 0
    for step, batch in steps:
        ticks += step
        now = ticks * bucket / 1000
        # "H" gets at least 2/capacity of the batch: H >= 2 * (H + others) / capacity.
        others = sum(batch.values())
        _apply(table, [ref], now,
               ("batch", {**batch, "H": max(1, -(-2 * others // (capacity - 2)))}))
        assert table.count(now, "H") == ref.expected("H")
        assert len(table) <= capacity


def test_weight_counts_each_key_that_many_times() -> None:
    sampled, whole = make(), make()
    sampled.add_keys(1.0, ["a", "a", "b"], weight=4)
    whole.add_counts(1.0, {"a": 8, "b": 4})
    assert sampled.over(1.0, 0) == whole.over(1.0, 0) == [("a", 8), ("b", 4)]
    assert sampled.total(1.0) == 12
    with pytest.raises(ValueError):
        sampled.add_keys(1.0, ["a"], weight=0)


def test_crossed_names_the_keys_a_count_took_over_the_threshold() -> None:
    table = make()
    table.add_keys(1.0, ["a"] * 3 + ["b"] * 5)
    assert table.crossed(["a"] * 3 + ["b"] * 5, 4) == ["b"]
    table.add_keys(1.1, ["a", "a", "b"])
    assert table.crossed(["a", "a", "b"], 4) == ["a"]  # b was over already
    assert table.crossed(["c"], 4) == []  # not tracked
    table.add_keys(1.2, ["d"], weight=6)
    assert table.crossed(["d"], 4, weight=6) == ["d"]


def test_crossed_counts_is_crossed_of_a_counted_batch() -> None:
    table = make()
    table.add_counts(1.0, {"a": 3, "b": 5})
    assert table.crossed_counts({"a": 3, "b": 5}, 4) == ["b"]
    table.add_counts(1.1, {"a": 2, "b": 1})
    assert table.crossed_counts({"a": 2, "b": 1}, 4) == ["a"]  # b was over already
    assert table.crossed_counts({"c": 1}, 4) == []  # not tracked
    assert table.crossed_counts({}, 4) == []
    table.add_counts(1.2, {"d": 12})
    assert table.crossed_counts({"d": 2}, 4, weight=6) == ["d"]


def test_over_reads_only_the_keys_whose_running_total_is_over() -> None:
    table = make(window=2.0, bucket=1.0)
    table.add_counts(0.5, {"a": 10, "b": 3})
    table.add_counts(1.5, {"b": 4})
    # At 2.5 the oldest bucket (0..1) weighs half: a 5, b 1 + 4 = 5 (running totals 10, 7).
    assert sorted(table.running_over(6)) == ["a", "b"]
    assert sorted(table.over(2.5, 4)) == [("a", 5), ("b", 5)]
    assert table.over(2.5, 5) == []
    assert table.over_among(2.5, ["b"], 4) == [("b", 5)]
