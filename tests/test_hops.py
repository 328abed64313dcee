from __future__ import annotations

import ipaddress
import sys
from collections.abc import Iterator
from itertools import cycle, islice, repeat

from floodd.detect.hops import HOP_BYTES, HopHistory, hop_keys
from floodd.scope import MAX_EXCEPT_HOPS

LEARN = 60.0
REAL = ipaddress.ip_address("203.0.113.10").packed
OTHER = ipaddress.ip_address("203.0.113.11").packed


def pair(key: bytes, hop: int) -> bytes:
    return key + HOP_BYTES[hop]


def learned(keys: list[bytes], hop: int = 64, capacity: int = 1000) -> HopHistory:
    """A history where ``keys`` are established with ``hop`` usual: as many as the
    probation holds are first seen at 0 and again at 60 (promoted), the next ones at 60
    and 120, and so on."""
    history = HopHistory(capacity, LEARN)
    size = history.probation
    chunks = [keys[i:i + size] for i in range(0, len(keys), size)] + [[]]
    for i in range(len(chunks)):
        both = chunks[i] + (chunks[i - 1] if i else [])
        history.observe(i * LEARN, hop_keys(both, [hop] * len(both)))
    assert history.established() == len(keys)
    return history


def test_hop_keys_are_the_key_and_one_byte() -> None:
    assert hop_keys([REAL, OTHER], [64, 0]) == [REAL + b"\x40", OTHER + b"\x00"]
    assert pair(REAL, 255)[-1] == 255


def test_a_value_is_usual_once_seen_again_learn_after_later() -> None:
    history = HopHistory(1000, LEARN)
    history.observe(0.0, [pair(REAL, 64)] * 3)
    assert history.usual(REAL) == () and len(history) == 1  # on probation
    history.observe(59.0, [pair(REAL, 64)])
    assert history.usual(REAL) == ()
    history.observe(60.0, [pair(REAL, 64)])
    assert history.usual(REAL) == (64,) and not history.verified(REAL)
    # A second path: usual once seen again 60 s after its first packet.
    history.observe(100.0, [pair(REAL, 64), pair(REAL, 63)])
    history.observe(159.0, [pair(REAL, 63)])
    assert history.usual(REAL) == (64,)
    history.observe(160.0, [pair(REAL, 63)])
    assert history.usual(REAL) == (63, 64)
    # A one-off packet teaches nothing, however long ago.
    history.observe(200.0, [pair(REAL, 50)])
    history.observe(1000.0, [pair(REAL, 64)])
    assert history.usual(REAL) == (63, 64)
    assert history.held(REAL) == bytes([64, 63, 50])
    assert history.usual(OTHER) == () and history.held(OTHER) == b""


def test_suspect_discards_values_not_usual_yet_and_blocks_learning() -> None:
    history = learned([REAL])
    history.observe(100.0, [pair(REAL, 50)])
    history.suspect(REAL, 130.0)  # a flood at TTL 50 fires a rule
    assert history.usual(REAL) == (64,) and history.held(REAL) == bytes([64])
    for now in (140.0, 160.0, 189.0):  # the flood goes on: nothing learned until 190
        history.observe(now, [pair(REAL, 50), pair(REAL, 64)])
    history.observe(250.0, [pair(REAL, 50)])
    assert history.usual(REAL) == (64,)
    history.observe(310.0, [pair(REAL, 50)])  # first seen again at 190: usual from 250
    assert history.usual(REAL) == (50, 64)


def test_suspect_drops_a_key_on_probation() -> None:
    history = HopHistory(1000, LEARN)
    history.observe(0.0, [pair(REAL, 50)])
    history.suspect(REAL, 30.0)
    history.observe(60.0, [pair(REAL, 50)])  # blocked until 90: off the probation
    assert len(history) == 0
    history.observe(100.0, [pair(REAL, 50)])
    history.observe(159.0, [pair(REAL, 50)])
    assert history.usual(REAL) == ()
    history.observe(160.0, [pair(REAL, 50)])
    assert history.usual(REAL) == (50,)


def test_verified_values_override_udp_ones_at_once() -> None:
    history = learned([REAL])
    history.observe(100.0, [pair(REAL, 50)])
    history.observe(110.0, [pair(REAL, 60)], verified=[pair(REAL, 60)])
    assert history.usual(REAL) == (60,) and history.verified(REAL)
    # UDP cannot add to them, however long it is seen.
    for now in (120.0, 200.0, 300.0):
        history.observe(now, [pair(REAL, 64), pair(REAL, 50)])
    assert history.usual(REAL) == (60,)
    # A new key seen over verified TCP needs no probation; a suspect one still learns.
    history.suspect(OTHER, 300.0)
    history.observe(301.0, [pair(OTHER, 57)], verified=[pair(OTHER, 57)])
    assert history.usual(OTHER) == (57,) and history.verified(OTHER)
    history.observe(302.0, [pair(OTHER, 58)], verified=[pair(OTHER, 58)])
    assert history.usual(OTHER) == (57, 58)
    history.suspect(OTHER, 303.0)
    assert history.usual(OTHER) == (57, 58)


def test_values_per_key_are_capped_and_the_real_one_stays() -> None:
    history = learned([REAL])
    # A forger rotates through every other TTL with the real address; the real client
    # keeps sending at 64.
    for i, hop in enumerate(h for h in range(256) if h != 64):
        now = 100.0 + i
        history.observe(now, [pair(REAL, hop), pair(REAL, 64)])
        assert len(history.held(REAL)) <= MAX_EXCEPT_HOPS
    history.observe(1000.0, [pair(REAL, 64)])
    assert history.usual(REAL) == (64,)


