"""The Kubernetes manifests (deploy/), rendered by the real kustomize and cross-checked
against the server, the images, the rules and each other: settings, model delivery,
probes, security, resources, monitoring, scaling. Schema validation is kubeconform's
(test_kubeconform.py); the linter is kube-score (test_kube_score.py). No cluster."""

from __future__ import annotations

import math
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.config import ServeConfig, from_sources
from pipeline.transport import DELIVERY_TIMEOUT_S
from tests.unit.deploy.conftest import COMPONENTS, DEPLOY, OVERLAYS, Docs, combinations
from tests.unit.deploy.dockerfiles import parse
from tests.unit.deploy.promql import RULES, alert_rules
from tests.unit.deploy.tools import REPO

CRDS = DEPLOY / "crds"
OPERATOR_KINDS = {
    "PodMonitor",
    "ServiceMonitor",
    "PrometheusRule",
    "ScaledObject",
    "TriggerAuthentication",
}
COMMIT_TIMEOUT_S = 30  # kafka-python's request_timeout_ms default, for the offset commit
# docs/benchmarks.md's results table: "| kafka-python | **29,908** (...".
CAPACITY_ROW = re.compile(r"^\| (kafka-python|confluent) \| \*\*([\d,]+)\*\*", re.MULTILINE)
LAG_SECONDS_OF_WORK = 30
# docs/operations.md#sizing: limit = 100 MiB + max_streams x (state + 137 + 33 + key) x 1.5
SIZING = {
    "base_mib": 100,
    "state_bytes": 512,
    "per_stream": 137 + 33,
    "key_bytes": 36,
    "slack": 1.5,
}
KEDA_SASL = {"PLAIN": "plaintext", "SCRAM-SHA-256": "scram_sha256", "SCRAM-SHA-512": "scram_sha512"}


def _one(docs: Docs, kind: str, name: str = "hiddenstate") -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def _kinds(docs: Docs) -> set[str]:
    return {d["kind"] for d in docs}


def _pod(docs: Docs) -> dict[str, Any]:
    return dict(_one(docs, "StatefulSet")["spec"]["template"]["spec"])


def _container(docs: Docs, name: str = "hiddenstate") -> dict[str, Any]:
    (container,) = [c for c in _pod(docs)["containers"] if c["name"] == name]
    return dict(container)


def _settings(docs: Docs) -> dict[str, str]:
    (config,) = [
        d
        for d in docs
        if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("hiddenstate-config")
    ]
    return dict(config["data"])


def _env(docs: Docs) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in _container(docs).get("env", [])}


