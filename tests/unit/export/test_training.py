"""Training on real data beats the naive baselines, writes its artifacts, and is reproducible."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from export.checkpoint import load_checkpoint
from export.data import Dataset, SequenceSet, load_dataset
from export.models import NetConfig
from export.train import TrainConfig, train, write_events, write_labels

FAST = TrainConfig(epochs=8, batch_size=32, bptt=16, lr=1e-2, patience=3, progress=False)


def _vowel_net(data: Dataset) -> NetConfig:
    return NetConfig(
        cell="gru",
        task="classification",
        n_features=12,
        n_outputs=len(data.labels or ()),
        hidden=16,
    )


@pytest.fixture(scope="module")
def vowels() -> Dataset:
    return load_dataset("vowels")


@pytest.fixture(scope="module")
def trained_vowels(vowels: Dataset, tmp_path_factory: pytest.TempPathFactory):
    return train(
        vowels, _vowel_net(vowels), FAST, tmp_path_factory.mktemp("vowels"), name="gru-test"
    )


def test_speaker_classifier_beats_the_majority_class_on_held_out_utterances(trained_vowels) -> None:
    evaluation = trained_vowels.evaluation
    assert evaluation.model["accuracy"] > 0.6
    assert evaluation.model["accuracy"] > evaluation.baselines["majority_class"]["accuracy"] + 0.3
    assert evaluation.beats_baselines


def test_motion_forecaster_beats_last_value_on_held_out_recordings(tmp_path: Path) -> None:
    data = load_dataset("motions")
    net = NetConfig(
        cell="lstm", task="regression", n_features=6, n_outputs=6, hidden=32, residual=True
    )
    config = TrainConfig(epochs=40, batch_size=8, bptt=100, lr=3e-3, patience=10, progress=False)
    evaluation = train(data, net, config, tmp_path, name="lstm-test").evaluation
    assert evaluation.model["mae"] < evaluation.baselines["last_value"]["mae"]


def test_training_writes_checkpoint_curve_metrics_and_events(trained_vowels) -> None:
    out = trained_vowels.out_dir
    assert (out / "training-curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["beats_baselines"] is True
    assert metrics["model"]["accuracy"] == pytest.approx(
        trained_vowels.evaluation.model["accuracy"]
    )
    assert load_checkpoint(out / "model.pt").weights_sha256 == trained_vowels.weights_sha256


def test_checkpoint_holds_the_training_normalisation(trained_vowels, vowels: Dataset) -> None:
    loaded = load_checkpoint(trained_vowels.out_dir / "model.pt")
    x = vowels.train.inputs[vowels.train.mask()]
    np.testing.assert_allclose(loaded.net.in_mean.numpy(), x.mean(axis=0), atol=1e-5)
    assert loaded.info.normalization is not None
    np.testing.assert_allclose(loaded.info.normalization.std, x.std(axis=0), rtol=1e-4)


def test_holdout_events_interleave_streams_in_per_stream_time_order(
    trained_vowels, vowels: Dataset
) -> None:
    lines = (trained_vowels.out_dir / "holdout-events.jsonl").read_text().splitlines()
    events = [json.loads(line) for line in lines]
    assert len(events) == int(vowels.test.lengths.sum())
    assert events[0]["key"] != events[1]["key"]
    first_key = events[0]["key"]
    own = [e["value"]["x"] for e in events if e["key"] == first_key]
    np.testing.assert_array_equal(
        np.array(own, np.float32), vowels.test.inputs[0, : vowels.test.lengths[0]]
    )


def test_holdout_labels_give_each_events_class_at_its_step_in_the_events_order(
    trained_vowels, vowels: Dataset
) -> None:
    out = trained_vowels.out_dir
    events = [json.loads(line) for line in (out / "holdout-events.jsonl").read_text().splitlines()]
    labels = [json.loads(line) for line in (out / "holdout-labels.jsonl").read_text().splitlines()]
    assert [label["key"] for label in labels] == [event["key"] for event in events]
    first_key = labels[0]["key"]
    own = [label["value"] for label in labels if label["key"] == first_key]
    length = int(vowels.test.lengths[0])
    assert [label["step"] for label in own] == list(range(1, length + 1))
    assert [label["y"] for label in own] == vowels.test.targets[0, :length].tolist()


def test_regression_labels_carry_the_target_values(tmp_path: Path) -> None:
    split = SequenceSet(
        inputs=np.zeros((1, 2, 2), np.float32),
        targets=np.array([[[0.1, 2.0], [-3.5, 0.25]]], np.float32),
        lengths=np.array([2]),
        keys=("m",),
    )
    write_labels(tmp_path / "l.jsonl", split, "regression")
    lines = (tmp_path / "l.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"key": "m", "value": {"step": 1, "y": [0.1, 2.0]}},
        {"key": "m", "value": {"step": 2, "y": [-3.5, 0.25]}},
    ]


def test_token_events_carry_the_token_id(tmp_path: Path) -> None:
    split = SequenceSet(
        inputs=np.array([[[3], [4]], [[5], [0]]], np.int64),
        targets=np.zeros((2, 2), np.int64),
        lengths=np.array([2, 1]),
        keys=("a", "b"),
    )
    write_events(tmp_path / "e.jsonl", split)
    lines = (tmp_path / "e.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"key": "a", "value": {"x": [3]}},
        {"key": "b", "value": {"x": [5]}},
        {"key": "a", "value": {"x": [4]}},
    ]


def test_same_seed_trains_the_same_weights(vowels: Dataset, tmp_path: Path) -> None:
    small = replace(FAST, epochs=2)
    a = train(vowels, _vowel_net(vowels), small, tmp_path / "a", name="a")
    b = train(vowels, _vowel_net(vowels), small, tmp_path / "b", name="b")
    assert a.weights_sha256 == b.weights_sha256


def test_early_stopping_ends_training_when_validation_stops_improving(
    vowels: Dataset, tmp_path: Path
) -> None:
    frozen = replace(FAST, epochs=20, lr=0.0, patience=2)
    result = train(vowels, _vowel_net(vowels), frozen, tmp_path, name="frozen")
    assert len(result.history["train"]) == 3
    assert result.best_epoch == 1


def test_truncated_bptt_updates_once_per_window(
    vowels: Dataset, tmp_path: Path, monkeypatch
) -> None:
    calls = []
    original = torch.optim.Adam.step

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", counting)
    one_batch = replace(vowels, train=vowels.train.subset(np.arange(4)))
    windows = -(-int(one_batch.train.lengths.max()) // 5)
    train(one_batch, _vowel_net(vowels), replace(FAST, epochs=1, bptt=5), tmp_path, name="w")
    assert len(calls) == windows
