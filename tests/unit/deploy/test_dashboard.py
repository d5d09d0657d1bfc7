"""The Grafana dashboard (deploy/components/grafana-dashboard/hiddenstate.json, the one copy
compose and Kubernetes share) and its provisioning: stable uid, data source, namespace and
pod as variables, every query parsed by promtool and naming only metrics the server
exports, every exported family charted, thresholds on every stat, legends by pod, the
latency quantiles from the histograms, a layout without overlaps."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

from tests.unit.deploy.promql import (
    DASHBOARD,
    PROMETHEUS_METRICS,
    dashboard_queries,
    exported_families,
    exported_metric_names,
    load_dashboard,
    metric_names,
    panels,
)
from tests.unit.deploy.tools import REPO, require

VARIABLES = {"__rate_interval": "1m", "job": "hiddenstate", "namespace": ".+", "pod": ".+"}
PROVISIONING = REPO / "docker" / "grafana" / "provisioning"


def test_the_dashboard_has_a_stable_uid_and_title() -> None:
    dashboard = load_dashboard()
    assert (dashboard["uid"], dashboard["title"]) == ("hiddenstate-serve", "hiddenstate serve")


def test_the_data_source_is_a_template_variable_every_query_uses() -> None:
    dashboard = load_dashboard()
    variable = next(v for v in dashboard["templating"]["list"] if v["name"] == "datasource")
    assert (variable["type"], variable["query"]) == ("datasource", "prometheus")
    sources = {(p["datasource"]["type"], p["datasource"]["uid"]) for p in panels(dashboard)}
    sources |= {
        (t["datasource"]["type"], t["datasource"]["uid"])
        for p in panels(dashboard)
        for t in p["targets"]
    }
    assert sources == {("prometheus", "${datasource}")}


def test_every_metric_family_the_server_exports_is_charted() -> None:
    charted = set()
    for query in dashboard_queries(VARIABLES).values():
        charted |= {re.sub(r"_(bucket|sum|count)$", "", name) for name in metric_names(query)}
    ours = {name for name in charted if name.startswith("hiddenstate_")}
    assert ours == exported_families()
    assert charted - ours >= {"process_resident_memory_bytes", "process_cpu_seconds_total", "up"}


def test_every_dashboard_query_names_only_metrics_the_server_exports() -> None:
    exported = exported_metric_names() | PROMETHEUS_METRICS
    unknown = {
        key: sorted(metric_names(query) - exported)
        for key, query in dashboard_queries(VARIABLES).items()
        if metric_names(query) - exported
    }
    assert unknown == {}


def test_every_dashboard_query_parses(tmp_path: Path) -> None:
    """promtool parses each query as the expression of a recording rule."""
    queries = list(dashboard_queries(VARIABLES).values())
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": q} for i, q in enumerate(queries)
                ],
            }
        ]
    }
    (tmp_path / "dashboard.rules.yml").write_text(yaml.safe_dump(rules))
    checked = subprocess.run(
        [require("promtool"), "check", "rules", "dashboard.rules.yml"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(queries)} rules found" in checked.stdout


def test_promtool_refuses_a_query_that_does_not_parse(tmp_path: Path) -> None:
    rules = {
        "groups": [{"name": "x", "rules": [{"record": "x:y", "expr": "sum by (le (rate(x[1m]))"}]}]
    }
    (tmp_path / "bad.rules.yml").write_text(yaml.safe_dump(rules))
    checked = subprocess.run(
        [require("promtool"), "check", "rules", "bad.rules.yml"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert checked.returncode == 1


def test_the_variables_are_data_source_job_namespace_and_pod() -> None:
    variables = load_dashboard()["templating"]["list"]
    assert [v["name"] for v in variables] == ["datasource", "job", "namespace", "pod"]
    multi = {v["name"]: (v.get("multi"), v.get("includeAll")) for v in variables[1:]}
    assert multi == {"job": (False, False), "namespace": (True, True), "pod": (True, True)}


def test_every_panel_query_selects_the_job_namespace_and_pod_variables() -> None:
    for panel in panels(load_dashboard()):
        for target in panel["targets"]:
            assert 'job="$job", namespace=~"$namespace", pod=~"$pod"' in target["expr"], panel[
                "title"
            ]


def test_per_replica_series_are_told_apart_by_pod_never_by_instance() -> None:
    for panel in panels(load_dashboard()):
        for target in panel["targets"]:
            assert "instance" not in target["expr"] + target.get("legendFormat", ""), panel["title"]
            if "by (pod" in target["expr"] and panel["type"] == "timeseries":
                assert "{{pod}}" in target["legendFormat"], panel["title"]


def test_every_stat_panel_colours_its_value_by_explicit_thresholds() -> None:
    for panel in panels(load_dashboard()):
        if panel["type"] != "stat":
            continue
        defaults = panel["fieldConfig"]["defaults"]
        steps = defaults["thresholds"]["steps"]
        assert defaults["color"] == {"mode": "thresholds"}, panel["title"]
        assert steps[0]["value"] is None, panel["title"]
        assert [s["value"] for s in steps[1:]] == sorted(s["value"] for s in steps[1:]), panel[
            "title"
        ]


def test_healthy_values_show_green() -> None:
    """What each stat shows when all is well, and the colour it gets for it."""
    healthy = {
        "Events/s": 500.0,
        "Predictions/s": 500.0,
        "Dead-letter ratio": 0.0,
        "Consumer lag": 0.0,
        "Replicas scraped": 3.0,
        "Assigned partitions": 12.0,
        "Device fallback": 0.0,
    }
    colours = {}
    for panel in panels(load_dashboard()):
        if panel["title"] in healthy:
            steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
            value = healthy[panel["title"]]
            colours[panel["title"]] = [
                s["color"] for s in steps if s["value"] is None or s["value"] <= value
            ][-1]
    assert colours == {title: "green" for title in healthy}


def test_latency_panels_show_p50_p95_and_p99_from_the_histograms() -> None:
    queries = dashboard_queries(VARIABLES)
    for histogram in ("hiddenstate_inference_seconds", "hiddenstate_end_to_end_seconds"):
        quantiles = {
            float(found)
            for query in queries.values()
            for found in re.findall(
                r"histogram_quantile\(([0-9.]+), sum by \(le\) \(rate\(" + histogram + "_bucket",
                query,
            )
        }
        assert quantiles == {0.5, 0.95, 0.99}, histogram


def test_breakdowns_are_by_reason_cause_and_partition() -> None:
    queries = list(dashboard_queries(VARIABLES).values())
    for by, metric in (
        ("reason", "hiddenstate_dead_letters_total"),
        ("cause", "hiddenstate_evictions_total"),
        ("partition", "hiddenstate_consumer_lag"),
    ):
        assert any(f"sum by ({by})" in q and metric in q for q in queries), metric


def test_panels_have_unique_ids_and_do_not_overlap() -> None:
    everything = load_dashboard()["panels"]
    ids = [p["id"] for p in everything]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for panel in everything:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_grafana_provisions_the_dashboard_folder_and_the_prometheus_data_source() -> None:
    providers = yaml.safe_load((PROVISIONING / "dashboards" / "hiddenstate.yaml").read_text())
    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    mounts = dict(m.split(":")[:2] for m in compose["services"]["grafana"]["volumes"])
    folder = "../deploy/components/grafana-dashboard"
    assert mounts[folder] == providers["providers"][0]["options"]["path"]
    assert (REPO / "docker" / folder / DASHBOARD.name).resolve() == DASHBOARD
    sources = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yaml").read_text())
    (source,) = sources["datasources"]
    assert (source["type"], source["url"]) == ("prometheus", "http://prometheus:9090")
