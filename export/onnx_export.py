"""Export a steppable PyTorch model as one ONNX step graph, checked and labelled.

`export_onnx(model, path, info)` does, in order:

1. Wraps a plain module built on `nn.LSTM`/`nn.GRU`/`nn.RNN` with
   `as_steppable`, unless the model already implements the step protocol.
2. Probes the model (`export.signature.inspect_step`). This refuses what
   cannot stream and finds each state's batch axis.
3. Traces `_StepGraph`, a thin module that moves every state's batch axis
   to 0 at the graph's edges. It uses the dynamo exporter or the
   TorchScript one, with a batch of 3 and the batch axis dynamic.
4. Checks the ops (no `Loop`/`Scan`) and measures parity against PyTorch
   (`export.parity`); a `ParityError` leaves no file behind.
5. Writes the `ModelSpec` metadata (`pipeline.model_spec`) and saves.

Which exporter (`exporter="auto"`): torch 2.15's dynamo path has no
translation for `nn.RNN`, so a model with an Elman layer goes through
TorchScript. Everything else tries dynamo first and falls back to
TorchScript if dynamo fails. The metadata records which one made the file.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import onnx
import torch
from torch import Tensor, nn

from export.adapter import as_steppable
from export.checkpoint import weights_sha256
from export.info import ModelInfo
from export.parity import DEFAULT_TOLERANCE, check_graph_ops, check_parity, sample_parity_data
from export.signature import StepSignature, example_input, inspect_step, output_tuple
from pipeline.errors import ExportError, HiddenstateError
from pipeline.model_spec import InputSpec, ModelSpec, OutputSpec, StateSpec

EXPORTERS = ("auto", "dynamo", "torchscript")
DEFAULT_OPSET = 18
_EXAMPLE_BATCH = 3  # > 1, or some exporters bake a batch of 1 into the state shapes
_BATCH = "batch"


class _StepGraph(nn.Module):
    """The traced module: batch-first tensors at the edges, the model's own layout inside."""

    def __init__(self, model: nn.Module, signature: StepSignature) -> None:
        super().__init__()
        self.model = model
        self.axes = signature.state_batch_axes

    def forward(self, x: Tensor, *states: Tensor) -> tuple[Tensor, ...]:
        # contiguous(): fused kernels want dense states, and the dynamo exporter's
        # shape check on nn.LSTM/nn.GRU refuses the strided views movedim makes.
        native = tuple(s.movedim(0, a).contiguous() for s, a in zip(states, self.axes, strict=True))
        y, new_state = self.model.step(x, native)
        moved = tuple(s.movedim(a, 0) for s, a in zip(new_state, self.axes, strict=True))
        return (*output_tuple(y), *moved)


def export_onnx(
    model: nn.Module,
    path: str | Path,
    info: ModelInfo,
    *,
    exporter: str = "auto",
    opset: int = DEFAULT_OPSET,
    parity_sequences: int = 16,
    parity_max_steps: int = 24,
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int = 0,
) -> ModelSpec:
    """Export `model`'s single step to `path` (ONNX) with its metadata; return the spec written.

    Raises ExportError when the model cannot be exported as a causal step, and
    ParityError when the graph does not reproduce PyTorch within `tolerance`.
    In both cases no file is written.
    """
    if exporter not in EXPORTERS:
        raise ExportError(f"exporter {exporter!r} is not one of {', '.join(EXPORTERS)}")
    if opset < 17:
        raise ExportError(f"opset {opset} is too old: the step contract needs opset >= 17")
    path = Path(path)
    token = info.task == "next_token"
    input_dtype = torch.int64 if token else torch.float32
    vocab_size = len(info.vocabulary) if info.vocabulary else None
    if not (
        callable(getattr(model, "step", None)) and callable(getattr(model, "initial_state", None))
    ):
        model = as_steppable(model, n_features=len(info.features), input_dtype=input_dtype)
    default_outputs = ("y",) if info.task == "regression" else ("probs",)
    signature = inspect_step(
        model,
        n_features=len(info.features),
        input_dtype=input_dtype,
        vocab_size=vocab_size,
        default_output_names=default_outputs,
    )
    was_training = model.training
    model.eval()
    try:
        graph, used = _trace(model, signature, exporter, opset, vocab_size)
        ops = check_graph_ops(graph, source=str(path))
        data = sample_parity_data(
            signature,
            sequences=parity_sequences,
            max_steps=parity_max_steps,
            seed=seed,
            normalization=info.normalization,
            vocab_size=vocab_size,
        )
        parity = check_parity(model, graph, signature, data, tolerance=tolerance, source=str(path))
    finally:
        model.train(was_training)

    spec = ModelSpec(
        name=info.name,
        version=info.version,
        task=info.task,
        cell=str(getattr(model, "cell", "custom")),
        weights_sha256=weights_sha256(model),
        input=InputSpec(
            features=info.features,
            dtype="int64" if token else "float32",
            vocabulary=info.vocabulary,
        ),
        states=tuple(
            StateSpec(name=name, output=f"{name}_out", shape=shape)
            for name, shape in zip(signature.state_names, signature.state_shapes, strict=True)
        ),
        outputs=tuple(
            OutputSpec(
                name=name, shape=shape, meaning=info.output(i).meaning, labels=info.output(i).labels
            )
            for i, (name, shape) in enumerate(
                zip(signature.output_names, signature.output_shapes, strict=True)
            )
        ),
        normalization=info.normalization,
        parity=parity,
        export={
            "exporter": used,
            "opset": str(opset),
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "ops": ",".join(sorted(ops)),
            "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
            **info.extra,
        },
    )
    for key, value in spec.to_metadata().items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, value
    graph.producer_name = "hiddenstate export"
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(graph, str(path))
    return spec


