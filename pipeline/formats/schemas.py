"""Schemas of the Schema Registry formats: what a registered input schema's fields are,
and the prediction schema the server registers for its output topic.

Pure functions of schema text and the model's metadata; the registry client and
the serializers are in `pipeline.formats.registry`. The prediction schema has
the fields of the JSON prediction (docs/events.md): `model`, `source`,
`event_time_ms`, `step`, `latency` and `outputs`, one field per model output.
An output is a float32 scalar, an array of them, or (Avro, JSON Schema) nested
arrays for more axes; Protobuf has no nested repeated fields, so a
multi-axis output is one repeated float in row-major order, its shape in the
model metadata (`hiddenstate.outputs[].shape`).
"""

from __future__ import annotations

import json
import re
from typing import Any

from google.protobuf import descriptor, descriptor_pb2

from pipeline.errors import ConfigError
from pipeline.formats.features import BOOLEAN, INTEGER, INTEGERS, NUMBER, NUMBERS, Field
from pipeline.model_spec import ModelSpec

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# --------------------------------------------------------------------------- input schemas

_AVRO_KINDS = {"double": NUMBER, "float": NUMBER, "int": INTEGER, "long": INTEGER}


def avro_fields(schema_str: str) -> list[Field]:
    """The top-level fields of an Avro record schema. A union with null counts as its
    other branch (an optional field); a logical type (timestamp-millis) as its base type."""
    schema = json.loads(schema_str)
    if not isinstance(schema, dict) or schema.get("type") != "record":
        raise ConfigError(
            f"the Avro schema is not a record (got {str(schema)[:200]}); events must be "
            "records with the model's features as fields"
        )
    return [Field(f["name"], _avro_kind(f["type"])) for f in schema.get("fields", [])]


def _avro_kind(avro_type: Any) -> str:
    if isinstance(avro_type, list):
        branches = [t for t in avro_type if t != "null"]
        return _avro_kind(branches[0]) if len(branches) == 1 else "union " + json.dumps(avro_type)
    if isinstance(avro_type, dict):
        base = avro_type.get("type")
        if base == "array":
            items = _avro_kind(avro_type.get("items"))
            return {NUMBER: NUMBERS, INTEGER: INTEGERS}.get(items, f"array of {items}")
        if isinstance(base, str) and base in _AVRO_KINDS | {"boolean": BOOLEAN}:
            return _avro_kind(base)
        return str(base)
    if avro_type == "boolean":
        return BOOLEAN
    return _AVRO_KINDS.get(str(avro_type), str(avro_type))


def json_schema_fields(schema_str: str) -> list[Field]:
    """The top-level properties of an object JSON Schema."""
    schema = json.loads(schema_str)
    if not isinstance(schema, dict) or schema.get("type") != "object":
        raise ConfigError(
            f"the JSON Schema does not describe an object (got {str(schema)[:200]}); events "
            "must be objects with the model's features as properties"
        )
    return [Field(name, _json_kind(p)) for name, p in schema.get("properties", {}).items()]


def _json_kind(prop: Any) -> str:
    if not isinstance(prop, dict):
        return "any"
    kind = prop.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        kind = kinds[0] if len(kinds) == 1 else kind
    if kind == "array":
        items = _json_kind(prop.get("items"))
        return {NUMBER: NUMBERS, INTEGER: INTEGERS}.get(items, f"array of {items}")
    if kind in (NUMBER, INTEGER, BOOLEAN):
        return str(kind)
    return str(kind) if kind is not None else "any"


_PROTO_NUMBERS = {descriptor.FieldDescriptor.TYPE_DOUBLE, descriptor.FieldDescriptor.TYPE_FLOAT}
_PROTO_INTEGERS = {
    descriptor.FieldDescriptor.TYPE_INT32,
    descriptor.FieldDescriptor.TYPE_INT64,
    descriptor.FieldDescriptor.TYPE_UINT32,
    descriptor.FieldDescriptor.TYPE_UINT64,
    descriptor.FieldDescriptor.TYPE_SINT32,
    descriptor.FieldDescriptor.TYPE_SINT64,
    descriptor.FieldDescriptor.TYPE_FIXED32,
    descriptor.FieldDescriptor.TYPE_FIXED64,
    descriptor.FieldDescriptor.TYPE_SFIXED32,
    descriptor.FieldDescriptor.TYPE_SFIXED64,
}


def protobuf_fields(message: descriptor.Descriptor) -> list[Field]:
    """The fields of a Protobuf message."""
    fields = []
    for f in message.fields:
        if f.type in _PROTO_NUMBERS:
            kind = NUMBER
        elif f.type in _PROTO_INTEGERS:
            kind = INTEGER
        elif f.type == descriptor.FieldDescriptor.TYPE_BOOL:
            kind = BOOLEAN
        else:
            kind = f"protobuf type {f.type}"
        repeated = f.is_repeated
        if repeated:
            kind = {NUMBER: NUMBERS, INTEGER: INTEGERS}.get(kind, f"repeated {kind}")
        fields.append(Field(f.name, kind))
    return fields


