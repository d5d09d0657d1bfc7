"""Bytes in, bytes out: decode input events, encode predictions and dead letters.

Input record (pipeline/schemas/event.schema.json, docs/events.md):

- key: the stream id, any non-empty bytes (a missing or empty key is bad input);
- value: a UTF-8 JSON object
  `{"x": [1.0, 2.5, ...] | {"feature": 1.0, ...}, "ts": 1700000000000, "reset": false}`
  - `x` as an array lists the features in the model's order; as an object it names
    every feature of the model exactly once (order free). A `next_token` model
    takes `[token_id]` or `{"<feature>": token_id}`, an integer below the vocabulary size;
  - `ts` (optional) event time in ms since the epoch, else the record's timestamp;
  - `reset` (optional) true: the stream restarts from zeros before this event's step;
  - other fields are ignored (tolerant reader: producers may add trace ids).

Every way an event can be bad raises `BadEventError(reason, detail)` with one
of `REASONS`: a fixed set, because it is a metric label.

This is the hot path: one JSON parse per event, type and range checks in one
Python pass, no per-event numpy call; numbers are formatted with `%`
formats (`%.9g` round-trips float32) instead of `json.dumps`, a whole wave
per call.

The JSON parser: orjson when it is installed (the `fast` extra; about 0.3 us
for an 8-feature event against 2 us for the standard library's), else the
standard library's. orjson refuses everything the standard library refuses
and also NaN/Infinity literals, lone surrogates and numbers beyond float
range; whatever orjson refuses goes through the standard library, which then
names the reason, so the reasons are the same with or without it. Two
corners differ, both documented in docs/events.md: orjson reads integers
beyond 64 bits as floats (the feature value is the same float32; only the
detail text of an error quoting one differs), and it parses nesting up to
1024 levels where the standard library's recursion limit (about 1000)
makes such a document `not_json`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from importlib import resources
from itertools import chain, repeat
from typing import Any, NamedTuple, cast

import numpy as np
from numpy.typing import NDArray

from pipeline.errors import BadEventError
from pipeline.model_spec import InputSpec, ModelSpec
from pipeline.records import InputRecord, OutputRecord

REASONS = (
    "missing_key",
    "missing_value",
    "oversized",
    "undecodable",
    "not_json",
    "schema",
    "feature_count",
    "feature_names",
    "wrong_type",
    "non_finite",
    "token_out_of_range",
    "wrong_magic_byte",
    "unknown_schema_id",
)
"""Every dead-letter reason label (bounded: it labels hiddenstate_dead_letters_total).
The last two come only from the Schema Registry formats (`pipeline.formats`), which
also use `undecodable` for a payload its writer schema does not decode."""

REGISTRY_REASONS = ("wrong_magic_byte", "unknown_schema_id")

try:
    from orjson import OPT_SERIALIZE_NUMPY
    from orjson import JSONDecodeError as _FastJSONError
    from orjson import dumps as _fast_dumps
    from orjson import loads as _fast_loads

    FAST_JSON: Callable[[bytes], Any] | None = _fast_loads

    def _dump_numpy(array: NDArray[np.float32]) -> bytes:
        return _fast_dumps(array, option=OPT_SERIALIZE_NUMPY)

    FAST_JSON_NUMPY: Callable[[NDArray[np.float32]], bytes] | None = _dump_numpy
except ImportError:  # without the `fast` extra: the standard library's parser only
    FAST_JSON = None
    FAST_JSON_NUMPY = None

    class _FastJSONError(ValueError):  # type: ignore[no-redef]
        """Never raised: stands in for orjson's error when orjson is missing."""


FLOAT32_MAX = float(np.finfo(np.float32).max)
_DETAIL_LIMIT = 300  # characters of offending input quoted in a detail
_HEADER_DETAIL_LIMIT = 1000
_decoder = json.JSONDecoder()


def _decode_json(text: str) -> Any:
    """`json.loads` without its per-call checks and two whitespace regex scans:
    `raw_decode` straight away, falling back to the full path only for the rare
    value with whitespace around it."""
    try:
        body, end = _decoder.raw_decode(text)
    except ValueError:
        return _decoder.decode(text)  # leading whitespace, or really not JSON: its error
    if end != len(text):
        return _decoder.decode(text)  # trailing whitespace is fine, trailing data raises
    return body


