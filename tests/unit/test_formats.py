"""The Schema Registry formats without a server: schema -> features mapping, the schema
conversions, and the wire path through confluent-kafka's serializers over its own
in-memory registry (`MockSchemaRegistryClient`). The real registry is in
tests/integration/test_schema_registry.py."""

from __future__ import annotations

import json
from dataclasses import replace

import fastavro
import jsonschema
import numpy as np
import pytest
from confluent_kafka.schema_registry import Schema
from confluent_kafka.schema_registry._sync.mock_schema_registry_client import (
    MockSchemaRegistryClient,
)
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.schema_registry.json_schema import JSONDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext
from google.protobuf import descriptor_pool, message_factory

from pipeline.codec import REGISTRY_REASONS, Event
from pipeline.config import FormatsConfig
from pipeline.errors import BadEventError, ConfigError
from pipeline.formats import registry, schemas
from pipeline.formats.features import (
    BOOLEAN,
    INTEGER,
    INTEGERS,
    NUMBER,
    NUMBERS,
    Field,
    map_features,
)
from pipeline.model_spec import InputSpec
from pipeline.records import InputRecord
from pipeline.testing import random_weights

FEATURES = InputSpec(features=("temperature", "humidity"))
TOKENS = InputSpec(features=("token",), dtype="int64", vocabulary=("a", "b", "c"))
URL = "mock://registry"


# --------------------------------------------------------------------------- the mapping


def test_fields_named_like_the_features_map_by_name_in_the_models_order():
    fields = [Field("humidity", NUMBER), Field("temperature", INTEGER), Field("site", "string")]
    mapping = map_features(fields, FEATURES, "s-value")
    assert (mapping.by_name, mapping.array) == (("temperature", "humidity"), None)


def test_one_array_of_numbers_maps_the_features_in_order():
    mapping = map_features([Field("values", NUMBERS), Field("site", "string")], FEATURES, "s")
    assert (mapping.by_name, mapping.array) == (None, "values")


def test_among_several_arrays_the_one_named_x_is_taken():
    mapping = map_features([Field("a", NUMBERS), Field("x", NUMBERS)], FEATURES, "s")
    assert mapping.array == "x"


def test_a_missing_feature_field_is_named_with_the_subject():
    with pytest.raises(ConfigError, match=r"subject 's-value' .* not for \['humidity'\]"):
        map_features([Field("temperature", NUMBER)], FEATURES, "s-value")


def test_a_mistyped_feature_field_is_named_with_its_type():
    fields = [Field("temperature", "string"), Field("humidity", NUMBER)]
    with pytest.raises(ConfigError, match="field 'temperature' is string; the model's feature"):
        map_features(fields, FEATURES, "s")


def test_a_schema_with_neither_names_nor_one_array_lists_what_it_has():
    with pytest.raises(ConfigError, match=r"has neither: .* it has 'a' \(string\)"):
        map_features([Field("a", "string")], FEATURES, "s")


def test_two_arrays_without_x_are_ambiguous():
    with pytest.raises(ConfigError, match=r"several array fields \['a', 'b'\]"):
        map_features([Field("a", NUMBERS), Field("b", NUMBERS)], FEATURES, "s")


def test_a_token_model_needs_integer_ids_not_floats():
    with pytest.raises(ConfigError, match="needs an integer"):
        map_features([Field("token", NUMBER)], TOKENS, "s")
    assert map_features([Field("ids", INTEGERS)], TOKENS, "s").tokens


def test_ts_and_reset_are_optional_but_typed_when_present():
    fields = [Field("x", NUMBERS), Field("ts", INTEGER), Field("reset", BOOLEAN)]
    assert map_features(fields, FEATURES, "s").ts == "ts"
    with pytest.raises(ConfigError, match="field 'ts' is number; it must be an integer"):
        map_features([Field("x", NUMBERS), Field("ts", NUMBER)], FEATURES, "s")


