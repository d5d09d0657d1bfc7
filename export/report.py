"""The baseline table: every preset's held-out metric beside its naive baselines, in Markdown."""

from __future__ import annotations

import os
import platform
from datetime import UTC, datetime
from typing import Any

_BASELINE_NAMES = {
    "last_value": "last value",
    "seasonal_naive": "seasonal naive",
    "majority_class": "majority class",
    "last_token": "last token",
    "most_frequent_token": "most frequent token",
}
_METRIC_NAMES = {"mae": "MAE ↓", "accuracy": "accuracy ↑"}


def machine_line() -> str:
    """Where and when: CPU, cores, OS, Python and torch versions, UTC date."""
    import torch

    cpu = platform.processor() or platform.machine()
    return (
        f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"{datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}"
    )


def baseline_table(metrics: list[dict[str, Any]]) -> str:
    """One row per trained model (the dicts written to metrics.json), as a Markdown table."""
    lines = [
        "| model | data | task | held-out metric | model | baselines | beats all | epochs | train time |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m in metrics:
        primary = m["primary"]
        baselines = ", ".join(
            f"{_BASELINE_NAMES.get(name, name)} {values[primary]:.4f}"
            for name, values in m["baselines"].items()
        )
        lines.append(
            f"| `{m['name']}` | {m['dataset']} | {m['task']} | "
            f"{_METRIC_NAMES.get(primary, primary)} | **{m['model'][primary]:.4f}** | {baselines} | "
            f"{'yes' if m['beats_baselines'] else 'NO'} | {m['epochs_run']} (kept {m['best_epoch']}) | "
            f"{m['train_seconds']:.0f} s |"
        )
    return "\n".join(lines) + "\n"


def secondary_table(metrics: list[dict[str, Any]]) -> str:
    """The other metrics (RMSE, last-step accuracy, log loss, cross-entropy), model vs baselines."""
    lines = ["| model | metric | model | baselines |", "| --- | --- | --- | --- |"]
    for m in metrics:
        for metric, value in m["model"].items():
            if metric == m["primary"]:
                continue
            theirs = ", ".join(
                f"{_BASELINE_NAMES.get(name, name)} {values[metric]:.4f}"
                for name, values in m["baselines"].items()
                if metric in values
            )
            lines.append(f"| `{m['name']}` | {metric} | {value:.4f} | {theirs or '—'} |")
    return "\n".join(lines) + "\n"
