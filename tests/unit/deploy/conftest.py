"""Fixtures for the deployment files: the settings the server reads, and kustomize output."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest
import yaml

from pipeline.config import settings_table
from tests.unit.deploy.tools import REPO, require

OVERLAYS = ("cpu", "gpu")


@pytest.fixture(scope="session")
def settings_defaults() -> dict[str, str]:
    """HIDDENSTATE_* variable -> its default as docs/configuration.md shows it."""
    return {row["env"]: row["default"] for row in settings_table()}


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """`kustomize build deploy/overlays/<name>` of every overlay, as parsed documents."""
    kustomize = require("kustomize")
    out = {}
    for overlay in OVERLAYS:
        built = subprocess.run(
            [kustomize, "build", str(REPO / "deploy" / "overlays" / overlay)],
            capture_output=True,
            text=True,
            check=False,
        )
        if built.returncode != 0:
            pytest.fail(f"kustomize build deploy/overlays/{overlay} failed:\n{built.stderr}")
        out[overlay] = [doc for doc in yaml.safe_load_all(built.stdout) if doc]
    return out
