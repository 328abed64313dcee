"""The comment every backend stores with a ban in the kernel, so that a restarted floodd
can adopt the ban: its rule, when it started and when it ends (unix seconds), and its
scope (:meth:`floodd.scope.Scope.text`).

Format: ``floodd since=S expires=E scope=X rule=R`` (nftables set element comment,
iptables ``comment`` match); ``scope=X`` is absent from comments of older floodd
versions, which banned whole sources only.
"""

from __future__ import annotations

import math
import re

from floodd.enforce.firewall.base import Ban
from floodd.scope import WHOLE, Scope

# The rule shown for a ban found without floodd's comment (added by hand).
UNKNOWN_RULE = "(unknown)"
# nft refuses comments over 128 bytes; the rule text is cut to fit.
_COMMENT_MAX = 128
_COMMENT_RE = re.compile(r"^floodd since=(\d+) expires=(\d+)(?: scope=(\S+))? rule=(.*)$",
                         re.DOTALL)
# nft's quoted strings have no escapes: these characters, and unprintable ones (as UTF-8),
# are percent-encoded in comments.
_ENCODE = {'"': "%22", "%": "%25", "\\": "%5C"}


def _escape(char: str) -> str:
    if char in _ENCODE:
        return _ENCODE[char]
    if char.isprintable():
        return char
    return "".join(f"%{b:02X}" for b in char.encode("utf-8", "surrogatepass"))


def _unescape(match: re.Match[str]) -> str:
    raw = bytes.fromhex(match.group(0).replace("%", ""))
    try:
        return raw.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return match.group(0)


def ban_comment(ban: Ban) -> str:
    """``floodd since=S expires=E scope=X rule=R``: R percent-encoded where nft needs it,
    cut at a whole character to fit nft's 128 bytes (iptables' comment match takes 256)."""
    # Whole seconds, the expiry rounded down: floodd never believes a ban lasts longer
    # than the kernel's timeout, so it extends an active ban in time.
    head = (f"floodd since={round(ban.since)} expires={math.floor(ban.expires)} "
            f"scope={ban.scope.text()} rule=")
    budget = _COMMENT_MAX - len(head)
    pieces = []
    for char in ban.rule:
        piece = _escape(char)
        budget -= len(piece.encode("utf-8", "surrogatepass"))
        if budget < 0:
            break
        pieces.append(piece)
    return head + "".join(pieces)


def parse_ban_comment(comment: str) -> tuple[str, float, float, Scope] | None:
    """``(rule, since, expires, scope)`` from a comment floodd wrote, else None."""
    m = _COMMENT_RE.match(comment)
    if m is None:
        return None
    try:
        scope = Scope.parse(m.group(3)) if m.group(3) else WHOLE
    except ValueError:
        return None
    rule = re.sub(r"(?:%[0-9A-F]{2})+", _unescape, m.group(4))
    return rule, float(m.group(1)), float(m.group(2)), scope
