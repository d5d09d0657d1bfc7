"""The step protocol: what a PyTorch model must offer to be exported as one recurrent step.

Any `torch.nn.Module` with these two methods can be exported, ours or yours::

    class Steppable(Protocol):
        def initial_state(self, batch_size: int) -> tuple[Tensor, ...]: ...
        def step(self, x: Tensor, state: tuple[Tensor, ...]) -> tuple[Output, tuple[Tensor, ...]]: ...

The contract of each method:

- `initial_state(batch_size)` returns the state of `batch_size` fresh streams:
  float32 tensors of zeros (the server starts every stream from zeros; fold
  a learned initial state into `step`). Each tensor has exactly one batch
  axis, anywhere. PyTorch's own `[layers, batch, hidden]` is fine; the
  exporter finds that axis by comparing `initial_state(2)` with
  `initial_state(3)` and moves it to axis 0 in the graph.
- `step(x, state)` advances every stream by one time step. `x` is
  `[batch, n_features]` float32, or `[batch, 1]` int64 token ids. It returns
  `(y, new_state)`: `y` is one tensor or a tuple of tensors, each
  `[batch, ...]` float32, in raw units (normalisation and softmax inside).
  `new_state` has the same shapes as `state`. It must not modify `state`
  in place, and must not depend on anything but `x` and `state` (it is
  causal by construction).

Optional attributes the exporter reads when present:

- `state_names: tuple[str, ...]` names the graph's state inputs. The default
  is `state0`, `state1`, … Outputs get the suffix `_out`.
- `output_names: tuple[str, ...]` names the prediction outputs. The default
  comes from the task: `y`, or `probs` for classification and next-token.
- `cell: str`, one of `lstm`, `gru`, `rnn`, `custom` (default `custom`).
- `run_sequence(xs, state) -> (ys, new_state)` runs whole batch-first
  sequences `[batch, time, n_features]` at once, with `ys[:, t]` equal to
  step t's `y`. The parity check uses it as the reference when present,
  which tests that stepping reproduces the sequence model. Without it, the
  reference is `step` called in a PyTorch loop.

`export.adapter.as_steppable` turns a plain module built on
`nn.LSTM`/`nn.GRU`/`nn.RNN` into a `Steppable` without changing it.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor

Output = Tensor | tuple[Tensor, ...]
"""What `step` returns as its prediction: one tensor or a tuple of them."""


@runtime_checkable
class Steppable(Protocol):
    """A recurrent model that advances a batch of streams one step at a time.

    Implementations are `torch.nn.Module`s. See this module's docstring for
    the full contract and the optional attributes the exporter reads.
    """

    def initial_state(self, batch_size: int) -> tuple[Tensor, ...]:
        """Zero state for `batch_size` new streams: float32 tensors with one batch axis each."""
        ...

    def step(self, x: Tensor, state: tuple[Tensor, ...]) -> tuple[Output, tuple[Tensor, ...]]:
        """Advance one step: `x` `[batch, features]` → (prediction(s), new state)."""
        ...
