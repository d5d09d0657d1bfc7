"""The step contract's metadata: what an exported ONNX file tells the server.

The ONNX file is the only thing the offline side (`export`) hands to the
online side (`pipeline`). Its graph is one recurrent step; its
`metadata_props` hold a `ModelSpec` as JSON strings under `hiddenstate.*`
keys. `export` writes them with `ModelSpec.to_metadata()`, the server reads
them with `ModelSpec.from_metadata()`: one implementation of the contract,
described for humans in docs/step-contract.md.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import ModelContractError

CONTRACT_VERSION = 1
TASKS = ("regression", "classification", "next_token")
STATE_DTYPES = ("float32",)
INPUT_DTYPES = ("float32", "int64")
_DTYPE_BYTES = {"float32": 4, "int64": 8}

_KEY_CONTRACT = "hiddenstate.contract"
_KEY_MODEL = "hiddenstate.model"
_KEY_INPUT = "hiddenstate.input"
_KEY_STATES = "hiddenstate.states"
_KEY_OUTPUTS = "hiddenstate.outputs"
_KEY_NORMALIZATION = "hiddenstate.normalization"
_KEY_PARITY = "hiddenstate.parity"
_KEY_EXPORT = "hiddenstate.export"


@dataclass(frozen=True)
class InputSpec:
    """The graph input `name`: `[batch, len(features)]` of `dtype`.

    For `int64` token input there is one feature (the token id) and
    `vocabulary[i]` is the token whose id is `i`.
    """

    features: tuple[str, ...]
    dtype: str = "float32"
    name: str = "x"
    vocabulary: tuple[str, ...] | None = None


@dataclass(frozen=True)
class StateSpec:
    """One recurrent state tensor: graph input `name`, graph output `output`.

    `shape` is per stream, batch axis excluded: the graph sees
    `[batch, *shape]`. Every stream starts from zeros.
    """

    name: str
    output: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    @property
    def nbytes(self) -> int:
        """Bytes one stream's copy of this state takes."""
        return math.prod(self.shape) * _DTYPE_BYTES[self.dtype]


@dataclass(frozen=True)
class OutputSpec:
    """One prediction output: graph output `name`, `[batch, *shape]` float32.

    `labels` names each element of the last axis where that means something
    (class names, forecast target names, vocabulary).
    """

    name: str
    shape: tuple[int, ...]
    meaning: str
    labels: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Normalization:
    """Statistics used in training. The exported graph applies them itself:
    the server feeds raw features and receives predictions in raw units.
    Recorded for audit and for producers that want to check their units."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    target_mean: tuple[float, ...] | None = None
    target_std: tuple[float, ...] | None = None


@dataclass(frozen=True)
class Parity:
    """What `export`'s parity check measured (PyTorch sequence vs ONNX steps)."""

    max_abs_error: float
    tolerance: float
    sequences: int
    max_steps: int


