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

The online-quality panels need a classifier and a regressor judged by labels: the
classifier above (and its shadow) serves as pod hiddenstate-0, a regressor on the same
events (its own group and output topic) as pod hiddenstate-1, each with a labels topic
that a labeller thread fills with the truth for every prediction it reads (plus a bad
label).
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml
from kafka import KafkaConsumer, KafkaProducer

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
CLASSES = 4
POD = 'pod="hiddenstate-0"'  # the classifier and its shadow; hiddenstate-1 is the regressor


class Labeller(threading.Thread):
    """Reads the classifier's predictions and publishes a label for each to both labels
    topics: a random class for the classifier (and its shadow), random target values for
    the regressor (both servers step the same events, so their steps agree)."""

    def __init__(self, bootstrap: str, predictions: str, labels: dict[str, str]) -> None:
        super().__init__(daemon=True, name="labeller")
        self.servers = bootstrap
        self.predictions = predictions
        self.labels = labels
        self.stopping = threading.Event()

    def run(self) -> None:
        rng = random.Random(0)
        consumer = KafkaConsumer(
            self.predictions, bootstrap_servers=self.servers, auto_offset_reset="earliest"
        )
        producer = KafkaProducer(bootstrap_servers=self.servers, linger_ms=5)
        producer.send(self.labels["classification"], key=b"x", value=b"{not json")
        try:
            while not self.stopping.is_set():
                for records in consumer.poll(timeout_ms=200).values():
                    for record in records:
                        step = json.loads(record.value)["step"]
                        truth = {
                            "classification": rng.randrange(CLASSES),
                            "regression": [rng.random(), rng.random()],
                        }
                        for task, topic in self.labels.items():
                            value = json.dumps({"step": step, "y": truth[task]}).encode()
                            producer.send(topic, key=record.key, value=value)
        finally:
            producer.close(timeout=5)
            consumer.close()


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
            "gru",
            n_features=3,
            hidden=16,
            layers=2,
            n_outputs=CLASSES,
            name=MODEL_NAME,
            task="classification",
        ),
        tmp / "m.onnx",
    )
    shadow = write_onnx_step(
        random_weights(
            "lstm",
            n_features=3,
            hidden=12,
            n_outputs=CLASSES,
            name=MODEL_NAME,
            version="2",
            task="classification",
        ),
        tmp / "shadow.onnx",
    )
    regressor = write_onnx_step(
        random_weights("gru", n_features=3, hidden=8, name="prom-reg"), tmp / "r.onnx"
    )
    topic = kafka.create_topic("prom-events", partitions=2)
    labels = {
        "regression": kafka.create_topic("prom-labels-reg", partitions=2),
        "classification": kafka.create_topic("prom-labels-cls", partitions=2),
    }
    metrics_port, regressor_port, prometheus_port = _free_port(), _free_port(), _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    processes: list[subprocess.Popen[bytes]] = []
    server_log = tmp / "serve.log"
    labeller = Labeller(kafka_bootstrap, f"{topic}.predictions", labels)
    try:
        for name, path, port, output, task, shadowed in (
            ("serve", model, metrics_port, f"{topic}.predictions", "classification", True),
            ("regress", regressor, regressor_port, f"{topic}.values", "regression", False),
        ):
            with (tmp / f"{name}.log").open("wb") as log:
                processes.append(
                    subprocess.Popen(
                        _cli(
                            "serve",
                            "--transport", serve_transport,
                            "--model", str(path),
                            *(("--shadow-model", str(shadow)) if shadowed else ()),
                            "--input-topic", topic,
                            "--output-topic", output,
                            "--group-id", f"prom-{name}",
                            "--labels-topic", labels[task],
                            "--bootstrap-servers", kafka_bootstrap,
                            "--metrics-host", "127.0.0.1",
                            "--metrics-port", str(port),
                            "--checkpoint-interval-seconds", "1",
                        ),
                        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                    )
                )  # fmt: skip
        metrics_url = f"http://127.0.0.1:{metrics_port}"
        for port in (metrics_port, regressor_port):
            _wait(
                "serve is not ready",
                lambda port=port: _get(f"http://127.0.0.1:{port}/readyz")[0] == 200,
                45,
                server_log,
            )
        labeller.start()

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
                        {"targets": [f"127.0.0.1:{metrics_port}"], "labels": TARGET_LABELS},
                        {
                            "targets": [f"127.0.0.1:{regressor_port}"],
                            "labels": {**TARGET_LABELS, "pod": "hiddenstate-1"},
                        },
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
            "prometheus has no 12 s of scrapes under load with every dead letter and labels",
            lambda: (
                stack.value(f'min(count_over_time(up{{job="{JOB}"}}[1m]))') >= 12
                and stack.value("sum(rate(hiddenstate_predictions_total[10s]))") > 0
                and stack.value(f"sum(hiddenstate_dead_letters_total{{{POD}}})") == bad_total
                and stack.value('min(rate(hiddenstate_online_labels_total{result="judged"}[10s]))')
                > 0
            ),
            60,
            server_log,
        )
        yield stack
    finally:
        labeller.stopping.set()
        for process in reversed(processes):
            _stop(process)
        if labeller.is_alive():
            labeller.join(timeout=10)


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
    assert stack.value(f'up{{job="{JOB}", {POD}}}') == 1


