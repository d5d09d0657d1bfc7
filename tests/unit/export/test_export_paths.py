"""The two torch exporters, our own models for each task, and raw units in the graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export.info import ModelInfo
from export.models import NetConfig, RecurrentNet
from export.onnx_export import export_onnx
from pipeline.errors import ExportError
from pipeline.model_spec import Normalization


def _net(cell: str, task: str = "regression", **kw: object) -> RecurrentNet:
    torch.manual_seed(0)
    features = 1 if task == "next_token" else 3
    outputs = {"regression": 3, "classification": 4, "next_token": 7}[task]
    return RecurrentNet(
        NetConfig(cell=cell, task=task, n_features=features, n_outputs=outputs, hidden=6, **kw)
    )


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_dynamo_exports_lstm_and_gru_as_fused_nodes_with_parity(
    cell: str, make_info, onnx_dir: Path
) -> None:
    path = onnx_dir / f"dynamo-{cell}.onnx"
    spec = export_onnx(_net(cell, layers=2), path, make_info(), exporter="dynamo")
    assert spec.export["exporter"] == "dynamo"
    assert cell.upper() in {n.op_type for n in onnx.load(str(path)).graph.node}
    assert spec.parity is not None
    assert spec.parity.max_abs_error <= 1e-5


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_user_module_exports_through_dynamo_too(
    cell: str, plain_forecaster, make_info, onnx_dir: Path
) -> None:
    spec = export_onnx(
        plain_forecaster(cell, 1, False),
        onnx_dir / f"user-dyn-{cell}.onnx",
        make_info(),
        exporter="dynamo",
    )
    assert spec.export["exporter"] == "dynamo"
    assert spec.parity is not None
    assert spec.parity.max_abs_error <= 1e-5


def test_auto_exporter_takes_torchscript_for_an_elman_rnn(make_info, onnx_dir: Path) -> None:
    spec = export_onnx(_net("rnn_relu"), onnx_dir / "auto-rnn.onnx", make_info())
    assert spec.export["exporter"] == "torchscript"


def test_dynamo_exporter_is_refused_for_an_elman_rnn_with_the_alternative_named(
    make_info, onnx_dir: Path
) -> None:
    with pytest.raises(ExportError, match="exporter='torchscript'"):
        export_onnx(_net("rnn_tanh"), onnx_dir / "never.onnx", make_info(), exporter="dynamo")


def test_classifier_graph_returns_probabilities_that_sum_to_one(onnx_dir: Path) -> None:
    info = ModelInfo(name="cls", task="classification", features=("a", "b", "c"))
    path = onnx_dir / "cls.onnx"
    export_onnx(_net("gru", "classification"), path, info, exporter="torchscript")
    session = ort.InferenceSession(str(path))
    probs, _ = session.run(
        None, {"x": np.ones((5, 3), np.float32), "h": np.zeros((5, 1, 6), np.float32)}
    )
    assert probs.shape == (5, 4)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)


def test_token_model_takes_int64_ids_and_records_its_vocabulary(make_info, onnx_dir: Path) -> None:
    path = onnx_dir / "tok.onnx"
    spec = export_onnx(
        _net("gru", "next_token"),
        path,
        make_info(features=1, task="next_token"),
        exporter="torchscript",
    )
    session = ort.InferenceSession(str(path))
    assert session.get_inputs()[0].type == "tensor(int64)"
    assert spec.input.dtype == "int64"
    assert spec.input.vocabulary == tuple(f"tok{i}" for i in range(7))
    probs, _ = session.run(
        None, {"x": np.array([[3], [6]], np.int64), "h": np.zeros((2, 1, 6), np.float32)}
    )
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)


def test_graph_takes_raw_units_and_returns_raw_units(onnx_dir: Path) -> None:
    net = _net("lstm", residual=True)
    net.set_normalization(
        torch.tensor([100.0, -50.0, 3.0]),
        torch.tensor([10.0, 5.0, 0.5]),
        torch.tensor([1.0, 2.0, 3.0]),
        torch.tensor([4.0, 5.0, 6.0]),
    )
    norm = Normalization(mean=(100.0, -50.0, 3.0), std=(10.0, 5.0, 0.5))
    info = ModelInfo(name="raw", task="regression", features=("a", "b", "c"), normalization=norm)
    path = onnx_dir / "raw.onnx"
    export_onnx(net, path, info, exporter="torchscript")
    x = np.array([[105.0, -52.0, 3.2]], np.float32)
    zeros = np.zeros((1, 1, 6), np.float32)
    y, *_ = ort.InferenceSession(str(path)).run(None, {"x": x, "h": zeros, "c": zeros})
    with torch.no_grad():
        expected, _ = net.step(torch.from_numpy(x), net.initial_state(1))
    np.testing.assert_allclose(y, expected.numpy(), atol=1e-5)
    # Raw units out: the forecast sits near the raw input, not near 0 as a normalised one would.
    assert abs(float(y[0, 0]) - 105.0) < 60.0


def test_opset_below_17_is_refused(make_info, onnx_dir: Path) -> None:
    with pytest.raises(ExportError, match="opset >= 17"):
        export_onnx(_net("gru"), onnx_dir / "old.onnx", make_info(), opset=16)
