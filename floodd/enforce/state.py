"""floodd's own memory across restarts: the repeat offenders (for escalating ban times).

The bans themselves live in the kernel (see floodd.enforce.firewall); this file only
remembers how often each network was banned.  It is rewritten atomically
(temporary file, fsync, rename), so a crash leaves the old or the new version,
never half of one.  Format: ``{"version": 1, "offences": {"NET": [count, last]}}``.
"""

from __future__ import annotations

import ipaddress
import json
import os
import tempfile
from typing import Mapping

from floodd.config import Network
from floodd.decide.policy import Offence

FILE_NAME = "offences.json"
MAX_ENTRIES = 100_000


def load_offences(state_dir: str) -> dict[Network, Offence]:
    """Read the offences file; a missing or damaged file means no history."""
    path = os.path.join(state_dir, FILE_NAME)
    try:
        with open(path) as f:
            data = json.load(f)
        out: dict[Network, Offence] = {}
        for net, (count, last) in data["offences"].items():
            out[ipaddress.ip_network(net)] = Offence(int(count), float(last))
        return out
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def save_offences(state_dir: str, offences: Mapping[Network, Offence], now: float,
                  forget_after: float) -> None:
    """Write the offences still remembered at ``now`` (the newest MAX_ENTRIES)."""
    keep = sorted(((n, o) for n, o in offences.items() if now - o.last <= forget_after),
                  key=lambda item: -item[1].last)[:MAX_ENTRIES]
    data = {"version": 1, "offences": {str(n): [o.count, o.last] for n, o in keep}}
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
