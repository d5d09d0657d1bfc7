"""Shared fixtures: small models (numpy and real ONNX), fresh metrics, a hand-moved clock."""

from __future__ import annotations

from pathlib import Path

import onnxruntime
import pytest
from prometheus_client import CollectorRegistry

from pipeline.metrics import Metrics
from pipeline.runtime import OrtStepModel
from pipeline.testing import (
    NumpyStepModel,
    StepWeights,
    random_weights,
    write_onnx_step,
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked `cuda` run only where onnxruntime has the CUDA provider."""
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        return
    skip = pytest.mark.skip(reason="needs onnxruntime-gpu with CUDAExecutionProvider and a GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def gru_weights() -> StepWeights:
    """A 2-layer GRU regressor: 3 features, 8 hidden units, 2 outputs."""
    return random_weights("gru", n_features=3, hidden=8, layers=2, n_outputs=2, seed=7)


@pytest.fixture(scope="session")
def gru_onnx(gru_weights: StepWeights, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same GRU as a step-contract ONNX file."""
    return write_onnx_step(gru_weights, tmp_path_factory.mktemp("models") / "gru.onnx")


@pytest.fixture(scope="session")
def ort_gru(gru_onnx: Path) -> OrtStepModel:
    """The GRU in an onnxruntime session (built once: sessions take a while)."""
    return OrtStepModel(gru_onnx)


@pytest.fixture
def numpy_gru(gru_weights: StepWeights) -> NumpyStepModel:
    """The GRU in numpy, counting its calls."""
    return NumpyStepModel(gru_weights)


@pytest.fixture
def metrics() -> Metrics:
    """Metrics on a fresh registry."""
    return Metrics(CollectorRegistry())
