"""What cannot be served as a causal fixed-size step is refused with one line that says what to do."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import Tensor, nn

from export.onnx_export import export_onnx
from export.parity import check_graph_ops
from pipeline.errors import ExportError, ModelContractError, ParityError


class GrowingHistory(nn.Module):
    """Keeps every input seen so far: the state grows by one row per step."""

    def __init__(self) -> None:
        super().__init__()
        self.out = nn.Linear(3, 1)

    def initial_state(self, batch_size: int) -> tuple[Tensor, ...]:
        return (torch.zeros(batch_size, 1, 3),)

    def step(self, x: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
        history = torch.cat([state[0], x.unsqueeze(1)], dim=1)
        return self.out(history.mean(dim=1)), (history,)


class DoubleState(nn.Module):
    """A float32 model whose state is float64."""

    def __init__(self) -> None:
        super().__init__()
        self.out = nn.Linear(3, 1)

    def initial_state(self, batch_size: int) -> tuple[Tensor, ...]:
        return (torch.zeros(batch_size, 3, dtype=torch.float64),)

    def step(self, x: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
        return self.out(x), (state[0] + x.double(),)


class NoBatchAxis(nn.Module):
    """Its state ignores the batch size."""

    def __init__(self) -> None:
        super().__init__()
        self.out = nn.Linear(3, 1)

    def initial_state(self, batch_size: int) -> tuple[Tensor, ...]:
        return (torch.zeros(4),)

    def step(self, x: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
        return self.out(x), state


class SequenceDisagrees(nn.Module):
    """Its sequence path is not what its step computes, so parity must fail."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(3, 4, batch_first=True)
        self.out = nn.Linear(4, 1)

    def initial_state(self, batch_size: int) -> tuple[Tensor, ...]:
        return (torch.zeros(1, batch_size, 4),)

    def step(self, x: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
        out, h = self.rnn(x.unsqueeze(1), state[0].contiguous())
        return self.out(out[:, 0]), (h,)

    def run_sequence(
        self, xs: Tensor, state: tuple[Tensor, ...]
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        out, h = self.rnn(xs, state[0])
        return self.out(out) + 0.01, (h,)


def _refusal(model: nn.Module, info, tmp_path: Path, error: type[Exception] = ExportError) -> str:
    path = tmp_path / "refused.onnx"
    with pytest.raises(error) as caught:
        export_onnx(model, path, info, exporter="torchscript")
    assert not path.exists()
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_bidirectional_layer_is_refused_because_it_reads_the_future(
    make_info, tmp_path: Path
) -> None:
    class Bi(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.GRU(3, 4, bidirectional=True, batch_first=True)

        def forward(self, x: Tensor) -> Tensor:
            return self.rnn(x)[0]

    message = _refusal(Bi(), make_info(), tmp_path)
    assert "bidirectional" in message
    assert "use bidirectional=False" in message


def test_state_that_grows_with_the_sequence_is_refused(make_info, tmp_path: Path) -> None:
    message = _refusal(GrowingHistory(), make_info(), tmp_path)
    assert "changes shape from [3, 1, 3] to [3, 2, 3]" in message
    assert "fixed-size state" in message


def test_float64_weights_are_refused_with_the_cast_to_make(
    plain_forecaster, make_info, tmp_path: Path
) -> None:
    message = _refusal(plain_forecaster("gru").double(), make_info(), tmp_path)
    assert "float64" in message
    assert "model.float()" in message


def test_float64_state_is_refused(make_info, tmp_path: Path) -> None:
    message = _refusal(DoubleState(), make_info(), tmp_path)
    assert "state 0 is float64" in message


def test_state_without_a_batch_axis_is_refused(make_info, tmp_path: Path) -> None:
    message = _refusal(NoBatchAxis(), make_info(), tmp_path)
    assert "exactly one batch axis" in message


def test_module_without_recurrent_layers_or_step_is_refused(make_info, tmp_path: Path) -> None:
    message = _refusal(nn.Linear(3, 2), make_info(), tmp_path)
    assert "implement" in message
    assert "Steppable" in message


def test_graph_that_disagrees_with_pytorch_fails_parity_and_writes_nothing(
    make_info, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    message = _refusal(SequenceDisagrees(), make_info(), tmp_path, ParityError)
    assert "tolerance 1e-05" in message
    assert "output 'y'" in message


def test_graph_with_a_loop_breaks_the_contract() -> None:
    body = helper.make_graph([], "body", [], [])
    loop = helper.make_node("Loop", ["n", "c"], [], body=body)
    graph = helper.make_graph(
        [loop, helper.make_node("MatMul", ["a", "a"], ["b"])],
        "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 2])],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, [2, 2])],
    )
    with pytest.raises(ModelContractError, match="uses Loop"):
        check_graph_ops(helper.make_model(graph), source="m.onnx")


def test_graph_without_any_recurrent_arithmetic_breaks_the_contract() -> None:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["a"], ["b"])],
        "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, [2])],
    )
    with pytest.raises(ModelContractError, match="computes no recurrence"):
        check_graph_ops(onnx.helper.make_model(graph))
