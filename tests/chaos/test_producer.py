"""The recording producer: what it says was delivered is what the checker holds the servers
to, so a report it cannot place, or a sending thread that dies, must not pass unnoticed.

Fast (no broker): librdkafka's reports are handed to it by hand.
"""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError

from tests.chaos.producer import Delivered, RecordingProducer


class _Report:
    """What a delivery report tells of its message."""

    def __init__(self, partition: int | None, offset: int | None) -> None:
        self._partition, self._offset = partition, offset

    def partition(self) -> int | None:
        return self._partition

    def offset(self) -> int | None:
        return self._offset


@pytest.fixture
def producer() -> RecordingProducer:
    # Nothing listens there, and nothing is sent: librdkafka connects only to send.
    return RecordingProducer("127.0.0.1:9", "events", streams=2, rate=1000.0)


def test_a_delivery_acknowledged_without_an_offset_is_kept_by_its_stream_and_index(producer):
    """librdkafka reported an event delivered with no offset right after a broker kill: the
    old report's assertion killed the sending thread, and the rest of that campaign run
    (broker restart, exactly-once, confluent) had no load."""
    producer.record(Delivered(b"s1", 3, -1, -1, (1.0,)), None, _Report(2, None))
    assert producer.delivered == []
    assert producer.unplaced == [Delivered(b"s1", 3, 2, -1, (1.0,))]


def test_an_event_acknowledged_without_an_offset_is_found_in_the_log_by_its_stream_and_index(
    producer,
):
    producer.record(Delivered(b"s1", 3, -1, -1, (1.0,)), None, _Report(2, None))
    producer.record(Delivered(b"s0", 0, -1, -1, (2.0,)), None, _Report(1, 8))
    log = [Delivered(b"s1", 3, 2, 41, (1.0,)), Delivered(b"s0", 0, 1, 8, (2.0,))]
    assert producer.not_in_log(log) == 0
    assert producer.not_in_log(log[1:]) == 1
    assert producer.not_in_log(log[:1]) == 1


def test_a_failed_delivery_is_counted_and_not_recorded(producer):
    timed_out = KafkaError(KafkaError._MSG_TIMED_OUT)
    producer.record(Delivered(b"s1", 3, -1, -1, (1.0,)), timed_out, _Report(2, None))
    assert (producer.failed, producer.delivered, producer.unplaced) == (1, [], [])


def test_a_sending_thread_that_dies_fails_the_run_when_it_stops(producer, monkeypatch):
    def broken(stream: int, bad: bool) -> None:
        raise AssertionError("a report it could not place")

    monkeypatch.setattr(producer, "_send", broken)
    producer.start()
    with pytest.raises(RuntimeError, match="stopped sending after 0 events"):
        producer.stop()
