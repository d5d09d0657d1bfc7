"""A real Prometheus scrapes a real `hiddenstate serve` under load, and every dashboard
query and alert expression is answered with data.

The stack, once for the module: the local Kafka broker (session fixture), `hiddenstate
serve` as a subprocess on a real ONNX model (`pipeline.testing.write_onnx_step`, a
classifier) with a second version of it in shadow (`--shadow-model`),
`hiddenstate produce --source synthetic` sending about 300 events/s plus a few bad events
for the dead-letter series, and Debian's `prometheus` binary on loopback (free port,
temporary data folder, 1 s scrapes and rule evaluations, the alert rules of
docker/prometheus/rules.yml loaded, the target labelled with the namespace and pod a
PodMonitor would give it). A missing `prometheus` or `promtool` fails the tests.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from pipeline.testing import random_weights, write_onnx_step
from tests.unit.deploy.promql import (
    KUBERNETES_METRICS,
    RULES,
    alert_probe,
    alert_rules,
    dashboard_queries,
    metric_names,
)
from tests.unit.deploy.tools import REPO, require

if TYPE_CHECKING:
    from tests.integration.conftest import KafkaKit

JOB = "hiddenstate"
# What the PodMonitor adds on Kubernetes (and docker/prometheus/prometheus.yml in compose).
TARGET_LABELS = {"namespace": "prom-test", "pod": "hiddenstate-0"}
GRAFANA_VARIABLES = {"__rate_interval": "30s", "job": JOB, "namespace": ".+", "pod": ".+"}
BAD_EVENTS = {"not_json": 4, "feature_count": 3, "missing_key": 2}
MODEL_NAME = "prom-gru"
STREAMS = 50  # of `hiddenstate produce --source synthetic`


@dataclass
class Stack:
    """Addresses of the running server and Prometheus."""

    metrics_url: str
    prometheus_url: str

    def query(self, promql: str) -> list[dict[str, Any]]:
        """The result vector of an instant query (fails on a query error)."""
        url = f"{self.prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", f"{promql}: {body}"
        return list(body["data"]["result"])

    def value(self, promql: str) -> float:
        """The single value of a query that returns one sample (nan when none)."""
        result = self.query(promql)
        return float(result[0]["value"][1]) if len(result) == 1 else math.nan


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""
    except OSError:
        return 0, b""


def _wait(what: str, ready: Any, timeout: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            pytest.fail(f"{what} after {timeout:.0f} s\n{tail}")
        time.sleep(0.25)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *args]


@pytest.fixture(scope="module")
def stack(
    kafka: KafkaKit,
    kafka_bootstrap: str,
    serve_transport: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    """Server, load and Prometheus, running until the module's tests are done."""
    prometheus = require("prometheus")
    require("promtool")
    tmp = tmp_path_factory.mktemp("prometheus-stack")
    model = write_onnx_step(
        random_weights(
            "gru", n_features=3, hidden=16, layers=2, name=MODEL_NAME, task="classification"
        ),
        tmp / "m.onnx",
    )
    shadow = write_onnx_step(
        random_weights(
            "lstm", n_features=3, hidden=12, name=MODEL_NAME, version="2", task="classification"
        ),
        tmp / "shadow.onnx",
    )
    topic = kafka.create_topic("prom-events", partitions=2)
    metrics_port, prometheus_port = _free_port(), _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    processes: list[subprocess.Popen[bytes]] = []
    server_log = tmp / "serve.log"
    try:
        with server_log.open("wb") as log:
            processes.append(
                subprocess.Popen(
                    _cli(
                        "serve",
                        "--transport", serve_transport,
                        "--model", str(model),
                        "--shadow-model", str(shadow),
                        "--input-topic", topic,
                        "--output-topic", f"{topic}.predictions",
                        "--bootstrap-servers", kafka_bootstrap,
                        "--metrics-host", "127.0.0.1",
                        "--metrics-port", str(metrics_port),
                        "--checkpoint-interval-seconds", "1",
                    ),
                    cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                )
            )  # fmt: skip
        metrics_url = f"http://127.0.0.1:{metrics_port}"
        _wait("serve is not ready", lambda: _get(f"{metrics_url}/readyz")[0] == 200, 45, server_log)

        bad = [(b"bad", b"{not json")] * BAD_EVENTS["not_json"]
        bad += [(b"bad", json.dumps({"x": [1.0]}).encode())] * BAD_EVENTS["feature_count"]
        bad += [(None, json.dumps({"x": [1.0, 2.0, 3.0]}).encode())] * BAD_EVENTS["missing_key"]
        kafka.produce(topic, bad)
        processes.append(
            subprocess.Popen(
                _cli(
                    "produce", "--topic", topic, "--source", "synthetic", "--features", "3",
                    "--streams", str(STREAMS), "--rate", "300", "--count", "18000",
                    "--bootstrap-servers", kafka_bootstrap,
                ),
                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        )  # fmt: skip

        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [
                {
                    "job_name": JOB,
                    "static_configs": [
                        {"targets": [f"127.0.0.1:{metrics_port}"], "labels": TARGET_LABELS}
                    ],
                }
            ],
        }
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        prometheus_log = tmp / "prometheus.log"
        with prometheus_log.open("wb") as log:
            processes.append(
                subprocess.Popen(
                    [
                        prometheus,
                        f"--config.file={tmp / 'prometheus.yml'}",
                        f"--storage.tsdb.path={tmp / 'data'}",
                        f"--web.listen-address=127.0.0.1:{prometheus_port}",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        stack = Stack(metrics_url, f"http://127.0.0.1:{prometheus_port}")
        _wait(
            "prometheus is not ready",
            lambda: _get(f"{stack.prometheus_url}/-/ready")[0] == 200,
            30,
            prometheus_log,
        )
        bad_total = sum(BAD_EVENTS.values())
        _wait(
            "prometheus has no 12 s of scrapes under load with every dead letter",
            lambda: (
                stack.value(f'count_over_time(up{{job="{JOB}"}}[1m])') >= 12
                and stack.value("sum(rate(hiddenstate_predictions_total[10s]))") > 0
                and stack.value("sum(hiddenstate_dead_letters_total)") == bad_total
            ),
            45,
            server_log,
        )
        yield stack
    finally:
        for process in reversed(processes):
            _stop(process)


def test_every_dashboard_query_returns_data(stack: Stack) -> None:
    empty = [
        f"{name}: {query}"
        for name, query in dashboard_queries(GRAFANA_VARIABLES).items()
        if not stack.query(query)
    ]
    assert empty == []


def test_latency_and_wave_size_quantiles_are_finite_under_load(stack: Stack) -> None:
    quantiles = {
        name: float(stack.query(query)[0]["value"][1])
        for name, query in dashboard_queries(GRAFANA_VARIABLES).items()
        if query.startswith("histogram_quantile") and "checkpoint" not in query
    }
    # inference, end to end: 3 each; waves, queue: 2 each; the shadow's difference 2, its step
    # latency 2 and the served model's p99 beside it
    assert len(quantiles) == 15
    assert {name: v for name, v in quantiles.items() if not 0 < v < math.inf} == {}


def _on_kubernetes_metrics(rule: dict[str, Any]) -> bool:
    """Alerts that read kube-state-metrics or cAdvisor, which this stack does not run
    (their firing and silent cases are promtool's: tests/unit/deploy)."""
    return bool(metric_names(rule["expr"]) & set(KUBERNETES_METRICS))


def test_every_alert_expression_on_the_servers_metrics_returns_data(stack: Stack) -> None:
    probed = [
        r
        for r in alert_rules()
        if not _on_kubernetes_metrics(r) and not r["expr"].startswith("absent(")
    ]
    empty = [
        f"{r['alert']}: {alert_probe(r['expr'])}"
        for r in probed
        if not stack.query(alert_probe(r["expr"]))
    ]
    assert len(probed) == len(alert_rules()) - 3  # absence (below), restarts, memory
    assert empty == []


def test_the_absence_alert_is_silent_while_the_server_is_scraped(stack: Stack) -> None:
    (absence,) = [r for r in alert_rules() if r["expr"].startswith("absent(")]
    assert stack.query(absence["expr"]) == []
    assert stack.value(f'up{{job="{JOB}"}}') == 1


def test_the_target_carries_the_namespace_and_pod_the_rules_and_dashboard_name(
    stack: Stack,
) -> None:
    (up,) = stack.query(f'up{{job="{JOB}"}}')
    assert {k: up["metric"][k] for k in TARGET_LABELS} == TARGET_LABELS


def test_prometheus_evaluates_every_alert_rule_without_error(stack: Stack) -> None:
    with urllib.request.urlopen(f"{stack.prometheus_url}/api/v1/rules", timeout=10) as response:
        groups = json.load(response)["data"]["groups"]
    health = {rule["name"]: rule["health"] for group in groups for rule in group["rules"]}
    assert health == {rule["alert"]: "ok" for rule in alert_rules()}


def test_dead_letters_reach_prometheus_by_reason(stack: Stack) -> None:
    result = stack.query("sum by (reason) (hiddenstate_dead_letters_total) > 0")
    assert {r["metric"]["reason"]: float(r["value"][1]) for r in result} == BAD_EVENTS


def test_model_info_names_the_served_model_and_device(stack: Stack) -> None:
    (info,) = stack.query(f'hiddenstate_model_info{{job="{JOB}"}}')
    labels = info["metric"]
    assert (labels["name"], labels["device"], labels["cell"]) == (MODEL_NAME, "cpu", "gru")


def test_both_partitions_report_their_lag(stack: Stack) -> None:
    partitions = stack.query("hiddenstate_consumer_lag")
    assert sorted(r["metric"]["partition"] for r in partitions) == ["0", "1"]
    assert stack.value("hiddenstate_assigned_partitions") == 2


def test_promtool_accepts_the_servers_metrics_exposition(stack: Stack) -> None:
    status, exposition = _get(f"{stack.metrics_url}/metrics")
    assert status == 200
    checked = subprocess.run(
        [require("promtool"), "check", "metrics"],
        input=exposition,
        capture_output=True,
        check=False,
    )
    assert checked.returncode == 0, (checked.stdout + checked.stderr).decode()
    assert b"hiddenstate_events_total" in exposition


def test_the_shadow_is_scraped_with_every_stream_warm_and_its_difference_measured(
    stack: Stack,
) -> None:
    (info,) = stack.query(f'hiddenstate_shadow_model_info{{job="{JOB}"}}')
    assert (info["metric"]["name"], info["metric"]["version"]) == (MODEL_NAME, "2")
    assert stack.value('sum(hiddenstate_shadow_streams{warmth="warm"})') == STREAMS
    assert stack.value('sum(hiddenstate_shadow_streams{warmth="cold"})') == 0
    shadowed = stack.value("sum(rate(hiddenstate_shadow_predictions_total[10s]))")
    served = stack.value("sum(rate(hiddenstate_predictions_total[10s]))")
    assert shadowed == pytest.approx(served, rel=0.2)
    compared = stack.value("sum(hiddenstate_shadow_abs_difference_count)")
    agreed = stack.value("sum(hiddenstate_shadow_argmax_agreements_total)")
    assert compared > 0
    assert 0 <= agreed <= compared
    assert stack.value("sum(hiddenstate_restored_cold_streams_total)") == 0
