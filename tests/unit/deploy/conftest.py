"""Fixtures for the deployment files: the settings the server reads, and kustomize output
of every overlay and of the base with every allowed combination of components."""

from __future__ import annotations

import itertools
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.config import settings_table
from tests.unit.deploy.tools import REPO, require

DEPLOY = REPO / "deploy"
OVERLAYS = ("cpu", "gpu", "demo")
# Every component, in the order a kustomization must list them (a later one may patch or
# copy from what an earlier one added).
COMPONENTS = (
    "prometheus-operator",
    "servicemonitor",
    "keda",
    "hpa-cpu",
    "kafka-sasl",
    "keda-kafka-auth",
    "kafka-private-ca",
    "model-image-volume",
    "model-pvc",
    "shadow-model",
    "grafana-dashboard",
    "nvidia-runtime-class",
    "streams-api",
)
# What a component needs beside it, and what never goes together (two autoscalers of one
# StatefulSet; two sources of the model).
REQUIRES = {
    "servicemonitor": {"prometheus-operator"},
    "keda-kafka-auth": {"keda", "kafka-sasl"},
    "kafka-private-ca": {"kafka-sasl"},  # a TLS protocol; kafka-sasl brings SASL_SSL
}
EXCLUDES = ({"keda", "hpa-cpu"}, {"model-image-volume", "model-pvc"})

Docs = list[dict[str, Any]]


def closure(chosen: set[str]) -> tuple[str, ...]:
    """`chosen` with what it requires, in kustomization order."""
    wanted = set(chosen)
    while True:
        more = set().union(*(REQUIRES.get(c, set()) for c in wanted)) - wanted
        if not more:
            return tuple(c for c in COMPONENTS if c in wanted)
        wanted |= more


def allowed(combination: tuple[str, ...]) -> bool:
    """No two components that exclude each other."""
    return not any(pair <= set(combination) for pair in EXCLUDES)


def combinations() -> list[tuple[str, ...]]:
    """The base alone, every component, every pair of components (each with what it
    requires), and the two largest sets that go together: every interaction of two
    components is rendered at least once."""
    found: list[tuple[str, ...]] = []
    for size in (0, 1, 2):
        for chosen in itertools.combinations(COMPONENTS, size):
            combination = closure(set(chosen))
            if allowed(combination) and combination not in found:
                found.append(combination)
    for left_out in ({"hpa-cpu", "model-pvc"}, {"keda", "keda-kafka-auth", "model-image-volume"}):
        combination = closure(set(COMPONENTS) - left_out)
        assert allowed(combination), combination
        found.append(combination)
    return found


def build(path: Path) -> Docs:
    """`kustomize build path`, parsed; fails the test with kustomize's error."""
    built = subprocess.run(
        [require("kustomize"), "build", str(path)], capture_output=True, text=True, check=False
    )
    if built.returncode != 0:
        pytest.fail(f"kustomize build {path} failed:\n{built.stderr}")
    return [doc for doc in yaml.safe_load_all(built.stdout) if doc]


def write_combination(folder: Path, combination: tuple[str, ...]) -> Path:
    """A kustomization in `folder` of the base and `combination`, by relative paths, with
    the image tags an overlay sets (as an overlay of a user's would be)."""
    folder.mkdir(parents=True, exist_ok=True)
    up = Path(os.path.relpath(DEPLOY, folder))
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [str(up / "base")],
        "components": [str(up / "components" / c) for c in combination],
        "images": [
            {"name": "hiddenstate", "newTag": "0.1.0"},
            {"name": "hiddenstate-model", "newTag": "0.1.0"},
            {"name": "hiddenstate-shadow-model", "newTag": "0.2.0"},
        ],
    }
    (folder / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return folder


@pytest.fixture(scope="session")
def settings_defaults() -> dict[str, str]:
    """HIDDENSTATE_* variable -> its default as docs/configuration.md shows it."""
    return {row["env"]: row["default"] for row in settings_table()}


@pytest.fixture(scope="session")
def rendered() -> dict[str, Docs]:
    """`kustomize build deploy/overlays/<name>` of every overlay, as parsed documents."""
    return {overlay: build(DEPLOY / "overlays" / overlay) for overlay in OVERLAYS}


@pytest.fixture(scope="session")
def rendered_combinations(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Docs]:
    """'+'-joined component names ('' for the base alone) -> the rendered documents."""
    root = tmp_path_factory.mktemp("combinations")
    return {
        "+".join(c): build(write_combination(root / (str(i)), c))
        for i, c in enumerate(combinations())
    }


@pytest.fixture(scope="session")
def every_rendering(
    rendered: dict[str, Docs], rendered_combinations: dict[str, Docs]
) -> dict[str, Docs]:
    """'overlay <name>' and 'base+<components>' -> rendered documents: everything a user
    can build from deploy/."""
    everything = {f"overlay {name}": docs for name, docs in rendered.items()}
    everything |= {f"base+{name}": docs for name, docs in rendered_combinations.items()}
    return everything
