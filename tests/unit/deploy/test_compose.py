"""The laptop stack (docker/compose.yaml), read as a file: valid against the Compose
specification, every path it builds or mounts exists, every setting it passes is one
the server reads, ports and health checks agree with the server's, the producer and
the demo model fit each other. Compose itself is not run here (no Docker engine)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import jsonschema
import pytest
import yaml

from pipeline.runtime import OrtStepModel
from tests.unit.deploy.dockerfiles import parse
from tests.unit.deploy.tools import REPO

DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
OURS = ("model", "hiddenstate", "producer")  # services built from docker/Dockerfile


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """docker/compose.yaml, parsed (YAML anchors and merge keys resolved)."""
    return dict(yaml.safe_load(COMPOSE.read_text()))


def _service(compose: dict[str, Any], name: str) -> dict[str, Any]:
    return dict(compose["services"][name])


def _default(text: str) -> str:
    """`text` with compose interpolations `${NAME:-default}` replaced by their defaults."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", text)


def _flag(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def test_the_file_follows_the_compose_specification(compose: dict[str, Any]) -> None:
    schema = json.loads((DOCKER / "schema" / "compose-spec.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(compose)]
    assert errors == []


def test_every_build_names_an_existing_dockerfile_and_stage(compose: dict[str, Any]) -> None:
    builds = {name: s["build"] for name, s in compose["services"].items() if "build" in s}
    assert set(builds) == set(OURS)
    for name, build in builds.items():
        context = (DOCKER / build["context"]).resolve()
        assert context == REPO, name
        stages = [stage.name for stage in parse(context / build["dockerfile"]).stages]
        assert build["target"] in stages, name


def test_every_bind_mount_exists_and_every_named_volume_is_declared(
    compose: dict[str, Any],
) -> None:
    for name, service in compose["services"].items():
        for mount in service.get("volumes", []):
            source = _default(mount).split(":")[0]
            if source.startswith((".", "/")):
                assert (DOCKER / source).exists(), f"{name}: {source}"
            else:
                assert source in compose["volumes"], f"{name}: {source}"


def test_services_pass_only_settings_the_server_reads(
    compose: dict[str, Any], settings_defaults: dict[str, str]
) -> None:
    passed = {
        key
        for service in compose["services"].values()
        for key in service.get("environment", {})
        if key.startswith("HIDDENSTATE_")
    }
    assert passed <= set(settings_defaults)
    assert {"HIDDENSTATE_INPUT_TOPIC", "HIDDENSTATE_MODEL"} <= passed


def test_the_server_publishes_and_probes_its_metrics_port(compose: dict[str, Any]) -> None:
    server = _service(compose, "hiddenstate")
    port = server["environment"]["HIDDENSTATE_METRICS_PORT"]
    assert server["ports"] == [f"{port}:{port}"]
    probe = " ".join(server["healthcheck"]["test"])
    assert f"http://127.0.0.1:{port}/readyz" in probe


def test_prometheus_scrapes_the_server_and_grafana_reads_prometheus(
    compose: dict[str, Any],
) -> None:
    config = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    port = _service(compose, "hiddenstate")["environment"]["HIDDENSTATE_METRICS_PORT"]
    assert job["static_configs"][0]["targets"] == [f"hiddenstate:{port}"]
    prometheus = _service(compose, "prometheus")
    assert "./prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    sources = yaml.safe_load(
        (DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text()
    )
    assert sources["datasources"][0]["url"] == "http://prometheus:9090"
    assert "9090:9090" in prometheus["ports"]


def test_our_services_run_unprivileged_and_the_server_read_only(compose: dict[str, Any]) -> None:
    for name in OURS:
        uid = str(_service(compose, name)["user"]).split(":")[0]
        assert int(uid) >= 1000, name
    server = _service(compose, "hiddenstate")
    assert (server["read_only"], server["cap_drop"]) == (True, ["ALL"])


def test_the_broker_is_kraft_at_the_version_of_the_local_dev_broker(
    compose: dict[str, Any],
) -> None:
    pom = ElementTree.parse(DOCKER.parent / "pipeline" / "devtools" / "kafka" / "pom.xml").getroot()
    namespace = {"m": "http://maven.apache.org/POM/4.0.0"}
    version = pom.findtext("m:properties/m:kafka.version", namespaces=namespace)
    kafka = _service(compose, "kafka")
    assert kafka["image"] == f"apache/kafka:{version}"
    assert _service(compose, "topics")["image"] == kafka["image"]
    assert kafka["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"


def test_producer_topic_and_server_agree_on_topic_and_broker(compose: dict[str, Any]) -> None:
    server = _service(compose, "hiddenstate")["environment"]
    producer = _service(compose, "producer")
    topics = _service(compose, "topics")["command"]
    assert _flag(producer["command"], "--topic") == server["HIDDENSTATE_INPUT_TOPIC"]
    assert _flag(topics, "--topic") == server["HIDDENSTATE_INPUT_TOPIC"]
    broker = _service(compose, "kafka")["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    assert broker == f"PLAINTEXT://{server['HIDDENSTATE_BOOTSTRAP_SERVERS']}"
    assert producer["environment"]["HIDDENSTATE_BOOTSTRAP_SERVERS"] == broker.split("//")[1]


def test_the_demo_model_takes_the_features_the_producer_sends(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    """Runs the Dockerfile's demo-model command here, then loads what it wrote."""
    stage = parse(REPO / "docker" / "Dockerfile").stage("demo-model")
    (command,) = stage.all("RUN")
    script = shlex.split(command.split("&&")[-1])[-1]
    written = _service(compose, "model")["command"][1]  # cp <this> /models/
    served = _service(compose, "hiddenstate")["environment"]["HIDDENSTATE_MODEL"]
    assert Path(written).name == Path(_default(served)).name
    script = script.replace(written, str(tmp_path / "demo.onnx"))
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO)
    model = OrtStepModel(tmp_path / "demo.onnx")
    features = int(_flag(_service(compose, "producer")["command"], "--features"))
    assert len(model.spec.input.features) == features
