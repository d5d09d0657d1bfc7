"""Training: truncated BPTT, gradient clipping, early stopping, fixed seeds, artifacts on disk.

`train(dataset, net_config, train_config, out_dir)` fits a `RecurrentNet` and
writes into `out_dir`:

- `model.pt`: the checkpoint (`export.checkpoint`). It carries the normalisation
  statistics, which also live in the model's buffers and so end up in the
  exported graph.
- `training-curve.png`: train and validation loss per epoch.
- `metrics.json`: held-out metrics against the naive baselines (`export.evaluate`).
- `holdout-events.jsonl`: the held-out streams as events
  `{"key": stream, "value": {"x": [...]}}`, one per line, interleaved across
  streams, each stream in time order. `hiddenstate produce` replays it.
- `holdout-labels.jsonl`: the truth for each of those events as label events
  `{"key": stream, "value": {"step": n, "y": ...}}` (docs/events.md), in the same
  order: what `--labels-topic` judges the served predictions by, so that the live
  accuracy can be set beside the held-out figure of `metrics.json`.

How a long sequence is trained: truncated BPTT. A batch of streams walks
through time in windows of `bptt` steps. The state is carried from one
window to the next, but the graph is cut (detached) between them, so
memory and time per update stay bounded however long the streams are.
Losses are masked, so the padding after a short sequence teaches nothing.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from export.checkpoint import save_checkpoint
from export.data import Dataset, SequenceSet
from export.evaluate import Evaluation, evaluate
from export.info import ModelInfo, OutputInfo
from export.models import NetConfig, RecurrentNet
from pipeline.model_spec import Normalization

CHECKPOINT_FILE = "model.pt"
CURVE_FILE = "training-curve.png"
METRICS_FILE = "metrics.json"
EVENTS_FILE = "holdout-events.jsonl"
LABELS_FILE = "holdout-labels.jsonl"


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings. `patience`: epochs without a better validation loss before stopping."""

    epochs: int = 60
    batch_size: int = 32
    bptt: int = 64
    lr: float = 3e-3
    clip: float = 1.0
    patience: int = 8
    seed: int = 0
    progress: bool = True


@dataclass(frozen=True)
class TrainResult:
    """What `train` produced: the best model, its evaluation, the files written."""

    net: RecurrentNet
    info: ModelInfo
    evaluation: Evaluation
    history: dict[str, list[float]]
    best_epoch: int
    seconds: float
    out_dir: Path
    weights_sha256: str


