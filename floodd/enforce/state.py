"""floodd's own memory across restarts: the repeat offenders (for escalating ban times).

The bans themselves live in the kernel (see floodd.enforce.firewall); this file only
remembers how often each network was banned.  It is rewritten atomically
(temporary file, fsync, rename), so a crash leaves the old or the new version,
never half of one.  Format: ``{"version": 1, "offences": {"NET": [count, last]}}``,
``last`` in unix seconds, newest first; in memory ``last`` is on the monotonic clock,
converted when the file is read and written.
"""

from __future__ import annotations

import ipaddress
import json
import os
import tempfile
from typing import Mapping

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
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".offences.", dir=state_dir)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(state_dir, FILE_NAME))
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
