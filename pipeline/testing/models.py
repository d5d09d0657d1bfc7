"""Small recurrent models for tests: in numpy, and as real step-contract ONNX files.

- `random_weights(...)` draws a small recurrent model (Elman RNN, GRU or LSTM,
  one or more layers, regression / classification / next-token head) in the
  ONNX operators' weight layout;
- `NumpyStepModel(weights)` steps it in numpy: a `StepModel` without onnxruntime;
- `write_onnx_step(weights, path)` writes the same model as a real step-contract
  ONNX file (fused `RNN`/`GRU`/`LSTM` nodes between batch-first transposes,
  metadata included), built with `onnx.helper` — the same numbers, so tests can
  compare onnxruntime against numpy.

`write_onnx_step` needs the `onnx` package (in the `export` and test extras,
not in the serving image); it is imported only when called.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from pipeline.model_spec import InputSpec, ModelSpec, OutputSpec, StateSpec

F32 = NDArray[np.float32]
_GATES = {"rnn": 1, "gru": 3, "lstm": 4}


@dataclass(frozen=True)
class LayerWeights:
    """One layer in ONNX layout: W `[1, G*H, in]`, R `[1, G*H, H]`, B `[1, 2*G*H]`."""

    w: F32
    r: F32
    b: F32


@dataclass(frozen=True)
class StepWeights:
    """A whole small model: optional token embedding, recurrent layers, linear head."""

    spec: ModelSpec
    cell: str
    hidden: int
    layers: tuple[LayerWeights, ...]
    head_w: F32  # [hidden, n_outputs]
    head_b: F32  # [n_outputs]
    embedding: F32 | None = None  # [vocabulary, embedding_dim] for next-token models


def random_weights(
    cell: str = "gru",
    *,
    n_features: int = 3,
    hidden: int = 8,
    layers: int = 1,
    n_outputs: int = 2,
    task: str = "regression",
    vocabulary: Sequence[str] | None = None,
    embedding_dim: int = 4,
    name: str | None = None,
    version: str = "1",
    seed: int = 0,
) -> StepWeights:
    """Draw a model; `task="next_token"` takes int64 token ids and predicts the vocabulary."""
    if cell not in _GATES:
        raise ValueError(f"cell must be one of {sorted(_GATES)}, got {cell!r}")
    rng = np.random.default_rng(seed)
    gates = _GATES[cell]
    scale = 1.0 / np.sqrt(hidden)

    def draw(*shape: int) -> F32:
        return rng.uniform(-scale, scale, size=shape).astype(np.float32)

    embedding = None
    if task == "next_token":
        vocab = tuple(vocabulary or [f"t{i}" for i in range(10)])
        embedding = draw(len(vocab), embedding_dim)
        input_spec = InputSpec(features=("token",), dtype="int64", vocabulary=vocab)
        n_outputs, in_size = len(vocab), embedding_dim
    else:
        input_spec = InputSpec(features=tuple(f"f{i}" for i in range(n_features)))
        in_size = n_features
    stack = []
    for layer in range(layers):
        size = in_size if layer == 0 else hidden
        stack.append(
            LayerWeights(
                w=draw(1, gates * hidden, size),
                r=draw(1, gates * hidden, hidden),
                b=draw(1, 2 * gates * hidden),
            )
        )
    head_w, head_b = draw(hidden, n_outputs), draw(n_outputs)
    digest = hashlib.sha256()
    for array in [*(a for lw in stack for a in (lw.w, lw.r, lw.b)), head_w, head_b]:
        digest.update(array.tobytes())
    states = [StateSpec(name="h", output="h_out", shape=(layers, hidden))]
    if cell == "lstm":
        states.append(StateSpec(name="c", output="c_out", shape=(layers, hidden)))
    output_name = "y" if task == "regression" else "probs"
    labels = input_spec.vocabulary if task == "next_token" else None
    spec = ModelSpec(
        name=name or f"test-{cell}",
        version=version,
        task=task,
        cell=cell,
        weights_sha256=digest.hexdigest(),
        input=input_spec,
        states=tuple(states),
        outputs=(OutputSpec(name=output_name, shape=(n_outputs,), meaning=task, labels=labels),),
        export={"exporter": "pipeline.testing"},
    )
    return StepWeights(spec, cell, hidden, tuple(stack), head_w, head_b, embedding)


def _sigmoid(v: NDArray[np.float64]) -> NDArray[np.float64]:
    return 1.0 / (1.0 + np.exp(-v))


class NumpyStepModel:
    """A `StepModel` in numpy, following the ONNX operators' equations (float64 inside).

    GRU uses `linear_before_reset=1` (PyTorch's GRU); LSTM gate order is i, o, f, c.
    """

    def __init__(self, weights: StepWeights) -> None:
        self.weights = weights
        self.calls = 0  # how many times step ran: tests count ORT calls through it

    @property
    def spec(self) -> ModelSpec:
        """The model's contract metadata."""
        return self.weights.spec

    def step(self, x: NDArray[Any], states: Sequence[F32]) -> tuple[dict[str, F32], list[F32]]:
        """One step for a batch; inputs are never mutated."""
        self.calls += 1
        wt = self.weights
        if wt.embedding is not None:
            inp = wt.embedding[np.asarray(x)[:, 0]].astype(np.float64)
        else:
            inp = np.asarray(x, dtype=np.float64)
        h = np.asarray(states[0], dtype=np.float64)
        c = np.asarray(states[1], dtype=np.float64) if wt.cell == "lstm" else None
        new_h, new_c = np.empty_like(h), None if c is None else np.empty_like(c)
        for index, layer in enumerate(wt.layers):
            hl = h[:, index, :]
            cl = None if c is None else c[:, index, :]
            hl, cl = self._cell(layer, inp, hl, cl)
            new_h[:, index, :] = hl
            if new_c is not None and cl is not None:
                new_c[:, index, :] = cl
            inp = hl
        logits = inp @ wt.head_w + wt.head_b
        if wt.spec.task != "regression":
            shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
            logits = shifted / shifted.sum(axis=-1, keepdims=True)
        out_states = [new_h.astype(np.float32)]
        if new_c is not None:
            out_states.append(new_c.astype(np.float32))
        return {wt.spec.outputs[0].name: logits.astype(np.float32)}, out_states

    def _cell(
        self,
        layer: LayerWeights,
        x: NDArray[np.float64],
        h: NDArray[np.float64],
        c: NDArray[np.float64] | None,
    ) -> tuple[NDArray[np.float64], NDArray[np.float64] | None]:
        hidden = self.weights.hidden
        w, r = layer.w[0].astype(np.float64), layer.r[0].astype(np.float64)
        gates = w.shape[0]
        wb, rb = layer.b[0, :gates].astype(np.float64), layer.b[0, gates:].astype(np.float64)
        xw = x @ w.T + wb
        hr = h @ r.T + rb
        if self.weights.cell == "rnn":
            return np.tanh(xw + hr), None
        if self.weights.cell == "gru":
            z = _sigmoid(xw[:, :hidden] + hr[:, :hidden])
            reset = _sigmoid(xw[:, hidden : 2 * hidden] + hr[:, hidden : 2 * hidden])
            n = np.tanh(xw[:, 2 * hidden :] + reset * hr[:, 2 * hidden :])
            return (1.0 - z) * n + z * h, None
        if c is None:
            raise ValueError("an LSTM step needs the cell state c")
        pre = xw + hr
        i = _sigmoid(pre[:, :hidden])
        o = _sigmoid(pre[:, hidden : 2 * hidden])
        f = _sigmoid(pre[:, 2 * hidden : 3 * hidden])
        cand = np.tanh(pre[:, 3 * hidden :])
        new_c = f * c + i * cand
        return o * np.tanh(new_c), new_c


def write_onnx_step(weights: StepWeights, path: str | Path, opset: int = 17) -> Path:
    """Write `weights` as a step-contract ONNX file (batch on axis 0 everywhere)."""
    import onnx  # not a serving dependency: only tests and export build graphs
    from onnx import TensorProto, helper, numpy_helper

    spec, cell, hidden = weights.spec, weights.cell, weights.hidden
    n_layers = len(weights.layers)
    inits = [
        numpy_helper.from_array(weights.head_w, "head_w"),
        numpy_helper.from_array(weights.head_b, "head_b"),
        numpy_helper.from_array(np.array([0], dtype=np.int64), "axis0"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
    ]
    nodes = []
    x_type = TensorProto.INT64 if spec.input.dtype == "int64" else TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("x", x_type, ["batch", len(spec.input.features)])]
    if weights.embedding is not None:
        inits.append(numpy_helper.from_array(weights.embedding, "embedding"))
        nodes += [
            helper.make_node("Gather", ["embedding", "x"], ["embedded"], axis=0),
            helper.make_node("Squeeze", ["embedded", "axis1"], ["features"]),
        ]
        nodes.append(helper.make_node("Unsqueeze", ["features", "axis0"], ["seq0"]))
    else:
        nodes.append(helper.make_node("Unsqueeze", ["x", "axis0"], ["seq0"]))
    state_names = [s.name for s in spec.states]
    for name in state_names:
        # [batch, layers, hidden] -> [layers, batch, hidden]: the ONNX operators' layout.
        inputs.append(
            helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", n_layers, hidden])
        )
        nodes.append(helper.make_node("Transpose", [name], [f"{name}_t"], perm=[1, 0, 2]))
        if n_layers > 1:
            inits.append(
                numpy_helper.from_array(np.ones(n_layers, dtype=np.int64), f"{name}_split")
            )
            parts = [f"{name}_l{i}" for i in range(n_layers)]
            nodes.append(helper.make_node("Split", [f"{name}_t", f"{name}_split"], parts, axis=0))
        else:
            nodes.append(helper.make_node("Identity", [f"{name}_t"], [f"{name}_l0"]))
    layer_in = "seq0"
    for i, layer in enumerate(weights.layers):
        inits += [
            numpy_helper.from_array(layer.w, f"w{i}"),
            numpy_helper.from_array(layer.r, f"r{i}"),
            numpy_helper.from_array(layer.b, f"b{i}"),
        ]
        ins = [layer_in, f"w{i}", f"r{i}", f"b{i}", "", f"h_l{i}"]
        outs = [f"y{i}", f"h_new{i}"]
        attrs: dict[str, Any] = {"hidden_size": hidden}
        if cell == "lstm":
            ins.append(f"c_l{i}")
            outs.append(f"c_new{i}")
        if cell == "gru":
            attrs["linear_before_reset"] = 1
        nodes.append(helper.make_node(cell.upper(), ins, outs, **attrs))
        nodes.append(helper.make_node("Squeeze", [f"y{i}", "axis1"], [f"seq{i + 1}"]))
        layer_in = f"seq{i + 1}"
    outputs = []
    for state in spec.states:
        prefix = "h_new" if state.name == "h" else "c_new"
        nodes.append(
            helper.make_node(
                "Concat", [f"{prefix}{i}" for i in range(n_layers)], [f"{state.name}_cat"], axis=0
            )
        )
        nodes.append(
            helper.make_node("Transpose", [f"{state.name}_cat"], [state.output], perm=[1, 0, 2])
        )
        outputs.append(
            helper.make_tensor_value_info(
                state.output, TensorProto.FLOAT, ["batch", n_layers, hidden]
            )
        )
    out = spec.outputs[0]
    nodes.append(helper.make_node("Squeeze", [f"h_new{n_layers - 1}", "axis0"], ["top"]))
    nodes.append(helper.make_node("MatMul", ["top", "head_w"], ["logits_w"]))
    logits = out.name if spec.task == "regression" else "logits"
    nodes.append(helper.make_node("Add", ["logits_w", "head_b"], [logits]))
    if spec.task != "regression":
        nodes.append(helper.make_node("Softmax", [logits], [out.name], axis=-1))
    outputs.insert(
        0, helper.make_tensor_value_info(out.name, TensorProto.FLOAT, ["batch", *out.shape])
    )
    graph = helper.make_graph(nodes, spec.name, inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9  # readable by every onnxruntime this project supports
    helper.set_model_props(model, spec.to_metadata())
    onnx.checker.check_model(model)
    target = Path(path)
    onnx.save(model, str(target))
    return target