def test_the_target_carries_the_namespace_and_pod_the_rules_and_dashboard_name(
    stack: Stack,
) -> None:
    (up,) = stack.query(f'up{{job="{JOB}", {POD}}}')
    assert {k: up["metric"][k] for k in TARGET_LABELS} == TARGET_LABELS


def test_prometheus_evaluates_every_alert_rule_without_error(stack: Stack) -> None:
    with urllib.request.urlopen(f"{stack.prometheus_url}/api/v1/rules", timeout=10) as response:
        groups = json.load(response)["data"]["groups"]
    health = {rule["name"]: rule["health"] for group in groups for rule in group["rules"]}
    assert health == {rule["alert"]: "ok" for rule in alert_rules()}


def test_dead_letters_reach_prometheus_by_reason(stack: Stack) -> None:
    result = stack.query(f"sum by (reason) (hiddenstate_dead_letters_total{{{POD}}}) > 0")
    assert {r["metric"]["reason"]: float(r["value"][1]) for r in result} == BAD_EVENTS


def test_model_info_names_the_served_model_and_device(stack: Stack) -> None:
    (info,) = stack.query(f'hiddenstate_model_info{{job="{JOB}", {POD}}}')
    labels = info["metric"]
    assert (labels["name"], labels["device"], labels["cell"]) == (MODEL_NAME, "cpu", "gru")


def test_both_partitions_report_their_lag(stack: Stack) -> None:
    partitions = stack.query(f"hiddenstate_consumer_lag{{{POD}}}")
    assert sorted(r["metric"]["partition"] for r in partitions) == ["0", "1"]
    assert stack.value(f"hiddenstate_assigned_partitions{{{POD}}}") == 2


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


def test_labels_judge_every_model_the_shadow_too_and_a_bad_one_is_counted(stack: Stack) -> None:
    judged = stack.query('sum by (identity) (hiddenstate_online_labels_total{result="judged"}) > 0')
    versions = sorted(r["metric"]["identity"].split("#")[0] for r in judged)
    malformed = f'sum(hiddenstate_online_malformed_labels_total{{reason="not_json", {POD}}})'
    assert versions == [f"{MODEL_NAME}@1", f"{MODEL_NAME}@2", "prom-reg@1"]
    assert stack.value(malformed) == 1


def test_the_online_accuracy_of_random_labels_is_about_one_in_the_number_of_classes(
    stack: Stack,
) -> None:
    """Random classifiers (the served one and its shadow) judged by random classes: each
    right about a quarter of the time, on the same labels."""
    correct = stack.query(f"sum by (identity) (hiddenstate_online_correct_total{{{POD}}})")
    judged = {
        r["metric"]["identity"]: float(r["value"][1])
        for r in stack.query(
            f'sum by (identity) (hiddenstate_online_labels_total{{{POD}, result="judged"}})'
        )
    }
    accuracy = {
        r["metric"]["identity"].split("#")[0]: float(r["value"][1])
        / judged[r["metric"]["identity"]]
        for r in correct
    }
    assert sorted(accuracy) == [f"{MODEL_NAME}@1", f"{MODEL_NAME}@2"]
    assert min(judged.values()) >= 100
    bound = 5 * math.sqrt(min(judged.values())) / min(judged.values())
    assert {v: abs(a - 1 / CLASSES) < bound for v, a in accuracy.items()} == dict.fromkeys(
        accuracy, True
    )


def test_the_shadow_is_scraped_with_every_stream_warm_and_its_difference_measured(
    stack: Stack,
) -> None:
    # Only the classifier's pod has a shadow (the regressor's exposes an empty info).
    (info,) = stack.query(f'hiddenstate_shadow_model_info{{job="{JOB}", {POD}}}')
    assert (info["metric"]["name"], info["metric"]["version"]) == (MODEL_NAME, "2")
    assert stack.value('sum(hiddenstate_shadow_streams{warmth="warm"})') == STREAMS
    assert stack.value('sum(hiddenstate_shadow_streams{warmth="cold"})') == 0
    shadowed = stack.value(f"sum(rate(hiddenstate_shadow_predictions_total{{{POD}}}[10s]))")
    served = stack.value(f"sum(rate(hiddenstate_predictions_total{{{POD}}}[10s]))")
    assert shadowed == pytest.approx(served, rel=0.2)
    compared = stack.value("sum(hiddenstate_shadow_abs_difference_count)")
    agreed = stack.value("sum(hiddenstate_shadow_argmax_agreements_total)")
    assert compared > 0
    assert 0 <= agreed <= compared
    assert stack.value("sum(hiddenstate_restored_cold_streams_total)") == 0
