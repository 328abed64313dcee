"""etc/prometheus/floodd-alerts.yml: Prometheus's own checks (promtool check rules) and its
unit tests (tests/prometheus/floodd-alerts-test.yml, promtool test rules), which must
cover every alert both firing and staying quiet."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "etc" / "prometheus" / "floodd-alerts.yml"
RULE_TESTS = ROOT / "tests" / "prometheus" / "floodd-alerts-test.yml"

needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="needs promtool (Debian package prometheus)")


def promtool(*args: str) -> None:
    proc = subprocess.run(["promtool", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, (f"promtool {' '.join(args)} failed ({proc.returncode}):\n"
                                  f"{proc.stdout}{proc.stderr}")


@needs_promtool
def test_rules_are_valid() -> None:
    promtool("check", "rules", str(RULES.relative_to(ROOT)))


@needs_promtool
def test_rule_unit_tests_pass() -> None:
    promtool("test", "rules", str(RULE_TESTS.relative_to(ROOT)))


def load(path: Path) -> Any:
    with path.open() as f:
        return yaml.safe_load(f)


def test_every_alert_is_tested_firing_and_quiet() -> None:
    alerts = {rule["alert"] for group in load(RULES)["groups"] for rule in group["rules"]}
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in load(RULE_TESTS)["tests"]:
        for check in case.get("alert_rule_test", ()):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert alerts - firing == set(), "alerts never tested firing"
    assert alerts - quiet == set(), "alerts never tested quiet"
    assert (firing | quiet) - alerts == set(), "tests of alerts the rules do not have"


def test_every_alert_has_severity_for_and_advice() -> None:
    for group in load(RULES)["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
            assert "for" in rule, rule["alert"]
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]