@dataclass(frozen=True)
class ModelSpec:
    """Everything the server needs to know about an exported step graph."""

    name: str
    version: str
    task: str
    cell: str
    weights_sha256: str
    input: InputSpec
    states: tuple[StateSpec, ...]
    outputs: tuple[OutputSpec, ...]
    normalization: Normalization | None = None
    parity: Parity | None = None
    export: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def identity(self) -> str:
        """`name@version#hash`: snapshots taken under another identity are not applied."""
        return f"{self.name}@{self.version}#{self.weights_sha256[:16]}"

    @property
    def state_bytes(self) -> int:
        """Bytes of hidden state one stream holds."""
        return sum(s.nbytes for s in self.states)

    def to_metadata(self) -> dict[str, str]:
        """The `metadata_props` entries for this spec (every value a JSON string)."""
        props: dict[str, Any] = {
            _KEY_CONTRACT: CONTRACT_VERSION,
            _KEY_MODEL: {
                "name": self.name,
                "version": self.version,
                "task": self.task,
                "cell": self.cell,
                "weights_sha256": self.weights_sha256,
            },
            _KEY_INPUT: {
                "name": self.input.name,
                "dtype": self.input.dtype,
                "features": list(self.input.features),
                "vocabulary": _list_or_none(self.input.vocabulary),
            },
            _KEY_STATES: [
                {"name": s.name, "output": s.output, "shape": list(s.shape), "dtype": s.dtype}
                for s in self.states
            ],
            _KEY_OUTPUTS: [
                {
                    "name": o.name,
                    "shape": list(o.shape),
                    "meaning": o.meaning,
                    "labels": _list_or_none(o.labels),
                }
                for o in self.outputs
            ],
            _KEY_NORMALIZATION: None
            if self.normalization is None
            else {
                "mean": list(self.normalization.mean),
                "std": list(self.normalization.std),
                "target_mean": _list_or_none(self.normalization.target_mean),
                "target_std": _list_or_none(self.normalization.target_std),
            },
            _KEY_PARITY: None
            if self.parity is None
            else {
                "max_abs_error": self.parity.max_abs_error,
                "tolerance": self.parity.tolerance,
                "sequences": self.parity.sequences,
                "max_steps": self.parity.max_steps,
            },
            _KEY_EXPORT: dict(self.export),
        }
        return {key: json.dumps(value) for key, value in props.items()}

    @classmethod
    def from_metadata(cls, props: Mapping[str, str], source: str = "model") -> ModelSpec:
        """Read a spec from `metadata_props`; `source` (a path) goes into error messages."""
        values = _decode_props(props, source)
        try:
            model = values[_KEY_MODEL]
            inp = values[_KEY_INPUT]
            norm = values.get(_KEY_NORMALIZATION)
            parity = values.get(_KEY_PARITY)
            return cls(
                name=str(model["name"]),
                version=str(model["version"]),
                task=str(model["task"]),
                cell=str(model["cell"]),
                weights_sha256=str(model["weights_sha256"]),
                input=InputSpec(
                    name=str(inp["name"]),
                    dtype=str(inp["dtype"]),
                    features=tuple(str(f) for f in inp["features"]),
                    vocabulary=_tuple_or_none(inp.get("vocabulary"), str),
                ),
                states=tuple(
                    StateSpec(
                        name=str(s["name"]),
                        output=str(s["output"]),
                        shape=tuple(int(d) for d in s["shape"]),
                        dtype=str(s["dtype"]),
                    )
                    for s in values[_KEY_STATES]
                ),
                outputs=tuple(
                    OutputSpec(
                        name=str(o["name"]),
                        shape=tuple(int(d) for d in o["shape"]),
                        meaning=str(o["meaning"]),
                        labels=_tuple_or_none(o.get("labels"), str),
                    )
                    for o in values[_KEY_OUTPUTS]
                ),
                normalization=None
                if norm is None
                else Normalization(
                    mean=tuple(float(v) for v in norm["mean"]),
                    std=tuple(float(v) for v in norm["std"]),
                    target_mean=_tuple_or_none(norm.get("target_mean"), float),
                    target_std=_tuple_or_none(norm.get("target_std"), float),
                ),
                parity=None
                if parity is None
                else Parity(
                    max_abs_error=float(parity["max_abs_error"]),
                    tolerance=float(parity["tolerance"]),
                    sequences=int(parity["sequences"]),
                    max_steps=int(parity["max_steps"]),
                ),
                export={str(k): str(v) for k, v in values.get(_KEY_EXPORT, {}).items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ModelContractError(
                f"{source}: hiddenstate metadata is incomplete or malformed ({exc!r}); "
                "re-export the model with `hiddenstate export`"
            ) from exc


def _decode_props(props: Mapping[str, str], source: str) -> dict[str, Any]:
    if _KEY_CONTRACT not in props:
        raise ModelContractError(
            f"{source}: no '{_KEY_CONTRACT}' in the ONNX metadata_props, so this file was not "
            "made by `hiddenstate export`; export it with hiddenstate (docs/step-contract.md)"
        )
    values: dict[str, Any] = {}
    for key, raw in props.items():
        if not key.startswith("hiddenstate."):
            continue
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ModelContractError(
                f"{source}: metadata '{key}' is not JSON ({exc.msg}); re-export the model"
            ) from exc
    if values[_KEY_CONTRACT] != CONTRACT_VERSION:
        raise ModelContractError(
            f"{source}: step contract version {values[_KEY_CONTRACT]!r}, this server reads "
            f"version {CONTRACT_VERSION}; re-export with this hiddenstate version"
        )
    return values


def _validate(spec: ModelSpec) -> None:
    where = f"model {spec.name!r}"
    if spec.task not in TASKS:
        raise ModelContractError(f"{where}: task {spec.task!r} is not one of {', '.join(TASKS)}")
    if spec.input.dtype not in INPUT_DTYPES:
        raise ModelContractError(
            f"{where}: input dtype {spec.input.dtype!r} is not one of {', '.join(INPUT_DTYPES)}"
        )
    if not spec.input.features:
        raise ModelContractError(f"{where}: the input has no features")
    if spec.input.dtype == "int64" and not spec.input.vocabulary:
        raise ModelContractError(f"{where}: token (int64) input needs a vocabulary")
    if not spec.states:
        raise ModelContractError(f"{where}: a recurrent step needs at least one state tensor")
    if not spec.outputs:
        raise ModelContractError(f"{where}: the step has no prediction output")
    names = [spec.input.name]
    for s in spec.states:
        if s.dtype not in STATE_DTYPES:
            raise ModelContractError(
                f"{where}: state {s.name!r} has dtype {s.dtype!r}; states must be float32"
            )
        if not s.shape or any(d <= 0 for d in s.shape):
            raise ModelContractError(
                f"{where}: state {s.name!r} has shape {list(s.shape)}; per-stream state shapes "
                "must be fixed positive sizes"
            )
        names += [s.name, s.output]
    names += [o.name for o in spec.outputs]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ModelContractError(f"{where}: tensor names used twice: {', '.join(duplicated)}")


def _list_or_none(values: tuple[Any, ...] | None) -> list[Any] | None:
    return None if values is None else list(values)


def _tuple_or_none(values: Any, kind: type) -> tuple[Any, ...] | None:
    return None if values is None else tuple(kind(v) for v in values)
