"""The PromQL that the dashboard and the alert rules run, as queries a test can send.

- `dashboard_queries()`: every panel target and query variable of the Grafana
  dashboard, with Grafana's variables replaced (`$__rate_interval`, `$job`, ...);
- `alert_rules()` / `alert_probe(expr)`: each alert expression, with its comparisons
  made `bool`, so that it returns one sample (0 or 1) per series instead of filtering:
  an empty answer then means a selector or a join matched nothing, never that the
  alert is quiet;
- `metric_names(expr)` and `exported_metric_names()`: what a query names, and what the
  server exports (`pipeline.metrics`, with prometheus-client's process and platform
  collectors); `KUBERNETES_METRICS`: what the Kubernetes-only alerts read from the rest of
  kube-prometheus-stack.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CollectorRegistry

from pipeline.metrics import Metrics
from pipeline.testing import random_weights

REPO = Path(__file__).resolve().parents[3]
DASHBOARD = REPO / "deploy" / "components" / "grafana-dashboard" / "hiddenstate.json"
RULES = REPO / "docker" / "prometheus" / "rules.yml"
RULE_TESTS = REPO / "docker" / "prometheus" / "rules.test.yml"

# Series that Prometheus itself records for every target.
PROMETHEUS_METRICS = {"up"}
# Series of kube-prometheus-stack's other exporters that the Kubernetes-only alerts read.
KUBERNETES_METRICS = {
    "kube_pod_container_status_restarts_total": "kube-state-metrics",
    "kube_pod_container_resource_limits": "kube-state-metrics",
    "container_memory_working_set_bytes": "the kubelet's cAdvisor",
}
_STRING = re.compile(r"\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'")
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_WORD = re.compile(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*")
_OPERATORS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring"}
_LABEL_VALUES = re.compile(r"^label_values\((?P<metric>.+),\s*(?P<label>\w+)\)$")
_COMPARISON = re.compile(r"==|!=|>=|<=|>|<")


def load_dashboard() -> dict[str, Any]:
    """The dashboard JSON."""
    return dict(json.loads(DASHBOARD.read_text()))


def panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside rows; rows themselves are left out."""
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def substitute(expr: str, variables: Mapping[str, str]) -> str:
    """`expr` with Grafana variables (`$name`, `${name}`) replaced; longest names first."""
    for name in sorted(variables, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", variables[name]).replace("$" + name, variables[name])
    if "$" in expr:
        raise ValueError(f"unreplaced Grafana variable in {expr!r}")
    return expr


def dashboard_queries(variables: Mapping[str, str]) -> dict[str, str]:
    """PromQL of every panel target and query variable: 'panel / legend' -> query.

    A `label_values(metric, label)` variable becomes `group by (label) (metric)`: it has
    values exactly when that query returns data.
    """
    dashboard = load_dashboard()
    queries: dict[str, str] = {}
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        found = _LABEL_VALUES.match(variable["query"]["query"])
        if found is None:
            raise ValueError(f"variable {variable['name']}: not label_values(...)")
        promql = f"group by ({found['label']}) ({found['metric']})"
        queries[f"variable ${variable['name']}"] = substitute(promql, variables)
    for panel in panels(dashboard):
        for target in panel["targets"]:
            key = f"{panel['title']} / {target.get('legendFormat') or target['refId']}"
            queries[key] = substitute(target["expr"], variables)
    return queries


def alert_rules() -> list[dict[str, Any]]:
    """The alerting rules of docker/prometheus/rules.yml, across groups."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def alert_probe(expr: str) -> str:
    """`expr` with every comparison outside label matchers and strings made `bool`."""
    out: list[str] = []
    i, braces, quote = 0, 0, ""
    while i < len(expr):
        char = expr[i]
        if quote:
            out.append(char)
            if char == "\\":
                out.append(expr[i + 1])
                i += 1
            elif char == quote:
                quote = ""
            i += 1
            continue
        if char in "\"'`":
            quote = char
        elif char == "{":
            braces += 1
        elif char == "}":
            braces -= 1
        elif braces == 0:
            found = _COMPARISON.match(expr, i)
            if found is not None:
                rest = expr[found.end() :].lstrip()
                out.append(found.group() if rest.startswith("bool") else found.group() + " bool")
                i = found.end()
                continue
        out.append(char)
        i += 1
    return "".join(out)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL query selects: every word that is not a function or
    aggregation (followed by a parenthesis), an operator, a label name or a string."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges and subqueries
    text = _LABEL_LIST.sub("", text)
    return {
        word.group()
        for word in _WORD.finditer(text)
        if word.group() not in _OPERATORS and not text[word.end() :].lstrip().startswith("(")
    }


def exported_metric_names() -> set[str]:
    """Every sample name the server can expose: counters' `_total`, histograms'
    `_bucket`/`_sum`/`_count`, the info metric's `_info`, gauges as they are."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.set_lag(0, 0)  # a labelled gauge has no sample until a label value is set
    # The online counters have a sample per model identity once a model is registered.
    metrics.online.register("classifier@1#0", "classification")
    metrics.online.register("regressor@1#0", "regression")
    # Likewise the shadow's series, which exist once a shadow is set.
    metrics.rollout.set_shadow(
        random_weights().spec, device="cpu", provider="", compared=["y"], argmax=["y"]
    )
    names = set()
    for family in registry.collect():
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
    return names


def exported_families() -> set[str]:
    """The server's own metric families as Prometheus users know them
    (`hiddenstate_events_total`, `hiddenstate_model_info`, `hiddenstate_inference_seconds`,
    ...): the process and platform collectors' families are left out."""
    registry = CollectorRegistry()
    Metrics(registry)
    families = set()
    for family in registry.collect():
        suffix = {"counter": "_total", "info": "_info"}.get(family.type, "")
        if family.name.startswith("hiddenstate_"):
            families.add(family.name + suffix)
    return families
