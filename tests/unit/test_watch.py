import math

import pytest

from pipeline.devtools.watch import Timing, describe, latency_summary, timing
from pipeline.model_spec import OutputSpec


def test_class_probabilities_read_as_the_top_label_and_its_probability():
    specs = {"probs": OutputSpec("probs", (3,), "class probabilities", ("cat", "dog", "eel"))}
    assert describe({"probs": [0.1, 0.7, 0.2]}, specs) == "probs: 'dog' p=0.700"


def test_without_labels_the_class_index_is_shown():
    assert describe({"probs": [0.6, 0.4]}, {}) == "probs: '0' p=0.600"


def test_a_forecast_shows_its_first_values():
    shown = describe({"y": [1.0, 2.5, 3.25, 4.0, 5.0]}, {})
    assert shown == "y: [1, 2.5, 3.25, 4, ...]"


def _timing(queued_ms: float, inference_ms: float, produce_ms: float, before_ms: float) -> Timing:
    """A prediction whose event waited `before_ms` before the server polled it."""
    event_time = 1_700_000_000_000.0
    produced = event_time + before_ms + queued_ms + inference_ms
    return Timing(
        event_time, queued_ms / 1000, inference_ms / 1000, produced, produced + produce_ms
    )


def test_the_server_adds_queue_inference_and_produce_and_not_the_wait_before_its_poll():
    row = _timing(queued_ms=2.0, inference_ms=0.5, produce_ms=1.5, before_ms=90.0)
    assert row.added_ms == pytest.approx(4.0)
    assert row.end_to_end_ms == pytest.approx(94.0)


def test_the_summary_gives_the_median_and_the_99th_percentile_not_a_mean():
    # 99 predictions that the server served in 1..99 ms (queue + inference + produce),
    # each after 10 ms in the events' producer, and one that waited 5 s before the poll.
    rows = [_timing(k - 1.0, 0.5, 0.5, 10.0) for k in range(1, 100)]
    rows.append(_timing(0.5, 0.25, 0.25, 5_000.0))
    summary = latency_summary(rows)
    assert summary.predictions == 100
    assert summary.added_p50_ms == pytest.approx(49.5)
    assert summary.added_p99_ms == pytest.approx(98.01)
    assert summary.end_to_end_p50_ms == pytest.approx(60.5)
    assert summary.end_to_end_p99_ms == pytest.approx(157.92)
    # the mean that the demo used to print would say 109.4 ms of event time to prediction
    assert sum(r.end_to_end_ms for r in rows) / len(rows) == pytest.approx(109.41)


def test_a_clock_step_between_producer_and_reader_never_makes_the_produce_negative():
    row = Timing(1000.0, 0.001, 0.0005, produced_ms=1010.0, read_ms=1009.0)
    assert row.added_ms == pytest.approx(1.5)


def test_a_prediction_reads_its_times_from_its_own_fields_and_the_records_timestamp():
    value = {
        "event_time_ms": 1000,
        "latency": {"queued_seconds": 0.002, "inference_seconds": 0.001},
    }
    assert timing(value, produced_ms=1020, read_ms=1024.0) == Timing(
        1000.0, 0.002, 0.001, 1020.0, 1024.0
    )
    assert timing({"reason": "not a prediction"}, 0, 0.0) is None


def test_no_predictions_summarise_as_not_a_number():
    summary = latency_summary([])
    assert summary.predictions == 0
    assert math.isnan(summary.added_p50_ms)
