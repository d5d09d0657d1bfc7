"""What a model means, as opposed to what it computes: names, task, features, labels.

The exporter measures shapes itself (`export.signature`); a `ModelInfo`
supplies what no probe can find: the model's name and version, its task,
what each input feature is called, the vocabulary of a token model, and
what each prediction output means. Our checkpoints store one; for your own
model, build one and pass it to `export.export_onnx`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import ExportError
from pipeline.model_spec import TASKS, Normalization

_DEFAULT_MEANING = {
    "regression": "forecast of the next value",
    "classification": "class probabilities",
    "next_token": "next-token distribution",
}


@dataclass(frozen=True)
class OutputInfo:
    """What one prediction output means; `labels` names the elements of its last axis."""

    meaning: str
    labels: tuple[str, ...] | None = None


@dataclass(frozen=True)
class ModelInfo:
    """Names and meaning of a model, for the ONNX metadata (`pipeline.model_spec.ModelSpec`).

    `outputs` holds one `OutputInfo` per prediction output, in order. When it is
    empty, the meaning comes from the task and there are no labels.
    `normalization` is recorded for audit only: the model must apply it itself
    (ours do; see `export.models.RecurrentNet`).
    """

    name: str
    task: str
    features: tuple[str, ...]
    version: str = "1"
    vocabulary: tuple[str, ...] | None = None
    outputs: tuple[OutputInfo, ...] = ()
    normalization: Normalization | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ExportError(f"task {self.task!r} is not one of {', '.join(TASKS)}")
        if not self.features:
            raise ExportError(f"model {self.name!r}: name at least one input feature")
        if self.task == "next_token" and not self.vocabulary:
            raise ExportError(f"model {self.name!r}: a next_token model needs its vocabulary")

    def output(self, i: int) -> OutputInfo:
        """Meaning of prediction output `i` (the task's default when none was given)."""
        if i < len(self.outputs):
            return self.outputs[i]
        return OutputInfo(meaning=_DEFAULT_MEANING[self.task])

    def to_dict(self) -> dict[str, Any]:
        """Plain values (lists, strings, floats) for a checkpoint file."""
        norm = self.normalization
        return {
            "name": self.name,
            "task": self.task,
            "features": list(self.features),
            "version": self.version,
            "vocabulary": None if self.vocabulary is None else list(self.vocabulary),
            "outputs": [
                {"meaning": o.meaning, "labels": None if o.labels is None else list(o.labels)}
                for o in self.outputs
            ],
            "normalization": None
            if norm is None
            else {
                "mean": list(norm.mean),
                "std": list(norm.std),
                "target_mean": None if norm.target_mean is None else list(norm.target_mean),
                "target_std": None if norm.target_std is None else list(norm.target_std),
            },
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelInfo:
        """Inverse of `to_dict`."""
        norm = d.get("normalization")
        return cls(
            name=str(d["name"]),
            task=str(d["task"]),
            features=tuple(str(f) for f in d["features"]),
            version=str(d.get("version", "1")),
            vocabulary=None if d.get("vocabulary") is None else tuple(d["vocabulary"]),
            outputs=tuple(
                OutputInfo(
                    meaning=str(o["meaning"]),
                    labels=None if o.get("labels") is None else tuple(o["labels"]),
                )
                for o in d.get("outputs", [])
            ),
            normalization=None
            if norm is None
            else Normalization(
                mean=tuple(float(v) for v in norm["mean"]),
                std=tuple(float(v) for v in norm["std"]),
                target_mean=None
                if norm.get("target_mean") is None
                else tuple(float(v) for v in norm["target_mean"]),
                target_std=None
                if norm.get("target_std") is None
                else tuple(float(v) for v in norm["target_std"]),
            ),
            extra={str(k): str(v) for k, v in d.get("extra", {}).items()},
        )
