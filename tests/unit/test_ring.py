"""The prediction ring: each stream's last predictions, found again by the labels that
judge them (by step or by source offset), bounded in memory."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.codec import Event, PredictionEncoder
from pipeline.ring import JUDGED, LATE, UNKNOWN, PredictionRing, RecordingEncoder
from pipeline.testing import event_record, random_weights

SPEC = random_weights("gru", n_features=2, hidden=4, n_outputs=3, task="classification").spec


def event(key: bytes, offset: int, partition: int = 0, ts: int = 1_000) -> Event:
    record = event_record(key, {"x": [0.0, 0.0]}, offset=offset, partition=partition)
    return Event(key, [0.0, 0.0], ts, False, record)


def record(ring: PredictionRing, key: bytes, step: int, offset: int, partition: int = 0) -> None:
    """One prediction of `key` at `step`, its values [step, offset, partition]."""
    ring.record(
        [event(key, offset, partition, ts=10 * step)],
        {"probs": np.array([[step, offset, partition]], np.float32)},
        np.array([step]),
        now=100.0 + step,
    )


def run(ring: PredictionRing, key: bytes, steps: range, partition: int = 0) -> None:
    """`key` predicted at each of `steps`, the event of step s at offset 10 * s."""
    for step in steps:
        record(ring, key, step, 10 * step, partition)


def find_step(ring, key, step, partition=0):
    return ring.find([key], [partition], [step], [-1])


def find_offset(ring, key, offset, partition=0):
    return ring.find([key], [partition], [-1], [offset])


def test_a_label_by_step_within_the_horizon_finds_that_steps_prediction():
    ring = PredictionRing(SPEC, horizon=4, max_streams=10)
    run(ring, b"a", range(1, 7))
    found = find_step(ring, b"a", 3)
    assert found.result.tolist() == [JUDGED]
    assert found.values.tolist() == [[3.0, 30.0, 0.0]]


def test_a_label_for_a_step_older_than_the_horizon_is_late():
    ring = PredictionRing(SPEC, horizon=4, max_streams=10)
    run(ring, b"a", range(1, 7))
    assert find_step(ring, b"a", 2).result.tolist() == [LATE]


def test_a_label_for_a_step_not_predicted_yet_is_unknown():
    ring = PredictionRing(SPEC, horizon=4, max_streams=10)
    run(ring, b"a", range(1, 4))
    assert find_step(ring, b"a", 4).result.tolist() == [UNKNOWN]


def test_a_label_for_a_stream_never_seen_is_unknown():
    ring = PredictionRing(SPEC, horizon=4, max_streams=10)
    run(ring, b"a", range(1, 4))
    assert find_step(ring, b"b", 1).result.tolist() == [UNKNOWN]


def test_a_label_read_from_another_partition_than_the_stream_is_unknown():
    ring = PredictionRing(SPEC, horizon=4, max_streams=10)
    run(ring, b"a", range(1, 4), partition=2)
    assert find_step(ring, b"a", 2, partition=1).result.tolist() == [UNKNOWN]
    assert find_step(ring, b"a", 2, partition=2).result.tolist() == [JUDGED]


def test_a_restart_of_the_steps_forgets_the_earlier_run():
    """After a reset (or a restore, or an eviction) the steps count from the new start: a
    label for a step of the old run must not judge the new run's prediction of it."""
    ring = PredictionRing(SPEC, horizon=8, max_streams=10)
    run(ring, b"a", range(1, 6))
    record(ring, b"a", 1, 100)  # reset: step 1 again, at offset 100
    assert find_step(ring, b"a", 1).values.tolist() == [[1.0, 100.0, 0.0]]
    assert find_step(ring, b"a", 3).result.tolist() == [UNKNOWN]
    assert find_offset(ring, b"a", 30).result.tolist() == [UNKNOWN]


def test_a_label_by_offset_finds_the_prediction_of_that_event():
    ring = PredictionRing(SPEC, horizon=4, max_streams=10)
    run(ring, b"a", range(1, 7))
    found = find_offset(ring, b"a", 50)
    assert found.result.tolist() == [JUDGED]
    assert found.values.tolist() == [[5.0, 50.0, 0.0]]


