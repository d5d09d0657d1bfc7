"""Every rendered manifest, validated by the real kubeconform (-strict) against the
Kubernetes schemas of three versions and the vendored CRDs (tests/unit/deploy/schemas.py):
each overlay, and the base with every allowed combination of components. No cluster."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.deploy import schemas
from tests.unit.deploy.conftest import Docs
from tests.unit.deploy.tools import require

# The oldest and newest minor versions the manifests must pass, and one between.
KUBERNETES_VERSIONS = ("1.30.0", "1.33.0", "1.37.0")
# Image volumes (`volumes[].image`) entered the API in 1.31: model-image-volume needs a
# newer cluster than that (docs/operations.md#model-delivery), so 1.30 skips it.
IMAGE_VOLUME_SINCE = (1, 31)


def _kinds(groups: dict[str, Docs]) -> set[tuple[str, str]]:
    return {(d["apiVersion"], d["kind"]) for docs in groups.values() for d in docs}


@pytest.fixture(scope="module")
def everything(every_rendering: dict[str, Docs]) -> dict[str, Docs]:
    """Every rendering, overlays and combinations."""
    return every_rendering


@pytest.fixture(scope="module")
def schema_locations(
    everything: dict[str, Docs], tmp_path_factory: pytest.TempPathFactory
) -> list[str]:
    return schemas.write(
        tmp_path_factory.mktemp("schemas"), KUBERNETES_VERSIONS, _kinds(everything)
    )


def _kubeconform(version: str, locations: list[str], files: list[Path]) -> list[dict[str, Any]]:
    """kubeconform's verdict on every resource in `files`."""
    checked = subprocess.run(
        [require("kubeconform"), "-strict", "-verbose", "-output", "json",
         "-kubernetes-version", version, *locations, *map(str, files)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return list(json.loads(checked.stdout)["resources"])


def _write(folder: Path, groups: dict[str, Docs]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, (name, docs) in enumerate(groups.items()):
        path = folder / f"{i:02d}-{name.replace(' ', '-').replace('+', '_') or 'base'}.yaml"
        path.write_text(yaml.safe_dump_all(docs))
        files.append(path)
    return files


def _uses_image_volumes(docs: Docs) -> bool:
    return any(
        "image" in volume
        for d in docs
        if d["kind"] == "StatefulSet"
        for volume in d["spec"]["template"]["spec"].get("volumes", [])
    )


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_rendering_is_valid_for_kubeconform_strict(
    version: str,
    everything: dict[str, Docs],
    schema_locations: list[str],
    tmp_path: Path,
) -> None:
    major, minor, _ = map(int, version.split("."))
    groups = {
        name: docs
        for name, docs in everything.items()
        if (major, minor) >= IMAGE_VOLUME_SINCE or not _uses_image_volumes(docs)
    }
    verdicts = _kubeconform(version, schema_locations, _write(tmp_path, groups))
    problems = [
        f"{v['filename']}: {v['kind']} {v['name']}: {v['status']} {v.get('msg', '')}"
        for v in verdicts
        if v["status"] != "statusValid"
    ]
    assert problems == []
    assert len(verdicts) == sum(len(docs) for docs in groups.values())


def test_kubeconform_refuses_a_misspelt_field_of_a_built_in_kind(
    rendered: dict[str, Docs], schema_locations: list[str], tmp_path: Path
) -> None:
    (workload,) = [d for d in rendered["cpu"] if d["kind"] == "StatefulSet"]
    workload["spec"]["template"]["spec"]["terminationGracePeriod"] = 180
    (verdict,) = _kubeconform("1.37.0", schema_locations, _write(tmp_path, {"x": [workload]}))
    assert verdict["status"] == "statusInvalid"
    assert "terminationGracePeriod" in verdict["msg"]


def test_kubeconform_refuses_a_misspelt_field_of_a_custom_resource(
    rendered: dict[str, Docs], schema_locations: list[str], tmp_path: Path
) -> None:
    (scaled,) = [d for d in rendered["cpu"] if d["kind"] == "ScaledObject"]
    scaled["spec"]["maxReplicas"] = scaled["spec"].pop("maxReplicaCount")
    (verdict,) = _kubeconform("1.37.0", schema_locations, _write(tmp_path, {"x": [scaled]}))
    assert verdict["status"] == "statusInvalid"
    assert "maxReplicas" in verdict["msg"]


def test_image_volumes_are_unknown_to_kubernetes_1_30(
    everything: dict[str, Docs], schema_locations: list[str], tmp_path: Path
) -> None:
    (docs,) = [d for n, d in everything.items() if n == "base+model-image-volume"]
    verdicts = _kubeconform("1.30.0", schema_locations, _write(tmp_path, {"x": docs}))
    invalid = {v["kind"] for v in verdicts if v["status"] == "statusInvalid"}
    assert invalid == {"StatefulSet"}
