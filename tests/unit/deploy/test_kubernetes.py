"""The Kubernetes manifests (deploy/), rendered by the real kustomize: built-in kinds
valid against the Kubernetes schemas, custom resources against their vendored CRDs,
and the settings, probes, security, scaling and rules cross-checked against the
server and the other deployment files. No cluster is involved."""

from __future__ import annotations

import copy
import re
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from pipeline.config import from_sources
from pipeline.transport import DELIVERY_TIMEOUT_S
from tests.unit.deploy.conftest import OVERLAYS
from tests.unit.deploy.dockerfiles import env_names, parse
from tests.unit.deploy.promql import RULES
from tests.unit.deploy.tools import REPO

KUBERNETES_VERSIONS = ("1.30", "1.37")  # oldest and newest that the manifests must pass
CRDS = REPO / "deploy" / "crds"
BUILT_IN = {"ServiceAccount", "Service", "ConfigMap", "StatefulSet", "PodDisruptionBudget"}
CUSTOM = {"PodMonitor", "PrometheusRule", "ScaledObject"}
COMMIT_TIMEOUT_S = 30  # kafka-python's request_timeout_ms default, for the offset commit

Docs = list[dict[str, Any]]


def _one(docs: Docs, kind: str) -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == kind]
    return found


def _container(docs: Docs) -> dict[str, Any]:
    (container,) = _one(docs, "StatefulSet")["spec"]["template"]["spec"]["containers"]
    return dict(container)


def _settings(docs: Docs) -> dict[str, str]:
    return dict(_one(docs, "ConfigMap")["data"])


def _strict(schema: Any) -> Any:
    """The schema with unknown fields refused wherever it lists the known ones, as
    `kubectl apply --validate=strict` does (the API server would drop them silently)."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    return schema


def _crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> the served version's openAPIV3Schema, made strict."""
    schemas = {}
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        for version in crd["spec"]["versions"]:
            if version["served"]:
                key = (f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])
                schemas[key] = _strict(version["schema"]["openAPIV3Schema"])
    return schemas


def _crd_errors(resource: dict[str, Any]) -> list[str]:
    schema = _crd_schemas()[(resource["apiVersion"], resource["kind"])]
    validator = jsonschema.Draft7Validator(schema)
    return [f"{e.json_path}: {e.message}" for e in validator.iter_errors(resource)]


@pytest.fixture(params=OVERLAYS)
def docs(request: pytest.FixtureRequest, rendered: dict[str, Docs]) -> Docs:
    """One overlay's rendered resources."""
    return rendered[request.param]


def test_each_overlay_renders_the_workload_its_config_and_its_operators_resources(
    docs: Docs,
) -> None:
    assert sorted(d["kind"] for d in docs) == sorted(BUILT_IN | CUSTOM)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_built_in_kinds_are_valid_kubernetes_objects(docs: Docs, version: str) -> None:
    for doc in docs:
        if doc["kind"] in BUILT_IN:
            kubernetes_validate.validate(doc, version, strict=True)


def test_custom_resources_are_valid_against_their_crds(docs: Docs) -> None:
    errors = {d["kind"]: _crd_errors(d) for d in docs if d["kind"] in CUSTOM}
    assert errors == {"PodMonitor": [], "PrometheusRule": [], "ScaledObject": []}


def test_crd_validation_refuses_a_misspelt_field(rendered: dict[str, Docs]) -> None:
    scaled = copy.deepcopy(_one(rendered["cpu"], "ScaledObject"))
    scaled["spec"]["maxReplicas"] = scaled["spec"].pop("maxReplicaCount")
    assert any("maxReplicas" in error for error in _crd_errors(scaled))


def test_the_config_map_is_a_valid_server_configuration(docs: Docs) -> None:
    env = {**_settings(docs), "HIDDENSTATE_INSTANCE_ID": "hiddenstate-0"}
    config = from_sources({}, env)
    assert config.kafka.instance_id == "hiddenstate-0"
    assert config.observability.metrics_port == 9108


def test_the_workload_passes_only_settings_the_server_reads(
    docs: Docs, settings_defaults: dict[str, str]
) -> None:
    names = set(_settings(docs)) | {e["name"] for e in _container(docs)["env"]}
    assert names <= set(settings_defaults)