# --------------------------------------------------------------------------- prediction schemas


def _output_names(spec: ModelSpec) -> list[str]:
    names = [o.name for o in spec.outputs]
    bad = [n for n in names if not _NAME.match(n)]
    if bad:
        raise ConfigError(
            f"model outputs {bad} are not valid Avro/Protobuf field names "
            "([A-Za-z_][A-Za-z0-9_]*); rename them at export, or use --output-format json"
        )
    return names


def avro_prediction_schema(spec: ModelSpec) -> str:
    """The Avro schema of this model's predictions."""
    names = _output_names(spec)

    def output_type(rank: int) -> Any:
        kind: Any = "float"
        for _ in range(rank):
            kind = {"type": "array", "items": kind}
        return kind

    def record(name: str, fields: list[tuple[str, Any]]) -> dict[str, Any]:
        return {
            "type": "record",
            "name": name,
            "fields": [{"name": n, "type": t} for n, t in fields],
        }

    outputs = [(n, output_type(len(o.shape))) for n, o in zip(names, spec.outputs, strict=True)]
    schema = record(
        "Prediction",
        [
            ("model", record("Model", [("name", "string"), ("version", "string")])),
            (
                "source",
                record("Source", [("topic", "string"), ("partition", "int"), ("offset", "long")]),
            ),
            ("event_time_ms", "long"),
            ("step", "long"),
            (
                "latency",
                record("Latency", [("queued_seconds", "double"), ("inference_seconds", "double")]),
            ),
            ("outputs", record("Outputs", outputs)),
        ],
    )
    schema["namespace"] = "hiddenstate"
    schema["doc"] = f"one prediction of {spec.identity}"
    return json.dumps(schema, separators=(",", ":"))


def json_prediction_schema(spec: ModelSpec) -> str:
    """The JSON Schema of this model's predictions (a non-finite value is null)."""
    names = _output_names(spec)

    def output_type(rank: int) -> dict[str, Any]:
        kind: dict[str, Any] = {"type": ["number", "null"]}
        for _ in range(rank):
            kind = {"type": "array", "items": kind}
        return kind

    def obj(properties: dict[str, Any]) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": properties,
            "required": list(properties),
        }

    schema = obj(
        {
            "model": obj({"name": {"type": "string"}, "version": {"type": "string"}}),
            "source": obj(
                {
                    "topic": {"type": "string"},
                    "partition": {"type": "integer"},
                    "offset": {"type": "integer"},
                }
            ),
            "event_time_ms": {"type": "integer"},
            "step": {"type": "integer"},
            "latency": obj(
                {"queued_seconds": {"type": "number"}, "inference_seconds": {"type": "number"}}
            ),
            "outputs": obj(
                {n: output_type(len(o.shape)) for n, o in zip(names, spec.outputs, strict=True)}
            ),
        }
    )
    schema["$schema"] = "http://json-schema.org/draft-07/schema#"
    schema["title"] = f"prediction of {spec.identity}"
    return json.dumps(schema, separators=(",", ":"))


def protobuf_prediction_file(spec: ModelSpec) -> descriptor_pb2.FileDescriptorProto:
    """The Protobuf file of this model's predictions: message `hiddenstate.Prediction`."""
    names = _output_names(spec)
    fdp = descriptor_pb2.FileDescriptorProto(
        name="hiddenstate_prediction.proto", package="hiddenstate", syntax="proto3"
    )
    t = descriptor_pb2.FieldDescriptorProto
    optional, repeated = t.LABEL_OPTIONAL, t.LABEL_REPEATED

    def message(name: str, fields: list[tuple[str, int, int, str | None]]) -> None:
        m = fdp.message_type.add(name=name)
        for number, (field_name, kind, label, type_name) in enumerate(fields, start=1):
            f = m.field.add(name=field_name, number=number, type=kind, label=label)
            if type_name:
                f.type_name = type_name

    # Prediction first: tools that take a file's first message as the record find it.
    message(
        "Prediction",
        [
            ("model", t.TYPE_MESSAGE, optional, ".hiddenstate.Model"),
            ("source", t.TYPE_MESSAGE, optional, ".hiddenstate.Source"),
            ("event_time_ms", t.TYPE_INT64, optional, None),
            ("step", t.TYPE_INT64, optional, None),
            ("latency", t.TYPE_MESSAGE, optional, ".hiddenstate.Latency"),
            ("outputs", t.TYPE_MESSAGE, optional, ".hiddenstate.Outputs"),
        ],
    )
    message(
        "Model",
        [("name", t.TYPE_STRING, optional, None), ("version", t.TYPE_STRING, optional, None)],
    )
    message(
        "Source",
        [
            ("topic", t.TYPE_STRING, optional, None),
            ("partition", t.TYPE_INT32, optional, None),
            ("offset", t.TYPE_INT64, optional, None),
        ],
    )
    message(
        "Latency",
        [
            ("queued_seconds", t.TYPE_DOUBLE, optional, None),
            ("inference_seconds", t.TYPE_DOUBLE, optional, None),
        ],
    )
    message(
        "Outputs",
        [
            (n, t.TYPE_FLOAT, repeated if o.shape else optional, None)
            for n, o in zip(names, spec.outputs, strict=True)
        ],
    )
    return fdp