class Event(NamedTuple):
    """A decoded, valid input event: features in the model's order, as Python numbers.
    A named tuple: immutable and cheap to build, one per event (see `InputRecord`)."""

    key: bytes
    x: list[float] | list[int]
    event_time_ms: int
    reset: bool
    record: InputRecord


def _parse(value: bytes) -> Any:
    """UTF-8 JSON with the standard library; `BadEventError` (undecodable, not_json)."""
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadEventError(
            "undecodable", f"the value is not UTF-8 ({exc.reason} at byte {exc.start})"
        ) from exc
    try:
        return _decode_json(text)
    except ValueError as exc:  # json.JSONDecodeError
        raise BadEventError("not_json", f"the value is not JSON ({exc})") from exc
    except RecursionError as exc:
        raise BadEventError("not_json", "the value nests too deeply to parse") from exc


def _quote(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _DETAIL_LIMIT else text[:_DETAIL_LIMIT] + "..."


class EventDecoder:
    """Turns input records into `Event`s for one model's input, or raises `BadEventError`."""

    def __init__(self, spec: InputSpec, max_event_bytes: int) -> None:
        self._features = spec.features
        self._n = len(spec.features)
        self._names = frozenset(spec.features)
        self._tokens = len(spec.vocabulary) if spec.dtype == "int64" and spec.vocabulary else None
        self._max_bytes = max_event_bytes

    def decode(self, record: InputRecord) -> Event:
        """Decode and validate one record; raises `BadEventError` naming the reason."""
        key = record.key
        value = check_envelope(record, self._max_bytes)
        fast = FAST_JSON
        if fast is None:
            body = _parse(value)
        else:
            try:
                body = fast(value)
            except _FastJSONError:
                body = _parse(value)  # refused: the standard library names the reason
        if type(body) is not dict:
            raise BadEventError(
                "schema", f"the value must be a JSON object, got {type(body).__name__}"
            )
        x = self._features_of(body)
        return Event(cast(bytes, key), x, self._event_time(body, record), self._reset(body), record)

    def _features_of(self, body: dict[str, Any]) -> list[Any]:
        x = body.get("x")
        if type(x) is list:
            if len(x) != self._n:
                raise BadEventError(
                    "feature_count",
                    f"'x' has {len(x)} values, the model takes {self._n}: {list(self._features)}",
                )
        elif type(x) is dict:
            if len(x) != self._n or not self._names.issuperset(x):
                missing = [f for f in self._features if f not in x]
                extra = sorted(k for k in x if k not in self._names)
                raise BadEventError(
                    "feature_names",
                    f"'x' must name each of {list(self._features)}; missing {missing}, "
                    f"unknown {_quote(extra)}",
                )
            x = [x[name] for name in self._features]
        elif x is None:
            raise BadEventError("schema", "the object has no 'x' (the features)")
        else:
            raise BadEventError(
                "schema", f"'x' must be an array or an object, got {type(x).__name__}"
            )
        return checked_features(x, self._tokens)

    @staticmethod
    def _event_time(body: dict[str, Any], record: InputRecord) -> int:
        ts = body.get("ts")
        if ts is None:
            return record.timestamp_ms
        kind = type(ts)
        if (kind is int or kind is float) and 0 <= ts < 1e16:  # 1e16 ms: year 318857
            return int(ts)
        raise BadEventError(
            "schema", f"'ts' must be milliseconds since the epoch (>= 0), got {_quote(ts)}"
        )

    @staticmethod
    def _reset(body: dict[str, Any]) -> bool:
        reset = body.get("reset", False)
        if type(reset) is not bool:
            raise BadEventError("schema", f"'reset' must be true or false, got {_quote(reset)}")
        return reset


def check_envelope(record: InputRecord, max_bytes: int) -> bytes:
    """The record's value once key, value and size are fine (every format checks these
    first); `BadEventError` (missing_key, missing_value, oversized) otherwise."""
    if not record.key:
        raise BadEventError(
            "missing_key", "the record has no key; the key is the stream id, and must be set"
        )
    value = record.value
    if value is None:
        raise BadEventError("missing_value", "the record has no value (null/tombstone)")
    if len(value) > max_bytes:
        raise BadEventError(
            "oversized", f"the value is {len(value)} bytes, the limit is {max_bytes}"
        )
    return value


def checked_features(x: list[Any], vocabulary_size: int | None) -> list[Any]:
    """`x` (the features in the model's order) once every value is a finite float32, or
    a token id below `vocabulary_size` for a token model; `BadEventError` otherwise."""
    if vocabulary_size is not None:
        return _token_ids(x, vocabulary_size)
    for v in x:
        kind = type(v)
        if kind is not float and kind is not int:
            raise BadEventError("wrong_type", f"features must be numbers, got {_quote(v)}")
        # One comparison catches NaN, infinities and values float32 cannot hold.
        if not -FLOAT32_MAX <= v <= FLOAT32_MAX:
            raise BadEventError("non_finite", f"feature value {_quote(v)} is not a finite float32")
    return x


def _token_ids(x: list[Any], vocabulary_size: int) -> list[int]:
    ids = []
    for v in x:
        kind = type(v)
        if kind is float and v.is_integer():
            v = int(v)  # JSON Schema counts 3.0 as an integer; so do we
        elif kind is not int:
            raise BadEventError("wrong_type", f"a token id must be an integer, got {_quote(v)}")
        if not 0 <= v < vocabulary_size:
            raise BadEventError(
                "token_out_of_range",
                f"token id {v} is outside the vocabulary [0, {vocabulary_size})",
            )
        ids.append(v)
    return ids


def _number_format(shape: tuple[int, ...]) -> bytes:
    """A `%` format writing a `[*shape]` array (flattened values) as nested JSON arrays."""
    if not shape:
        return b"%.9g"
    inner = _number_format(shape[1:])
    return b"[" + b",".join([inner] * shape[0]) + b"]"


_SEPARATOR = b"\x00"  # never inside a formatted value: JSON escapes control characters


class PredictionEncoder:
    """Writes the prediction records of a wave (pipeline/schemas/prediction.schema.json).

    A wave is formatted in a few C calls, not a format call per event:

    - the predicted numbers of each output, for the whole wave at once: with
      orjson (the `fast` extra), one `dumps` of the `[wave, *shape]` array,
      cut into rows; without it, one `%` operation on a row format (`%.9g`
      per number) repeated once per event. Both write float32 exactly (orjson
      the shortest decimal that reads back as the same float32, `%.9g` nine
      significant digits) and a non-finite value as null;
    - the records around them: one `%` operation on the record format
      repeated once per event, joined by a separator, then split.

    The per-event Python work left is gathering the event's columns.
    """

    def __init__(self, spec: ModelSpec, topic: str, *, by_source_partition: bool = False) -> None:
        """`by_source_partition`: each record goes to the partition number of its input
        event, not to the partitioner's choice by key (a shadow's predictions:
        `pipeline.shadow`)."""
        self._topic = topic
        self._by_source_partition = by_source_partition
        model = json.dumps({"name": spec.name, "version": spec.version}, separators=(",", ":"))
        # A literal part of a % format has its own % doubled (a model named "50%").
        self._head = _literal('{"model":' + model + ',"source":{"topic":')
        members = b",".join(_literal(json.dumps(o.name) + ":") + b"%s" for o in spec.outputs)
        self._tail = b',"outputs":{' + members + b"}}"
        self._outputs = [(o.name, o.shape, _number_format(o.shape)) for o in spec.outputs]
        self._topics: dict[str, bytes] = {}

    def encode_wave(
        self,
        events: Sequence[Event],
        outputs: dict[str, NDArray[np.float32]],
        steps: NDArray[np.int64],
        queued_seconds: float,
        inference_seconds: float,
    ) -> list[OutputRecord]:
        """One record per event of the wave; row `i` of `outputs` and `steps` is event `i`'s."""
        batch = len(events)
        if not batch:
            return []
        latency = (
            f'"latency":{{"queued_seconds":{queued_seconds:.9g},'
            f'"inference_seconds":{inference_seconds:.9g}}}'
        ).encode()
        template = (
            self._head
            + b'%s,"partition":%d,"offset":%d},"event_time_ms":%d,"step":%d,'
            + latency
            + self._tail
        )
        records = [e.record for e in events]
        quoted = self._quoted
        columns = [
            [quoted(r.topic) for r in records],
            [r.partition for r in records],
            [r.offset for r in records],
            [e.event_time_ms for e in events],
            steps.tolist(),
            *(self._rows(outputs[name], shape, fmt, batch) for name, shape, fmt in self._outputs),
        ]
        arguments = tuple(chain.from_iterable(zip(*columns, strict=True)))
        values = (_SEPARATOR.join([template] * batch) % arguments).split(_SEPARATOR)
        keys = [e.key for e in events]
        if self._by_source_partition:
            partitions = [r.partition for r in records]
            return list(
                map(OutputRecord, repeat(self._topic), keys, values, repeat(()), partitions)
            )
        return list(map(OutputRecord, repeat(self._topic), keys, values))

    def _quoted(self, topic: str) -> bytes:
        quoted = self._topics.get(topic)
        if quoted is None:
            quoted = self._topics.setdefault(topic, json.dumps(topic).encode())
        return quoted

    @staticmethod
    def _rows(
        output: NDArray[np.float32], shape: tuple[int, ...], fmt: bytes, batch: int
    ) -> list[bytes]:
        """One output's value for every event of the wave, as JSON."""
        if FAST_JSON_NUMPY is not None:
            return _split_rows(FAST_JSON_NUMPY(np.ascontiguousarray(output)), len(shape))
        array = output.reshape(batch, -1)
        finite = np.isfinite(array).all(axis=1)
        if finite.all():
            return (_SEPARATOR.join([fmt] * batch) % tuple(array.ravel().tolist())).split(
                _SEPARATOR
            )
        # JSON has no NaN/Infinity: a non-finite prediction value is written as null.
        return [
            fmt % tuple(values) if ok else _with_nulls(values, shape).encode()
            for values, ok in zip(array.tolist(), cast(list[bool], finite.tolist()), strict=True)
        ]


def _literal(text: str) -> bytes:
    """`text` as a literal part of a bytes `%` format."""
    return text.replace("%", "%%").encode()


def _split_rows(dumped: bytes, rank: int) -> list[bytes]:
    """The rows of a JSON array of `[batch, *shape]` numbers, `rank = len(shape)`.

    Rows of rank r are separated by r closing brackets, a comma and r opening
    ones; inside a row at most r - 1 brackets close in a row before a comma."""
    inner = dumped[1:-1]
    if rank == 0:
        return inner.split(b",")
    closing, opening = b"]" * rank, b"[" * rank
    return inner.replace(closing + b"," + opening, closing + _SEPARATOR + opening).split(_SEPARATOR)


def _with_nulls(values: list[float], shape: tuple[int, ...]) -> str:
    cleaned = [v if math.isfinite(v) else None for v in values]
    nested: Any = np.array(cleaned, dtype=object).reshape(shape).tolist() if shape else cleaned[0]
    return json.dumps(nested, separators=(",", ":"))


def dead_letter(record: InputRecord, error: BadEventError, topic: str) -> OutputRecord:
    """The dead-letter record for a bad input: original key, value and headers, plus
    headers saying why and where it came from."""
    detail = error.detail[:_HEADER_DETAIL_LIMIT]
    headers = (
        *record.headers,
        ("hiddenstate.error.reason", error.reason.encode()),
        ("hiddenstate.error.detail", detail.encode("utf-8", "replace")),
        ("hiddenstate.source.topic", record.topic.encode()),
        ("hiddenstate.source.partition", str(record.partition).encode()),
        ("hiddenstate.source.offset", str(record.offset).encode()),
        ("hiddenstate.source.timestamp_ms", str(record.timestamp_ms).encode()),
    )
    return OutputRecord(topic, record.key, record.value, headers)


def event_schema(spec: ModelSpec) -> dict[str, Any]:
    """The JSON Schema of input values for this very model (feature names, count,
    token range), derived from pipeline/schemas/event.schema.json's shape: hand it to
    producers. Non-finite and float32-overflowing numbers are refused beyond it."""
    inp = spec.input
    if inp.dtype == "int64":
        number: dict[str, Any] = {
            "type": "integer",
            "minimum": 0,
            "maximum": len(inp.vocabulary or ()) - 1,
        }
    else:
        number = {"type": "number"}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"input event of {spec.identity}",
        "type": "object",
        "required": ["x"],
        "properties": {
            "x": {
                "oneOf": [
                    {
                        "type": "array",
                        "items": number,
                        "minItems": len(inp.features),
                        "maxItems": len(inp.features),
                    },
                    {
                        "type": "object",
                        "properties": {name: number for name in inp.features},
                        "required": list(inp.features),
                        "additionalProperties": False,
                    },
                ]
            },
            "ts": {"type": "number", "minimum": 0, "exclusiveMaximum": 1e16},
            "reset": {"type": "boolean"},
        },
    }


def packaged_schema(name: str) -> dict[str, Any]:
    """A JSON Schema shipped in pipeline/schemas: `"event"` or `"prediction"`."""
    text = (resources.files("pipeline") / "schemas" / f"{name}.schema.json").read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema
