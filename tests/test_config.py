from __future__ import annotations

import ipaddress
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from floodd.config import (DEFAULT_RULES, build_config, default_config, load_config,
                           parse_duration, summary)
from floodd.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
BAD = yaml.safe_load((ROOT / "tests" / "data" / "bad_configs.yaml").read_text())


def test_reference_file_equals_builtin_defaults() -> None:
    assert load_config(str(ROOT / "etc" / "floodd.yaml")).settings() == \
        default_config().settings()


def test_reference_file_documents_every_key_with_a_comment() -> None:
    lines = (ROOT / "etc" / "floodd.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        # Every mapping key outside the rules list has a comment on the line above.
        if stripped and not stripped.startswith(("#", "-")) and ":" in stripped \
                and line.startswith("  ") and not line.startswith("    "):
            assert lines[i - 1].strip().startswith("#"), f"no comment above: {line!r}"


@pytest.mark.parametrize("case", BAD, ids=[c["error"][:40] for c in BAD])
def test_bad_config_is_rejected_with_key_path(tmp_path: Path, case: dict[str, Any]) -> None:
    path = tmp_path / "floodd.yaml"
    path.write_text(case["yaml"])
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert str(err.value).startswith(f"config error: {path}: {case['error']}")


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(str(tmp_path))


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(str(path)).settings() == default_config().settings()


def test_values_are_typed_and_frozen() -> None:
    cfg = build_config({"whitelist": ["2001:db8::/32", "192.0.2.1"],
                        "rules": [{"name": "x", "match": "any", "window": "1m",
                                   "ban_time": "1h30m"}]})
    assert cfg.whitelist == (ipaddress.ip_network("2001:db8::/32"),
                             ipaddress.ip_network("192.0.2.1/32"))
    rule = cfg.rules[0]
    assert (rule.match, rule.qtype, rule.window, rule.ban_time) == ("ANY", 255, 60.0, 5400.0)
    with pytest.raises(AttributeError):
        rule.threshold = 3  # type: ignore[misc]


def test_default_rules_are_the_documented_ones() -> None:
    names = [r.name for r in default_config().rules]
    assert names == [r["name"] for r in DEFAULT_RULES]


@pytest.mark.parametrize("text,seconds", [(30, 30.0), (2.5, 2.5), ("30", 30.0), ("2.5", 2.5),
                                          ("90s", 90.0), ("10m", 600.0), ("1h30m", 5400.0),
                                          ("2d", 172800.0), ("1d12h", 129600.0),
                                          ("1.5h", 5400.0), (" 1h30m\n", 5400.0),
                                          ("1d2h3m4s", 93784.0)])
def test_parse_duration(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", " ", "abc", "-1", 0, "0s", "1x", True, None, "1h-",
                                  "1 2 3", "1h 30m", "1 h", "30m1h", "1h1h", "1h30", "h",
                                  "1.h", ".5h", "1e3", "inf", "nan", "１h", "1_000",
                                  float("nan"), float("inf"), "9" * 400 + "s", [1], "1hm"])
def test_parse_duration_rejects(text: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize("text", ["1" * 24 + "x", "1" * 60 + "x", "1" * 10_000 + "x",
                                  "1." + "1" * 10_000 + "x", "1h" * 5_000])
def test_parse_duration_is_linear(text: str) -> None:
    """The old pattern backtracked exponentially: 24 digits then 'x' took 3 s, doubling
    with each digit; 60 digits would take years.  Refused at once now."""
    started = time.monotonic()
    with pytest.raises(ValueError):
        parse_duration(text)
    assert time.monotonic() - started < 1.0  # a sanity bound, not a benchmark


def test_summary_mentions_every_rule() -> None:
    text = "\n".join(summary(default_config()))
    for r in default_config().rules:
        assert r.name in text


def _floodd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "floodd", *args], capture_output=True,
                          text=True, timeout=60)


def test_check_config_cli_ok() -> None:
    proc = _floodd("check-config", "-c", str(ROOT / "etc" / "floodd.yaml"))
    assert proc.returncode == 0, proc.stderr
    assert "configuration OK" in proc.stdout


def test_check_config_cli_error_is_one_line_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "floodd.yaml"
    path.write_text(BAD[0]["yaml"])
    proc = _floodd("check-config", "-c", str(path))
    assert proc.returncode == 2
    assert proc.stderr == f"floodd: config error: {path}: {BAD[0]['error']}\n"
    assert proc.stdout == ""
