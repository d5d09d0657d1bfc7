"""The event sources of `hiddenstate produce`, and its pacing, without a broker."""

from __future__ import annotations

import itertools
import json
import time

import pytest
from kafka.errors import KafkaTimeoutError, MessageSizeTooLargeError, NotLeaderForPartitionError
from kafka.future import Future

from pipeline.devtools.produce import file_events, send, synthetic_events
from pipeline.errors import ConfigError


class ListProducer:
    """Collects what would be sent; at flush, the broker's answer is `outcome(i)` for the
    i-th record (None: acknowledged, an exception: refused, "silent": no answer yet).
    Its futures are kafka-python's own, with their callback machinery."""

    def __init__(self, outcome=lambda i: None, refuse_at_send=()) -> None:
        self.sent: list[tuple[str, bytes, bytes]] = []
        self.futures: list[Future] = []
        self.outcome = outcome
        self.refuse_at_send = refuse_at_send

    def send(self, topic: str, key: bytes, value: bytes) -> Future:
        if len(self.futures) in self.refuse_at_send:
            self.futures.append(None)
            raise MessageSizeTooLargeError("the record is larger than max_request_size")
        self.sent.append((topic, key, value))
        future = Future()
        self.futures.append(future)
        return future

    def flush(self, timeout=None) -> None:
        silent = False
        for i, future in enumerate(self.futures):
            if future is None:
                continue
            result = self.outcome(i)
            if result == "silent":
                silent = True
            elif result is None:
                future.success(i)
            else:
                future.failure(result)
        if silent:
            raise KafkaTimeoutError("flush timed out")


def test_a_file_gives_its_events_in_order(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text('{"key": "a", "value": {"x": [1]}}\n\n{"key": "b", "value": {"x": [2]}}\n')
    assert list(file_events(path)) == [("a", {"x": [1]}), ("b", {"x": [2]})]


def test_a_repeated_file_renames_its_streams_each_round(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text('{"key": "a", "value": {"x": [1]}}\n')
    keys = [key for key, _ in itertools.islice(file_events(path, repeat=True), 3)]
    assert keys == ["a", "a~1", "a~2"]


def test_a_malformed_line_is_named_by_file_and_line_number(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text('{"key": "a", "value": {"x": [1]}}\n{"value": {}}\n')
    with pytest.raises(ConfigError, match=r"events\.jsonl:2: expected"):
        list(file_events(path))


def test_a_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        next(file_events(tmp_path / "nope.jsonl"))


def test_synthetic_events_go_round_robin_over_the_devices():
    events = list(itertools.islice(synthetic_events(streams=3, features=5, seed=1), 6))
    assert [key for key, _ in events] == ["device-00000", "device-00001", "device-00002"] * 2
    assert {len(value["x"]) for _, value in events} == {5}


def test_send_stamps_the_event_time_and_stops_at_the_count():
    producer = ListProducer()
    events = iter([("a", {"x": [1]}), ("b", {"x": [2], "ts": 5}), ("c", {"x": [3]})])
    sent, deliveries = send(producer, "t", events, count=2, rate=0)
    assert (sent, deliveries.acknowledged, deliveries.failed) == (2, 2, 0)
    values = [json.loads(value) for _, _, value in producer.sent]
    assert values[0]["ts"] > 1_700_000_000_000
    assert values[1]["ts"] == 5
    assert [key for _, key, _ in producer.sent] == [b"a", b"b"]


def test_send_keeps_to_the_rate():
    producer = ListProducer()
    events = ((f"s{i}", {"x": [i]}) for i in itertools.count())
    started = time.monotonic()
    send(producer, "t", events, count=50, rate=500.0)
    assert time.monotonic() - started >= 49 / 500.0


def test_every_refusal_by_the_broker_is_counted_with_the_first_error():
    refused = NotLeaderForPartitionError("partition moved")
    producer = ListProducer(outcome=lambda i: refused if i % 2 else None)
    events = ((f"s{i}", {"x": [i]}) for i in itertools.count())
    sent, deliveries = send(producer, "t", events, count=6, rate=0)
    assert (sent, deliveries.acknowledged, deliveries.failed) == (6, 3, 3)
    assert (
        deliveries.first_error
        == "NotLeaderForPartitionError: [Error 6] NotLeaderForPartitionError: partition moved"
    )


def test_a_record_the_client_refuses_at_send_is_counted_and_the_rest_still_go():
    producer = ListProducer(refuse_at_send={1})
    events = ((f"s{i}", {"x": [i]}) for i in itertools.count())
    sent, deliveries = send(producer, "t", events, count=3, rate=0)
    assert (sent, deliveries.acknowledged, deliveries.failed) == (3, 2, 1)
    assert deliveries.first_error.startswith("MessageSizeTooLargeError")


def test_records_without_an_answer_by_the_flush_timeout_are_neither_acknowledged_nor_failed():
    producer = ListProducer(outcome=lambda i: "silent" if i == 0 else None)
    events = ((f"s{i}", {"x": [i]}) for i in itertools.count())
    sent, deliveries = send(producer, "t", events, count=2, rate=0, flush_timeout_s=0.1)
    assert (sent, deliveries.acknowledged, deliveries.failed) == (2, 1, 0)
