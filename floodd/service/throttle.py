"""At most one log line per key and interval, in bounded memory.

The daemon logs a warning or a refusal for a network at most once per interval.
Under a flood of forged sources the keys it remembers for that would grow without
limit, so :class:`Throttle` remembers at most ``size`` of them: beyond, the key
allowed longest ago is forgotten, and may be logged again early.  Times are
seconds of the caller's (monotonic) clock.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class Throttle(Generic[K]):
    """Allows each key once per interval; remembers at most ``size`` keys."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"size must be at least 1, got {size!r}")
        self.size = size
        # key -> the time it may be allowed again, in the order the keys were allowed.
        self._until: OrderedDict[K, float] = OrderedDict()

    def allow(self, now: float, key: K, interval: float) -> bool:
        """True, and ``key`` is remembered until ``now + interval``, unless it was
        allowed less than its interval ago."""
        until = self._until
        if until.get(key, now) > now:
            return False
        until.pop(key, None)
        until[key] = now + interval
        # Forget, oldest first, the keys whose interval is over, and any beyond size.
        while until and (len(until) > self.size or next(iter(until.values())) <= now):
            until.popitem(last=False)
        return True

    def __len__(self) -> int:
        return len(self._until)