def _config(docs: Docs, tmp_path: Path) -> ServeConfig:
    """The server's configuration from the ConfigMap and the pod's own variables, as the
    pod would see them: Secret values stand in, a mounted file is a file here."""
    env = {**_settings(docs), "HIDDENSTATE_INSTANCE_ID": "hiddenstate-0"}
    for name, entry in _env(docs).items():
        if "secretKeyRef" in entry.get("valueFrom", {}):
            env[name] = f"secret {entry['valueFrom']['secretKeyRef']['key']}"
    if "HIDDENSTATE_SSL_CAFILE" in env:
        (tmp_path / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
        env["HIDDENSTATE_SSL_CAFILE"] = str(tmp_path / "ca.crt")
    return from_sources({}, env)


def _trigger(docs: Docs) -> dict[str, Any]:
    (trigger,) = _one(docs, "ScaledObject")["spec"]["triggers"]
    return dict(trigger)


def _measured_capacity() -> dict[str, int]:
    text = (REPO / "docs" / "benchmarks.md").read_text()
    return {name: int(value.replace(",", "")) for name, value in CAPACITY_ROW.findall(text)}


def _anchors(page: Path) -> set[str]:
    return {
        re.sub(r"[^a-z0-9 -]", "", heading.lower()).replace(" ", "-")
        for heading in re.findall(r"^#+ (.+)$", page.read_text(), flags=re.MULTILINE)
    }


@pytest.fixture(params=OVERLAYS)
def docs(request: pytest.FixtureRequest, rendered: dict[str, Docs]) -> Docs:
    """One overlay's rendered resources."""
    return rendered[request.param]


COMBINATIONS = ["+".join(c) for c in combinations() if c]


@pytest.fixture(params=COMBINATIONS)
def combination(request: pytest.FixtureRequest, rendered_combinations: dict[str, Docs]) -> Docs:
    """The base with one allowed combination of components."""
    return rendered_combinations[request.param]


# ----------------------------------------------------------------- what is rendered


def test_the_cpu_and_gpu_overlays_render_the_workload_monitoring_and_scaling(
    rendered: dict[str, Docs],
) -> None:
    expected = {"ServiceAccount", "Service", "ConfigMap", "StatefulSet", "PodDisruptionBudget",
                "PodMonitor", "PrometheusRule", "ScaledObject"}  # fmt: skip
    assert {overlay: _kinds(rendered[overlay]) for overlay in ("cpu", "gpu")} == {
        "cpu": expected,
        "gpu": expected,
    }


def test_the_base_alone_needs_no_operator(rendered_combinations: dict[str, Docs]) -> None:
    assert _kinds(rendered_combinations[""]) == {
        "ServiceAccount", "Service", "ConfigMap", "StatefulSet", "PodDisruptionBudget"
    }  # fmt: skip


def test_every_component_is_rendered_in_some_combination() -> None:
    on_disk = {p.name for p in (DEPLOY / "components").iterdir() if p.is_dir()}
    rendered = {c for combination in combinations() for c in combination}
    assert on_disk == set(COMPONENTS) == rendered


def test_the_demo_overlay_brings_kafka_a_producer_and_the_dashboard(
    rendered: dict[str, Docs],
) -> None:
    demo = rendered["demo"]
    assert {(d["kind"], d["metadata"]["name"]) for d in demo} >= {
        ("Namespace", "hiddenstate-demo"),
        ("StatefulSet", "kafka"),
        ("Service", "kafka"),
        ("Deployment", "producer"),
        ("ConfigMap", "hiddenstate-dashboard"),
    }
    assert {d["metadata"].get("namespace") for d in demo if d["kind"] != "Namespace"} == {
        "hiddenstate-demo"
    }


# ----------------------------------------------------------------- settings


def test_the_config_map_is_a_valid_server_configuration_in_every_rendering(
    every_rendering: dict[str, Docs], tmp_path: Path
) -> None:
    for name, docs in every_rendering.items():
        config = _config(docs, tmp_path)
        assert config.kafka.instance_id == "hiddenstate-0", name
        assert config.observability.metrics_port == 9108, name


def test_the_workload_passes_only_settings_the_server_reads(
    combination: Docs, settings_defaults: dict[str, str]
) -> None:
    names = set(_settings(combination)) | set(_env(combination))
    assert names <= set(settings_defaults)


def test_the_instance_id_for_static_membership_is_the_pod_name(docs: Docs) -> None:
    source = _env(docs)["HIDDENSTATE_INSTANCE_ID"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert source == "metadata.name"


def test_the_session_timeout_is_set_and_documented_with_static_membership(docs: Docs) -> None:
    seconds = int(_settings(docs)["HIDDENSTATE_SESSION_TIMEOUT_MS"]) / 1000
    guide = (REPO / "docs" / "operations.md").read_text()
    section = guide.split("### Static membership", 1)[1].split("\n#", 1)[0]
    assert 6 <= seconds <= 1800  # the broker's default group.min/max.session.timeout.ms
    assert f"{seconds:.0f} s" in section


def test_the_servers_logs_are_json_lines(docs: Docs) -> None:
    assert _settings(docs)["HIDDENSTATE_LOG_FORMAT"] == "json"


# ----------------------------------------------------------------- model delivery


def test_the_cpu_and_gpu_overlays_copy_the_model_from_a_model_image_to_models(
    rendered: dict[str, Docs],
) -> None:
    model_image = parse(REPO / "docker" / "Dockerfile.model")
    (copied_to,) = {
        shlex.split(rest)[-1]
        for stage in ("demo", "model")
        for rest in model_image.stage(stage).all("COPY")
        if rest.endswith(".onnx")
    }
    for overlay in ("cpu", "gpu"):
        docs = rendered[overlay]
        (init,) = _pod(docs)["initContainers"]
        command = init["command"]
        volume = next(m["name"] for m in init["volumeMounts"] if m["mountPath"] == "/models")
        served = next(m for m in _container(docs)["volumeMounts"] if m["name"] == volume)
        assert init["image"].startswith("hiddenstate-model:"), overlay
        assert command == ["/bin/busybox", "cp", copied_to, _settings(docs)["HIDDENSTATE_MODEL"]]
        assert (served["mountPath"], served["readOnly"]) == ("/models", True), overlay


def test_the_model_path_is_inside_the_models_mount(combination: Docs) -> None:
    model = Path(_settings(combination)["HIDDENSTATE_MODEL"])
    mounts = {m["mountPath"]: m["name"] for m in _container(combination)["volumeMounts"]}
    volumes = {v["name"]: v for v in _pod(combination)["volumes"]}
    assert str(model.parent) in mounts
    assert set(volumes[mounts[str(model.parent)]]) & {"emptyDir", "image", "persistentVolumeClaim"}


def test_the_image_volume_component_mounts_the_model_image_instead_of_copying(
    rendered_combinations: dict[str, Docs],
) -> None:
    docs = rendered_combinations["model-image-volume"]
    volumes = {v["name"]: v for v in _pod(docs)["volumes"]}
    assert volumes["models"] == {
        "name": "models",
        # the tag the overlay's `images:` sets, as on the init container it replaces
        "image": {"reference": "hiddenstate-model:0.1.0", "pullPolicy": "IfNotPresent"},
    }
    assert _pod(docs).get("initContainers", []) == []


def test_the_volume_claim_component_mounts_a_shared_claim_read_only(
    rendered_combinations: dict[str, Docs],
) -> None:
    docs = rendered_combinations["model-pvc"]
    volumes = {v["name"]: v for v in _pod(docs)["volumes"]}
    assert volumes["models"]["persistentVolumeClaim"] == {
        "claimName": "hiddenstate-models",
        "readOnly": True,
    }
    assert _pod(docs).get("initContainers", []) == []


def test_the_shadow_component_copies_a_second_model_image_and_names_it_in_the_config_map(
    rendered_combinations: dict[str, Docs],
) -> None:
    for name in ("shadow-model", "model-image-volume+shadow-model", "model-pvc+shadow-model"):
        docs = rendered_combinations[name]
        init = {c["name"]: c for c in _pod(docs)["initContainers"]}["shadow-model"]
        shadow = _settings(docs)["HIDDENSTATE_SHADOW_MODEL"]
        mounts = {m["mountPath"]: m for m in _container(docs)["volumeMounts"]}
        assert init["image"] == "hiddenstate-shadow-model:0.2.0", name
        assert init["command"] == ["/bin/busybox", "cp", "/model.onnx", shadow], name
        assert mounts[str(Path(shadow).parent)]["readOnly"] is True, name
        assert shadow != _settings(docs)["HIDDENSTATE_MODEL"], name


def test_the_shadow_components_memory_holds_both_models_states_by_the_sizing_formula(
    rendered_combinations: dict[str, Docs],
) -> None:
    docs = rendered_combinations["shadow-model"]
    streams = int(_settings(docs)["HIDDENSTATE_MAX_STREAMS"])
    served = SIZING["state_bytes"] + SIZING["per_stream"] + SIZING["key_bytes"]
    shadow = SIZING["state_bytes"] + SIZING["per_stream"] - 33  # the key object is shared
    need = SIZING["base_mib"] * 2**20 + streams * (served + shadow) * SIZING["slack"]
    resources = _container(docs)["resources"]
    assert _bytes(resources["limits"]["memory"]) >= need
    assert resources["requests"]["memory"] == resources["limits"]["memory"]


# ----------------------------------------------------------------- probes and shutdown


def test_probes_ask_healthz_for_liveness_and_startup_and_readyz_for_readiness(docs: Docs) -> None:
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
        "startupProbe": ("/healthz", port["name"]),
    }


def test_the_startup_probe_allows_five_minutes_to_open_the_port(docs: Docs) -> None:
    startup = _container(docs)["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] == 300


def test_liveness_restarts_a_stuck_loop_within_three_minutes(docs: Docs) -> None:
    probe = _container(docs)["livenessProbe"]
    heartbeat_timeout = float(_settings(docs)["HIDDENSTATE_LIVENESS_TIMEOUT_SECONDS"])
    assert heartbeat_timeout + probe["periodSeconds"] * probe["failureThreshold"] <= 180


def test_the_grace_period_outlasts_the_worst_drain(docs: Docs) -> None:
    flush = DELIVERY_TIMEOUT_S  # the producer gives a record up after this
    worst_drain = flush + flush + COMMIT_TIMEOUT_S  # predictions, changelog, commit
    assert _pod(docs)["terminationGracePeriodSeconds"] > worst_drain


# ----------------------------------------------------------------- security and resources


def test_every_container_runs_under_the_restricted_security_profile(
    every_rendering: dict[str, Docs],
) -> None:
    restricted = {
        "allowPrivilegeEscalation": False,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    for name, docs in every_rendering.items():
        for workload in (d for d in docs if d["kind"] in ("StatefulSet", "Deployment")):
            pod = workload["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True, name
            assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
            assert pod["automountServiceAccountToken"] is False, name
            for container in pod["containers"] + pod.get("initContainers", []):
                context = container["securityContext"]
                assert restricted.items() <= context.items(), (name, container["name"])


def test_the_servers_root_file_system_is_read_only_with_only_tmp_and_mounts_to_write(
    combination: Docs,
) -> None:
    pod = _pod(combination)
    volumes = {v["name"]: v for v in pod["volumes"]}
    for container in pod["containers"] + pod.get("initContainers", []):
        assert container["securityContext"]["readOnlyRootFilesystem"] is True, container["name"]
    writable = {
        m["mountPath"]
        for m in _container(combination)["volumeMounts"]
        if not m.get("readOnly") and "emptyDir" in volumes[m["name"]]
    }
    assert writable == {"/tmp"}


def test_every_container_requests_as_much_memory_as_its_limit(
    every_rendering: dict[str, Docs],
) -> None:
    for name, docs in every_rendering.items():
        for workload in (d for d in docs if d["kind"] in ("StatefulSet", "Deployment")):
            pod = workload["spec"]["template"]["spec"]
            for container in pod["containers"] + pod.get("initContainers", []):
                resources = container["resources"]
                assert resources["requests"]["memory"] == resources["limits"]["memory"], (
                    name,
                    container["name"],
                )


def _bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    return int(quantity[:-2]) * units[quantity[-2:]]


def test_the_memory_limit_holds_the_stream_cap_by_the_documented_formula(docs: Docs) -> None:
    streams = int(_settings(docs)["HIDDENSTATE_MAX_STREAMS"])
    per_stream = SIZING["state_bytes"] + SIZING["per_stream"] + SIZING["key_bytes"]
    need = SIZING["base_mib"] * 2**20 + streams * per_stream * SIZING["slack"]
    limit = _bytes(_container(docs)["resources"]["limits"]["memory"])
    assert limit >= need
    guide = (REPO / "docs" / "operations.md").read_text()
    times = "\u00d7"  # the guide writes the formula with a multiplication sign
    assert (
        f"100 MiB + max_streams {times} (state bytes + 137 B + 33 B + key length) {times} 1.5"
        in guide
    )


def test_the_budget_lets_a_drain_evict_unready_replicas(docs: Docs) -> None:
    budget = _one(docs, "PodDisruptionBudget")["spec"]
    assert (budget["maxUnavailable"], budget["unhealthyPodEvictionPolicy"]) == (1, "AlwaysAllow")


def test_selectors_of_the_workload_budget_and_monitor_match_the_pods(docs: Docs) -> None:
    pod_labels = _one(docs, "StatefulSet")["spec"]["template"]["metadata"]["labels"]
    for kind in ("StatefulSet", "PodDisruptionBudget", "PodMonitor"):
        selector = _one(docs, kind)["spec"]["selector"]["matchLabels"]
        assert selector, kind
        assert selector.items() <= pod_labels.items(), kind
    assert _one(docs, "Service")["spec"]["selector"].items() <= pod_labels.items()


# ----------------------------------------------------------------- monitoring


def test_the_monitoring_objects_carry_the_release_label_kube_prometheus_stack_selects(
    docs: Docs,
) -> None:
    labels = {
        d["kind"]: d["metadata"]["labels"].get("release")
        for d in docs
        if d["kind"] in OPERATOR_KINDS
    }
    assert labels["PodMonitor"] == labels["PrometheusRule"] == "kube-prometheus-stack"
    assert labels["ScaledObject"] is None


def test_the_release_label_is_written_in_one_place() -> None:
    found = [
        path.relative_to(DEPLOY)
        for path in DEPLOY.rglob("*.yaml")
        if "crds" not in path.parts and "release: kube-prometheus-stack" in path.read_text()
    ]
    assert found == [Path("components/prometheus-operator/kustomization.yaml")]


def test_the_pod_monitor_scrapes_the_metrics_port_as_the_job_the_rules_select(docs: Docs) -> None:
    monitor = _one(docs, "PodMonitor")["spec"]
    (endpoint,) = monitor["podMetricsEndpoints"]
    (port,) = _container(docs)["ports"]
    pod_labels = _one(docs, "StatefulSet")["spec"]["template"]["metadata"]["labels"]
    assert (endpoint["port"], endpoint["path"]) == (port["name"], "/metrics")
    job = pod_labels[monitor["jobLabel"]]
    assert all(f'job="{job}"' in r["expr"] for r in alert_rules() if "up{" in r["expr"])


def test_the_service_monitor_replaces_the_pod_monitor_with_the_same_release_label(
    rendered_combinations: dict[str, Docs],
) -> None:
    docs = rendered_combinations["prometheus-operator+servicemonitor"]
    monitor = _one(docs, "ServiceMonitor")
    service = _one(docs, "Service")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert "PodMonitor" not in _kinds(docs)
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "hiddenstate"


def test_the_prometheus_rule_carries_the_compose_rules_unchanged(docs: Docs) -> None:
    assert _one(docs, "PrometheusRule")["spec"] == yaml.safe_load(RULES.read_text())


def test_the_demo_dashboard_config_map_holds_the_dashboard_for_grafanas_sidecar(
    rendered: dict[str, Docs],
) -> None:
    board = _one(rendered["demo"], "ConfigMap", "hiddenstate-dashboard")
    source = DEPLOY / "components" / "grafana-dashboard" / "hiddenstate.json"
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert board["data"] == {"hiddenstate.json": source.read_text()}


# ----------------------------------------------------------------- scaling


def test_no_rendering_sets_a_replica_count_for_the_server(every_rendering: dict[str, Docs]) -> None:
    counted = [
        name
        for name, docs in every_rendering.items()
        if "replicas" in _one(docs, "StatefulSet")["spec"]
    ]
    assert counted == []


def test_keda_scales_the_statefulset_on_the_lag_of_the_servers_group(
    docs: Docs, tmp_path: Path
) -> None:
    target = _one(docs, "ScaledObject")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("StatefulSet", "hiddenstate")
    config = _config(docs, tmp_path)
    trigger = _trigger(docs)
    assert trigger["type"] == "kafka"
    assert {k: trigger["metadata"][k] for k in ("bootstrapServers", "consumerGroup", "topic", "offsetResetPolicy")} == {
        "bootstrapServers": config.kafka.bootstrap_servers,
        "consumerGroup": config.kafka.group_id,
        "topic": config.topics.input_topic,
        "offsetResetPolicy": config.kafka.auto_offset_reset,
    }  # fmt: skip


def test_the_scaled_object_names_no_broker_group_or_topic_of_its_own() -> None:
    written = yaml.safe_load((DEPLOY / "components" / "keda" / "scaledobject.yaml").read_text())
    (trigger,) = written["spec"]["triggers"]
    assert not {"bootstrapServers", "consumerGroup", "topic"} & set(trigger["metadata"])


def test_the_lag_threshold_is_at_least_thirty_seconds_of_a_replicas_measured_work(
    docs: Docs, tmp_path: Path
) -> None:
    capacity = _measured_capacity()
    transport = _config(docs, tmp_path).kafka.transport
    per_second = capacity.get(transport, max(capacity.values()))
    threshold = int(_trigger(docs)["metadata"]["lagThreshold"])
    assert set(capacity) == {"kafka-python", "confluent"}
    assert threshold >= LAG_SECONDS_OF_WORK * per_second
    assert threshold == math.ceil(LAG_SECONDS_OF_WORK * per_second / 10_000) * 10_000


def test_scaling_up_and_down_is_stabilised_and_a_blind_scaler_keeps_the_count(docs: Docs) -> None:
    spec = _one(docs, "ScaledObject")["spec"]
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleUp"]["stabilizationWindowSeconds"] >= 60
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 300
    assert spec["fallback"]["behavior"] == "currentReplicas"
    assert spec["fallback"]["failureThreshold"] >= 1


def test_replicas_stop_at_the_partition_count(every_rendering: dict[str, Docs]) -> None:
    for name, docs in every_rendering.items():
        for scaler in (d for d in docs if d["kind"] in ("ScaledObject", "HorizontalPodAutoscaler")):
            partitions = int(
                scaler["metadata"]["annotations"]["hiddenstate/input-topic-partitions"]
            )
            spec = scaler["spec"]
            assert spec.get("maxReplicaCount", spec.get("maxReplicas")) == partitions, name
            if scaler["kind"] == "ScaledObject":
                assert spec["triggers"][0]["metadata"]["allowIdleConsumers"] == "false", name


def test_the_cpu_autoscaler_targets_the_statefulset_on_cpu(
    rendered_combinations: dict[str, Docs],
) -> None:
    hpa = _one(rendered_combinations["hpa-cpu"], "HorizontalPodAutoscaler")["spec"]
    (metric,) = hpa["metrics"]
    assert (hpa["scaleTargetRef"]["kind"], hpa["scaleTargetRef"]["name"]) == (
        "StatefulSet",
        "hiddenstate",
    )
    assert (metric["resource"]["name"], metric["resource"]["target"]["type"]) == (
        "cpu",
        "Utilization",
    )
    assert hpa["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300


def test_keda_reads_the_lag_with_the_servers_credentials_and_mechanism(
    rendered_combinations: dict[str, Docs], tmp_path: Path
) -> None:
    docs = rendered_combinations["keda+kafka-sasl+keda-kafka-auth"]
    config = _config(docs, tmp_path)
    trigger = _trigger(docs)
    auth = _one(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    refs = {r["parameter"]: (r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]}
    env = {
        name: (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
        for name, e in _env(docs).items()
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert refs == {
        "username": env["HIDDENSTATE_SASL_PLAIN_USERNAME"],
        "password": env["HIDDENSTATE_SASL_PLAIN_PASSWORD"],
    }
    assert trigger["metadata"]["sasl"] == KEDA_SASL[config.kafka.sasl_mechanism]
    assert trigger["metadata"]["tls"] == (
        "enable" if config.kafka.security_protocol.endswith("SSL") else "disable"
    )


def test_kafka_credentials_come_from_a_secret_that_must_exist(
    rendered_combinations: dict[str, Docs],
) -> None:
    docs = rendered_combinations["kafka-sasl"]
    for name, key in (
        ("HIDDENSTATE_SASL_PLAIN_USERNAME", "username"),
        ("HIDDENSTATE_SASL_PLAIN_PASSWORD", "password"),
    ):
        ref = _env(docs)[name]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "hiddenstate-kafka", "key": key, "optional": False}
        assert name not in _settings(docs)
    assert "HIDDENSTATE_SASL_PLAIN_USERNAME" not in _env(rendered_combinations[""])


def test_the_private_ca_is_mounted_read_only_where_the_server_and_keda_read_it(
    rendered_combinations: dict[str, Docs],
) -> None:
    docs = rendered_combinations["keda+kafka-sasl+keda-kafka-auth+kafka-private-ca"]
    cafile = Path(_settings(docs)["HIDDENSTATE_SSL_CAFILE"])
    mount = next(
        m for m in _container(docs)["volumeMounts"] if m["mountPath"] == str(cafile.parent)
    )
    volume = next(v for v in _pod(docs)["volumes"] if v["name"] == mount["name"])
    (item,) = volume["secret"]["items"]
    auth = _one(docs, "TriggerAuthentication", "hiddenstate-kafka")
    ca = {(r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"] if r["parameter"] == "ca"}
    assert mount["readOnly"] is True
    assert (volume["secret"]["optional"], item["path"]) == (False, cafile.name)
    assert ca == {(volume["secret"]["secretName"], item["key"])}


# ----------------------------------------------------------------- GPU


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
    assert seen == {
        "cpu": (None, None, False, "cpu"),
        "gpu": ("1", "1", True, "cuda"),
        "demo": (None, None, False, "cpu"),
    }


def test_the_gpu_overlay_is_scheduled_by_its_gpu_request_alone(rendered: dict[str, Docs]) -> None:
    pod = _pod(rendered["gpu"])
    assert "nodeSelector" not in pod
    assert "affinity" not in pod or "nodeAffinity" not in pod["affinity"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]


def test_the_runtime_class_component_asks_for_the_nvidia_runtime(
    rendered_combinations: dict[str, Docs],
) -> None:
    assert _pod(rendered_combinations["nvidia-runtime-class"])["runtimeClassName"] == "nvidia"
    assert "runtimeClassName" not in _pod(rendered_combinations[""])


# ----------------------------------------------------------------- the streams API


def test_the_streams_api_is_off_without_its_component(docs: Docs, tmp_path: Path) -> None:
    assert _config(docs, tmp_path).online.streams_api is False


def test_the_streams_api_component_serves_it_on_a_port_of_its_own(
    rendered_combinations: dict[str, Docs], tmp_path: Path
) -> None:
    docs = rendered_combinations["streams-api"]
    online = _config(docs, tmp_path).online
    ports = {p["name"]: p["containerPort"] for p in _container(docs)["ports"]}
    service = _one(docs, "Service")["spec"]
    assert (online.streams_api, online.streams_api_port) == (True, 9109)
    assert ports == {"metrics": 9108, "streams": 9109}
    assert {p["name"]: p["targetPort"] for p in service["ports"]} == {
        "metrics": "metrics",
        "streams": "streams",
    }
    # Headless, no node port, no load balancer: reachable inside the cluster only.
    assert (service["clusterIP"], service.get("type", "ClusterIP")) == ("None", "ClusterIP")


def test_only_labelled_clients_in_the_namespace_reach_the_streams_api(
    rendered_combinations: dict[str, Docs],
) -> None:
    docs = rendered_combinations["streams-api"]
    policy = _one(docs, "NetworkPolicy")["spec"]
    pod_labels = _one(docs, "StatefulSet")["spec"]["template"]["metadata"]["labels"]
    by_port = {rule["ports"][0]["port"]: rule["from"] for rule in policy["ingress"]}
    assert policy["policyTypes"] == ["Ingress"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert all(len(rule["ports"]) == 1 and rule.get("from") for rule in policy["ingress"])
    assert by_port == {
        "streams": [{"podSelector": {"matchLabels": {"hiddenstate.io/streams-client": "true"}}}],
        "metrics": [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
        ],
    }


# ----------------------------------------------------------------- the demo


def test_the_demo_server_the_producer_and_the_scaler_agree_on_broker_topic_and_partitions(
    rendered: dict[str, Docs],
) -> None:
    demo = rendered["demo"]
    settings = _settings(demo)
    (topic_init,) = [c for c in _pod(demo)["initContainers"] if c["name"] == "topic"]
    (producer,) = _one(demo, "Deployment", "producer")["spec"]["template"]["spec"]["containers"]
    broker = _one(demo, "StatefulSet", "kafka")["spec"]["template"]["spec"]["containers"][0]
    advertised = {e["name"]: e["value"] for e in broker["env"]}["KAFKA_ADVERTISED_LISTENERS"]

    def flag(args: list[str], name: str) -> str:
        return args[args.index(name) + 1]

    assert advertised == f"PLAINTEXT://{settings['HIDDENSTATE_BOOTSTRAP_SERVERS']}"
    assert settings["HIDDENSTATE_BOOTSTRAP_SERVERS"].split(".")[1] == "hiddenstate-demo"
    assert (
        flag(producer["args"], "--topic")
        == flag(topic_init["args"], "--topic")
        == settings["HIDDENSTATE_INPUT_TOPIC"]
    )
    partitions = {flag(producer["args"], "--partitions"), flag(topic_init["args"], "--partitions")}
    assert partitions == {str(_one(demo, "ScaledObject")["spec"]["maxReplicaCount"])}


def test_the_demo_model_takes_the_features_the_demo_producer_sends(
    rendered: dict[str, Docs],
) -> None:
    (producer,) = _one(rendered["demo"], "Deployment", "producer")["spec"]["template"]["spec"][
        "containers"
    ]
    (command,) = parse(REPO / "docker" / "Dockerfile.model").stage("demo-build").all("RUN")
    features = re.search(r"n_features=(\d+)", command)
    assert features is not None
    assert producer["args"][producer["args"].index("--features") + 1] == features.group(1)


def test_the_vendored_crds_are_the_ones_their_readme_lists() -> None:
    readme = (CRDS / "README.md").read_text()
    listed = set(re.findall(r"^\| `([\w.]+\.yaml)` \|", readme, flags=re.MULTILINE))
    assert listed == {path.name for path in CRDS.glob("*.yaml")}


def test_every_operator_kind_rendered_has_a_vendored_crd(every_rendering: dict[str, Docs]) -> None:
    crd_kinds = {
        yaml.safe_load(p.read_text())["spec"]["names"]["kind"] for p in CRDS.glob("*.yaml")
    }
    used = {
        d["kind"]
        for docs in every_rendering.values()
        for d in docs
        if "." in d["apiVersion"].split("/")[0]
        and not d["apiVersion"].startswith(("apps/", "policy/", "networking.k8s.io/"))
    }
    assert used == OPERATOR_KINDS == crd_kinds


def test_every_runbook_link_in_the_deploy_comments_names_an_existing_section() -> None:
    anchors = _anchors(REPO / "docs" / "operations.md")
    missing = {
        (str(path.relative_to(DEPLOY)), anchor)
        for path in DEPLOY.rglob("*.yaml")
        for anchor in re.findall(r"docs/operations\.md#([a-z0-9-]+)", path.read_text())
        if anchor not in anchors
    }
    assert missing == set()
