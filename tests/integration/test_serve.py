"""`hiddenstate serve` against a real broker: what a user of the server relies on."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections import defaultdict

import numpy as np
import pytest

from tests.integration.streams import reference, round_robin_events


def served_outputs(records) -> dict[bytes, list[dict]]:
    """Predictions per stream in output-topic order (per-key order is per-partition order)."""
    by_stream: dict[bytes, list[dict]] = defaultdict(list)
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        by_stream[record.key].append(json.loads(record.value))
    return by_stream


def test_predictions_equal_stepping_each_stream_alone_across_four_partitions(
    kafka, serve, gru_model, gru_weights
):
    source = kafka.create_topic("events", partitions=4)
    output = kafka.create_topic("predictions", partitions=4)
    sent = round_robin_events(streams=40, steps=25)
    kafka.produce(source, sent)

    served = serve("--model", str(gru_model), "--input-topic", source, "--output-topic", output)
    records = kafka.consume(output, count=len(sent))
    served.stop()

    expected = reference(gru_weights, sent)
    got = served_outputs(records)
    assert set(got) == set(expected)
    for key, predictions in got.items():
        assert [p["step"] for p in predictions] == list(range(1, 26))
        offsets = [p["source"]["offset"] for p in predictions]
        assert offsets == sorted(offsets)
        assert len({p["source"]["partition"] for p in predictions}) == 1
        np.testing.assert_allclose(
            [p["outputs"]["y"] for p in predictions], expected[key], atol=1e-5
        )


BAD_EVENTS = {
    "missing_key": (None, b'{"x": [1, 2, 3]}'),
    "missing_value": (b"bad", None),
    "oversized": (b"bad", json.dumps({"x": [1, 2, 3], "pad": "p" * 70_000}).encode()),
    "undecodable": (b"bad", b"\xff\xfe{"),
    "not_json": (b"bad", b"{x: 1"),
    "schema": (b"bad", b'{"features": [1, 2, 3]}'),
    "feature_count": (b"bad", b'{"x": [1, 2]}'),
    "feature_names": (b"bad", b'{"x": {"nope": 1}}'),
    "wrong_type": (b"bad", b'{"x": [1, "two", 3]}'),
    "non_finite": (b"bad", b'{"x": [1, NaN, 3]}'),
}


def test_every_bad_input_lands_in_the_dead_letter_topic_and_valid_events_are_unaffected(
    kafka, serve, gru_model, gru_weights
):
    source = kafka.create_topic("events", partitions=2)
    output = kafka.create_topic("predictions", partitions=2)
    dead = kafka.create_topic("dead", partitions=2)
    good = round_robin_events(streams=5, steps=4, seed=1)
    mixed = []
    for i, (key, value) in enumerate(good):
        mixed.append((key, value))
        if i < len(BAD_EVENTS):
            mixed.append(list(BAD_EVENTS.values())[i])
    kafka.produce(source, mixed)

    served = serve(
        "--model",
        str(gru_model),
        "--input-topic",
        source,
        "--output-topic",
        output,
        "--dead-letter-topic",
        dead,
    )
    predictions = kafka.consume(output, count=len(good))
    dead_letters = kafka.consume(dead, count=len(BAD_EVENTS))
    served.wait_metric("hiddenstate_dead_letters_total", 1, reason="non_finite")
    counted = {r: served.metric("hiddenstate_dead_letters_total", reason=r) for r in BAD_EVENTS}
    served.stop()

    assert len(predictions) + len(dead_letters) == len(mixed)
    reasons = {}
    for record in dead_letters:
        headers = dict(record.headers)
        reason = headers["hiddenstate.error.reason"].decode()
        reasons[reason] = (record.key, record.value)
        assert headers["hiddenstate.source.topic"].decode() == source
        assert int(headers["hiddenstate.source.offset"]) >= 0
    assert reasons == BAD_EVENTS
    assert counted == dict.fromkeys(BAD_EVENTS, 1.0)
    expected = reference(gru_weights, good)
    for key, outputs in served_outputs(predictions).items():
        np.testing.assert_allclose([p["outputs"]["y"] for p in outputs], expected[key], atol=1e-5)


def test_least_recently_used_stream_is_evicted_at_the_cap_and_comes_back_fresh(
    kafka, serve, gru_model
):
    source = kafka.create_topic("events", partitions=1)
    output = kafka.create_topic("predictions", partitions=1)
    served = serve(
        "--model",
        str(gru_model),
        "--input-topic",
        source,
        "--output-topic",
        output,
        "--max-streams",
        "2",
    )
    x = b'{"x": [0.1, 0.2, 0.3]}'
    # a, b fill the store; a is used again, so c evicts b, not a; b then evicts c.
    order = (b"a", b"b", b"a", b"c", b"a", b"b")
    for sent, key in enumerate(order, start=1):
        kafka.produce(source, [(key, x)])
        served.wait_metric("hiddenstate_events_total", sent)
    records = kafka.consume(output, count=len(order))
    served.wait_metric("hiddenstate_evictions_total", 2, cause="lru")
    served.stop()

    steps = [(r.key, json.loads(r.value)["step"]) for r in sorted(records, key=lambda r: r.offset)]
    assert steps == [(b"a", 1), (b"b", 1), (b"a", 2), (b"c", 1), (b"a", 3), (b"b", 1)]


def test_stream_idle_past_the_ttl_is_evicted_and_starts_fresh(kafka, serve, gru_model):
    source = kafka.create_topic("events", partitions=1)
    output = kafka.create_topic("predictions", partitions=1)
    served = serve(
        "--model",
        str(gru_model),
        "--input-topic",
        source,
        "--output-topic",
        output,
        "--idle-ttl-seconds",
        "1",
    )
    x = b'{"x": [0.1, 0.2, 0.3]}'
    kafka.produce(source, [(b"idle", x), (b"idle", x)])
    kafka.consume(output, count=2)
    served.wait_metric("hiddenstate_evictions_total", 1, cause="ttl", timeout=10)
    kafka.produce(source, [(b"idle", x)])
    records = kafka.consume(output, count=3)
    active = served.metric("hiddenstate_active_streams")
    served.stop()

    assert [json.loads(r.value)["step"] for r in records] == [1, 2, 1]
    assert active == 1


def test_sigterm_stops_cleanly_and_a_restart_neither_loses_nor_repeats_a_prediction(
    kafka, serve, gru_model
):
    source = kafka.create_topic("events", partitions=4)
    output = kafka.create_topic("predictions", partitions=4)
    sent = round_robin_events(streams=20, steps=150, seed=2)
    args = ("--model", str(gru_model), "--input-topic", source, "--output-topic", output)
    first = serve(*args)
    producer = threading.Thread(
        target=lambda: [kafka.produce(source, sent[i : i + 100]) for i in range(0, len(sent), 100)]
    )
    producer.start()
    first.wait_metric("hiddenstate_predictions_total", 500)
    assert first.stop(signal.SIGTERM) == 0
    producer.join()
    served_before = kafka.end_offsets(output)
    second = serve(*args)
    records = kafka.consume(output, count=len(sent))
    time.sleep(1.0)  # a duplicate, if any, would arrive within this
    total = sum(kafka.end_offsets(output).values())
    second.stop()

    assert "stopped: outputs acknowledged" in first.log()
    assert 0 < sum(served_before.values()) < len(sent)
    sources = [
        (json.loads(r.value)["source"]["partition"], json.loads(r.value)["source"]["offset"])
        for r in records
    ]
    assert len(set(sources)) == len(sent)
    assert total == len(sent)


def test_metrics_and_health_endpoints_answer_over_http(kafka, serve, gru_model):
    source = kafka.create_topic("events", partitions=2)
    output = kafka.create_topic("predictions", partitions=2)
    served = serve("--model", str(gru_model), "--input-topic", source, "--output-topic", output)
    kafka.produce(source, round_robin_events(streams=3, steps=2))
    kafka.consume(output, count=6)
    served.wait_metric("hiddenstate_end_to_end_seconds_count", 6)

    assert served.get("/healthz")[0] == 200
    status, body = served.get("/readyz")
    assert (status, json.loads(body)["assigned_partitions"]) == (200, 2)
    assert served.metric("hiddenstate_events_total") == 6
    assert served.metric("hiddenstate_predictions_total") == 6
    assert served.metric("hiddenstate_active_streams") == 3
    assert served.metric("hiddenstate_assigned_partitions") == 2
    assert (
        served.metric("hiddenstate_model_info", name="gru-it", provider="CPUExecutionProvider") == 1
    )
    served.stop()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--bootstrap-servers", "127.0.0.1:1", "--bootstrap-timeout-ms", "1000"],
            "cannot reach Kafka at ['127.0.0.1:1']",
        ),
        (
            ["--input-topic", "no-such-topic-anywhere"],
            "topic 'no-such-topic-anywhere' (--input-topic) does not exist",
        ),
        (["--model", "/nonexistent/model.onnx"], "/nonexistent/model.onnx"),
    ],
    ids=["unreachable-broker", "missing-topic", "unreadable-model"],
)
def test_start_up_failure_is_one_clear_line_and_a_nonzero_exit(
    kafka, serve, gru_model, flags, message
):
    source = kafka.create_topic("events", partitions=1)
    args = {"--model": str(gru_model), "--input-topic": source, "--output-topic": "unused"}
    for name, value in zip(flags[::2], flags[1::2], strict=True):
        args[name] = value
    served = serve(*[item for pair in args.items() for item in pair], ready=False)

    assert served.wait_exit(timeout=60) == 1
    assert message in served.log()
    assert "Traceback" not in served.log()
