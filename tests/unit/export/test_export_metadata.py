"""The ModelSpec written by export reads back the same through onnx and through onnxruntime."""

from __future__ import annotations

from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch

from export.checkpoint import weights_sha256
from export.info import ModelInfo, OutputInfo
from export.models import NetConfig, RecurrentNet
from export.onnx_export import export_onnx
from pipeline.model_spec import ModelSpec, Normalization


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[RecurrentNet, ModelSpec, Path]:
    torch.manual_seed(0)
    net = RecurrentNet(
        NetConfig(cell="gru", task="classification", n_features=2, n_outputs=3, hidden=4, layers=2)
    )
    info = ModelInfo(
        name="gru-meta",
        version="7",
        task="classification",
        features=("lpc_1", "lpc_2"),
        outputs=(OutputInfo(meaning="class probabilities", labels=("a", "b", "c")),),
        normalization=Normalization(mean=(0.0, 0.0), std=(1.0, 1.0)),
    )
    path = tmp_path_factory.mktemp("meta") / "gru-meta.onnx"
    spec = export_onnx(net, path, info, exporter="torchscript")
    return net, spec, path


def test_metadata_read_with_onnx_equals_the_spec_export_returned(exported) -> None:
    _, spec, path = exported
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert ModelSpec.from_metadata(props) == spec


def test_metadata_read_with_onnxruntime_equals_the_spec_export_returned(exported) -> None:
    _, spec, path = exported
    props = ort.InferenceSession(str(path)).get_modelmeta().custom_metadata_map
    assert ModelSpec.from_metadata(props) == spec


def test_metadata_describes_the_model(exported) -> None:
    net, spec, _ = exported
    assert spec.identity == f"gru-meta@7#{weights_sha256(net)[:16]}"
    assert (spec.task, spec.cell) == ("classification", "gru")
    assert spec.input.features == ("lpc_1", "lpc_2")
    assert [(s.name, s.output, s.shape) for s in spec.states] == [("h", "h_out", (2, 4))]
    assert [(o.name, o.shape, o.labels) for o in spec.outputs] == [("probs", (3,), ("a", "b", "c"))]
    assert spec.normalization == Normalization(mean=(0.0, 0.0), std=(1.0, 1.0))


def test_metadata_records_measured_parity_and_the_exporter(exported) -> None:
    _, spec, _ = exported
    assert spec.parity is not None
    assert 0.0 <= spec.parity.max_abs_error <= spec.parity.tolerance == 1e-5
    assert (spec.parity.sequences, spec.parity.max_steps) == (16, 24)
    assert spec.export["exporter"] == "torchscript"
    assert spec.export["opset"] == "18"
    assert spec.export["torch"] == torch.__version__