# --------------------------------------------------------------------------- event schemas


def event_fields(sample: dict[str, Any]) -> tuple[list[str] | None, bool]:
    """The shape of an event schema from one JSON event `{"x": ...}`: the feature names
    when `x` is an object (one field each), else None (one array field `x`); and whether
    the features are integers (token ids)."""
    x = sample.get("x")
    values = list(x.values()) if isinstance(x, dict) else x
    if not isinstance(values, list) or not values:
        raise ConfigError(f"an event's 'x' must be a non-empty array or object, got {x!r}")
    integers = all(type(v) is int for v in values)
    if isinstance(x, dict):
        bad = [name for name in x if not _NAME.match(name) or name in ("ts", "reset")]
        if bad:
            raise ConfigError(
                f"feature names {bad} cannot be record fields ([A-Za-z_][A-Za-z0-9_]*, not "
                "ts or reset); send 'x' as an array instead"
            )
        return list(x), integers
    return None, integers


def avro_event_schema(sample: dict[str, Any]) -> str:
    """An Avro record for events shaped like `sample`, with optional `ts` and `reset`."""
    names, integers = event_fields(sample)
    number = "long" if integers else "double"
    features: list[dict[str, Any]] = (
        [{"name": "x", "type": {"type": "array", "items": number}}]
        if names is None
        else [{"name": n, "type": number} for n in names]
    )
    schema = {
        "type": "record",
        "name": "Event",
        "namespace": "hiddenstate",
        "fields": [
            *features,
            {"name": "ts", "type": ["null", "long"], "default": None},
            {"name": "reset", "type": "boolean", "default": False},
        ],
    }
    return json.dumps(schema, separators=(",", ":"))


def json_event_schema(sample: dict[str, Any]) -> str:
    """A JSON Schema for events shaped like `sample` (the record form, not `{"x": ...}`
    nesting for named features: each feature is a property)."""
    names, integers = event_fields(sample)
    number = {"type": "integer" if integers else "number"}
    features: dict[str, Any] = (
        {"x": {"type": "array", "items": number}} if names is None else dict.fromkeys(names, number)
    )
    schema = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "hiddenstate event",
        "type": "object",
        "properties": {**features, "ts": {"type": "integer"}, "reset": {"type": "boolean"}},
        "required": list(features),
    }
    return json.dumps(schema, separators=(",", ":"))


def protobuf_event_file(sample: dict[str, Any]) -> descriptor_pb2.FileDescriptorProto:
    """A Protobuf file whose message `hiddenstate.Event` holds events shaped like `sample`."""
    names, integers = event_fields(sample)
    t = descriptor_pb2.FieldDescriptorProto
    number = t.TYPE_INT64 if integers else t.TYPE_DOUBLE
    fdp = descriptor_pb2.FileDescriptorProto(
        name="hiddenstate_event.proto", package="hiddenstate", syntax="proto3"
    )
    message = fdp.message_type.add(name="Event")
    features = (
        [("x", number, t.LABEL_REPEATED)]
        if names is None
        else [(n, number, t.LABEL_OPTIONAL) for n in names]
    )
    rest = [("ts", t.TYPE_INT64, t.LABEL_OPTIONAL), ("reset", t.TYPE_BOOL, t.LABEL_OPTIONAL)]
    for number_, (name, kind, label) in enumerate([*features, *rest], start=1):
        message.field.add(name=name, number=number_, type=kind, label=label)
    return fdp


def event_record(value: dict[str, Any], names: list[str] | None) -> dict[str, Any]:
    """A JSON event `{"x": ..., "ts": ..., "reset": ...}` as a record of the event schema."""
    x = value["x"]
    record: dict[str, Any] = {"x": list(x)} if names is None else {n: x[n] for n in names}
    if "ts" in value:
        record["ts"] = value["ts"]
    record["reset"] = bool(value.get("reset", False))
    return record
