"""The Prometheus alert rules (docker/prometheus/rules.yml): promtool checks and runs
their unit tests (rules.test.yml); every alert fires in one case and stays silent in
another, names real metrics, says which pod, and links a section of the operations guide."""

from __future__ import annotations

import re
import subprocess

import yaml

from tests.unit.deploy.promql import (
    KUBERNETES_METRICS,
    PROMETHEUS_METRICS,
    RULE_TESTS,
    RULES,
    alert_rules,
    exported_metric_names,
    metric_names,
)
from tests.unit.deploy.tools import REPO, require

# Where the runbook links point: the operations guide in the repository's home.
RUNBOOK = "https://github.com/hiddenstate/hiddenstate/blob/main/docs/operations.md"


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


def _checks() -> list[dict[str, object]]:
    cases = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    return [check for case in cases for check in case.get("alert_rule_test", [])]


def test_every_alert_has_a_unit_test_where_it_fires() -> None:
    firing = {check["alertname"] for check in _checks() if check.get("exp_alerts")}
    assert firing == {rule["alert"] for rule in alert_rules()}


def test_every_alert_has_a_unit_test_where_it_stays_silent() -> None:
    silent = {check["alertname"] for check in _checks() if check.get("exp_alerts") == []}
    assert silent == {rule["alert"] for rule in alert_rules()}


def test_the_rules_cover_absence_restarts_memory_evictions_lag_latency_and_stalls() -> None:
    assert {rule["alert"] for rule in alert_rules()} >= {
        "HiddenstateNotScraped",
        "HiddenstateDown",
        "HiddenstateRestarting",
        "HiddenstateMemoryNearLimit",
        "HiddenstateStreamsEvicted",
        "HiddenstateConsumerLagGrowing",
        "HiddenstateEndToEndLatencyHigh",
        "HiddenstateDeadLetterRatioHigh",
        "HiddenstateNoProgress",
        "HiddenstateRestoreSlow",
    }


def test_an_alert_fires_when_no_target_is_scraped_and_when_one_is_down() -> None:
    exprs = {rule["alert"]: rule["expr"] for rule in alert_rules()}
    assert exprs["HiddenstateNotScraped"] == 'absent(up{job="hiddenstate"})'
    assert exprs["HiddenstateDown"] == 'up{job="hiddenstate"} == 0'


def test_every_metric_an_alert_uses_is_the_servers_prometheus_or_kubernetes() -> None:
    known = exported_metric_names() | PROMETHEUS_METRICS | set(KUBERNETES_METRICS)
    unknown = {
        rule["alert"]: sorted(metric_names(rule["expr"]) - known)
        for rule in alert_rules()
        if metric_names(rule["expr"]) - known
    }
    assert unknown == {}


def test_every_alert_has_a_severity_a_summary_and_a_runbook_url_to_a_section() -> None:
    guide = (REPO / "docs" / "operations.md").read_text()
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", heading.lower()).replace(" ", "-")
        for heading in re.findall(r"^#+ (.+)$", guide, flags=re.MULTILINE)
    }
    for rule in alert_rules():
        annotations = rule["annotations"]
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert annotations["summary"], rule["alert"]
        assert "runbook" not in annotations, rule["alert"]
        page, _, anchor = annotations["runbook_url"].partition("#")
        assert page == RUNBOOK, rule["alert"]
        assert anchor in anchors, f"{rule['alert']}: no section #{anchor} in docs/operations.md"


def test_summaries_name_the_pod_an_alert_is_about_never_its_address() -> None:
    """An alert about one pod (its firing case's labels have one) says which in its summary."""
    summaries = {rule["alert"]: rule["annotations"]["summary"] for rule in alert_rules()}
    per_pod = {
        check["alertname"]
        for check in _checks()
        for alert in check.get("exp_alerts") or []
        if "pod" in alert["exp_labels"]
    }
    assert {name for name, text in summaries.items() if "$labels.instance" in text} == set()
    assert {name for name in per_pod if "{{ $labels.pod }}" not in summaries[name]} == set()
    assert len(per_pod) >= 7


def test_only_the_restart_and_memory_alerts_need_kubernetes_metrics() -> None:
    on_kubernetes = {
        rule["alert"]
        for rule in alert_rules()
        if metric_names(rule["expr"]) & set(KUBERNETES_METRICS)
    }
    assert on_kubernetes == {"HiddenstateRestarting", "HiddenstateMemoryNearLimit"}
