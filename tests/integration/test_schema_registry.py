"""Schema Registry formats against a real registry (Apicurio, the Confluent API): events
written by confluent-kafka's serializers over librdkafka, predictions read back by its
deserializers, bad records dead-lettered with their reason, a schema that cannot feed the
model refused at start."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import Producer
from confluent_kafka.schema_registry import Schema
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.schema_registry.json_schema import JSONDeserializer
from confluent_kafka.schema_registry.protobuf import ProtobufDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory

from pipeline.formats.registry import protobuf_schema
from tests.integration.streams import reference, round_robin_events

_REPO_ROOT = Path(__file__).resolve().parents[2]


def librdkafka_produce(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    """Send with confluent-kafka's producer (Java's partitioner), every record acknowledged."""
    failures: list[str] = []

    def delivered(error, message):
        if error is not None:
            failures.append(str(error))

    producer = Producer(
        {"bootstrap.servers": bootstrap, "linger.ms": 5, "partitioner": "murmur2_random"}
    )
    for key, value in records:
        producer.produce(topic, value, key, on_delivery=delivered)
    assert producer.flush(30) == 0
    assert failures == []


def by_stream(records, decode) -> dict[bytes, list[dict]]:
    """Decoded predictions per stream, in each partition's offset order."""
    streams: dict[bytes, list[dict]] = defaultdict(list)
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        streams[record.key].append(decode(record.value))
    return streams


def assert_match_the_reference(streams, gru_weights, sent):
    expected = reference(gru_weights, sent)
    assert set(streams) == set(expected)
    for key, predictions in streams.items():
        assert [p["step"] for p in predictions] == list(range(1, len(expected[key]) + 1))
        np.testing.assert_allclose(
            [p["outputs"]["y"] for p in predictions], expected[key], atol=1e-5
        )


def registry_args(url: str, fmt: str, output_format: str | None = None) -> list[str]:
    return [
        "--input-format",
        fmt,
        "--output-format",
        output_format or fmt,
        "--schema-registry-url",
        url,
    ]


def test_an_avro_topic_is_served_end_to_end_and_read_back_by_confluents_deserializer(
    kafka, serve, gru_model, gru_weights, registry_url, registry_client
):
    source = kafka.create_topic("avro-events", partitions=2)
    output = kafka.create_topic("avro-predictions", partitions=2)
    features = gru_weights.spec.input.features
    schema = {
        "type": "record",
        "name": "Reading",
        "namespace": "test.sensors",
        "fields": [
            *({"name": f, "type": "double"} for f in features),
            {"name": "ts", "type": ["null", "long"], "default": None},
            {"name": "trace", "type": "string"},
        ],
    }
    serialize = AvroSerializer(registry_client, json.dumps(schema))
    context = SerializationContext(source, MessageField.VALUE)
    sent = round_robin_events(streams=8, steps=6, seed=8)
    records = []
    for i, (key, value) in enumerate(sent):
        x = json.loads(value)["x"]
        reading = {**dict(zip(features, x, strict=True)), "ts": 1_700_000_000_000 + i, "trace": "t"}
        records.append((key, serialize(reading, context)))
    librdkafka_produce(kafka.bootstrap, source, records)

    served = serve(
        "--model",
        str(gru_model),
        "--input-topic",
        source,
        "--output-topic",
        output,
        *registry_args(registry_url, "avro"),
    )
    predictions = kafka.consume(output, count=len(sent))
    served.stop()

    deserialize = AvroDeserializer(registry_client)
    out_context = SerializationContext(output, MessageField.VALUE)
    streams = by_stream(predictions, lambda value: deserialize(value, out_context))
    assert_match_the_reference(streams, gru_weights, sent)
    first = streams[b"s0"][0]
    assert first["model"] == {"name": "gru-it", "version": gru_weights.spec.version}
    assert first["event_time_ms"] == 1_700_000_000_000
    registered = registry_client.get_latest_version(f"{output}-value")
    assert registered.schema.schema_type == "AVRO"
    schema_ids = {int.from_bytes(r.value[1:5], "big") for r in predictions}
    assert schema_ids == {registered.schema_id}


def write_events(path: Path, sent, named: tuple[str, ...] | None) -> Path:
    """The events as a JSON-lines file for `hiddenstate produce`; `named`: `x` by name."""
    with path.open("w") as lines:
        for key, value in sent:
            x = json.loads(value)["x"]
            body = {"x": dict(zip(named, x, strict=True)) if named else x}
            lines.write(json.dumps({"key": key.decode(), "value": body}) + "\n")
    return path


def protobuf_reader(registry_client, subject: str):
    """The class of the first message of a subject's registered Protobuf schema."""
    schema = protobuf_schema(registry_client, subject, "latest")
    fdp = descriptor_pb2.FileDescriptorProto.FromString(
        base64.standard_b64decode(schema.schema_str)
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    name = f"{fdp.package}.{fdp.message_type[0].name}"
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(name))


