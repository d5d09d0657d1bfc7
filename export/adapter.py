"""Bring your own model: make a plain `nn.Module` built on `nn.LSTM`/`nn.GRU`/`nn.RNN` steppable.

A typical user module runs whole sequences and never exposes its state::

    class Forecaster(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(4, 32, batch_first=True)
            self.head = nn.Linear(32, 4)

        def forward(self, x):
            out, _ = self.lstm(x)
            return self.head(out)

`as_steppable(Forecaster())` returns a `Steppable` that feeds it sequences of
length 1. Hooks on each recurrent layer put the carried state in and take
the new state out, so the module's code and weights are untouched. Hooks are
plain Python, so both the TorchScript tracer and `torch.export` see through
them.

What the adapter assumes, and checks where it can:

- Input is `[batch, time, features]` if the first recurrent layer has
  `batch_first=True`, `[time, batch, features]` otherwise. That is the
  usual layout, because the module hands its input to that layer.
- Each recurrent layer is called exactly once per forward.
- The forward returns a tensor, or a tuple whose first element is the
  prediction. The prediction has a time axis (one output per step) or none
  (a last-step head). A probe at construction tells which.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from export.protocol import Output
from pipeline.errors import ExportError

_CELL_OF = {nn.LSTM: "lstm", nn.GRU: "gru", nn.RNN: "rnn"}


def recurrent_layers(module: nn.Module) -> list[tuple[str, nn.RNNBase]]:
    """Every `nn.LSTM`/`nn.GRU`/`nn.RNN` inside `module`, in registration order."""
    return [(name, m) for name, m in module.named_modules() if isinstance(m, nn.RNNBase)]


def refuse_bidirectional(module: nn.Module) -> None:
    """Raise ExportError if any recurrent layer in `module` reads the sequence backwards too."""
    for name, layer in recurrent_layers(module):
        if layer.bidirectional:
            raise ExportError(
                f"layer '{name or type(module).__name__}' is bidirectional: its output at step t "
                "depends on later steps, which a stream has not seen yet; use bidirectional=False"
            )


def refuse_parameter_dtypes(model: nn.Module) -> None:
    """Raise ExportError for any floating parameter or buffer that is not float32."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    for name, tensor in tensors:
        if tensor.is_floating_point() and tensor.dtype != torch.float32:
            raise ExportError(
                f"{type(model).__name__}: '{name}' is {str(tensor.dtype).removeprefix('torch.')}; the step "
                "contract is float32, call model.float() before exporting"
            )
        if tensor.is_complex():
            raise ExportError(f"{type(model).__name__}: '{name}' is complex; ONNX steps are real")