def test_the_instance_id_for_static_membership_is_the_pod_name(docs: Docs) -> None:
    env = {e["name"]: e for e in _container(docs)["env"]}
    source = env["HIDDENSTATE_INSTANCE_ID"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert source == "metadata.name"


def test_kafka_credentials_come_from_a_secret_and_not_the_config_map(docs: Docs) -> None:
    env = {e["name"]: e for e in _container(docs)["env"]}
    for name, key in (
        ("HIDDENSTATE_SASL_PLAIN_USERNAME", "username"),
        ("HIDDENSTATE_SASL_PLAIN_PASSWORD", "password"),
    ):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == ("hiddenstate-kafka", key)
        assert name not in _settings(docs)


def test_the_model_path_is_where_the_images_put_the_model(docs: Docs) -> None:
    for image in ("Dockerfile", "Dockerfile.cuda"):
        runtime = parse(REPO / "docker" / image).stage("runtime")
        model = runtime.expand(env_names(runtime)["HIDDENSTATE_MODEL"], {})
        assert _settings(docs)["HIDDENSTATE_MODEL"] == model


def test_probes_ask_healthz_for_liveness_and_readyz_for_readiness_and_startup(
    docs: Docs,
) -> None:
    container = _container(docs)
    (port,) = container["ports"]
    assert port["containerPort"] == int(_settings(docs)["HIDDENSTATE_METRICS_PORT"])
    paths = {
        probe: (container[probe]["httpGet"]["path"], container[probe]["httpGet"]["port"])
        for probe in ("livenessProbe", "readinessProbe", "startupProbe")
    }
    assert paths == {
        "livenessProbe": ("/healthz", port["name"]),
        "readinessProbe": ("/readyz", port["name"]),
        "startupProbe": ("/readyz", port["name"]),
    }


def test_the_startup_probe_allows_ten_minutes_for_model_load_and_restore(docs: Docs) -> None:
    startup = _container(docs)["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] == 600


def test_liveness_restarts_a_stuck_loop_within_three_minutes(docs: Docs) -> None:
    probe = _container(docs)["livenessProbe"]
    heartbeat_timeout = float(_settings(docs)["HIDDENSTATE_LIVENESS_TIMEOUT_SECONDS"])
    assert heartbeat_timeout + probe["periodSeconds"] * probe["failureThreshold"] <= 180


def test_the_grace_period_outlasts_the_worst_drain(docs: Docs) -> None:
    flush = DELIVERY_TIMEOUT_S  # the producer gives a record up after this
    worst_drain = flush + flush + COMMIT_TIMEOUT_S  # predictions, changelog, commit
    grace = _one(docs, "StatefulSet")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > worst_drain


def test_the_pod_runs_under_the_restricted_security_profile(docs: Docs) -> None:
    pod = _one(docs, "StatefulSet")["spec"]["template"]["spec"]
    container = _container(docs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] >= 1000
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    volumes = {v["name"]: v for v in pod["volumes"]}
    (mount,) = container["volumeMounts"]
    assert mount["mountPath"] == "/tmp"
    assert "emptyDir" in volumes[mount["name"]]
    assert pod["automountServiceAccountToken"] is False


def test_selectors_of_the_workload_budget_and_monitor_match_the_pods(docs: Docs) -> None:
    pod_labels = _one(docs, "StatefulSet")["spec"]["template"]["metadata"]["labels"]
    for kind in ("StatefulSet", "PodDisruptionBudget", "PodMonitor"):
        selector = _one(docs, kind)["spec"]["selector"]["matchLabels"]
        assert selector, kind
        assert selector.items() <= pod_labels.items(), kind
    assert _one(docs, "Service")["spec"]["selector"].items() <= pod_labels.items()
    assert _one(docs, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


def test_the_pod_monitor_scrapes_the_metrics_port(docs: Docs) -> None:
    (endpoint,) = _one(docs, "PodMonitor")["spec"]["podMetricsEndpoints"]
    (port,) = _container(docs)["ports"]
    assert (endpoint["port"], endpoint["path"]) == (port["name"], "/metrics")


def test_the_prometheus_rule_carries_the_compose_rules_unchanged(docs: Docs) -> None:
    assert _one(docs, "PrometheusRule")["spec"] == yaml.safe_load(RULES.read_text())


def test_keda_scales_the_statefulset_on_the_lag_of_the_servers_group(docs: Docs) -> None:
    scaled = _one(docs, "ScaledObject")["spec"]
    target = scaled["scaleTargetRef"]
    workload = _one(docs, "StatefulSet")
    assert (target["kind"], target["name"]) == (workload["kind"], workload["metadata"]["name"])
    config = from_sources({}, _settings(docs))
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "kafka"
    assert trigger["metadata"]["topic"] == config.topics.input_topic
    assert trigger["metadata"]["consumerGroup"] == config.kafka.group_id
    assert trigger["metadata"]["bootstrapServers"] == config.kafka.bootstrap_servers
    assert int(trigger["metadata"]["lagThreshold"]) > 0
    assert trigger["metadata"]["offsetResetPolicy"] == config.kafka.auto_offset_reset


def test_replicas_stop_at_the_partition_count_and_scale_down_is_stabilised(docs: Docs) -> None:
    scaled = _one(docs, "ScaledObject")
    partitions = int(scaled["metadata"]["annotations"]["hiddenstate/input-topic-partitions"])
    assert scaled["spec"]["maxReplicaCount"] == partitions
    assert scaled["spec"]["triggers"][0]["metadata"]["allowIdleConsumers"] == "false"
    behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 300


def test_only_the_gpu_overlay_requests_a_gpu_and_runs_the_cuda_image(
    rendered: dict[str, Docs],
) -> None:
    seen = {}
    for overlay, docs in rendered.items():
        container = _container(docs)
        seen[overlay] = (
            container["resources"]["limits"].get("nvidia.com/gpu"),
            container["resources"]["requests"].get("nvidia.com/gpu"),
            container["image"].endswith("-cuda"),
            _settings(docs)["HIDDENSTATE_DEVICE"],
        )
    assert seen == {"cpu": (None, None, False, "cpu"), "gpu": ("1", "1", True, "cuda")}


def test_the_vendored_crds_are_the_ones_their_readme_lists() -> None:
    readme = (CRDS / "README.md").read_text()
    listed = set(re.findall(r"^\| `([\w.]+\.yaml)` \|", readme, flags=re.MULTILINE))
    assert listed == {path.name for path in CRDS.glob("*.yaml")}
