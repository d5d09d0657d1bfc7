"""The Grafana dashboard (docker/grafana/dashboards/hiddenstate.json) and its provisioning:
stable uid, data source as a variable, every exported metric charted, only real metrics,
the latency quantiles from the histograms, a layout without overlaps."""

from __future__ import annotations

import re

import yaml

from tests.unit.deploy.promql import (
    DASHBOARD,
    dashboard_queries,
    exported_families,
    exported_metric_names,
    load_dashboard,
    metric_names,
    panels,
)
from tests.unit.deploy.tools import REPO

VARIABLES = {"__rate_interval": "1m", "job": "hiddenstate", "instance": ".+"}
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
    assert charted == exported_families()


def test_every_dashboard_query_names_only_exported_metrics() -> None:
    exported = exported_metric_names()
    unknown = {
        key: sorted(metric_names(query) - exported)
        for key, query in dashboard_queries(VARIABLES).items()
        if metric_names(query) - exported
    }
    assert unknown == {}


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
    assert mounts["./grafana/dashboards"] == providers["providers"][0]["options"]["path"]
    assert (REPO / "docker" / "grafana" / "dashboards" / DASHBOARD.name).is_file()
    sources = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yaml").read_text())
    (source,) = sources["datasources"]
    assert (source["type"], source["url"]) == ("prometheus", "http://prometheus:9090")
