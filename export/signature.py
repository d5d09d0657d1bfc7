"""What a steppable model looks like from outside, found by probing it, and what we refuse.

`inspect_step` calls `initial_state` and `step` on small batches and works
out everything the exporter needs: each state's batch axis, every tensor's
per-stream shape, the outputs. It refuses, with one line that says what to
change, anything that cannot be served as a fixed-size causal step:
bidirectional layers, state whose shape depends on how many steps were
seen, and dtypes other than float32 (states, outputs, parameters) or
float32/int64 (input).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from export.adapter import refuse_bidirectional, refuse_parameter_dtypes
from pipeline.errors import ExportError

# Two probe batch sizes that cannot be mistaken for any model dimension of size 1.
_PROBE_SMALL, _PROBE_LARGE = 2, 3


@dataclass(frozen=True)
class StepSignature:
    """The step's tensors as the exporter will lay them out (batch on axis 0).

    `state_batch_axes[i]` is where state i keeps its batch axis in PyTorch.
    Shapes are per stream (batch axis removed), in graph order.
    """

    input_dtype: torch.dtype
    n_features: int
    state_names: tuple[str, ...]
    state_batch_axes: tuple[int, ...]
    state_shapes: tuple[tuple[int, ...], ...]
    output_names: tuple[str, ...]
    output_shapes: tuple[tuple[int, ...], ...]


def example_input(
    batch: int, n_features: int, input_dtype: torch.dtype, vocab_size: int | None, seed: int = 0
) -> Tensor:
    """A deterministic `[batch, n_features]` input: normal floats, or token ids below `vocab_size`."""
    gen = torch.Generator().manual_seed(seed)
    if input_dtype == torch.int64:
        return torch.randint(0, vocab_size or 1, (batch, n_features), generator=gen)
    return torch.randn(batch, n_features, generator=gen)


def inspect_step(
    model: nn.Module,
    *,
    n_features: int,
    input_dtype: torch.dtype,
    vocab_size: int | None,
    default_output_names: tuple[str, ...],
) -> StepSignature:
    """Probe `model` (a `Steppable` nn.Module) and return its signature, or raise ExportError."""
    who = type(model).__name__
    if not isinstance(model, nn.Module):
        raise ExportError(f"{who} is not a torch.nn.Module; subclass nn.Module so it can be traced")
    if not (
        callable(getattr(model, "initial_state", None)) and callable(getattr(model, "step", None))
    ):
        raise ExportError(
            f"{who} has no initial_state()/step(); implement export.protocol.Steppable or wrap a "
            "module built on nn.LSTM/nn.GRU/nn.RNN with export.as_steppable()"
        )
    refuse_bidirectional(model)
    refuse_parameter_dtypes(model)
    if input_dtype not in (torch.float32, torch.int64):
        raise ExportError(
            f"{who}: input dtype {_dtype_name(input_dtype)} is not served; the step contract takes "
            "float32 features or int64 token ids (cast the input)"
        )
    if input_dtype == torch.int64 and not vocab_size:
        raise ExportError(f"{who}: int64 token input needs a vocabulary (pass vocabulary=...)")

    small = _states(model, _PROBE_SMALL)
    large = _states(model, _PROBE_LARGE)
    if len(small) != len(large):
        raise ExportError(
            f"{who}.initial_state returns {len(small)} tensors for batch {_PROBE_SMALL} and "
            f"{len(large)} for batch {_PROBE_LARGE}; return one tensor per state whatever the batch"
        )
    names = tuple(getattr(model, "state_names", None) or (f"state{i}" for i in range(len(small))))
    if len(names) != len(small):
        raise ExportError(
            f"{who}.state_names has {len(names)} names for {len(small)} state tensors"
        )
    axes = tuple(
        _batch_axis(name, a, b, who) for name, a, b in zip(names, small, large, strict=True)
    )

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            x = example_input(_PROBE_LARGE, n_features, input_dtype, vocab_size)
            y, new_state = model.step(x, large)
    finally:
        model.train(was_training)
    outputs = output_tuple(y)
    new_state = tuple(new_state)
    if len(new_state) != len(large):
        raise ExportError(
            f"{who}.step returned {len(new_state)} state tensors for {len(large)} given; "
            "return the same number of states as initial_state"
        )
    for name, before, after in zip(names, large, new_state, strict=True):
        if tuple(after.shape) != tuple(before.shape):
            raise ExportError(
                f"{who}: state '{name}' changes shape from {list(before.shape)} to "
                f"{list(after.shape)} in one step; state that grows with the sequence cannot be "
                "served, keep a fixed-size state (e.g. a fixed window)"
            )
        if after.dtype != torch.float32:
            raise ExportError(
                f"{who}: step returns state '{name}' as {_dtype_name(after.dtype)}; return float32"
            )
    out_names = tuple(getattr(model, "output_names", None) or default_output_names)
    if len(outputs) > 1 and len(out_names) != len(outputs):
        out_names = tuple(f"y{i}" for i in range(len(outputs)))
    out_names = out_names[: len(outputs)]
    for name, out in zip(out_names, outputs, strict=True):
        if out.dtype != torch.float32:
            raise ExportError(
                f"{who}: output '{name}' is {_dtype_name(out.dtype)}; predictions must be float32"
            )
        if out.dim() < 1 or out.shape[0] != _PROBE_LARGE:
            raise ExportError(
                f"{who}: output '{name}' has shape {list(out.shape)} for a batch of "
                f"{_PROBE_LARGE}; put the batch on axis 0 of every prediction"
            )
    state_shapes = tuple(
        tuple(d for i, d in enumerate(s.shape) if i != axis)
        for s, axis in zip(large, axes, strict=True)
    )
    return StepSignature(
        input_dtype=input_dtype,
        n_features=n_features,
        state_names=names,
        state_batch_axes=axes,
        state_shapes=state_shapes,
        output_names=out_names,
        output_shapes=tuple(tuple(o.shape[1:]) for o in outputs),
    )


def _states(model: nn.Module, batch: int) -> tuple[Tensor, ...]:
    states = model.initial_state(batch)
    if isinstance(states, Tensor) or not isinstance(states, tuple | list):
        raise ExportError(
            f"{type(model).__name__}.initial_state must return a tuple of tensors, got "
            f"{type(states).__name__}"
        )
    for i, s in enumerate(states):
        if s.dtype != torch.float32:
            raise ExportError(
                f"{type(model).__name__}: state {i} is {_dtype_name(s.dtype)}; states must be float32 "
                "(call model.float() or create the state with dtype=torch.float32)"
            )
    return tuple(states)


def _batch_axis(name: str, small: Tensor, large: Tensor, who: str) -> int:
    if small.dim() != large.dim():
        raise ExportError(
            f"{who}: state '{name}' has {small.dim()} axes at batch {_PROBE_SMALL} and "
            f"{large.dim()} at batch {_PROBE_LARGE}; keep one fixed layout"
        )
    differing = [i for i, (a, b) in enumerate(zip(small.shape, large.shape, strict=True)) if a != b]
    if (
        len(differing) != 1
        or small.shape[differing[0]] != _PROBE_SMALL
        or large.shape[differing[0]] != _PROBE_LARGE
    ):
        raise ExportError(
            f"{who}: state '{name}' has shape {list(small.shape)} at batch {_PROBE_SMALL} and "
            f"{list(large.shape)} at batch {_PROBE_LARGE}; a state needs exactly one batch axis "
            "whose size is the batch size"
        )
    return differing[0]


def output_tuple(y: Tensor | tuple[Tensor, ...] | list[Tensor]) -> tuple[Tensor, ...]:
    """A step's prediction as a tuple of tensors, whether it returned one or several."""
    if isinstance(y, Tensor):
        return (y,)
    return tuple(y)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
