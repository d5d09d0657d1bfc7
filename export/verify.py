"""`hiddenstate verify`: re-prove an exported file against the PyTorch model it came from.

How the PyTorch model is found. An ONNX file records the sha256 of the
weights it was exported from (`hiddenstate.model.weights_sha256`). Verify
loads, in this order, `--checkpoint PATH` if given, then `<stem>.pt` beside
the file, then `model.pt` beside it, then any other `*.pt` beside it. It
uses the first checkpoint whose weights hash matches. Without a match:
a `ParityError` if checkpoints were there (the weights changed since the
export), an `ExportError` if there were none.

Then it checks, each failure a one-line error: the metadata reads as a
`ModelSpec`; the graph has no `Loop`/`Scan`; its inputs, outputs and state
shapes match the model; and stepping it in onnxruntime reproduces PyTorch
within the tolerance over sequences of different lengths.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import nn

from export.checkpoint import load_checkpoint, weights_sha256
from export.parity import DEFAULT_TOLERANCE, check_graph_ops, check_parity, sample_parity_data
from export.signature import inspect_step
from pipeline.errors import ExportError, ModelContractError, ParityError
from pipeline.model_spec import ModelSpec, Parity


@dataclass(frozen=True)
class Verification:
    """A passed verification: the file's spec, what parity measured, the checkpoint used (if any)."""

    spec: ModelSpec
    parity: Parity
    checkpoint: Path | None


def read_spec(path: Path) -> ModelSpec:
    """The `ModelSpec` in an ONNX file's metadata (ModelContractError if absent or malformed)."""
    model = _load(path)
    return ModelSpec.from_metadata({p.key: p.value for p in model.metadata_props}, source=str(path))


def find_checkpoint(onnx_path: Path, weights_sha: str, checkpoint: Path | None = None) -> Path:
    """The checkpoint whose weights the file was exported from (see the module docstring)."""
    if checkpoint is not None:
        candidates = [Path(checkpoint)]
    else:
        folder = onnx_path.parent
        preferred = [folder / f"{onnx_path.stem}.pt", folder / "model.pt"]
        others = sorted(p for p in folder.glob("*.pt") if p not in preferred)
        candidates = [p for p in preferred if p.is_file()] + others
    if not candidates:
        raise ExportError(
            f"{onnx_path}: no checkpoint (*.pt) beside it; pass --checkpoint PATH to the model it "
            "was exported from"
        )
    for candidate in candidates:
        if load_checkpoint(candidate).weights_sha256 == weights_sha:
            return candidate
    raise ParityError(
        f"{onnx_path}: exported from weights {weights_sha[:16]}…, but "
        f"{', '.join(str(c) for c in candidates)} hold other weights; re-export the model"
    )


def verify_onnx(
    path: str | Path,
    model: nn.Module | None = None,
    *,
    checkpoint: str | Path | None = None,
    sequences: int = 16,
    max_steps: int = 24,
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int = 1,
) -> Verification:
    """Verify the ONNX file at `path` against `model`, or against its checkpoint when `model` is None."""
    path = Path(path)
    graph = _load(path)
    spec = ModelSpec.from_metadata({p.key: p.value for p in graph.metadata_props}, source=str(path))
    check_graph_ops(graph, source=str(path))
    used: Path | None = None
    if model is None:
        used = find_checkpoint(
            path, spec.weights_sha256, None if checkpoint is None else Path(checkpoint)
        )
        model = load_checkpoint(used).net
    elif weights_sha256(model) != spec.weights_sha256:
        raise ParityError(
            f"{path}: exported from weights {spec.weights_sha256[:16]}…, the model given has "
            f"{weights_sha256(model)[:16]}…; re-export it"
        )
    token = spec.input.dtype == "int64"
    vocab_size = len(spec.input.vocabulary) if spec.input.vocabulary else None
    signature = inspect_step(
        model,
        n_features=len(spec.input.features),
        input_dtype=torch.int64 if token else torch.float32,
        vocab_size=vocab_size,
        default_output_names=tuple(o.name for o in spec.outputs),
    )
    want_states = tuple((s.name, s.shape) for s in spec.states)
    have_states = tuple(zip(signature.state_names, signature.state_shapes, strict=True))
    if want_states != have_states:
        raise ModelContractError(
            f"{path}: metadata states {list(want_states)} but the model has {list(have_states)}"
        )
    data = sample_parity_data(
        signature,
        sequences=sequences,
        max_steps=max_steps,
        seed=seed,
        normalization=spec.normalization,
        vocab_size=vocab_size,
    )
    parity = check_parity(model, graph, signature, data, tolerance=tolerance, source=str(path))
    return Verification(spec=spec, parity=parity, checkpoint=used)


def _load(path: Path) -> onnx.ModelProto:
    if not path.is_file():
        raise ModelContractError(f"{path}: no such ONNX file")
    try:
        return onnx.load(str(path))
    except Exception as exc:
        raise ModelContractError(f"{path}: not a readable ONNX file ({exc})") from exc
