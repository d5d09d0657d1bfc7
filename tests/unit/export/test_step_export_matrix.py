"""Every torch recurrent cell, stacked 1 or 2 deep, either batch layout, served at batch 1 and 37."""

from __future__ import annotations

import onnx
import pytest
import torch

from export.adapter import as_steppable
from export.parity import check_parity, sample_parity_data
from export.signature import inspect_step

CELLS = ("rnn_tanh", "rnn_relu", "lstm", "gru")
FUSED_OP = {"rnn_tanh": "RNN", "rnn_relu": "RNN", "lstm": "LSTM", "gru": "GRU"}


@pytest.mark.parametrize("batch", [1, 37])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "time_first"])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("cell", CELLS)
def test_stepping_the_graph_reproduces_the_module_within_1e_5(
    cell: str, layers: int, batch_first: bool, batch: int, exported_plain
) -> None:
    module, path = exported_plain(cell, layers, batch_first)
    steppable = as_steppable(module)
    signature = inspect_step(
        steppable,
        n_features=3,
        input_dtype=torch.float32,
        vocab_size=None,
        default_output_names=("y",),
    )
    data = sample_parity_data(signature, sequences=batch, max_steps=12, seed=batch)
    parity = check_parity(steppable, onnx.load(str(path)), signature, data)
    assert parity.max_abs_error <= 1e-5
    assert parity.sequences == batch


@pytest.mark.parametrize("cell", CELLS)
def test_graph_runs_the_recurrence_in_the_fused_onnx_operator(cell: str, exported_plain) -> None:
    _, path = exported_plain(cell, 2, True)
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert FUSED_OP[cell] in ops
    assert not ops & {"Loop", "Scan"}


@pytest.mark.parametrize("cell", CELLS)
def test_every_graph_tensor_has_a_dynamic_batch_named_batch_on_axis_0(
    cell: str, exported_plain
) -> None:
    _, path = exported_plain(cell, 2, False)
    graph = onnx.load(str(path)).graph
    for value in [*graph.input, *graph.output]:
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch", value.name


def test_lstm_states_are_batch_first_in_the_graph_even_for_a_time_first_module(
    exported_plain,
) -> None:
    _, path = exported_plain("lstm", 2, False)
    graph = onnx.load(str(path)).graph
    shapes = {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in [*graph.input, *graph.output]
    }
    assert shapes == {
        "x": ["batch", 3],
        "h": ["batch", 2, 5],
        "c": ["batch", 2, 5],
        "y": ["batch", 2],
        "h_out": ["batch", 2, 5],
        "c_out": ["batch", 2, 5],
    }