def test_the_least_recently_seen_usual_value_gives_way() -> None:
    history = HopHistory(1000, LEARN)
    hops = list(range(40, 40 + MAX_EXCEPT_HOPS))
    history.observe(0.0, hop_keys([REAL] * len(hops), hops))
    history.observe(60.0, hop_keys([REAL] * len(hops), hops))
    assert history.usual(REAL) == tuple(hops)
    history.observe(70.0, hop_keys([REAL] * (len(hops) - 1), hops[1:]))  # all but 40
    history.observe(80.0, [pair(REAL, 99)])  # a ninth value takes 40's place
    assert 40 not in history.held(REAL) and 99 in history.held(REAL)
    history.observe(140.0, [pair(REAL, 99)])
    assert history.usual(REAL) == tuple(hops[1:] + [99])


def test_established_keys_evict_the_least_recently_seen_first() -> None:
    capacity = 64
    keys = [bytes([198, 51, 100, i]) for i in range(capacity)]
    history = learned(keys, capacity=capacity)
    recent = keys[capacity // 2:]
    history.observe(1000.0, hop_keys(recent, [64] * len(recent)))
    newcomer = bytes([198, 51, 101, 1])
    history.observe(1000.0, [pair(newcomer, 70)])
    history.observe(1060.0, [pair(newcomer, 70)])  # promoted: room is made
    assert history.usual(newcomer) == (70,)
    assert history.established() <= capacity
    assert all(history.usual(key) == (64,) for key in recent)
    gone = [key for key in keys if not history.usual(key)]
    assert len(gone) == capacity // 16 and set(gone) <= set(keys[:capacity // 2])


def test_budget_bounds_the_packets_looked_at() -> None:
    keys = [bytes([198, 51, 100, i]) for i in range(50)]
    history = learned(keys)
    history.budget = 30  # packets a second, at most 30 at once
    history.observe(100.0, hop_keys(keys[:25], [50] * 25))
    history.observe(100.01, hop_keys(keys[25:], [50] * 25))  # 5.3 left: looked at
    assert all(50 in history.held(key) for key in keys) and history.skipped == 0
    history.observe(100.02, hop_keys(keys, [51] * 50))  # spent
    assert history.skipped == 50 and not any(51 in history.held(key) for key in keys)
    # Verified TCP has a budget of its own; established keys keep their values.
    history.observe(100.03, [pair(OTHER, 57)], verified=[pair(OTHER, 57)])
    assert history.usual(OTHER) == (57,) and history.skipped == 51
    assert all(history.usual(key) == (64,) for key in keys)
    history.observe(101.0, hop_keys(keys, [51] * 50))  # refilled by 29 since
    assert all(51 in history.held(key) for key in keys)


def forged_batches(count: int, batch: int) -> Iterator[list[bytes]]:
    """Pairs of ``count`` distinct forged sources (198.18.0.0 onwards), ``batch`` at a
    time, their hop values cycling through 0..255."""
    hops = cycle(range(256))
    for first in range(0, count, batch):
        n = min(batch, count - first)
        sources = map(int.to_bytes, range(0xC6120000 + first, 0xC6120000 + first + n),
                      repeat(4))
        yield hop_keys(sources, islice(hops, n))


def deep_size(obj: object) -> int:
    """The bytes of an object's attributes, their items included (shared ones counted
    once per container: an upper bound)."""
    size = 0
    for value in vars(obj).values():
        size += sys.getsizeof(value)
        if isinstance(value, dict):
            size += sum(map(sys.getsizeof, value)) + sum(map(sys.getsizeof, value.values()))
        elif isinstance(value, (set, frozenset)):
            size += sum(map(sys.getsizeof, value))
    return size


def test_memory_is_bounded_under_a_flood_of_forged_sources() -> None:
    capacity = 1000
    real = [b"\x20\x01\x0d\xb8" + bytes(10) + i.to_bytes(2, "big") for i in range(capacity)]
    history = learned(real, capacity=capacity)
    real_pairs = hop_keys(real, [64] * capacity)
    limit = capacity + history.probation
    before = deep_size(history)
    biggest = 0
    for i, pairs in enumerate(forged_batches(5_000_000, 4096)):
        now = 1000.0 + i * 0.1  # 40,960 forged packets a second, for 122 s
        history.observe(now, pairs + real_pairs[i % 10 * 100:(i % 10 + 1) * 100])
        assert len(history) <= limit
        if i % 100 == 0:
            biggest = max(biggest, deep_size(history))
    assert history.established() == capacity
    assert all(history.usual(key) == (64,) for key in real)
    # The probation's pairs (5-byte keys in 2 generations) at most, about 200 bytes each.
    assert biggest - before < history.probation * 250, (before, biggest)


def test_learns_tells_when_the_budget_is_spent() -> None:
    history = HopHistory(100, 0.0, budget=10)
    keys = [bytes([198, 51, 100, i]) for i in range(20)]
    assert history.learns(1.0, 20)
    history.observe(1.0, hop_keys(keys, [64] * 20))
    assert not history.learns(1.0, 20) and history.skipped == 20  # spent: not built
    assert history.learns(1.0, 5, verified=5)  # verified TCP has its own budget
    assert history.learns(3.0, 20)  # refilled (the 10 over the budget paid back)
