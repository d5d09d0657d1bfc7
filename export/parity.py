"""Proof that the exported step graph computes what the PyTorch model computes.

`check_parity` draws a batch of sequences of *different* lengths. The
PyTorch reference runs each whole sequence: `run_sequence` when the model
has one, otherwise `step` in a PyTorch loop. onnxruntime then steps the
graph one time step at a time, the way the server does. At each step it
runs only the streams that still have input (a gather), and writes their
new state back (a scatter). Every prediction at every step, and every
stream's final state, must agree within `tolerance` (absolute), or
`ParityError` says where and by how much.

`check_graph_ops` enforces the contract's other half: the recurrence runs
in fused `LSTM`/`GRU`/`RNN` nodes or plain matrix products, never in a
`Loop` or `Scan`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import Tensor, nn

from export.signature import StepSignature, output_tuple
from pipeline.errors import ModelContractError, ParityError
from pipeline.model_spec import Normalization, Parity

DEFAULT_TOLERANCE = 1e-5
FORBIDDEN_OPS = frozenset({"Loop", "Scan"})
RECURRENT_OPS = frozenset({"LSTM", "GRU", "RNN", "MatMul", "Gemm"})


@dataclass(frozen=True)
class ParityData:
    """Parity inputs: `xs` `[sequences, max_steps, n_features]`, `lengths` `[sequences]`."""

    xs: np.ndarray
    lengths: np.ndarray


def sample_parity_data(
    signature: StepSignature,
    *,
    sequences: int,
    max_steps: int,
    seed: int = 0,
    normalization: Normalization | None = None,
    vocab_size: int | None = None,
) -> ParityData:
    """Random sequences in the model's raw input units, lengths spread over 1..max_steps.

    With training statistics, features are drawn around the training mean
    and spread, so the check exercises the range the model will serve.
    The first sequence always has the full `max_steps`.
    """
    if sequences < 1 or max_steps < 1:
        raise ParityError(
            f"parity needs at least one sequence and one step, got {sequences}, {max_steps}"
        )
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_steps + 1, size=sequences)
    lengths[0] = max_steps
    shape = (sequences, max_steps, signature.n_features)
    if signature.input_dtype == torch.int64:
        xs = rng.integers(0, vocab_size or 1, size=shape).astype(np.int64)
    else:
        xs = rng.standard_normal(shape)
        if normalization is not None:
            xs = xs * np.asarray(normalization.std) + np.asarray(normalization.mean)
        xs = xs.astype(np.float32)
    return ParityData(xs=xs, lengths=lengths.astype(np.int64))


def check_graph_ops(model: onnx.ModelProto, source: str = "model") -> frozenset[str]:
    """Return the graph's op types; ModelContractError on Loop/Scan or no recurrent arithmetic."""
    ops = frozenset(_op_types(model))
    forbidden = sorted(ops & FORBIDDEN_OPS)
    if forbidden:
        raise ModelContractError(
            f"{source}: the graph uses {', '.join(forbidden)}; a step graph must run the recurrence "
            "in fused LSTM/GRU/RNN nodes or plain MatMul/Gemm (export with sequence length 1)"
        )
    if not ops & RECURRENT_OPS:
        raise ModelContractError(
            f"{source}: the graph has no LSTM, GRU, RNN, MatMul or Gemm node, so it computes no "
            "recurrence; export the model's step, not a constant"
        )
    return ops


def check_parity(
    model: nn.Module,
    graph: onnx.ModelProto | str,
    signature: StepSignature,
    data: ParityData,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    source: str = "model",
) -> Parity:
    """Compare PyTorch with onnxruntime over `data`; return what was measured or raise ParityError."""
    session = _session(graph)
    _check_io_names(session, signature, source)
    reference = _reference(model, signature, data)
    onnx_outputs, onnx_states = _step_onnx(session, signature, data)

    worst = 0.0
    worst_where = ""
    for n, length in enumerate(data.lengths.tolist()):
        ref_outputs, ref_states = reference[n]
        for j, name in enumerate(signature.output_names):
            got = onnx_outputs[j][n, :length]
            err = np.abs(got - ref_outputs[j]).max(axis=tuple(range(1, got.ndim)))
            step = int(err.argmax())
            if err[step] > worst:
                worst, worst_where = (
                    float(err[step]),
                    f"output '{name}' of sequence {n} at step {step}",
                )
        for i, name in enumerate(signature.state_names):
            err_s = float(np.abs(onnx_states[i][n] - ref_states[i]).max())
            if err_s > worst:
                worst, worst_where = (
                    err_s,
                    f"final state '{name}' of sequence {n} (length {length})",
                )
    if not worst <= tolerance:  # written so that NaN fails too
        raise ParityError(
            f"{source}: ONNX and PyTorch differ by {worst:.3g} (tolerance {tolerance:g}) in "
            f"{worst_where}; the exported step does not reproduce the model"
        )
    return Parity(
        max_abs_error=worst,
        tolerance=tolerance,
        sequences=int(data.lengths.size),
        max_steps=int(data.lengths.max()),
    )


