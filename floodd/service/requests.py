"""Control requests, validated: what the control socket's JSON lines may ask for.

The socket thread turns each JSON object into one of these frozen records (or a
one-line error reply) before anything else sees it; the main loop only ever
receives a valid request.  The wire format (one JSON object per line):

* ``{"cmd": "status"}``
* ``{"cmd": "top", "n": N}`` (``n`` optional, 1..MAX_TOP, default 20): the busiest
  sources, with the bans per rule and the newest bans from the daemon's mirror
* ``{"cmd": "bans"}``
* ``{"cmd": "ban", "source": "198.51.100.7", "seconds": S, "reason": "text",
  "force": false}`` (all but ``source`` optional)
* ``{"cmd": "unban", "source": "198.51.100.0/24"}`` or ``{"cmd": "unban", "all": true}``

Unknown commands and unknown fields are refused, so a typo is never taken as the
default.
"""

from __future__ import annotations

import ipaddress
import math
import unicodedata
from dataclasses import dataclass
from typing import Any

from floodd.config import MAX_DURATION, Network
from floodd.errors import FlooddError

DEFAULT_TOP = 20
MAX_TOP = 10_000
DEFAULT_BAN_TIME = 3600.0  # a manual ban lasts this long unless the request says otherwise
MAX_BAN_TIME = MAX_DURATION
DEFAULT_REASON = "manual"
MAX_REASON = 64  # characters; the reason is logged and kept in the kernel's comment
MAX_SOURCE = 64  # characters: the longest IPv6 prefix written out is 43


class BadRequest(FlooddError):
    """A control request that does not validate; its text is the one-line reply."""


@dataclass(frozen=True)
class Status:
    pass


@dataclass(frozen=True)
class Top:
    n: int


@dataclass(frozen=True)
class ListBans:
    pass


@dataclass(frozen=True)
class BanRequest:
    network: Network
    seconds: float  # finite, > 0, at most a year
    reason: str  # non-empty, printable, short
    force: bool  # ban even a protected network


@dataclass(frozen=True)
class UnbanRequest:
    network: Network | None  # None: every ban


Request = Status | Top | ListBans | BanRequest | UnbanRequest


_FIELDS: dict[str, frozenset[str]] = {
    "status": frozenset(),
    "top": frozenset({"n"}),
    "bans": frozenset(),
    "ban": frozenset({"source", "seconds", "reason", "force"}),
    "unban": frozenset({"source", "all"}),
}


def parse_request(body: Any) -> Request:
    """The request ``body`` (a decoded JSON value) asks for, or BadRequest."""
    if not isinstance(body, dict):
        raise BadRequest("bad request: expected a JSON object")
    cmd = body.get("cmd")
    if not isinstance(cmd, str):
        raise BadRequest("bad request: \"cmd\" must be a string")
    if cmd not in _FIELDS:
        raise BadRequest(f"unknown command {_show(cmd)} (expected one of "
                         f"{', '.join(sorted(_FIELDS))})")
    unknown = sorted(set(body) - _FIELDS[cmd] - {"cmd"})
    if unknown:
        raise BadRequest(f"{cmd}: unknown field {_show(unknown[0])}")
    if cmd == "status":
        return Status()
    if cmd == "bans":
        return ListBans()
    if cmd == "top":
        return Top(_integer(body, "top", "n", DEFAULT_TOP, 1, MAX_TOP))
    if cmd == "ban":
        if "source" not in body:
            raise BadRequest("ban: \"source\" is missing")
        return BanRequest(_network(body["source"], "ban"),
                          _seconds(body.get("seconds", DEFAULT_BAN_TIME)),
                          check_reason(body.get("reason", DEFAULT_REASON), "ban: reason"),
                          _boolean(body, "ban", "force"))
    everything = _boolean(body, "unban", "all")
    if everything == ("source" in body):
        raise BadRequest("unban: give either \"source\" or \"all\": true")
    return UnbanRequest(None if everything else _network(body["source"], "unban"))


def check_reason(value: object, what: str) -> str:
    """A ban's reason as given, stripped: 1 to MAX_REASON printable characters."""
    if not isinstance(value, str):
        raise BadRequest(f"{what}: expected text, got {_kind(value)}")
    text = value.strip()
    if not text:
        raise BadRequest(f"{what}: must not be empty")
    if len(text) > MAX_REASON:
        raise BadRequest(f"{what}: at most {MAX_REASON} characters, got {len(text)}")
    if any(unicodedata.category(c)[0] == "C" for c in text):
        raise BadRequest(f"{what}: control characters are not allowed")
    return text


def _network(value: object, cmd: str) -> Network:
    if not isinstance(value, str) or len(value) > MAX_SOURCE:
        raise BadRequest(f"{cmd}: \"source\" must be an address or prefix as text")
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError:
        raise BadRequest(f"{cmd}: not an address or prefix (host bits must be zero): "
                         f"{_show(value)}") from None


def _seconds(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"ban: \"seconds\" must be a number, got {_kind(value)}")
    seconds = float(value) if isinstance(value, float) or abs(value) <= MAX_BAN_TIME else math.inf
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_BAN_TIME):
        raise BadRequest(f"ban: \"seconds\" must be more than 0 and at most "
                         f"{MAX_BAN_TIME:.0f} (365 days), got {_show(value)}")
    return seconds


def _integer(body: dict[str, Any], cmd: str, key: str, default: int, low: int,
             high: int) -> int:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadRequest(f"{cmd}: \"{key}\" must be an integer from {low} to {high}, "
                         f"got {_show(value)}")
    return value


def _boolean(body: dict[str, Any], cmd: str, key: str) -> bool:
    value = body.get(key, False)
    if not isinstance(value, bool):
        raise BadRequest(f"{cmd}: \"{key}\" must be true or false, got {_show(value)}")
    return value


def _kind(value: object) -> str:
    return "null" if value is None else {bool: "a boolean", int: "a number", float: "a number",
                                         str: "text", list: "a list", dict: "an object"
                                         }.get(type(value), type(value).__name__)


def _show(value: object) -> str:
    """A value for a one-line error: repr, cut short."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
