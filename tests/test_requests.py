"""floodd.service.requests: every control request validated, every bad one a one-line error."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from floodd.service.requests import (DEFAULT_BAN_TIME, BadRequest, BanRequest, ListBans, Status,
                                     Top, UnbanRequest, check_reason, parse_request)

NET = ipaddress.ip_network


@pytest.mark.parametrize("body, expected", [
    ({"cmd": "status"}, Status()),
    ({"cmd": "bans"}, ListBans()),
    ({"cmd": "top"}, Top(20)),
    ({"cmd": "top", "n": 5}, Top(5)),
    ({"cmd": "ban", "source": "198.51.100.7"},
     BanRequest(NET("198.51.100.7/32"), DEFAULT_BAN_TIME, "manual", False)),
    ({"cmd": "ban", "source": "2001:db8::/48", "seconds": 90, "reason": " abuse ",
      "force": True}, BanRequest(NET("2001:db8::/48"), 90.0, "abuse", True)),
    ({"cmd": "ban", "source": "198.51.100.0/24", "seconds": 0.5},
     BanRequest(NET("198.51.100.0/24"), 0.5, "manual", False)),
    ({"cmd": "unban", "source": "198.51.100.7"}, UnbanRequest(NET("198.51.100.7/32"))),
    ({"cmd": "unban", "all": True}, UnbanRequest(None)),
])
def test_good_requests(body: dict[str, Any], expected: object) -> None:
    assert parse_request(body) == expected


BAD = [
    ([1, 2], "bad request: expected a JSON object"),
    ("status", "bad request: expected a JSON object"),
    ({}, 'bad request: "cmd" must be a string'),
    ({"cmd": 5}, 'bad request: "cmd" must be a string'),
    ({"cmd": "halt"}, "unknown command 'halt' (expected one of ban, bans, status, top, unban)"),
    ({"cmd": "status", "x": 1}, "status: unknown field 'x'"),
    ({"cmd": "ban", "source": "198.51.100.7", "secs": 5}, "ban: unknown field 'secs'"),
    ({"cmd": "top", "n": 0}, 'top: "n" must be an integer from 1 to 10000, got 0'),
    ({"cmd": "top", "n": "5"}, "top: \"n\" must be an integer from 1 to 10000, got '5'"),
    ({"cmd": "top", "n": True}, 'top: "n" must be an integer from 1 to 10000, got True'),
    ({"cmd": "top", "n": 2.0}, 'top: "n" must be an integer from 1 to 10000, got 2.0'),
    ({"cmd": "top", "n": 10 ** 30}, 'top: "n" must be an integer from 1 to 10000, got '
                                    '1000000000000000000000000000000'),
    ({"cmd": "ban"}, 'ban: "source" is missing'),
    ({"cmd": "ban", "source": 7}, 'ban: "source" must be an address or prefix as text'),
    ({"cmd": "ban", "source": "1" * 100}, 'ban: "source" must be an address or prefix as text'),
    ({"cmd": "ban", "source": "198.51.100.7/24"},
     "ban: not an address or prefix (host bits must be zero): '198.51.100.7/24'"),
    ({"cmd": "ban", "source": "example.com"},
     "ban: not an address or prefix (host bits must be zero): 'example.com'"),
    ({"cmd": "ban", "source": "198.51.100.7", "seconds": "x"},
     'ban: "seconds" must be a number, got text'),
    ({"cmd": "ban", "source": "198.51.100.7", "seconds": None},
     'ban: "seconds" must be a number, got null'),
    ({"cmd": "ban", "source": "198.51.100.7", "seconds": True},
     'ban: "seconds" must be a number, got a boolean'),
    ({"cmd": "ban", "source": "198.51.100.7", "seconds": float("nan")},
     'ban: "seconds" must be more than 0 and at most 31536000 (365 days), got nan'),
    ({"cmd": "ban", "source": "198.51.100.7", "seconds": float("inf")},
     'ban: "seconds" must be more than 0 and at most 31536000 (365 days), got inf'),
    ({"cmd": "ban", "source": "198.51.100.7", "seconds": 1e308},
     'ban: "seconds" must be more than 0 and at most 31536000 (365 days), got 1e+308'),
    ({"cmd": "ban", "source": "198.51.100.7", "seconds": 0},
     'ban: "seconds" must be more than 0 and at most 31536000 (365 days), got 0'),
    ({"cmd": "ban", "source": "198.51.100.7", "seconds": -5},
     'ban: "seconds" must be more than 0 and at most 31536000 (365 days), got -5'),
    ({"cmd": "ban", "source": "198.51.100.7", "reason": ""}, "ban: reason: must not be empty"),
    ({"cmd": "ban", "source": "198.51.100.7", "reason": 5}, "ban: reason: expected text, "
                                                           "got a number"),
    ({"cmd": "ban", "source": "198.51.100.7", "reason": "a\nb"},
     "ban: reason: control characters are not allowed"),
    ({"cmd": "ban", "source": "198.51.100.7", "reason": "x" * 65},
     "ban: reason: at most 64 characters, got 65"),
    ({"cmd": "ban", "source": "198.51.100.7", "force": "yes"},
     "ban: \"force\" must be true or false, got 'yes'"),
    ({"cmd": "unban"}, 'unban: give either "source" or "all": true'),
    ({"cmd": "unban", "source": "198.51.100.7", "all": True},
     'unban: give either "source" or "all": true'),
    ({"cmd": "unban", "all": False}, 'unban: give either "source" or "all": true'),
    ({"cmd": "unban", "all": 1}, 'unban: "all" must be true or false, got 1'),
    ({"cmd": "unban", "source": ""}, "unban: not an address or prefix (host bits must be "
                                     "zero): ''"),
]


@pytest.mark.parametrize("body, error", BAD, ids=[e for _, e in BAD])
def test_bad_requests_are_one_line_errors(body: Any, error: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_request(body)
    assert str(info.value) == error
    assert "\n" not in str(info.value)


def test_reason_is_checked_as_the_command_line_checks_it() -> None:
    assert check_reason("  spam  ", "--reason") == "spam"
    with pytest.raises(BadRequest, match="^--reason: must not be empty$"):
        check_reason(" ", "--reason")


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)
FIELDS = st.sampled_from(["cmd", "n", "source", "seconds", "reason", "force", "all"])
COMMANDS = st.sampled_from(["status", "top", "bans", "ban", "unban", "x"])
VALUES = JSON | st.sampled_from(["198.51.100.7", "2001:db8::/32", "0.0.0.0/0", "90", "nan"])


@settings(max_examples=500, deadline=None)
@given(st.one_of(JSON, st.fixed_dictionaries({"cmd": COMMANDS},
                                             optional={}).flatmap(
    lambda base: st.dictionaries(FIELDS, VALUES, max_size=4).map(lambda d: {**d, **base}))))
def test_any_json_value_is_a_request_or_a_one_line_error(body: Any) -> None:
    try:
        req = parse_request(json.loads(json.dumps(body)))
    except BadRequest as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert isinstance(req, (Status, Top, ListBans, BanRequest, UnbanRequest))
    if isinstance(req, BanRequest):
        assert 0 < req.seconds <= 365 * 86400 and req.reason.strip() == req.reason


def test_a_huge_integer_is_refused_not_overflowed() -> None:
    with pytest.raises(BadRequest, match=r'^ban: "seconds" must be more than 0 and at most '
                                         r"31536000 \(365 days\), got 9999"):
        parse_request({"cmd": "ban", "source": "198.51.100.7", "seconds": int("9" * 500)})
