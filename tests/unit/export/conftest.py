"""Fixtures for the offline side: small user-style modules, infos, and a cache of exports."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from export.info import ModelInfo

LAYER_OF = {
    "rnn_tanh": lambda f, h, n, bf: nn.RNN(f, h, n, nonlinearity="tanh", batch_first=bf),
    "rnn_relu": lambda f, h, n, bf: nn.RNN(f, h, n, nonlinearity="relu", batch_first=bf),
    "lstm": lambda f, h, n, bf: nn.LSTM(f, h, n, batch_first=bf),
    "gru": lambda f, h, n, bf: nn.GRU(f, h, n, batch_first=bf),
}


class PlainForecaster(nn.Module):
    """What a user writes: a torch recurrent layer and a linear head, no state handling."""

    def __init__(
        self, cell: str, layers: int, batch_first: bool, features: int = 3, hidden: int = 5
    ):
        super().__init__()
        self.rnn = LAYER_OF[cell](features, hidden, layers, batch_first)
        self.head = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out)


def info_for(features: int = 3, task: str = "regression", name: str = "tiny") -> ModelInfo:
    """A ModelInfo with generated feature names (and a vocabulary for token models)."""
    vocabulary = tuple(f"tok{i}" for i in range(7)) if task == "next_token" else None
    return ModelInfo(
        name=name,
        task=task,
        features=tuple(f"f{i}" for i in range(features)),
        vocabulary=vocabulary,
    )


@pytest.fixture
def make_info() -> Callable[..., ModelInfo]:
    """Factory for a ModelInfo: make_info(features=3, task="regression")."""
    return info_for


@pytest.fixture
def plain_forecaster() -> Callable[..., PlainForecaster]:
    """Factory for a user-style module: plain_forecaster(cell, layers, batch_first)."""

    def build(
        cell: str, layers: int = 1, batch_first: bool = True, **kwargs: int
    ) -> PlainForecaster:
        torch.manual_seed(0)
        return PlainForecaster(cell, layers, batch_first, **kwargs)

    return build


@pytest.fixture(scope="session")
def onnx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder shared by the session's exports (each test names its own file)."""
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="session")
def exported_plain(onnx_dir: Path) -> Callable[[str, int, bool], tuple[PlainForecaster, Path]]:
    """exported_plain(cell, layers, batch_first) -> (module, path), each exported once per session.

    TorchScript keeps the many-configuration tests fast; the dynamo path has its own tests.
    """
    cache: dict[tuple[str, int, bool], tuple[PlainForecaster, Path]] = {}

    def get(cell: str, layers: int, batch_first: bool) -> tuple[PlainForecaster, Path]:
        key = (cell, layers, batch_first)
        if key not in cache:
            from export.onnx_export import export_onnx

            torch.manual_seed(layers)
            module = PlainForecaster(cell, layers, batch_first)
            path = onnx_dir / f"{cell}-{layers}-{'bf' if batch_first else 'tf'}.onnx"
            export_onnx(module, path, info_for(), exporter="torchscript", parity_sequences=4)
            cache[key] = (module, path)
        return cache[key]

    return get
