"""Our recurrent models: Elman RNN (tanh or relu), LSTM and GRU, with one head per task.

`RecurrentNet` is one causal network for the three tasks of the step contract:

- `regression`: raw features in, the next value(s) of the target series out
  (`y`, raw units).
- `classification`: raw features in, class probabilities per step out (`probs`).
- `next_token`: token ids in (`[batch, 1]` int64, through an embedding), the
  next token's distribution out (`probs`).

Normalisation is part of the model: buffers hold the training statistics,
`forward` normalises its input, and `predict`/`step` de-normalise the
forecast. So the exported graph takes raw units and gives raw units
(docs/step-contract.md). `forward` returns what the loss wants (normalised
forecasts, or logits). `step` and `run_sequence` return what the server
serves.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.errors import ExportError
from pipeline.model_spec import TASKS

CELLS = ("rnn_tanh", "rnn_relu", "lstm", "gru")


@dataclass(frozen=True)
class NetConfig:
    """Architecture of a `RecurrentNet`: everything needed to rebuild it from a checkpoint.

    `n_outputs` is the number of forecast targets (regression), classes
    (classification) or the vocabulary size (next_token, where `n_features` is 1).
    `residual` (regression with one target per input feature): the head
    forecasts the change from the current input, `y = x + delta`. Persistence
    is then the network's zero, which makes "beat last value" the easy
    part and leaves the capacity for what persistence misses.
    """

    cell: str
    task: str
    n_features: int
    n_outputs: int
    hidden: int = 64
    layers: int = 1
    embedding_dim: int = 16
    dropout: float = 0.0
    residual: bool = False

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ExportError(f"cell {self.cell!r} is not one of {', '.join(CELLS)}")
        if self.task not in TASKS:
            raise ExportError(f"task {self.task!r} is not one of {', '.join(TASKS)}")
        if self.task == "next_token" and self.n_features != 1:
            raise ExportError("a next_token model reads one token id per step: use n_features=1")
        if self.residual and (self.task != "regression" or self.n_outputs != self.n_features):
            raise ExportError("residual forecasting needs a regression with one target per feature")
        if min(self.n_features, self.n_outputs, self.hidden, self.layers) < 1:
            raise ExportError(f"sizes must be positive: {self}")

    def to_dict(self) -> dict[str, Any]:
        """Plain values, for a checkpoint that `torch.load(weights_only=True)` can read."""
        return asdict(self)


class RecurrentNet(nn.Module):
    """A stack of Elman/LSTM/GRU layers with a task head; implements `export.protocol.Steppable`.

    Sequences are batch-first: `[batch, time, n_features]` (float32, or int64
    token ids for `next_token`). State is PyTorch's `[layers, batch, hidden]`
    per tensor: `(h,)`, or `(h, c)` for an LSTM.
    """

    # Buffers, declared for type checkers (register_buffer creates them).
    in_mean: Tensor
    in_std: Tensor
    target_mean: Tensor
    target_std: Tensor

    def __init__(self, config: NetConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        if c.task == "next_token":
            self.embed: nn.Embedding | None = nn.Embedding(c.n_outputs, c.embedding_dim)
            rnn_input = c.embedding_dim
        else:
            self.embed = None
            rnn_input = c.n_features
        dropout = c.dropout if c.layers > 1 else 0.0
        if c.cell == "lstm":
            self.rnn: nn.RNNBase = nn.LSTM(
                rnn_input, c.hidden, c.layers, batch_first=True, dropout=dropout
            )
        elif c.cell == "gru":
            self.rnn = nn.GRU(rnn_input, c.hidden, c.layers, batch_first=True, dropout=dropout)
        else:
            self.rnn = nn.RNN(
                rnn_input,
                c.hidden,
                c.layers,
                nonlinearity=c.cell.removeprefix("rnn_"),
                batch_first=True,
                dropout=dropout,
            )
        self.head = nn.Linear(c.hidden, c.n_outputs)
        # Normalisation statistics live in buffers: saved in the state dict,
        # hashed with the weights, and traced into the exported graph as constants.
        self.register_buffer("in_mean", torch.zeros(c.n_features))
        self.register_buffer("in_std", torch.ones(c.n_features))
        self.register_buffer("target_mean", torch.zeros(c.n_outputs))
        self.register_buffer("target_std", torch.ones(c.n_outputs))
        self.cell = "rnn" if c.cell.startswith("rnn") else c.cell
        self.state_names: tuple[str, ...] = ("h", "c") if c.cell == "lstm" else ("h",)
        self.output_names: tuple[str, ...] = ("y",) if c.task == "regression" else ("probs",)

    def set_normalization(
        self,
        mean: Tensor,
        std: Tensor,
        target_mean: Tensor | None = None,
        target_std: Tensor | None = None,
    ) -> None:
        """Store training statistics. Zero deviations become 1, so constant features pass through."""
        with torch.no_grad():
            self.in_mean.copy_(mean)
            self.in_std.copy_(torch.where(std > 0, std, torch.ones_like(std)))
            if target_mean is not None and target_std is not None:
                self.target_mean.copy_(target_mean)
                self.target_std.copy_(
                    torch.where(target_std > 0, target_std, torch.ones_like(target_std))
                )

    def initial_state(self, batch_size: int) -> tuple[Tensor, ...]:
        """Zeros, `[layers, batch, hidden]` per state tensor."""
        zeros = self.head.weight.new_zeros(self.config.layers, batch_size, self.config.hidden)
        # Distinct tensors, never one object twice: an exporter that sees two inputs
        # aliasing one tensor may merge them into one graph input.
        return (zeros, zeros.clone()) if self.config.cell == "lstm" else (zeros,)

    def forward(
        self, xs: Tensor, state: tuple[Tensor, ...] | None = None
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        """Training view: `[batch, time, n_outputs]` normalised forecasts or logits, new state."""
        if state is None:
            state = self.initial_state(xs.shape[0])
        if self.embed is not None:
            inputs = self.embed(xs[..., 0])
        else:
            inputs = (xs - self.in_mean) / self.in_std
        hx: Tensor | tuple[Tensor, Tensor] = (
            (state[0], state[1]) if self.config.cell == "lstm" else state[0]
        )
        out, new = self.rnn(inputs, hx)
        new_state = tuple(new) if isinstance(new, tuple) else (new,)
        return self.head(out), new_state

    def finish(self, raw: Tensor, xs: Tensor) -> Tensor:
        """Head output → served units: de-normalised forecast (plus `xs` if residual), or probabilities."""
        if self.config.task == "regression":
            forecast = raw * self.target_std + self.target_mean
            return xs + forecast if self.config.residual else forecast
        return torch.softmax(raw, dim=-1)

    def target_space(self, xs: Tensor, ys: Tensor) -> Tensor:
        """Raw regression targets → what the head is trained to output (normalised, delta if residual)."""
        delta = ys - xs if self.config.residual else ys
        return (delta - self.target_mean) / self.target_std

    def run_sequence(
        self, xs: Tensor, state: tuple[Tensor, ...] | None = None
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        """Served predictions for whole sequences `[batch, time, ...]` (the parity reference)."""
        raw, new_state = self.forward(xs, state)
        return self.finish(raw, xs), new_state

    def step(self, x: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
        """One step for a batch of streams: `x` `[batch, n_features]` → (prediction, new state)."""
        raw, new_state = self.forward(x.unsqueeze(1), state)
        return self.finish(raw.squeeze(1), x), new_state