class RecurrentModuleAdapter(nn.Module):
    """A user module built on torch recurrent layers, driven one step at a time.

    Implements `export.protocol.Steppable`. Build it with `as_steppable`.
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        n_features: int | None = None,
        input_dtype: torch.dtype = torch.float32,
        state_names: tuple[str, ...] | None = None,
    ) -> None:
        super().__init__()
        layers = recurrent_layers(module)
        if not layers:
            raise ExportError(
                f"{type(module).__name__} has no nn.LSTM, nn.GRU or nn.RNN layer to step; implement "
                "initial_state() and step() yourself (export.protocol.Steppable)"
            )
        refuse_bidirectional(module)
        refuse_parameter_dtypes(module)
        self.module = module
        self._layers = [layer for _, layer in layers]
        self._layer_names = [name for name, _ in layers]
        self.batch_first = bool(self._layers[0].batch_first)
        self.n_features = n_features if n_features is not None else self._layers[0].input_size
        self.input_dtype = input_dtype
        kinds = {_CELL_OF.get(type(layer), "custom") for layer in self._layers}
        self.cell = kinds.pop() if len(kinds) == 1 else "custom"
        self.state_names = state_names or _default_state_names(self._layers)
        if len(self.state_names) != sum(_n_states(layer) for layer in self._layers):
            raise ExportError(
                f"state_names {self.state_names} do not match the {len(self._layers)} recurrent "
                "layer(s): give one name per state tensor (LSTM layers have two, h and c)"
            )
        # The probe runs once, in eval mode so that dropout cannot change shapes or values.
        self._output_time_axis = self._probe_output_time_axis()

    def initial_state(self, batch_size: int) -> tuple[Tensor, ...]:
        """Zeros in PyTorch's layout: `[layers * directions, batch, hidden]` per tensor."""
        states: list[Tensor] = []
        for layer in self._layers:
            ref = layer.weight_hh_l0
            hidden = layer.proj_size if getattr(layer, "proj_size", 0) > 0 else layer.hidden_size
            layers_dirs = layer.num_layers * (2 if layer.bidirectional else 1)
            states.append(ref.new_zeros(layers_dirs, batch_size, hidden))
            if isinstance(layer, nn.LSTM):
                states.append(ref.new_zeros(layers_dirs, batch_size, layer.hidden_size))
        return tuple(states)

    def step(self, x: Tensor, state: tuple[Tensor, ...]) -> tuple[Output, tuple[Tensor, ...]]:
        """Feed `x` `[batch, features]` as a length-1 sequence, carrying `state`."""
        xs = x.unsqueeze(1) if self.batch_first else x.unsqueeze(0)
        out, new_state = self._call_with_state(xs, state)
        if self._output_time_axis is not None:
            out = out.squeeze(self._output_time_axis)
        return out, new_state

    def run_sequence(
        self, xs: Tensor, state: tuple[Tensor, ...]
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        """Whole batch-first sequences `[batch, time, features]` in one call (parity reference).

        Only for modules whose output has a time axis. A last-step head has no
        per-step output to compare, so the parity check then steps in PyTorch.
        """
        if self._output_time_axis is None:
            raise ExportError(
                f"{type(self.module).__name__} returns the last step only; no per-step sequence"
            )
        seq = xs if self.batch_first else xs.transpose(0, 1)
        out, new_state = self._call_with_state(seq, state)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, new_state

    @property
    def has_sequence_output(self) -> bool:
        """True when the module returns one prediction per time step."""
        return self._output_time_axis is not None

    def _call_with_state(
        self, xs: Tensor, state: tuple[Tensor, ...]
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        pending = list(_split_states(self._layers, state))
        captured: list[tuple[Tensor, ...] | None] = [None] * len(self._layers)
        calls = [0] * len(self._layers)
        handles = []
        for i, layer in enumerate(self._layers):
            handles.append(
                layer.register_forward_pre_hook(_inject(i, pending, calls), with_kwargs=True)
            )
            handles.append(layer.register_forward_hook(_capture(i, captured)))
        try:
            result = self.module(xs)
        finally:
            for handle in handles:
                handle.remove()
        for i, count in enumerate(calls):
            if count != 1:
                raise ExportError(
                    f"layer '{self._layer_names[i]}' ran {count} times in one forward; the adapter "
                    "needs each recurrent layer called exactly once (implement step() yourself)"
                )
        out = result[0] if isinstance(result, tuple | list) else result
        if not isinstance(out, Tensor):
            raise ExportError(
                f"{type(self.module).__name__}.forward returned {type(out).__name__}; "
                "return the prediction tensor (or a tuple that starts with it)"
            )
        new_state: list[Tensor] = []
        for item in captured:
            if item is None:  # pragma: no cover - calls == 1 guarantees a capture
                raise ExportError("a recurrent layer returned no state")
            new_state.extend(item)
        return out, tuple(new_state)

    def _probe_output_time_axis(self) -> int | None:
        # Two sequence lengths: the output axis whose size follows the length is time.
        # One probe alone could mistake, say, 3 classes for 3 time steps.
        batch = 2
        short, long = self._probe(batch, 3), self._probe(batch, 5)
        if short.dim() == long.dim():
            moved = [
                i for i, (a, b) in enumerate(zip(short.shape, long.shape, strict=True)) if a != b
            ]
            if moved == [1] and self.batch_first and short.shape[0] == batch:
                return 1
            if (
                moved == [0]
                and not self.batch_first
                and short.dim() >= 2
                and short.shape[1] == batch
            ):
                return 0
            if not moved and short.dim() >= 1 and short.shape[0] == batch:
                return None
        raise ExportError(
            f"{type(self.module).__name__} outputs {list(short.shape)} for 3 steps and "
            f"{list(long.shape)} for 5 steps of a batch of {batch}: expected "
            f"{'[batch, time, ...]' if self.batch_first else '[time, batch, ...]'} or [batch, ...]"
        )

    def _probe(self, batch: int, time: int) -> Tensor:
        shape = (
            (batch, time, self.n_features) if self.batch_first else (time, batch, self.n_features)
        )
        xs = torch.zeros(shape, dtype=self.input_dtype)
        was_training = self.module.training
        self.module.eval()
        try:
            with torch.no_grad():
                out, _ = self._call_with_state(xs, self.initial_state(batch))
        except ExportError:
            raise
        except Exception as exc:
            raise ExportError(
                f"{type(self.module).__name__} failed on a probe input of shape {list(shape)} "
                f"({exc}); pass n_features= and input_dtype= to as_steppable"
            ) from exc
        finally:
            self.module.train(was_training)
        return out


def as_steppable(
    module: nn.Module,
    *,
    n_features: int | None = None,
    input_dtype: torch.dtype = torch.float32,
    state_names: tuple[str, ...] | None = None,
) -> RecurrentModuleAdapter:
    """Wrap a user module built on `nn.LSTM`/`nn.GRU`/`nn.RNN` as a `Steppable`.

    `n_features` defaults to the first recurrent layer's `input_size`; give it
    (and `input_dtype=torch.int64`) when the module embeds or projects its input
    first. State names default to `h` (and `c` for an LSTM) for one layer, and
    `h0`, `c0`, `h1`, … for several.
    """
    return RecurrentModuleAdapter(
        module, n_features=n_features, input_dtype=input_dtype, state_names=state_names
    )


def _n_states(layer: nn.RNNBase) -> int:
    return 2 if isinstance(layer, nn.LSTM) else 1


def _default_state_names(layers: list[nn.RNNBase]) -> tuple[str, ...]:
    if len(layers) == 1:
        return ("h", "c") if isinstance(layers[0], nn.LSTM) else ("h",)
    names: list[str] = []
    for i, layer in enumerate(layers):
        names.append(f"h{i}")
        if isinstance(layer, nn.LSTM):
            names.append(f"c{i}")
    return tuple(names)


def _split_states(
    layers: list[nn.RNNBase], state: tuple[Tensor, ...]
) -> list[Tensor | tuple[Tensor, Tensor]]:
    expected = sum(_n_states(layer) for layer in layers)
    if len(state) != expected:
        raise ExportError(f"got {len(state)} state tensors, the recurrent layers need {expected}")
    out: list[Tensor | tuple[Tensor, Tensor]] = []
    i = 0
    for layer in layers:
        if isinstance(layer, nn.LSTM):
            # nn.LSTM's fused kernels want contiguous (h, c); the dynamo exporter's
            # shape check refuses the transposed views the step graph hands in.
            out.append((state[i].contiguous(), state[i + 1].contiguous()))
            i += 2
        else:
            out.append(state[i].contiguous())
            i += 1
    return out


def _inject(
    i: int, pending: list[Tensor | tuple[Tensor, Tensor]], calls: list[int]
) -> Callable[..., tuple[tuple[Any, ...], dict[str, Any]]]:
    def hook(
        _layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        calls[i] += 1
        rest = {k: v for k, v in kwargs.items() if k != "hx"}
        # Whatever state the module passes (usually none) is replaced by the carried one.
        return (args[0], pending[i]), rest

    return hook


def _capture(
    i: int, captured: list[tuple[Tensor, ...] | None]
) -> Callable[[nn.Module, Any, Any], None]:
    def hook(_layer: nn.Module, _args: Any, output: Any) -> None:
        new = output[1]
        captured[i] = tuple(new) if isinstance(new, tuple) else (new,)

    return hook
