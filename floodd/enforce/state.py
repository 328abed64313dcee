"""floodd's own memory across restarts: the repeat offenders (for escalating ban times).

The bans themselves live in the kernel (see floodd.enforce.firewall); this file only
remembers how often each network was banned.  It is rewritten atomically
(temporary file, fsync, rename), so a crash leaves the old or the new version,
never half of one.  Format: ``{"version": 1, "offences": {"NET": [count, last]}}``,
``last`` in unix seconds, newest first; in memory ``last`` is on the monotonic clock,
converted when the file is read and written.

:class:`StateWriter` writes in a thread of its own, so that a ban never waits for a
disk: the main loop hands it a snapshot and goes on; snapshots handed in while one is
written are coalesced into the newest.
"""

from __future__ import annotations

import ipaddress
import json
import os
import tempfile
import threading
from typing import Any, Callable, Mapping

from floodd.config import Network
from floodd.decide.policy import Offence, Offences, remembered
from floodd.enforce.clock import Instant

FILE_NAME = "offences.json"


def load_offences(state_dir: str, now: Instant, forget_after: float) -> Offences:
    """The offences file's entries still remembered at ``now``; a missing or damaged file
    means no history."""
    path = os.path.join(state_dir, FILE_NAME)
    try:
        with open(path) as f:
            data = json.load(f)
        items = [(ipaddress.ip_network(net), Offence(int(count), now.to_mono(float(last))))
                 for net, (count, last) in data["offences"].items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        items = []
    offences = Offences(forget_after, items)
    offences.forget_old(now.mono)
    return offences


def save_offences(state_dir: str, offences: Mapping[Network, Offence], now: Instant,
                  forget_after: float) -> None:
    """Write the offences still remembered at ``now``."""
    keep = sorted(((n, o) for n, o in offences.items()
                   if remembered(o, now.mono, forget_after) is not None),
                  key=lambda item: -item[1].last)
    data = {"version": 1,
            "offences": {str(n): [o.count, now.to_wall(o.last)] for n, o in keep}}
    write_json(os.path.join(state_dir, FILE_NAME), data)


def write_json(path: str, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` atomically: a temporary file beside it, fsync,
    rename; its directory is made (mode 0700) when missing.  OSError when it cannot."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class StateWriter:
    """Saves snapshots of the offences in the background, the newest one first to last.

    ``failed`` is called (in the writer's thread) with the OSError of a save that failed;
    the next snapshot is tried as usual.
    """

    def __init__(self, state_dir: str, forget_after: float,
                 failed: Callable[[OSError], None]) -> None:
        self.state_dir = state_dir
        self.forget_after = forget_after
        self._failed = failed
        self._cond = threading.Condition()
        self._pending: tuple[Offences, Instant] | None = None
        self._writing = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="floodd-state", daemon=True)
        self._thread.start()

    def submit(self, offences: Offences, now: Instant) -> None:
        """Save a copy of ``offences`` as of ``now`` soon; returns at once."""
        with self._cond:
            self._pending = (offences.copy(), now)
            self._cond.notify()

    def close(self, timeout: float = 10.0) -> None:
        """Write what is pending, then stop (waiting at most ``timeout`` seconds)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)

    def idle(self) -> bool:
        """True when every snapshot handed in is on disk (or failed)."""
        with self._cond:
            return self._pending is None and not self._writing

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                if self._pending is None:
                    return
                (offences, now), self._pending = self._pending, None
                self._writing = True
            try:
                save_offences(self.state_dir, offences, now, self.forget_after)
            except OSError as exc:
                self._failed(exc)
            finally:
                with self._cond:
                    self._writing = False
