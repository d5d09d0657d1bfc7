"""Compressed topics: events written by librdkafka (kcat) in every codec Kafka has, served
exactly by the transport under test and by the default one; compressed output; and the
named error for a batch the client cannot decode."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from tests.integration.conftest import kcat_produce
from tests.integration.streams import reference, round_robin_events
from tests.integration.test_serve import served_outputs

CODECS = ["gzip", "snappy", "lz4", "zstd"]


def blocked_module(folder: Path, name: str) -> dict[str, str]:
    """An environment in which package `name` looks not installed: a `sitecustomize` puts
    None in its `sys.modules` entry, so `import` raises ImportError and
    `importlib.util.find_spec` answers None, as for a package that is absent."""
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(f"import sys\nsys.modules[{name!r}] = None\n")
    return {"PYTHONPATH": str(folder)}


def assert_served_exactly(kafka, gru_weights, output, sent):
    records = kafka.consume(output, count=len(sent))
    expected = reference(gru_weights, sent)
    got = served_outputs(records)
    assert set(got) == set(expected)
    for key, predictions in got.items():
        assert [p["step"] for p in predictions] == list(range(1, len(expected[key]) + 1))
        np.testing.assert_allclose(
            [p["outputs"]["y"] for p in predictions], expected[key], atol=1e-5
        )


@pytest.mark.parametrize("codec", CODECS)
def test_a_topic_kcat_wrote_in_each_codec_is_served_exactly(
    kafka, serve, gru_model, gru_weights, codec, monkeypatch
):
    source = kafka.create_topic(f"events-{codec}", partitions=2)
    output = kafka.create_topic("predictions", partitions=2)
    sent = round_robin_events(streams=12, steps=10, seed=3)
    kcat_produce(kafka.bootstrap, source, sent, codec=codec)

    served = serve("--model", str(gru_model), "--input-topic", source, "--output-topic", output)
    assert_served_exactly(kafka, gru_weights, output, sent)
    served.stop()

    assert batch_codecs(kafka.bootstrap, source, len(sent), monkeypatch) == {codec}


def test_the_default_transport_serves_a_zstd_topic_and_says_which_client_it_chose(
    kafka, serve, gru_model, gru_weights
):
    source = kafka.create_topic("events-zstd", partitions=2)
    output = kafka.create_topic("predictions", partitions=2)
    sent = round_robin_events(streams=6, steps=5, seed=4)
    kcat_produce(kafka.bootstrap, source, sent, codec="zstd")

    served = serve(
        "--model", str(gru_model), "--input-topic", source, "--output-topic", output, transport=None
    )
    assert_served_exactly(kafka, gru_weights, output, sent)
    served.stop()

    assert (
        "Kafka client confluent (--transport auto: confluent-kafka (librdkafka) is installed)"
        in served.log()
    )


def test_without_confluent_kafka_the_default_transport_is_kafka_python_and_says_why(
    kafka, serve, gru_model, gru_weights, tmp_path
):
    source = kafka.create_topic("events-lz4", partitions=1)
    output = kafka.create_topic("predictions", partitions=1)
    sent = round_robin_events(streams=4, steps=5, seed=5)
    kcat_produce(kafka.bootstrap, source, sent, codec="lz4")

    served = serve(
        "--model",
        str(gru_model),
        "--input-topic",
        source,
        "--output-topic",
        output,
        transport=None,
        env=blocked_module(tmp_path / "blocked", "confluent_kafka"),
    )
    assert_served_exactly(kafka, gru_weights, output, sent)
    served.stop()

    assert "Kafka client kafka-python (--transport auto: confluent-kafka is not installed" in (
        served.log()
    )


def test_a_batch_kafka_python_cannot_decode_stops_serve_with_a_named_error(
    kafka, serve, gru_model, tmp_path
):
    source = kafka.create_topic("events-zstd", partitions=1)
    output = kafka.create_topic("predictions", partitions=1)
    kcat_produce(kafka.bootstrap, source, round_robin_events(streams=3, steps=3), codec="zstd")

    served = serve(
        "--model",
        str(gru_model),
        "--input-topic",
        source,
        "--output-topic",
        output,
        ready=False,
        transport="kafka-python",
        env=blocked_module(tmp_path / "blocked", "zstandard"),
    )

    assert served.wait_exit(timeout=90) == 1
    log = served.log()
    assert f"cannot decode the record batch of {source}[0] at offset 0" in log
    assert "pip install python-snappy lz4 zstandard" in log
    # No traceback through our code: the error is named, not raised out of serve.
    # (kafka-python may log a traceback of its own while its sockets close at the exit.)
    assert not re.search(r'File "[^"]*/pipeline/', log)
    assert log.rstrip().splitlines()[-1].startswith("hiddenstate serve: error: cannot decode")
    assert kafka.end_offsets(output) == {0: 0}


def batch_codecs(bootstrap: str, topic: str, count: int, monkeypatch) -> set[str]:
    """The compression codecs of the record batches holding `topic`'s `count` records (all
    partitions), as kafka-python's batch reader sees them while consuming."""
    from kafka import KafkaConsumer, TopicPartition
    from kafka.record.default_records import DefaultRecordBatch

    names = {0: "none", 1: "gzip", 2: "snappy", 3: "lz4", 4: "zstd"}
    seen: set[str] = set()
    original = DefaultRecordBatch._maybe_uncompress

    def recording(batch):
        seen.add(names[batch.compression_type])
        return original(batch)

    monkeypatch.setattr(DefaultRecordBatch, "_maybe_uncompress", recording)
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        read = 0
        for _ in range(40):
            read += sum(len(b) for b in consumer.poll(timeout_ms=500).values())
            if read >= count:
                break
        assert read == count
    finally:
        consumer.close()
    return seen


@pytest.mark.parametrize("codec", CODECS)
def test_predictions_are_written_in_the_compression_type_asked_for(
    kafka, serve, gru_model, codec, monkeypatch
):
    source = kafka.create_topic("events", partitions=1)
    output = kafka.create_topic("predictions", partitions=1)
    sent = round_robin_events(streams=3, steps=4, seed=6)
    kafka.produce(source, sent)
    served = serve(
        "--model",
        str(gru_model),
        "--input-topic",
        source,
        "--output-topic",
        output,
        "--compression-type",
        codec,
    )
    kafka.consume(output, count=len(sent))
    served.stop()

    assert batch_codecs(kafka.bootstrap, output, len(sent), monkeypatch) == {codec}


def test_predictions_are_uncompressed_by_default(kafka, serve, gru_model, monkeypatch):
    source = kafka.create_topic("events", partitions=1)
    output = kafka.create_topic("predictions", partitions=1)
    sent = round_robin_events(streams=3, steps=2, seed=7)
    kafka.produce(source, sent)
    served = serve("--model", str(gru_model), "--input-topic", source, "--output-topic", output)
    kafka.consume(output, count=len(sent))
    served.stop()

    assert batch_codecs(kafka.bootstrap, output, len(sent), monkeypatch) == {"none"}