def test_a_label_by_offset_older_than_a_full_ring_is_late():
    ring = PredictionRing(SPEC, horizon=4, max_streams=10)
    run(ring, b"a", range(1, 7))
    assert find_offset(ring, b"a", 20).result.tolist() == [LATE]


def test_a_label_by_an_offset_the_stream_never_had_is_unknown():
    ring = PredictionRing(SPEC, horizon=4, max_streams=10)
    run(ring, b"a", range(1, 7))
    assert find_offset(ring, b"a", 55).result.tolist() == [UNKNOWN]
    assert find_offset(ring, b"a", 70).result.tolist() == [UNKNOWN]


def test_a_batch_of_labels_gets_one_result_each_in_order():
    ring = PredictionRing(SPEC, horizon=4, max_streams=10)
    run(ring, b"a", range(1, 7))
    run(ring, b"b", range(1, 3))
    found = ring.find([b"a", b"b", b"a", b"c"], [0, 0, 0, 0], [6, -1, 1, 1], [-1, 10, -1, -1])
    assert found.result.tolist() == [JUDGED, JUDGED, LATE, UNKNOWN]
    assert found.values[:2].tolist() == [[6.0, 60.0, 0.0], [1.0, 10.0, 0.0]]


def test_the_least_recently_predicted_stream_is_forgotten_at_the_cap():
    ring = PredictionRing(SPEC, horizon=2, max_streams=2, initial_capacity=1)
    record(ring, b"a", 1, 0)
    record(ring, b"b", 1, 1)
    record(ring, b"a", 2, 2)
    record(ring, b"c", 1, 3)
    assert len(ring) == 2
    assert find_step(ring, b"b", 1).result.tolist() == [UNKNOWN]
    assert find_step(ring, b"a", 2).result.tolist() == [JUDGED]


def test_dropping_a_partition_forgets_only_its_streams():
    ring = PredictionRing(SPEC, horizon=2, max_streams=10)
    record(ring, b"a", 1, 0, partition=0)
    record(ring, b"b", 1, 0, partition=1)
    assert ring.drop_partition(1) == 1
    assert ring.last(b"b") is None
    assert ring.last(b"a") is not None


def test_the_last_prediction_is_the_newest_with_its_source_and_times():
    ring = PredictionRing(SPEC, horizon=3, max_streams=10)
    run(ring, b"a", range(1, 6), partition=1)
    last = ring.last(b"a")
    assert last is not None
    assert (last.step, last.partition, last.offset, last.event_time_ms, last.updated_at) == (
        5,
        1,
        50,
        50,
        105.0,
    )
    assert last.outputs["probs"].tolist() == [5.0, 50.0, 1.0]


def test_memory_per_stream_is_the_documented_formula():
    ring = PredictionRing(SPEC, horizon=64, max_streams=4096, initial_capacity=4096)
    assert ring.nbytes == 4096 * PredictionRing.bytes_per_stream(SPEC, 64)
    assert PredictionRing.bytes_per_stream(SPEC, 64) == 64 * (3 * 4 + 8) + 44


def test_the_recording_encoder_keeps_the_wave_and_returns_the_inner_records():
    ring = PredictionRing(SPEC, horizon=2, max_streams=10)
    inner = PredictionEncoder(SPEC, "predictions")
    events = [event(b"a", 7), event(b"b", 8)]
    outputs = {"probs": np.array([[0.1, 0.2, 0.7], [0.5, 0.25, 0.25]], np.float32)}
    steps = np.array([1, 4])
    encoded = RecordingEncoder(inner, ring, clock=lambda: 5.0).encode_wave(
        events, outputs, steps, 0.0, 0.0
    )
    assert encoded == inner.encode_wave(events, outputs, steps, 0.0, 0.0)
    last = ring.last(b"b")
    assert last is not None
    assert (last.step, last.offset, last.updated_at) == (4, 8, 5.0)
    np.testing.assert_array_equal(last.outputs["probs"], outputs["probs"][1])


def test_a_ring_needs_a_horizon_of_at_least_one():
    with pytest.raises(ValueError, match="horizon >= 1"):
        PredictionRing(SPEC, horizon=0, max_streams=10)
