"""The usual hop values of each source (or prefix), learned from its traffic.

A packet's hop value is its IPv4 TTL or IPv6 hop limit as it arrives: the sender's
initial value minus the routers on the way, so the packets of one real source carry
one or two stable values, and a forger elsewhere on the network other ones.
:class:`HopHistory` remembers, per key (bytes: a packed source address, or a prefix
key as :mod:`floodd.detect.traffic` builds them), the values that were usual before a
flood, so that a ban can spare them.  It is fed *pairs*: the key followed by one byte,
the hop value (:func:`hop_keys`), as the evidence tables count them.

Learning.
* A UDP value becomes usual when it is seen again at least ``learn_after`` seconds
  after it was first seen, and the key was not marked flooding since
  (:meth:`HopHistory.suspect`): a flood that starts now cannot teach its own values
  before its rule fires, provided ``learn_after`` is at least the rule window, and a
  one-off packet (a forged probe) teaches nothing.  Until then a value is *pending*.
* ``suspect(key, now)`` discards the key's pending values and learns no UDP value for
  it (nor takes it on probation, nor promotes its pairs on probation) for
  ``learn_after`` seconds from the latest call.
* Values seen over handshake-verified TCP (``F_VERIFIED``: a forged source cannot
  complete a handshake) are a trusted tier: once a key has one, its usual values are
  its verified ones, usual at once; its UDP values are dropped and UDP cannot add any.
  A suspect key still learns verified values.
* At most ``MAX_EXCEPT_HOPS`` values are held per key (what one ban can spare).  A new
  value takes the place of the least recently seen pending one, or if every value
  held is usual, of the least recently seen usual one: a real source's value, seen in
  every batch, stays, while values a forger rotates through push out each other.

What a forger can still do: values sent with a real source's address at a low rate
(below every rule) for longer than ``learn_after`` become usual like the real ones
(priming).  A ban then spares them too, and if the flood comes with them its packets
count as the source's own.  A source seen over verified TCP cannot be primed.

Memory (at most ``capacity`` established keys plus ``probation`` pairs):
* a key seen for the first time goes on probation: its (key, value) pair is kept, with
  the time it was first seen, in one of two generations, at most ``probation`` pairs
  in both.  A pair seen again moves to the young generation (keeping its first
  time), and establishes its key, with that value usual, once seen again
  ``learn_after`` after it was first seen.  When the probation is full, the old
  generation (the pairs not seen again since it was the young one) is dropped and
  the young one becomes the old one, if it is at least ``learn_after`` old; else new
  pairs are turned away.  So a flood of forged one-off sources only churns the
  probation and never takes the place of an established key; new sources are
  learned ``probation`` per ``learn_after`` at least, but during a flood of new
  sources that keeps the probation full, they may not be.
* established keys, when there are ``capacity`` of them, make room for a new one
  by dropping the ``capacity // 16`` least recently seen, at once.
* suspect marks are kept for ``learn_after``; more than ``capacity`` at once keep
  the latest ``capacity // 2``.
About 300 bytes per established key with one value (bench/bench_memory.py).

CPU.  ``budget`` (``LEARN_BUDGET``, 20,000) bounds the packets (pairs) a history looks
at: ``budget`` a second on average, at most a second's worth at once, and as many of
those over verified TCP.  Batches beyond it are left out (counted in ``skipped``), so
the batches looked at spread over time.  Each batch looked at costs a few passes in C
over its pairs (``set``, dict views, ``map``, ``compress``: the pairs already held
refresh their time, those of unknown keys go on probation) and one Python step per
distinct pair that is a new value of an established key, verified and not held yet,
or on probation and seen again: about 1 us a packet, so at most about 20 ms of CPU a
second per history, whatever the packet rate.  Beyond the budget, established keys
keep their values (nothing is dropped but to make room for a new key), but new
values and new keys may be learned late or not at all during a flood: at 200,000
packets a second, one in ten teaches the history.

Every method takes the clock as ``now`` (monotonic in the daemon, the capture's
timestamps offline).  Not thread-safe.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, KeysView, Sequence
from dataclasses import dataclass
from itertools import compress, islice
from operator import add, itemgetter, not_

from floodd.scope import MAX_EXCEPT_HOPS

HOP_BYTES = tuple(bytes((hop,)) for hop in range(256))  # the suffix of a pair, per value
LEARN_BUDGET = 20_000  # pairs looked at per second (see the module docstring)
PROBATION_SHARE = 4  # the probation holds capacity // PROBATION_SHARE pairs at most
EVICT_SHARE = 16  # a full history drops capacity // EVICT_SHARE keys at once

_key_of = itemgetter(slice(None, -1))  # a pair's key


def hop_keys(keys: Iterable[bytes], hops: Iterable[int]) -> list[bytes]:
    """The pair of each key and hop value (0..255): the key followed by one byte."""
    return list(map(add, keys, map(HOP_BYTES.__getitem__, hops)))


@dataclass(frozen=True)
class HopEvidence:
    """What a rule's packets from one key in its window say about their source being
    real (:meth:`floodd.detect.traffic.Traffic.evidence`)."""

    usual: tuple[int, ...]  # the key's usual hop values, sorted (none: no history)
    verified: bool  # whether they were seen over handshake-verified TCP
    at_usual: int  # the rule's matching packets at one of those values
    tcp: int  # the rule's matching packets over verified TCP


class HopHistory:
    """Per key, the hop values usual before a flood; bounded in memory and CPU."""

    def __init__(self, capacity: int, learn_after: float, budget: int = LEARN_BUDGET) -> None:
        if capacity < EVICT_SHARE:
            raise ValueError(f"capacity must be at least {EVICT_SHARE}, got {capacity!r}")
        if not (math.isfinite(learn_after) and learn_after >= 0):
            raise ValueError(f"learn_after must be a number of seconds, got {learn_after!r}")
        self.capacity = capacity
        self.learn_after = learn_after  # the daemon may change it on reload
        self.budget = budget
        self.probation = max(capacity // PROBATION_SHARE, 2)
        self.skipped = 0  # pairs left out by the budget
        # Invariants, for every established key k (and only those):
        #   _seen[k] = when k was last seen; _hops[k] = the values held (at most
        #   MAX_EXCEPT_HOPS), each value h as pair p = k + HOP_BYTES[h] in _last
        #   (when p was last seen); h is usual unless p is in _pending (when p was
        #   first seen) and _last[p] - _pending[p] < learn_after; k is in _verified
        #   iff the values held were seen over verified TCP (then none is pending).
        # A pair on probation is in _young or _old, not both, and not in _last; its key
        # may have been established since (the pair is taken from there when seen).
        self._seen: dict[bytes, float] = {}
        self._hops: dict[bytes, bytes] = {}
        self._last: dict[bytes, float] = {}
        self._pending: dict[bytes, float] = {}
        self._verified: set[bytes] = set()
        self._young: dict[bytes, float] = {}
        self._old: dict[bytes, float] = {}
        self._young_since = -math.inf  # when the young generation started
        self._blocked: dict[bytes, float] = {}  # suspect key -> learning resumes at
        self._unblock = math.inf  # the earliest time in _blocked
        self._settle_at = -math.inf  # next time pending values that became usual are settled
        # The budget as two token buckets (all pairs, verified ones): each refills at
        # ``budget`` a second up to ``budget``; a batch is looked at while it is positive.
        self._tokens = self._verified_tokens = float(budget)
        self._refilled = -math.inf  # when the tokens were last refilled

    def __len__(self) -> int:
        """Keys established plus pairs on probation: at most capacity + probation."""
        return len(self._seen) + len(self._young) + len(self._old)

    def established(self) -> int:
        """Keys established (not on probation)."""
        return len(self._seen)

    def usual(self, key: bytes) -> tuple[int, ...]:
        """The key's usual hop values, sorted (none if it has no history)."""
        held = self._hops.get(key)
        if not held:
            return ()
        if key in self._verified:
            return tuple(sorted(held))
        return tuple(sorted(h for h in held if self._is_usual(key + HOP_BYTES[h])))

    def established_keys(self) -> KeysView[bytes]:
        """The keys established (their values held), for C-speed membership tests; a
        live view."""
        return self._seen.keys()

    def held_pairs(self) -> KeysView[bytes]:
        """The pairs of every value held for an established key (usual or pending), for
        C-speed membership tests; a live view."""
        return self._last.keys()

    def held(self, key: bytes) -> bytes:
        """Every value held for an established key, usual or pending (one byte each)."""
        return self._hops.get(key, b"")

    def verified(self, key: bytes) -> bool:
        """Whether the key's usual values were seen over handshake-verified TCP."""
        return key in self._verified

    def forget(self, key: bytes) -> None:
        """Drop what is established about ``key`` (its values; a suspect mark stays)."""
        held = self._hops.pop(key, None)
        if held is None:
            return
        del self._seen[key]
        self._verified.discard(key)
        for hop in held:
            self._drop_pair(key + HOP_BYTES[hop])

    def suspect(self, key: bytes, now: float) -> None:
        """``key`` is flooding: discard its values not usual yet (pending, on probation)
        and learn no UDP value for it until ``now + learn_after``."""
        held = self._hops.get(key)
        if held and key not in self._verified:
            keep = bytearray()
            for hop in held:
                pair = key + HOP_BYTES[hop]
                if self._is_usual(pair):
                    self._pending.pop(pair, None)
                    keep.append(hop)
                else:
                    self._drop_pair(pair)
            self._hops[key] = bytes(keep)
        # Its pairs on probation stay there (dropping them would cost 512 lookups for
        # every trigger of every tick), but none is promoted while it is suspect.
        until = now + self.learn_after
        self._blocked.pop(key, None)  # re-inserted last: the dict stays in time order
        self._blocked[key] = until
        self._unblock = min(self._unblock, until)
        if len(self._blocked) > self.capacity:
            self._unblock_expired(now)
            if len(self._blocked) > self.capacity:
                self._blocked = dict(islice(self._blocked.items(),
                                            len(self._blocked) - self.capacity // 2, None))

    def learns(self, now: float, pairs: int, verified: int = 0) -> bool:
        """Whether :meth:`observe` at ``now`` would look at a batch of ``pairs`` pairs,
        ``verified`` of them over verified TCP; when not (the budget is spent), they are
        counted in ``skipped`` here, and the caller need not build them."""
        self._refill(now)
        if self._tokens > 0 or (verified and self._verified_tokens > 0):
            return True
        self.skipped += pairs
        return False

    def _refill(self, now: float) -> None:
        if now > self._refilled:
            gained = (now - self._refilled) * self.budget
            self._tokens = min(self._tokens + gained, self.budget)
            self._verified_tokens = min(self._verified_tokens + gained, self.budget)
            self._refilled = now

    def observe(self, now: float, pairs: Sequence[bytes],
                verified: Sequence[bytes] = ()) -> None:
        """Learn from one batch: ``pairs`` of every packet (repeats allowed), and among
        them ``verified``, those of packets over handshake-verified TCP."""
        if not pairs:
            return
        self._refill(now)
        if now >= self._unblock:
            self._unblock_expired(now)
        if now >= self._settle_at:
            self._settle(now)
        if verified and self._verified_tokens > 0:
            self._verified_tokens -= len(verified)
            self._learn_verified(now, set(verified))
        if self._tokens <= 0:
            self.skipped += len(pairs)
            return
        self._tokens -= len(pairs)
        distinct = set(pairs)
        last, seen = self._last, self._seen
        held = last.keys() & distinct
        if held:
            last.update(dict.fromkeys(held, now))
        keys = set(map(_key_of, distinct))
        established = seen.keys() & keys
        if established:
            seen.update(dict.fromkeys(established, now))
        fresh = list(distinct.difference(held))
        if not fresh:
            return
        known = list(map(seen.__contains__, map(_key_of, fresh)))
        new_values = list(compress(fresh, known))
        if new_values:
            self._learn_values(now, new_values)
        if len(new_values) < len(fresh):
            self._probation_step(now, set(compress(fresh, map(not_, known))))

    def _is_usual(self, pair: bytes) -> bool:
        first = self._pending.get(pair)
        return first is None or self._last[pair] - first >= self.learn_after

    def _drop_pair(self, pair: bytes) -> None:
        del self._last[pair]
        self._pending.pop(pair, None)

    def _settle(self, now: float) -> None:
        """Forget when the pending values that became usual were first seen (memory)."""
        after, last = self.learn_after, self._last
        self._pending = {p: first for p, first in self._pending.items()
                         if last[p] - first < after}
        self._settle_at = now + max(after, 1.0)

    def _unblock_expired(self, now: float) -> None:
        self._blocked = {k: until for k, until in self._blocked.items() if until > now}
        self._unblock = min(self._blocked.values(), default=math.inf)

    def _unblocked(self, pairs: list[bytes]) -> list[bytes]:
        """The pairs whose key is not suspect."""
        if not self._blocked:
            return pairs
        return list(compress(pairs, map(not_, map(self._blocked.__contains__,
                                                  map(_key_of, pairs)))))

    def _establish(self, now: float, key: bytes) -> None:
        if key in self._seen:
            return
        if len(self._seen) >= self.capacity:
            seen = self._seen
            for old in heapq.nsmallest(self.capacity // EVICT_SHARE, seen, key=seen.__getitem__):
                self.forget(old)
        self._seen[key] = now
        self._hops[key] = b""

    def _add_value(self, key: bytes, pair: bytes, now: float, first: float) -> None:
        """Hold a new value for established ``key``: pending since ``first`` (UDP), or
        usual (verified keys: ``first`` is ignored)."""
        held = self._hops[key]
        if len(held) >= MAX_EXCEPT_HOPS:
            held = self._make_room(key, held)
        self._hops[key] = held + pair[-1:]
        self._last[pair] = now
        if key not in self._verified:
            self._pending[pair] = first

    def _make_room(self, key: bytes, held: bytes) -> bytes:
        """Drop the least recently seen pending value, or else usual one."""
        last = self._last
        pairs = [key + HOP_BYTES[h] for h in held]
        pending = [p for p in pairs if not self._is_usual(p)]
        victim = min(pending or pairs, key=last.__getitem__)
        self._drop_pair(victim)
        return held.replace(victim[-1:], b"")

    def _learn_verified(self, now: float, distinct: set[bytes]) -> None:
        last, verified = self._last, self._verified
        held = list(last.keys() & distinct)
        # Not held yet, or held as a UDP value of a key not verified yet.
        todo = list(distinct.difference(held))
        todo += compress(held, map(not_, map(verified.__contains__, map(_key_of, held))))
        for pair in todo:
            key = _key_of(pair)
            self._establish(now, key)
            if key not in verified:  # the trusted tier replaces the UDP values
                for hop in self._hops[key]:
                    self._drop_pair(key + HOP_BYTES[hop])
                self._hops[key] = b""
                verified.add(key)
            self._add_value(key, pair, now, now)

    def _learn_values(self, now: float, pairs: list[bytes]) -> None:
        """New UDP values of established keys (pairs not held)."""
        if self._verified:
            pairs = list(compress(pairs, map(not_, map(self._verified.__contains__,
                                                       map(_key_of, pairs)))))
        pairs = self._unblocked(pairs)
        young, old = self._young, self._old
        for pair in pairs:
            # A pair may be on probation since before its key was established.
            first = young.pop(pair, None)
            if first is None:
                first = old.pop(pair, now)
            self._add_value(_key_of(pair), pair, now, first)

    def _probation_step(self, now: float, pairs: set[bytes]) -> None:
        """Pairs of keys not established: promote those seen again ``learn_after`` after
        they were first seen, move the other ones seen again to the young generation,
        take new ones on probation while there is room."""
        young, old = self._young, self._old
        again_old = old.keys() & pairs
        again_young = young.keys() & pairs
        if again_old or again_young:
            seen_again = list(again_old) + list(again_young)
            again = self._unblocked(seen_again)
            if len(again) < len(seen_again):  # pairs of suspect keys leave the probation
                for pair in set(seen_again).difference(again):
                    (young if pair in young else old).pop(pair)
                again_old = again_old.intersection(again)
            cutoff = now - self.learn_after
            for pair in again:
                generation = young if pair in young else old
                first = generation[pair]
                if first <= cutoff:
                    del generation[pair]
                    key = _key_of(pair)
                    self._establish(now, key)
                    self._add_value(key, pair, now, first)
            still = old.keys() & again_old
            young.update(zip(still, map(old.pop, still)))
        new = self._unblocked(list(pairs.difference(again_old, again_young)))
        if not new:
            return
        # Full: the old generation goes, if the young one is at least a generation old
        # (every pair had that long to be seen again); else the new pairs are turned away.
        if len(young) + len(old) + len(new) > self.probation and \
                now - self._young_since >= max(self.learn_after, 1.0):
            self._old, self._young, self._young_since = young, {}, now
            young = self._young
        room = self.probation - len(young) - len(self._old)
        if room > 0:
            young.update(dict.fromkeys(islice(new, room), now))
