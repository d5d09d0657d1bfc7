"""How a registered input schema maps to a model's features: checked once, at start.

Pure logic, no registry client: each format turns its schema into a list of
`Field`s (`pipeline.formats.schemas`), and `map_features` decides how an
event of that schema gives the model its features, or raises `ConfigError`
naming the missing or mistyped field. Two shapes are accepted:

- **by name**: the record has a field named like each of the model's
  features (`hiddenstate.input.features`), each a number (a token model: an
  integer);
- **one array**: no feature is named, and the record has exactly one field
  that is an array of numbers (of integers for a token model), in the
  model's feature order; a field named `x` wins if there are several.

Optional, as in the JSON events: `ts`, an integer (ms since the epoch), and
`reset`, a boolean. Other fields are ignored (producers may add trace ids).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from pipeline.errors import ConfigError
from pipeline.model_spec import InputSpec

NUMBER = "number"
INTEGER = "integer"
BOOLEAN = "boolean"
NUMBERS = "array of number"
INTEGERS = "array of integer"


class Field(NamedTuple):
    """One top-level field of a record schema. `kind` is one of the constants above,
    or the schema's own name for any other type (quoted in errors)."""

    name: str
    kind: str


@dataclass(frozen=True)
class FeatureMapping:
    """Where an event of one schema holds the model's features, time and reset flag."""

    by_name: tuple[str, ...] | None  # the feature fields, in the model's order
    array: str | None  # or the one array field
    ts: str | None
    reset: str | None
    tokens: bool  # a token model: features are integer ids


def map_features(fields: Sequence[Field], spec: InputSpec, subject: str) -> FeatureMapping:
    """The mapping of `fields` (the registered schema of `subject`) onto `spec`'s features;
    `ConfigError` naming the field when there is none."""
    tokens = spec.dtype == "int64"
    scalar_ok = {INTEGER} if tokens else {NUMBER, INTEGER}
    array_ok = {INTEGERS} if tokens else {NUMBERS, INTEGERS}
    needed = "an integer (int or long)" if tokens else "a number (float, double, int or long)"
    kinds = {f.name: f.kind for f in fields}
    where = f"the schema registered under subject {subject!r}"
    named = [name for name in spec.features if name in kinds]
    if named:
        missing = [name for name in spec.features if name not in kinds]
        if missing:
            raise ConfigError(
                f"{where} has fields for some of the model's features but not for "
                f"{missing}; it needs a field for each of {list(spec.features)} "
                "(or one array field holding them in that order)"
            )
        for name in spec.features:
            if kinds[name] not in scalar_ok:
                raise ConfigError(
                    f"{where}: field {name!r} is {kinds[name]}; the model's feature "
                    f"{name!r} needs {needed}"
                )
        by_name: tuple[str, ...] | None = tuple(spec.features)
        array = None
    else:
        arrays = [f.name for f in fields if f.kind in array_ok]
        if "x" in arrays:
            arrays = ["x"]
        if len(arrays) != 1:
            found = ", ".join(f"{f.name!r} ({f.kind})" for f in fields) or "no fields"
            problem = "several array fields " + str(arrays) if arrays else "neither"
            raise ConfigError(
                f"{where} has {problem}: it needs fields named like the model's features "
                f"{list(spec.features)}, or one field that is an array of "
                f"{'integers' if tokens else 'numbers'} (in that order); it has {found}"
            )
        by_name, array = None, arrays[0]
    ts = _optional(kinds, "ts", {INTEGER}, "an integer (long: ms since the epoch)", where)
    reset = _optional(kinds, "reset", {BOOLEAN}, "a boolean", where)
    return FeatureMapping(by_name, array, ts, reset, tokens)


def _optional(
    kinds: dict[str, str], name: str, allowed: set[str], needed: str, where: str
) -> str | None:
    kind = kinds.get(name)
    if kind is None:
        return None
    if kind not in allowed:
        raise ConfigError(f"{where}: field {name!r} is {kind}; it must be {needed}")
    return name