# --------------------------------------------------------------------------- schema conversions


def test_avro_fields_read_optional_unions_logical_types_and_arrays():
    schema = {
        "type": "record",
        "name": "E",
        "fields": [
            {"name": "a", "type": ["null", "double"]},
            {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-millis"}},
            {"name": "xs", "type": {"type": "array", "items": "float"}},
            {"name": "flag", "type": "boolean"},
            {"name": "s", "type": "string"},
        ],
    }
    assert schemas.avro_fields(json.dumps(schema)) == [
        Field("a", NUMBER),
        Field("ts", INTEGER),
        Field("xs", NUMBERS),
        Field("flag", BOOLEAN),
        Field("s", "string"),
    ]


def test_an_avro_schema_that_is_not_a_record_is_refused():
    with pytest.raises(ConfigError, match="is not a record"):
        schemas.avro_fields('"double"')


def test_json_schema_fields_read_nullable_types_and_arrays():
    schema = {
        "type": "object",
        "properties": {
            "a": {"type": ["number", "null"]},
            "ids": {"type": "array", "items": {"type": "integer"}},
            "name": {"type": "string"},
        },
    }
    assert schemas.json_schema_fields(json.dumps(schema)) == [
        Field("a", NUMBER),
        Field("ids", INTEGERS),
        Field("name", "string"),
    ]


def test_protobuf_fields_read_scalars_and_repeated_numbers():
    fdp = schemas.protobuf_event_file({"x": [1.5, 2.5]})
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    fields = schemas.protobuf_fields(pool.FindMessageTypeByName("hiddenstate.Event"))
    assert fields == [Field("x", NUMBERS), Field("ts", INTEGER), Field("reset", BOOLEAN)]


SPEC = random_weights("gru", n_features=3, hidden=4, layers=1, n_outputs=2, name="unit").spec


def test_the_avro_prediction_schema_is_a_valid_avro_schema_with_each_output():
    parsed = fastavro.parse_schema(json.loads(schemas.avro_prediction_schema(SPEC)))
    outputs = next(f for f in parsed["fields"] if f["name"] == "outputs")
    assert [f["name"] for f in outputs["type"]["fields"]] == [o.name for o in SPEC.outputs]


def test_the_json_prediction_schema_is_a_valid_draft_7_schema():
    jsonschema.Draft7Validator.check_schema(json.loads(schemas.json_prediction_schema(SPEC)))


def test_an_output_name_that_cannot_be_a_field_is_refused_at_start():
    spec = random_weights("gru", n_features=2, hidden=2, layers=1, n_outputs=1, name="u").spec
    renamed = replace(spec, outputs=(replace(spec.outputs[0], name="class-probs"),))
    with pytest.raises(ConfigError, match=r"\['class-probs'\] are not valid Avro/Protobuf"):
        schemas.avro_prediction_schema(renamed)


# --------------------------------------------------------------------------- the wire path


@pytest.fixture
def mock_registry() -> MockSchemaRegistryClient:
    return MockSchemaRegistryClient({"url": URL})


AVRO_EVENT = {
    "type": "record",
    "name": "Reading",
    "fields": [
        {"name": "temperature", "type": "double"},
        {"name": "humidity", "type": ["null", "double"], "default": None},
        {"name": "ts", "type": ["null", "long"], "default": None},
    ],
}


def avro_decoder(mock_registry, schema=AVRO_EVENT):
    mock_registry.register_schema("events-value", Schema(json.dumps(schema), "AVRO"))
    formats = FormatsConfig(input_format="avro", schema_registry_url=URL)
    return registry.input_decoder(formats, mock_registry, FEATURES, "events", 1000)


def avro_value(mock_registry, reading, schema=AVRO_EVENT) -> bytes:
    serialize = AvroSerializer(mock_registry, json.dumps(schema))
    return serialize(reading, SerializationContext("events", MessageField.VALUE))


def record(value: bytes | None, key: bytes | None = b"s1") -> InputRecord:
    return InputRecord("events", 0, 7, key, value, 1_700_000_000_000)


def reason_of(decoder, value: bytes) -> str:
    with pytest.raises(BadEventError) as caught:
        decoder.decode(record(value))
    return caught.value.reason


def test_an_avro_event_decodes_to_the_features_in_the_models_order(mock_registry):
    decoder = avro_decoder(mock_registry)
    value = avro_value(mock_registry, {"humidity": 0.4, "temperature": 21.5, "ts": 5})
    event = decoder.decode(record(value))
    assert (event.key, event.x, event.event_time_ms, event.reset) == (b"s1", [21.5, 0.4], 5, False)


def test_an_event_without_ts_takes_the_records_timestamp(mock_registry):
    decoder = avro_decoder(mock_registry)
    event = decoder.decode(record(avro_value(mock_registry, {"temperature": 1.0, "humidity": 2.0})))
    assert event.event_time_ms == 1_700_000_000_000


def test_a_value_without_the_magic_byte_is_wrong_magic_byte(mock_registry):
    assert reason_of(avro_decoder(mock_registry), b'{"x": [1, 2]}') == "wrong_magic_byte"


def test_a_value_shorter_than_the_wire_header_is_wrong_magic_byte(mock_registry):
    assert reason_of(avro_decoder(mock_registry), b"\x00\x00\x01") == "wrong_magic_byte"


def test_a_schema_id_the_registry_does_not_know_is_unknown_schema_id(mock_registry):
    decoder = avro_decoder(mock_registry)
    assert reason_of(decoder, b"\x00\x00\x00\x30\x39" + b"\x00" * 8) == "unknown_schema_id"


def test_a_payload_its_writer_schema_cannot_decode_is_undecodable(mock_registry):
    decoder = avro_decoder(mock_registry)
    value = avro_value(mock_registry, {"temperature": 1.0, "humidity": 2.0})
    assert reason_of(decoder, value[:6]) == "undecodable"


def test_every_registry_reason_label_is_produced_by_these_tests():
    tested = {"wrong_magic_byte", "unknown_schema_id"}
    assert tested == set(REGISTRY_REASONS)


def test_a_null_feature_value_is_wrong_type(mock_registry):
    decoder = avro_decoder(mock_registry)
    value = avro_value(mock_registry, {"temperature": 1.0, "humidity": None})
    assert reason_of(decoder, value) == "wrong_type"


def test_a_record_of_another_schema_without_a_feature_is_feature_names(mock_registry):
    decoder = avro_decoder(mock_registry)
    other = {
        "type": "record",
        "name": "Other",
        "fields": [{"name": "temperature", "type": "double"}],
    }
    value = avro_value(mock_registry, {"temperature": 1.0}, schema=other)
    assert reason_of(decoder, value) == "feature_names"


def test_a_non_finite_avro_double_is_non_finite(mock_registry):
    decoder = avro_decoder(mock_registry)
    value = avro_value(mock_registry, {"temperature": float("nan"), "humidity": 1.0})
    assert reason_of(decoder, value) == "non_finite"


def test_the_missing_key_is_checked_before_the_wire_format(mock_registry):
    with pytest.raises(BadEventError) as caught:
        avro_decoder(mock_registry).decode(record(b"junk", key=None))
    assert caught.value.reason == "missing_key"


def test_no_schema_under_the_input_subject_is_a_clear_start_error(mock_registry):
    formats = FormatsConfig(input_format="avro", schema_registry_url=URL)
    with pytest.raises(ConfigError, match="no schema is registered under subject 'events-value'"):
        registry.input_decoder(formats, mock_registry, FEATURES, "events", 1000)


def event_of(x, offset=3):
    return Event(
        b"s1", x, 1_700_000_000_123, False, InputRecord("events", 1, offset, b"s1", b"", 0)
    )


def test_avro_predictions_read_back_by_confluents_deserializer_hold_every_field(mock_registry):
    formats = FormatsConfig(output_format="avro", schema_registry_url=URL)
    encoder = registry.output_encoder(formats, mock_registry, SPEC, "predictions")
    y = np.array([[0.25, -1.5]], np.float32)
    (out,) = encoder.encode_wave([event_of([1, 2, 3])], {"y": y}, np.array([4]), 0.002, 0.0003)
    value = AvroDeserializer(mock_registry)(
        out.value, SerializationContext("predictions", MessageField.VALUE)
    )
    assert value == {
        "model": {"name": "unit", "version": SPEC.version},
        "source": {"topic": "events", "partition": 1, "offset": 3},
        "event_time_ms": 1_700_000_000_123,
        "step": 4,
        "latency": {"queued_seconds": 0.002, "inference_seconds": 0.0003},
        "outputs": {"y": [0.25, -1.5]},
    }
    assert (out.topic, out.key) == ("predictions", b"s1")


def test_the_prediction_schema_is_registered_under_the_output_subject(mock_registry):
    formats = FormatsConfig(output_format="avro", schema_registry_url=URL)
    registry.output_encoder(formats, mock_registry, SPEC, "predictions")
    latest = mock_registry.get_latest_version("predictions-value")
    assert json.loads(latest.schema.schema_str)["name"] == "Prediction"


def test_json_schema_predictions_write_a_non_finite_value_as_null(mock_registry):
    formats = FormatsConfig(output_format="json-schema", schema_registry_url=URL)
    encoder = registry.output_encoder(formats, mock_registry, SPEC, "predictions")
    y = np.array([[np.nan, 1.0]], np.float32)
    (out,) = encoder.encode_wave([event_of([1, 2, 3])], {"y": y}, np.array([1]), 0.0, 0.0)
    value = JSONDeserializer(None, schema_registry_client=mock_registry)(
        out.value, SerializationContext("predictions", MessageField.VALUE)
    )
    assert value["outputs"]["y"] == [None, 1.0]


def test_protobuf_predictions_flatten_a_multi_axis_output_row_major(mock_registry):
    spec = replace(SPEC, outputs=(replace(SPEC.outputs[0], shape=(2, 2)),))
    formats = FormatsConfig(output_format="protobuf", schema_registry_url=URL)
    encoder = registry.output_encoder(formats, mock_registry, spec, "predictions")
    y = np.array([[[1, 2], [3, 4]]], np.float32)
    (out,) = encoder.encode_wave([event_of([1, 2, 3])], {"y": y}, np.array([1]), 0.0, 0.0)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(schemas.protobuf_prediction_file(spec))
    message = message_factory.GetMessageClass(pool.FindMessageTypeByName("hiddenstate.Prediction"))
    # The wire format: magic byte, schema id, message indexes (one 0 byte: the first message).
    decoded = message.FromString(out.value[6:])
    assert list(decoded.outputs.y) == [1.0, 2.0, 3.0, 4.0]


@pytest.mark.parametrize("fmt", ["avro", "protobuf", "json-schema"])
def test_produces_events_decode_back_to_what_was_sent(mock_registry, fmt):
    encode = registry.event_serializer(fmt, mock_registry, URL, "events", {"x": [1.0, 2.0]})
    value = encode({"x": [0.5, -2.0], "ts": 9})
    formats = FormatsConfig(input_format=fmt, schema_registry_url=URL)
    decoder = registry.input_decoder(formats, mock_registry, FEATURES, "events", 1000)
    event = decoder.decode(record(value))
    assert (event.x, event.event_time_ms) == ([0.5, -2.0], 9)


def test_feature_names_that_cannot_be_fields_are_refused_when_making_an_event_schema():
    with pytest.raises(ConfigError, match=r"\['wind speed'\] cannot be record fields"):
        schemas.avro_event_schema({"x": {"wind speed": 1.0}})
