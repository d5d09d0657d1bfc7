"""The models `hiddenstate train` knows by name: data set, architecture and training settings.

| preset | task | data | cell |
| --- | --- | --- | --- |
| `gru-vowels` | classification | JapaneseVowels | 2-layer GRU, 64 units (the demo model, about a minute on 2 cores) |
| `gru-synthetic` | regression | synthetic fleet | GRU, 64 units, residual forecast |
| `lstm-motions` | regression | BasicMotions | LSTM, 64 units, residual forecast |
| `rnn-chars` | next_token | CPython documentation text | Elman RNN (tanh), 128 units, 16-wide embedding |

`hiddenstate train --report` trains all four and writes the baseline table in
docs/training.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from export.train import TrainConfig

DEMO_PRESET = "gru-vowels"


@dataclass(frozen=True)
class Preset:
    """A named recipe: which data, which network, how to train it."""

    name: str
    dataset: str
    cell: str
    hidden: int
    layers: int
    train: TrainConfig
    summary: str
    residual: bool = False


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="gru-vowels",
            dataset="vowels",
            cell="gru",
            hidden=64,
            layers=2,
            train=TrainConfig(epochs=40, batch_size=32, bptt=32, lr=3e-3, patience=8),
            summary="speaker of a Japanese vowel at every frame (9 classes)",
        ),
        Preset(
            name="gru-synthetic",
            dataset="synthetic",
            cell="gru",
            hidden=64,
            layers=1,
            train=TrainConfig(epochs=30, batch_size=16, bptt=64, lr=3e-3, patience=6),
            summary="next reading of 8 sensors on simulated devices",
            residual=True,
        ),
        Preset(
            name="lstm-motions",
            dataset="motions",
            cell="lstm",
            hidden=64,
            layers=1,
            train=TrainConfig(epochs=150, batch_size=8, bptt=100, lr=2e-3, patience=20),
            summary="next accelerometer and gyroscope reading of a smartwatch",
            residual=True,
        ),
        Preset(
            name="rnn-chars",
            dataset="text",
            cell="rnn_tanh",
            hidden=128,
            layers=1,
            train=TrainConfig(epochs=20, batch_size=32, bptt=64, lr=3e-3, patience=4),
            summary="next character of Python documentation",
        ),
    )
}
