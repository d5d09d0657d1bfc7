"""Held-out metrics for a trained model, and the naive baselines it has to beat.

Every metric is computed on the same held-out steps for the model and for
each baseline:

- regression: MAE and RMSE in raw units, averaged over the targets.
  Baselines: *last value* (tomorrow equals today) and, where the data has a
  known period, *seasonal naive* (the value one period ago). The steps
  compared start after the longest period, so seasonal naive has a
  history everywhere.
- classification: per-step accuracy, last-step accuracy (one answer per
  sequence) and log loss. Baseline: the *majority class* of the training set.
- next_token: accuracy and cross-entropy in nats per token. Baselines:
  *last token* (the next one equals this one) and *most frequent token*
  (also the unigram distribution for the cross-entropy).

The primary metric (regression MAE, classification and next_token accuracy)
decides whether the model beats the baselines.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from export.data import Dataset, SequenceSet
from export.models import RecurrentNet

PRIMARY = {"regression": "mae", "classification": "accuracy", "next_token": "accuracy"}
_EPS = 1e-12


@dataclass(frozen=True)
class Evaluation:
    """The model's and each baseline's metrics on the held-out streams."""

    task: str
    primary: str
    model: dict[str, float]
    baselines: dict[str, dict[str, float]]
    steps: int
    streams: int
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def higher_is_better(self) -> bool:
        """Accuracy goes up, errors go down."""
        return self.primary == "accuracy"

    @property
    def beats_baselines(self) -> bool:
        """True when the model's primary metric is strictly better than every baseline's."""
        ours = self.model[self.primary]
        theirs = [b[self.primary] for b in self.baselines.values()]
        if self.higher_is_better:
            return all(ours > t for t in theirs)
        return all(ours < t for t in theirs)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, for metrics.json."""
        return {
            "task": self.task,
            "primary": self.primary,
            "higher_is_better": self.higher_is_better,
            "model": self.model,
            "baselines": self.baselines,
            "beats_baselines": self.beats_baselines,
            "held_out_streams": self.streams,
            "held_out_steps": self.steps,
            **self.notes,
        }


def predict(net: RecurrentNet, split: SequenceSet, batch_size: int = 256) -> np.ndarray:
    """Served predictions (raw units, or probabilities) for every step of every row."""
    net.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(split), batch_size):
            xs = torch.from_numpy(split.inputs[start : start + batch_size])
            ys, _ = net.run_sequence(xs)
            out.append(ys.numpy())
    return np.concatenate(out)


def evaluate(net: RecurrentNet, dataset: Dataset) -> Evaluation:
    """Metrics of `net` and of the baselines on `dataset.test`."""
    test = dataset.test
    prediction = predict(net, test)
    if dataset.task == "regression":
        return _regression(prediction, test)
    if dataset.task == "classification":
        return _classification(prediction, test, dataset.train)
    return _next_token(prediction, test, dataset.train)


def _regression(prediction: np.ndarray, test: SequenceSet) -> Evaluation:
    mask = test.mask()
    warmup = 0 if test.periods is None else int(test.periods.max())
    mask[:, :warmup] = False
    target = test.targets
    methods = {"model": prediction, "last_value": test.inputs}
    if test.periods is not None:
        # Forecast of x[t+1] is x[t+1-P]; the input at step t is x[t], so that is inputs[t+1-P].
        seasonal = np.zeros_like(test.inputs)
        for n, period in enumerate(test.periods.tolist()):
            seasonal[n, period - 1 :] = test.inputs[n, : test.inputs.shape[1] - period + 1]
        methods["seasonal_naive"] = seasonal
    scores = {}
    for name, guess in methods.items():
        err = (guess - target)[mask]
        scores[name] = {
            "mae": float(np.abs(err).mean()),
            "rmse": float(np.sqrt((err**2).mean())),
        }
    return Evaluation(
        task="regression",
        primary="mae",
        model=scores.pop("model"),
        baselines=scores,
        steps=int(mask.sum()),
        streams=len(test),
        notes={"warmup_steps": warmup},
    )


def _classification(probs: np.ndarray, test: SequenceSet, train: SequenceSet) -> Evaluation:
    mask = test.mask()
    labels = test.targets
    last = test.lengths - 1
    rows = np.arange(len(test))
    majority = int(np.bincount(train.targets[:, 0]).argmax())
    chosen = probs.argmax(-1)
    picked = np.take_along_axis(probs, labels[..., None], axis=-1)[..., 0]
    model = {
        "accuracy": float((chosen == labels)[mask].mean()),
        "last_step_accuracy": float((chosen[rows, last] == labels[rows, last]).mean()),
        "log_loss": float(-np.log(np.clip(picked[mask], _EPS, 1.0)).mean()),
    }
    baseline = {
        "accuracy": float((labels[mask] == majority).mean()),
        "last_step_accuracy": float((labels[rows, last] == majority).mean()),
    }
    return Evaluation(
        task="classification",
        primary="accuracy",
        model=model,
        baselines={"majority_class": baseline},
        steps=int(mask.sum()),
        streams=len(test),
    )


def _next_token(probs: np.ndarray, test: SequenceSet, train: SequenceSet) -> Evaluation:
    mask = test.mask()
    target = test.targets
    vocab = probs.shape[-1]
    counts = np.bincount(train.targets[train.mask()], minlength=vocab).astype(np.float64)
    unigram = counts / counts.sum()
    frequent = int(counts.argmax())
    picked = np.take_along_axis(probs, target[..., None], axis=-1)[..., 0]
    model = {
        "accuracy": float((probs.argmax(-1) == target)[mask].mean()),
        "cross_entropy": float(-np.log(np.clip(picked[mask], _EPS, 1.0)).mean()),
    }
    baselines = {
        "last_token": {"accuracy": float((test.inputs[..., 0] == target)[mask].mean())},
        "most_frequent_token": {
            "accuracy": float((target[mask] == frequent).mean()),
            "cross_entropy": float(-np.log(np.clip(unigram[target[mask]], _EPS, 1.0)).mean()),
        },
    }
    return Evaluation(
        task="next_token",
        primary="accuracy",
        model=model,
        baselines=baselines,
        steps=int(mask.sum()),
        streams=len(test),
    )
