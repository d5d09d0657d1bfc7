"""The Prometheus alert rules (docker/prometheus/rules.yml): promtool checks and runs
their unit tests (rules.test.yml); every alert is tested, names real metrics and links
to a section of the operations guide."""

from __future__ import annotations

import re
import subprocess

import yaml

from tests.unit.deploy.promql import (
    RULE_TESTS,
    RULES,
    alert_rules,
    exported_metric_names,
    metric_names,
)
from tests.unit.deploy.tools import REPO, require


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require("promtool"), *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=RULES.parent,
    )


def test_promtool_accepts_the_rules_file() -> None:
    checked = _promtool("check", "rules", RULES.name)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in checked.stdout


def test_promtool_rule_unit_tests_pass() -> None:
    tested = _promtool("test", "rules", RULE_TESTS.name)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_promtool_accepts_the_compose_prometheus_config_and_its_rules() -> None:
    checked = _promtool("check", "config", "prometheus.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "Checking rules.yml" in checked.stdout


def test_every_alert_has_a_unit_test_where_it_fires() -> None:
    cases = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    firing = {
        check["alertname"]
        for case in cases
        for check in case.get("alert_rule_test", [])
        if check.get("exp_alerts")
    }
    assert firing == {rule["alert"] for rule in alert_rules()}


def test_the_rules_cover_lag_latency_dead_letters_stalls_and_restores() -> None:
    assert {rule["alert"] for rule in alert_rules()} >= {
        "HiddenstateConsumerLagGrowing",
        "HiddenstateEndToEndLatencyHigh",
        "HiddenstateDeadLetterRatioHigh",
        "HiddenstateNoProgress",
        "HiddenstateRestoreSlow",
    }


def test_every_metric_an_alert_uses_is_exported_by_the_server() -> None:
    exported = exported_metric_names()
    unknown = {
        rule["alert"]: sorted(metric_names(rule["expr"]) - exported)
        for rule in alert_rules()
        if metric_names(rule["expr"]) - exported
    }
    assert unknown == {}


def test_every_alert_has_a_severity_a_summary_and_a_runbook_section() -> None:
    guide = (REPO / "docs" / "operations.md").read_text()
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", heading.lower()).replace(" ", "-")
        for heading in re.findall(r"^#+ (.+)$", guide, flags=re.MULTILINE)
    }
    for rule in alert_rules():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        page, _, anchor = rule["annotations"]["runbook"].partition("#")
        assert page == "docs/operations.md", rule["alert"]
        assert anchor in anchors, f"{rule['alert']}: no section #{anchor} in {page}"
