"""Shared fixtures: small models (numpy and real ONNX), fresh metrics, a hand-moved clock."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnxruntime
import pytest
from prometheus_client import CollectorRegistry

from pipeline.config import ProcessingConfig, TopicsConfig
from pipeline.metrics import Metrics
from pipeline.processor import Processor
from pipeline.runtime import OrtStepModel, StepModel
from pipeline.state_store import StateStore
from pipeline.testing import (
    ManualClock,
    NumpyStepModel,
    StepWeights,
    random_weights,
    write_onnx_step,
)

TOPICS = TopicsConfig(
    input_topic="events", output_topic="predictions", dead_letter_topic="events.dead-letter"
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


@pytest.fixture
def clock() -> ManualClock:
    """Wall time that moves only when a test says so."""
    return ManualClock()


@pytest.fixture
def make_processor(metrics: Metrics, clock: ManualClock) -> Callable[..., Processor]:
    """Build a processor around a model with a fresh store; keyword overrides for limits."""

    def build(
        model: StepModel,
        *,
        max_streams: int = 1000,
        idle_ttl_seconds: float = 0.0,
        max_wave_size: int = 256,
        max_event_bytes: int = 4096,
        **kwargs: Any,
    ) -> Processor:
        store = StateStore(
            model.spec.states,
            max_streams=max_streams,
            idle_ttl_seconds=idle_ttl_seconds,
            initial_capacity=4,
            on_evict=metrics.count_eviction,
        )
        processing = ProcessingConfig(max_wave_size=max_wave_size, max_event_bytes=max_event_bytes)
        return Processor(
            model,
            store,
            topics=TOPICS,
            processing=processing,
            metrics=metrics,
            clock=clock,
            **kwargs,
        )

    return build
