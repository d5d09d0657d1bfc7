"""Models that are not ours: a plain module on nn.LSTM, and one written to the step protocol."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor, nn

from export.adapter import as_steppable
from export.onnx_export import export_onnx
from export.protocol import Steppable
from export.signature import inspect_step


class LastStepClassifier(nn.Module):
    """A user's sequence classifier: it returns only the last step's logits."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(x)
        return torch.softmax(self.head(out[:, -1]), dim=-1)


class TwoStacks(nn.Module):
    """Two separate recurrent layers in a row, a GRU then an LSTM, returning (y, extra)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.GRU(3, 5)
        self.second = nn.LSTM(5, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        a, _ = self.first(x)
        b, _ = self.second(a)
        return self.head(b), b


class SmoothedCell(nn.Module):
    """Written to the step protocol by hand: a GRU cell whose state is [hidden, batch]."""

    state_names = ("memory",)
    output_names = ("score",)

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.cell = nn.GRUCell(2, 6)
        self.out = nn.Linear(6, 1)

    def initial_state(self, batch_size: int) -> tuple[Tensor, ...]:
        return (torch.zeros(6, batch_size),)

    def step(self, x: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
        h = self.cell(x, state[0].T)
        return self.out(h), (h.T,)


def test_plain_lstm_module_exports_without_changes(
    plain_forecaster, make_info, tmp_path: Path
) -> None:
    module = plain_forecaster("lstm", 1, True)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    spec = export_onnx(module, tmp_path / "user.onnx", make_info(), exporter="torchscript")
    assert spec.parity is not None
    assert spec.parity.max_abs_error <= 1e-5
    assert [s.name for s in spec.states] == ["h", "c"]
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_module_with_a_last_step_head_is_stepped_and_matches(make_info, tmp_path: Path) -> None:
    torch.manual_seed(0)
    info = make_info(features=4, task="classification")
    spec = export_onnx(LastStepClassifier(), tmp_path / "last.onnx", info, exporter="torchscript")
    assert spec.outputs[0].shape == (3,)
    assert spec.parity is not None
    assert spec.parity.max_abs_error <= 1e-5


def test_several_recurrent_layers_each_carry_their_own_state(make_info, tmp_path: Path) -> None:
    torch.manual_seed(0)
    spec = export_onnx(TwoStacks(), tmp_path / "two.onnx", make_info(), exporter="torchscript")
    assert [(s.name, s.shape) for s in spec.states] == [
        ("h0", (1, 5)),
        ("h1", (1, 4)),
        ("c1", (1, 4)),
    ]
    assert spec.cell == "custom"
    assert spec.parity is not None
    assert spec.parity.max_abs_error <= 1e-5


def test_hand_written_steppable_satisfies_the_protocol() -> None:
    assert isinstance(SmoothedCell(), Steppable)
    assert isinstance(as_steppable(nn.GRU(2, 3)), Steppable)


def test_state_batch_axis_is_found_wherever_the_model_keeps_it() -> None:
    signature = inspect_step(
        SmoothedCell(),
        n_features=2,
        input_dtype=torch.float32,
        vocab_size=None,
        default_output_names=("y",),
    )
    assert signature.state_batch_axes == (1,)
    assert signature.state_shapes == ((6,),)


def test_hand_written_steppable_exports_with_its_state_moved_to_batch_first(
    make_info, tmp_path: Path
) -> None:
    model = SmoothedCell()
    path = tmp_path / "custom.onnx"
    spec = export_onnx(model, path, make_info(features=2), exporter="dynamo")
    assert spec.parity is not None
    assert spec.parity.max_abs_error <= 1e-5
    session = ort.InferenceSession(str(path))
    assert [i.name for i in session.get_inputs()] == ["x", "memory"]
    x = np.random.default_rng(0).standard_normal((4, 2)).astype(np.float32)
    score, memory = session.run(None, {"x": x, "memory": np.zeros((4, 6), np.float32)})
    with torch.no_grad():
        expected, (h,) = model.step(torch.from_numpy(x), model.initial_state(4))
    np.testing.assert_allclose(score, expected.numpy(), atol=1e-5)
    np.testing.assert_allclose(memory, h.T.numpy(), atol=1e-5)


def test_package_lists_its_public_api_sorted_and_every_name_resolves() -> None:
    import export

    assert export.__all__ == sorted(export.__all__)
    assert all(getattr(export, name) is not None for name in export.__all__)
