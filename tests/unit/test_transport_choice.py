"""`--transport auto` and the named errors for record batches a client cannot decode."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
from confluent_kafka import KafkaError
from kafka import TopicPartition
from kafka.errors import CorruptRecordError, UnsupportedCodecError

from pipeline.errors import UndecodableBatchError
from pipeline.transport import choose_transport
from pipeline.transport import confluent as confluent_transport
from pipeline.transport.kafka_python import undecodable_batch

_real_find_spec = importlib.util.find_spec


def without(module: str):
    def find_spec(name, *args):
        return None if name == module else _real_find_spec(name, *args)

    return find_spec


def test_auto_chooses_confluent_where_confluent_kafka_is_installed():
    choice = choose_transport("auto")
    assert (choice.name, choice.reason) == (
        "confluent",
        "--transport auto: confluent-kafka (librdkafka) is installed",
    )


def test_auto_falls_back_to_kafka_python_and_says_how_to_get_the_fast_one(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", without("confluent_kafka"))
    choice = choose_transport("auto")
    assert choice.name == "kafka-python"
    assert "confluent-kafka is not installed; pip install 'hiddenstate[fast]'" in choice.reason


def test_a_named_transport_is_taken_as_it_is():
    assert choose_transport("kafka-python").name == "kafka-python"


class Consumer:
    """What `undecodable_batch` reads of kafka-python's consumer."""

    def __init__(self, fetch=None):
        self._fetcher = SimpleNamespace(_next_partition_records=fetch)

    def assignment(self):
        return {TopicPartition("events", 1), TopicPartition("events", 0)}

    def position(self, tp):
        return {0: 12, 1: 40}[tp.partition]


def test_a_missing_codec_names_the_partition_the_offset_and_what_to_install():
    fetch = SimpleNamespace(topic_partition=TopicPartition("events", 2), next_fetch_offset=1234)
    error = undecodable_batch(
        Consumer(fetch), UnsupportedCodecError("Libraries for zstd compression codec not found")
    )
    assert isinstance(error, UndecodableBatchError)
    assert str(error).startswith(
        "cannot decode the record batch of events[2] at offset 1234: "
        "UnsupportedCodecError: Libraries for zstd compression codec not found"
    )
    assert "pip install python-snappy lz4 zstandard" in str(error)


def test_without_the_fetchers_partition_every_assigned_position_is_listed():
    error = undecodable_batch(Consumer(None), CorruptRecordError("crc check failed"))
    assert "one of events[0]@12, events[1]@40 is corrupt" in str(error)


class Message:
    def __init__(self, code):
        self._error = KafkaError(code)

    def error(self):
        return self._error

    def topic(self):
        return "events"

    def partition(self):
        return 3

    def offset(self):
        return 77


@pytest.mark.parametrize("code", [KafkaError._BAD_COMPRESSION, KafkaError._BAD_MSG])
def test_librdkafka_reporting_an_undecodable_batch_stops_the_source_with_where(code):
    source = object.__new__(confluent_transport.ConfluentSource)
    with pytest.raises(UndecodableBatchError, match=r"events\[3\] at offset 77"):
        source._error(Message(code))


def test_other_librdkafka_errors_are_logged_and_serving_goes_on():
    source = object.__new__(confluent_transport.ConfluentSource)
    logged = []
    source._errors = logged.append
    source._error(Message(KafkaError._TRANSPORT))
    assert [e.code() for e in logged] == [KafkaError._TRANSPORT]