@pytest.mark.parametrize(
    ("fmt", "by_name"),
    [("protobuf", False), ("protobuf", True), ("json-schema", False), ("json-schema", True)],
    ids=["protobuf-array", "protobuf-named", "json-schema-array", "json-schema-named"],
)
def test_protobuf_and_json_schema_topics_written_by_produce_are_served_and_read_back(
    kafka, serve, gru_model, gru_weights, registry_url, registry_client, tmp_path, fmt, by_name
):
    source = kafka.create_topic(f"{fmt}-events", partitions=2)
    output = kafka.create_topic(f"{fmt}-predictions", partitions=2)
    sent = round_robin_events(streams=5, steps=4, seed=9)
    features = gru_weights.spec.input.features if by_name else None
    events = write_events(tmp_path / "events.jsonl", sent, features)
    produced = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "produce",
            "--topic",
            source,
            "--source",
            str(events),
            "--format",
            fmt,
            "--schema-registry-url",
            registry_url,
            "--bootstrap-servers",
            kafka.bootstrap,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=_REPO_ROOT,
    )
    assert produced.returncode == 0, produced.stderr
    assert f"sent {len(sent)} events to {source} (2 partitions), all acknowledged" in (
        produced.stderr
    )

    served = serve(
        "--model",
        str(gru_model),
        "--input-topic",
        source,
        "--output-topic",
        output,
        *registry_args(registry_url, fmt),
    )
    predictions = kafka.consume(output, count=len(sent))
    served.stop()

    context = SerializationContext(output, MessageField.VALUE)
    if fmt == "protobuf":
        message = protobuf_reader(registry_client, f"{output}-value")
        deserialize = ProtobufDeserializer(message)

        def decode(value):
            return json_format.MessageToDict(
                deserialize(value, context), preserving_proto_field_name=True
            )
    else:
        deserialize = JSONDeserializer(None, schema_registry_client=registry_client)

        def decode(value):
            return deserialize(value, context)

    streams = by_stream(predictions, decode)
    for items in streams.values():
        for p in items:
            p["step"] = int(p["step"])  # protobuf's JSON form writes int64 as a string
    assert_match_the_reference(streams, gru_weights, sent)
    expected_type = {"protobuf": "PROTOBUF", "json-schema": "JSON"}[fmt]
    assert registry_client.get_latest_version(f"{output}-value").schema.schema_type == (
        expected_type
    )


def test_records_that_are_not_in_the_registry_format_go_to_the_dead_letter_topic_with_the_reason(
    kafka, serve, gru_model, gru_weights, registry_url, registry_client
):
    source = kafka.create_topic("avro-events", partitions=1)
    output = kafka.create_topic("avro-predictions", partitions=1)
    dead = kafka.create_topic("avro-dead", partitions=1)
    features = gru_weights.spec.input.features
    schema = {
        "type": "record",
        "name": "Reading",
        "fields": [{"name": f, "type": "double"} for f in features],
    }
    serialize = AvroSerializer(registry_client, json.dumps(schema))
    context = SerializationContext(source, MessageField.VALUE)
    good = serialize(dict(zip(features, [0.1, 0.2, 0.3], strict=True)), context)
    bad = {
        "wrong_magic_byte": b'{"x": [0.1, 0.2, 0.3]}',
        "unknown_schema_id": b"\x00" + (2**31 - 1).to_bytes(4, "big") + good[5:],
        "undecodable": good[:5] + b"\x01",
    }
    librdkafka_produce(
        kafka.bootstrap, source, [(b"a", good), *((b"bad", v) for v in bad.values()), (b"a", good)]
    )

    served = serve(
        "--model",
        str(gru_model),
        "--input-topic",
        source,
        "--output-topic",
        output,
        "--dead-letter-topic",
        dead,
        *registry_args(registry_url, "avro", "json"),
    )
    predictions = kafka.consume(output, count=2)
    letters = kafka.consume(dead, count=len(bad))
    served.wait_metric("hiddenstate_dead_letters_total", 1, reason="undecodable")
    counted = {r: served.metric("hiddenstate_dead_letters_total", reason=r) for r in bad}
    served.stop()

    reasons = {dict(r.headers)["hiddenstate.error.reason"].decode(): r.value for r in letters}
    assert reasons == bad
    assert counted == dict.fromkeys(bad, 1.0)
    assert [json.loads(p.value)["step"] for p in predictions] == [1, 2]


def test_an_input_schema_that_cannot_feed_the_model_stops_the_start_naming_the_field(
    kafka, serve, gru_model, gru_weights, registry_url, registry_client
):
    source = kafka.create_topic("avro-events", partitions=1)
    first, *rest = gru_weights.spec.input.features
    schema = {
        "type": "record",
        "name": "Reading",
        "fields": [
            {"name": first, "type": "string"},
            *({"name": f, "type": "double"} for f in rest),
        ],
    }
    registry_client.register_schema(f"{source}-value", Schema(json.dumps(schema), "AVRO"))

    served = serve(
        "--model",
        str(gru_model),
        "--input-topic",
        source,
        "--output-topic",
        "unused",
        *registry_args(registry_url, "avro", "json"),
        ready=False,
    )

    assert served.wait_exit(timeout=60) == 1
    log = served.log()
    assert f"field {first!r} is string; the model's feature {first!r} needs a number" in log
    assert "Traceback" not in log
