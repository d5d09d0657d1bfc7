"""kube-score, a Kubernetes manifest linter, on every overlay and every allowed combination
of components on the base: nothing at WARNING or
CRITICAL except the findings waived below, each with its reason. Two demo-only waivers
sit on the demo's Kafka StatefulSet itself (`kube-score/ignore`, with its reason there).
Optional checks that the manifests meet are switched on, so they stay met."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from tests.unit.deploy.conftest import OVERLAYS, Docs, combinations
from tests.unit.deploy.tools import require

# check id -> why the manifests do not do what it asks.
WAIVED = {
    "container-image-pull-policy": (
        "Releases are immutable tags (0.1.0, 0.1.0-cuda): IfNotPresent, the default for "
        "tagged images, starts a restarted pod from the node's copy; Always would make every "
        "restart wait on the registry, and fail while it is away."
    ),
    "pod-networkpolicy": (
        "The server talks to brokers whose addresses only the user knows (in or outside the "
        "cluster) and is scraped from a monitoring namespace whose name varies: a policy here "
        "would either cut one of them off or allow everything. docs/operations.md#network-policy "
        "has one to adapt."
    ),
    "horizontalpodautoscaler-replicas": (
        "The CPU autoscaler (deploy/components/hpa-cpu) goes down to one replica, as the KEDA "
        "component does: a group at rest needs one consumer, and a replica that crashes is "
        "back within the session timeout with its partitions (static membership)."
    ),
}
# The CPU-limit check is waived by kube-score's own flag: a CPU limit makes CFS throttle the
# loop mid-batch (latency spikes at any load above the limit); the request reserves the core.
CPU_LIMIT_WAIVER = "--ignore-container-cpu-limit"
OPTIONAL = (
    "container-memory-requests-equal-limits",
    "container-seccomp-profile",
    "container-ports-check",
)


def _score(path: Path, *extra: str) -> list[str]:
    """kube-score's findings above OK ('[CRITICAL] name kind: message' lines)."""
    scored = subprocess.run(
        [require("kube-score"), "score", "--output-format", "ci", *extra, str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    return [
        line for line in scored.stdout.splitlines() if line.startswith(("[WARNING]", "[CRITICAL]"))
    ]


def test_kube_score_finds_nothing_beyond_the_waived_checks(
    every_rendering: dict[str, Docs], tmp_path: Path
) -> None:
    findings = {}
    for i, (name, docs) in enumerate(every_rendering.items()):
        path = tmp_path / f"{i}.yaml"
        path.write_text(yaml.safe_dump_all(docs))
        found = _score(
            path,
            CPU_LIMIT_WAIVER,
            "--ignore-test", ",".join(WAIVED),
            "--enable-optional-test", ",".join(OPTIONAL),
        )  # fmt: skip
        if found:
            findings[name] = found
    assert findings == {}
    assert len(every_rendering) == len(OVERLAYS) + len(combinations())


# What kube-score says for each waived check: a waiver it no longer prints is stale.
WAIVED_FINDINGS = {
    "container-image-pull-policy": "ImagePullPolicy is not set to Always",
    "pod-networkpolicy": "The pod does not have a matching NetworkPolicy",
    "horizontalpodautoscaler-replicas": "HPA few replicas",
    CPU_LIMIT_WAIVER: "CPU limit is not set",
}


def test_every_waiver_is_still_needed(
    rendered_combinations: dict[str, Docs], tmp_path: Path
) -> None:
    path = tmp_path / "hpa.yaml"
    path.write_text(yaml.safe_dump_all(rendered_combinations["hpa-cpu"]))
    unwaived = "\n".join(_score(path))
    assert set(WAIVED_FINDINGS) == {*WAIVED, CPU_LIMIT_WAIVER}
    assert {check: message in unwaived for check, message in WAIVED_FINDINGS.items()} == {
        check: True for check in WAIVED_FINDINGS
    }