def _trace(
    model: nn.Module, sig: StepSignature, exporter: str, opset: int, vocab_size: int | None
) -> tuple[onnx.ModelProto, str]:
    step_graph = _StepGraph(model, sig).eval()
    x = example_input(_EXAMPLE_BATCH, sig.n_features, sig.input_dtype, vocab_size, seed=1)
    # clone(): two graph inputs must never alias one tensor (an LSTM's h and c both
    # zeros, say); the dynamo exporter merges aliased inputs and computes nonsense.
    states = tuple(
        s.movedim(a, 0).clone()
        for s, a in zip(model.initial_state(_EXAMPLE_BATCH), sig.state_batch_axes, strict=True)
    )
    input_names = ["x", *sig.state_names]
    output_names = [*sig.output_names, *(f"{s}_out" for s in sig.state_names)]
    has_elman = any(isinstance(m, nn.RNN) for m in model.modules())
    if exporter == "dynamo" and has_elman:
        raise ExportError(
            "the dynamo exporter cannot translate nn.RNN (torch 2.15); use exporter='torchscript' "
            "or 'auto'"
        )
    order = ["torchscript"] if has_elman or exporter == "torchscript" else ["dynamo"]
    if exporter == "auto" and not has_elman:
        order.append("torchscript")
    failures: list[str] = []
    for name in order:
        try:
            if name == "dynamo":
                graph = _export_dynamo(step_graph, x, states, input_names, output_names, opset)
            else:
                graph = _export_torchscript(step_graph, x, states, input_names, output_names, opset)
        except HiddenstateError:
            raise
        except Exception as exc:
            failures.append(f"{name}: {_first_line(exc)}")
            continue
        _name_batch_axis(graph, input_names, output_names)
        return graph, name
    raise ExportError(
        f"{type(model).__name__} could not be traced ({'; '.join(failures)}); make step() "
        "traceable: tensor operations only, no data-dependent Python branches"
    )


def _export_dynamo(
    module: nn.Module,
    x: Tensor,
    states: tuple[Tensor, ...],
    input_names: list[str],
    output_names: list[str],
    opset: int,
) -> onnx.ModelProto:
    batch = torch.export.Dim(_BATCH, min=1)
    dynamic = {"x": {0: batch}, "states": tuple({0: batch} for _ in states)}
    with _quiet():
        # Our own torch.export first: torch.onnx.export's internal capture would
        # swap nn.LSTM/nn.GRU for while_loop decompositions when shapes are dynamic.
        program = torch.export.export(module, (x, *states), dynamic_shapes=dynamic, strict=False)
        onnx_program = torch.onnx.export(
            program,
            (x, *states),
            input_names=input_names,
            output_names=output_names,
            opset_version=opset,
            dynamo=True,
            verbose=False,
            optimize=True,
        )
    if onnx_program is None:  # pragma: no cover - torch returns a program on the dynamo path
        raise ExportError("the dynamo exporter returned nothing")
    return onnx_program.model_proto


def _export_torchscript(
    module: nn.Module,
    x: Tensor,
    states: tuple[Tensor, ...],
    input_names: list[str],
    output_names: list[str],
    opset: int,
) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with _quiet():
        torch.onnx.export(
            module,
            (x, *states),
            buffer,
            input_names=input_names,
            output_names=output_names,
            opset_version=opset,
            dynamic_axes={name: {0: _BATCH} for name in [*input_names, *output_names]},
            dynamo=False,
        )
    return onnx.load_from_string(buffer.getvalue())


def _name_batch_axis(graph: onnx.ModelProto, inputs: list[str], outputs: list[str]) -> None:
    """Call axis 0 `batch` everywhere (dynamo names it `s0`, `s3`, …), and check it is dynamic."""
    io_values = [v for v in graph.graph.input if v.name in inputs] + [
        v for v in graph.graph.output if v.name in outputs
    ]
    symbols = set()
    for value in io_values:
        dim = value.type.tensor_type.shape.dim[0]
        if not dim.dim_param:
            raise ExportError(
                f"the exported graph fixes the batch axis of '{value.name}' to {dim.dim_value}; "
                "every step tensor needs a dynamic batch on axis 0"
            )
        symbols.add(dim.dim_param)
    for value in [*graph.graph.input, *graph.graph.output, *graph.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in symbols:
                dim.dim_param = _BATCH


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' progress lines and deprecation chatter; errors still raise."""
    loggers = [
        logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "torch")
    ]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