def _session(graph: onnx.ModelProto | str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    # One thread: parity is about numbers, and small graphs run fastest without a pool.
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    payload = graph.SerializeToString() if isinstance(graph, onnx.ModelProto) else graph
    return ort.InferenceSession(payload, options, providers=["CPUExecutionProvider"])


def _check_io_names(session: ort.InferenceSession, sig: StepSignature, source: str) -> None:
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    want_in = ["x", *sig.state_names]
    want_out = [*sig.output_names, *(f"{s}_out" for s in sig.state_names)]
    if inputs != want_in or outputs != want_out:
        raise ModelContractError(
            f"{source}: graph inputs {inputs} / outputs {outputs}, the model needs {want_in} / "
            f"{want_out}; re-export it from this model"
        )


def _reference(
    model: nn.Module, sig: StepSignature, data: ParityData
) -> list[tuple[list[np.ndarray], list[np.ndarray]]]:
    """Per sequence: outputs `[length, *shape]` per output, final state per state (batch axis removed)."""
    use_sequence = callable(getattr(model, "run_sequence", None)) and getattr(
        model, "has_sequence_output", True
    )
    was_training = model.training
    model.eval()
    results = []
    try:
        with torch.no_grad():
            for n, length in enumerate(data.lengths.tolist()):
                xs = torch.from_numpy(data.xs[n : n + 1, :length])
                state = tuple(model.initial_state(1))
                if use_sequence:
                    ys, state = model.run_sequence(xs, state)
                    outputs = [y[0] for y in output_tuple(ys)]
                else:
                    per_step: list[tuple[Tensor, ...]] = []
                    for t in range(length):
                        y, state = model.step(xs[:, t], state)
                        per_step.append(output_tuple(y))
                    outputs = [torch.cat([s[j] for s in per_step]) for j in range(len(per_step[0]))]
                states = [
                    s.select(axis, 0) for s, axis in zip(state, sig.state_batch_axes, strict=True)
                ]
                results.append(([o.numpy() for o in outputs], [s.numpy() for s in states]))
    finally:
        model.train(was_training)
    return results


def _step_onnx(
    session: ort.InferenceSession, sig: StepSignature, data: ParityData
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    count, max_steps = data.lengths.size, int(data.lengths.max())
    states = [np.zeros((count, *shape), dtype=np.float32) for shape in sig.state_shapes]
    outputs = [
        np.zeros((count, max_steps, *shape), dtype=np.float32) for shape in sig.output_shapes
    ]
    out_names = [*sig.output_names, *(f"{s}_out" for s in sig.state_names)]
    for t, active in _active_rows(data.lengths):
        feed = {"x": data.xs[active, t]}
        feed.update({name: states[i][active] for i, name in enumerate(sig.state_names)})
        results = session.run(out_names, feed)
        for j in range(len(outputs)):
            outputs[j][active, t] = results[j]
        for i in range(len(states)):
            states[i][active] = results[len(outputs) + i]
    return outputs, states


def _active_rows(lengths: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    for t in range(int(lengths.max())):
        yield t, np.nonzero(lengths > t)[0]


def _op_types(model: onnx.ModelProto) -> Iterator[str]:
    def walk(graph: onnx.GraphProto) -> Iterator[str]:
        for node in graph.node:
            yield node.op_type
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    yield from walk(attr.g)
                for sub in attr.graphs:
                    yield from walk(sub)

    yield from walk(model.graph)
    for function in model.functions:
        for node in function.node:
            yield node.op_type