def train(
    dataset: Dataset,
    net_config: NetConfig,
    config: TrainConfig,
    out_dir: Path,
    *,
    name: str,
    version: str = "1",
) -> TrainResult:
    """Fit, evaluate and write every artifact; returns the best model (by validation loss)."""
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    net = RecurrentNet(net_config)
    normalization = _fit_normalization(net, dataset)
    optimizer = torch.optim.Adam(net.parameters(), lr=config.lr)
    rng = np.random.default_rng(config.seed)
    history: dict[str, list[float]] = {"train": [], "val": []}
    best_val, best_epoch, best_state = math.inf, 0, copy.deepcopy(net.state_dict())
    bar = _progress(config, name)
    for epoch in range(1, config.epochs + 1):
        train_loss = _train_epoch(net, dataset.train, optimizer, config, rng)
        val_loss = _loss_over(net, dataset.val, config.batch_size)
        history["train"].append(train_loss)
        history["val"].append(val_loss)
        # A relative margin, so that noise-level improvements do not keep a flat run alive.
        if val_loss < best_val * (1.0 - 1e-4):
            best_val, best_epoch, best_state = val_loss, epoch, copy.deepcopy(net.state_dict())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(train=f"{train_loss:.4f}", val=f"{val_loss:.4f}", best=best_epoch)
        if epoch - best_epoch >= config.patience:
            break
    if bar is not None:
        bar.close()
    net.load_state_dict(best_state)
    net.eval()
    evaluation = evaluate(net, dataset)
    info = model_info(dataset, name=name, version=version, normalization=normalization)
    seconds = time.perf_counter() - started

    out_dir.mkdir(parents=True, exist_ok=True)
    sha = save_checkpoint(out_dir / CHECKPOINT_FILE, net, info)
    plot_curve(history, best_epoch, out_dir / CURVE_FILE, title=f"{name} ({dataset.name})")
    metrics: dict[str, Any] = {
        "name": name,
        "dataset": dataset.name,
        "data": dataset.description,
        "net": net_config.to_dict(),
        "train": asdict(config),
        "epochs_run": len(history["train"]),
        "best_epoch": best_epoch,
        "best_val_loss": best_val,
        "train_seconds": round(seconds, 1),
        "weights_sha256": sha,
        **evaluation.to_dict(),
    }
    (out_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    write_events(out_dir / EVENTS_FILE, dataset.test)
    write_labels(out_dir / LABELS_FILE, dataset.test, dataset.task)
    return TrainResult(
        net=net,
        info=info,
        evaluation=evaluation,
        history=history,
        best_epoch=best_epoch,
        seconds=seconds,
        out_dir=out_dir,
        weights_sha256=sha,
    )


def model_info(
    dataset: Dataset, *, name: str, version: str, normalization: Normalization | None
) -> ModelInfo:
    """The metadata-facing description of a model trained on `dataset`."""
    if dataset.task == "regression":
        targets = dataset.targets or ()
        output = OutputInfo(
            meaning=f"forecast of the next value of {', '.join(targets)} (raw units)",
            labels=targets,
        )
    elif dataset.task == "classification":
        output = OutputInfo(meaning="class probabilities", labels=dataset.labels)
    else:
        output = OutputInfo(meaning="next-token distribution", labels=dataset.labels)
    return ModelInfo(
        name=name,
        task=dataset.task,
        features=dataset.features,
        version=version,
        vocabulary=dataset.labels if dataset.task == "next_token" else None,
        outputs=(output,),
        normalization=normalization,
        extra={"dataset": dataset.description},
    )


def write_events(path: Path, split: SequenceSet) -> int:
    """Write `split`'s inputs as events, round-robin across streams; return the line count.

    Floats are written in their shortest float32 form, so a reader that parses
    them back to float32 gets exactly the values the metrics were computed on.
    """
    lines = []
    max_len = int(split.lengths.max()) if len(split) else 0
    token = split.inputs.dtype == np.int64
    for t in range(max_len):
        for n, key in enumerate(split.keys):
            if t >= split.lengths[n]:
                continue
            row = split.inputs[n, t]
            if token:
                x = ",".join(str(int(v)) for v in row)
            else:
                x = ",".join(np.format_float_positional(v, unique=True, trim="0") for v in row)
            lines.append(f'{{"key": {json.dumps(key)}, "value": {{"x": [{x}]}}}}\n')
    path.write_text("".join(lines), encoding="utf-8")
    return len(lines)


def write_labels(path: Path, split: SequenceSet, task: str) -> int:
    """Write the truth of each of `split`'s events as a label event, in the order of
    `write_events`: step n (1 for a stream's first event) of each stream, `y` its class
    (or next token) index, or its target values (regression). Returns the line count."""
    lines = []
    max_len = int(split.lengths.max()) if len(split) else 0
    for t in range(max_len):
        for n, key in enumerate(split.keys):
            if t >= split.lengths[n]:
                continue
            target = split.targets[n, t]
            if task == "regression":
                values = ",".join(
                    np.format_float_positional(v, unique=True, trim="0") for v in target
                )
                y = f"[{values}]"
            else:
                y = str(int(target))
            lines.append(f'{{"key": {json.dumps(key)}, "value": {{"step": {t + 1}, "y": {y}}}}}\n')
    path.write_text("".join(lines), encoding="utf-8")
    return len(lines)


def plot_curve(history: dict[str, list[float]], best_epoch: int, path: Path, title: str) -> None:
    """Train and validation loss per epoch, the kept epoch marked."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server or in CI
    import matplotlib.pyplot as plt

    epochs = range(1, len(history["train"]) + 1)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.plot(epochs, history["train"], label="train")
    ax.plot(epochs, history["val"], label="validation")
    ax.axvline(
        best_epoch, color="grey", linestyle="--", linewidth=1, label=f"kept (epoch {best_epoch})"
    )
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _fit_normalization(net: RecurrentNet, dataset: Dataset) -> Normalization | None:
    """Training-set statistics, stored in the model (applied in the graph) and returned for metadata."""
    if dataset.task == "next_token":
        return None
    train = dataset.train
    mask = train.mask()
    x = train.inputs[mask].astype(np.float64)
    mean, std = x.mean(axis=0), x.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    target_mean = target_std = None
    if dataset.task == "regression":
        y = train.targets[mask].astype(np.float64)
        if net.config.residual:
            y = y - x
        target_mean, target_std = y.mean(axis=0), y.std(axis=0)
        target_std = np.where(target_std > 0, target_std, 1.0)
    net.set_normalization(
        torch.tensor(mean, dtype=torch.float32),
        torch.tensor(std, dtype=torch.float32),
        None if target_mean is None else torch.tensor(target_mean, dtype=torch.float32),
        None if target_std is None else torch.tensor(target_std, dtype=torch.float32),
    )
    # Record what the model holds (float32), not the float64 estimates.
    return Normalization(
        mean=tuple(float(v) for v in net.in_mean),
        std=tuple(float(v) for v in net.in_std),
        target_mean=None if target_mean is None else tuple(float(v) for v in net.target_mean),
        target_std=None if target_std is None else tuple(float(v) for v in net.target_std),
    )


def _batch_loss(
    net: RecurrentNet, xs: Tensor, ys: Tensor, mask: Tensor, state: tuple[Tensor, ...] | None
) -> tuple[Tensor, tuple[Tensor, ...]]:
    out, new_state = net(xs, state)
    if net.config.task == "regression":
        target = net.target_space(xs, ys)
        # Huber, not squared error: injected anomalies are unpredictable by design,
        # and squared, their few huge errors would outweigh every ordinary step.
        per_step = nn.functional.huber_loss(out, target, reduction="none", delta=1.0).mean(dim=-1)
    else:
        per_step = nn.functional.cross_entropy(out.transpose(1, 2), ys, reduction="none")
    weight = mask.to(per_step.dtype)
    return (per_step * weight).sum() / weight.sum().clamp(min=1.0), new_state


def _train_epoch(
    net: RecurrentNet,
    split: SequenceSet,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    rng: np.random.Generator,
) -> float:
    net.train()
    order = rng.permutation(len(split))
    total, count = 0.0, 0
    for start in range(0, len(order), config.batch_size):
        rows = order[start : start + config.batch_size]
        length = int(split.lengths[rows].max())
        xs = torch.from_numpy(split.inputs[rows, :length])
        ys = torch.from_numpy(split.targets[rows, :length])
        mask = torch.from_numpy(split.mask()[rows, :length])
        state: tuple[Tensor, ...] | None = None
        for t0 in range(0, length, config.bptt):
            window = slice(t0, t0 + config.bptt)
            if not bool(mask[:, window].any()):
                break
            loss, state = _batch_loss(net, xs[:, window], ys[:, window], mask[:, window], state)
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), config.clip)
            optimizer.step()
            # Truncation: keep the state's values, drop its history.
            state = tuple(s.detach() for s in state)
            n = int(mask[:, window].sum())
            total += float(loss.detach()) * n
            count += n
    return total / max(count, 1)


def _loss_over(net: RecurrentNet, split: SequenceSet, batch_size: int) -> float:
    net.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(split), batch_size):
            rows = slice(start, start + batch_size)
            xs = torch.from_numpy(split.inputs[rows])
            ys = torch.from_numpy(split.targets[rows])
            mask = torch.from_numpy(split.mask()[rows])
            loss, _ = _batch_loss(net, xs, ys, mask, None)
            n = int(mask.sum())
            total += float(loss) * n
            count += n
    return total / max(count, 1)


def _progress(config: TrainConfig, name: str) -> Any:
    if not config.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=config.epochs, desc=f"train {name}", unit="epoch", leave=True)
