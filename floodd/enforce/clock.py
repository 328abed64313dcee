"""The two clocks of the ban stage, read together.

Every deadline, idle time and interval floodd keeps in memory is on the monotonic clock,
which a wall-clock step (NTP, an operator's ``date -s``) never moves.  Unix (wall-clock)
times are only written where people read them or where they must outlive the process:
the ban comments in the kernel and the offences file.  They are converted at that edge,
with one :class:`Instant` holding both clocks read at the same moment.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Instant:
    """One moment on both clocks."""

    mono: float  # time.monotonic()
    wall: float  # time.time(), unix seconds

    def to_wall(self, mono: float) -> float:
        """The unix time of the monotonic time ``mono``."""
        return self.wall + (mono - self.mono)

    def to_mono(self, wall: float) -> float:
        """The monotonic time of the unix time ``wall``."""
        return self.mono + (wall - self.wall)


def now() -> Instant:
    return Instant(time.monotonic(), time.time())
