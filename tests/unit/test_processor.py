import json

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from pipeline.config import load_config
from pipeline.metrics import Metrics
from pipeline.processor import make_processor
from pipeline.testing import (
    NumpyStepModel,
    event_record,
    event_records,
    prediction_values,
    random_weights,
)


def ev(i: int = 0, **extra):
    return {"x": [0.1 * i, -0.2 * i, 0.3], **extra}


def counter(metrics, metric, **labels):
    return metrics.registry.get_sample_value(metric, labels)


def test_each_valid_event_gives_one_prediction_keyed_by_its_stream(make_processor, numpy_gru):
    result = make_processor(numpy_gru).process(event_records([("a", ev(1)), ("b", ev(2))]))
    assert [(r.topic, r.key) for r in result.predictions] == [
        ("predictions", b"a"),
        ("predictions", b"b"),
    ]
    assert result.dead_letters == []


def test_predictions_equal_stepping_the_model_directly(make_processor, numpy_gru, gru_weights):
    values = prediction_values(
        make_processor(numpy_gru).process(event_records([("a", ev(1)), ("a", ev(2))]))
    )
    reference = NumpyStepModel(gru_weights)
    states = [np.zeros((1, *s.shape), np.float32) for s in gru_weights.spec.states]
    for i, value in zip((1, 2), values, strict=True):
        outputs, states = reference.step(np.array([ev(i)["x"]], np.float32), states)
        np.testing.assert_allclose(value["outputs"]["y"], outputs["y"][0], atol=1e-6)


def test_predictions_follow_the_input_order_and_count_steps(make_processor, numpy_gru):
    records = event_records([("a", ev()), ("b", ev()), ("a", ev()), ("c", ev()), ("a", ev())])
    values = prediction_values(make_processor(numpy_gru).process(records))
    assert [v["source"]["offset"] for v in values] == [0, 1, 2, 3, 4]
    assert [v["step"] for v in values] == [1, 1, 2, 1, 3]


def test_state_carries_over_from_one_batch_to_the_next(make_processor, numpy_gru, gru_weights):
    records = event_records([("a", ev(1)), ("a", ev(2)), ("a", ev(3))])
    split = make_processor(numpy_gru)
    in_two = prediction_values(split.process(records[:1])) + prediction_values(
        split.process(records[1:])
    )
    in_one = prediction_values(make_processor(NumpyStepModel(gru_weights)).process(records))
    assert [v["outputs"] for v in in_two] == [v["outputs"] for v in in_one]


def test_one_model_call_per_wave(make_processor, numpy_gru):
    records = event_records([("a", ev()), ("b", ev()), ("c", ev()), ("a", ev()), ("b", ev())])
    make_processor(numpy_gru).process(records)
    assert numpy_gru.calls == 2


def test_no_wave_holds_more_streams_than_the_cap(make_processor, numpy_gru, metrics):
    records = event_records([(f"s{i}", ev()) for i in range(10)])
    make_processor(numpy_gru, max_wave_size=4).process(records)
    assert numpy_gru.calls == 3
    assert counter(metrics, "hiddenstate_wave_size_bucket", le="4.0") == 3


def test_a_bad_event_goes_to_the_dead_letter_topic_with_its_reason(make_processor, numpy_gru):
    result = make_processor(numpy_gru).process([event_record("a", b"{not json", offset=3)])
    (letter,) = result.dead_letters
    assert letter.topic == "events.dead-letter"
    assert dict(letter.headers)["hiddenstate.error.reason"] == b"not_json"
    assert result.predictions == []


def test_bad_events_do_not_change_the_valid_ones_beside_them(
    make_processor, numpy_gru, gru_weights
):
    good = event_records([("a", ev(1)), ("b", ev(2)), ("a", ev(3))])
    bad = [
        event_record(None, ev()),
        event_record("a", None),
        event_record("a", b"\xff"),
        event_record("a", b"[]"),
        event_record("b", {"x": [1]}),
        event_record("a", {"x": {"f0": 1}}),
        event_record("b", {"x": ["1", 2, 3]}),
        event_record("a", b'{"x": [NaN, 1, 2]}'),
        event_record("a", {"x": [1, 2, 3], "pad": "p" * 5000}),
    ]
    mixed = [bad[0], good[0], *bad[1:5], good[1], *bad[5:], good[2]]
    with_bad = make_processor(numpy_gru).process(mixed)
    clean = make_processor(NumpyStepModel(gru_weights)).process(good)

    def served(result):
        return [
            {k: v for k, v in value.items() if k != "latency"}
            for value in prediction_values(result)
        ]

    assert served(with_bad) == served(clean)
    assert len(with_bad.dead_letters) == len(bad)


def test_bad_events_are_counted_by_reason(make_processor, numpy_gru, metrics):
    make_processor(numpy_gru).process(
        [event_record(None, ev()), event_record("a", {"x": [1]}), event_record("b", {"x": [2]})]
    )
    assert counter(metrics, "hiddenstate_dead_letters_total", reason="missing_key") == 1
    assert counter(metrics, "hiddenstate_dead_letters_total", reason="feature_count") == 2


def test_a_bad_event_is_logged_with_its_position(make_processor, numpy_gru, caplog):
    make_processor(numpy_gru).process([event_record("a", b"{", offset=9, partition=2)])
    assert "events[2]@9: dead-lettered (not_json)" in caplog.text


def test_a_reset_restarts_the_stream_from_zeros(make_processor, numpy_gru):
    records = event_records([("a", ev(1)), ("a", ev(2)), ("a", ev(1, reset=True)), ("a", ev(2))])
    values = prediction_values(make_processor(numpy_gru).process(records))
    assert [v["step"] for v in values] == [1, 2, 1, 2]
    assert values[2]["outputs"] == values[0]["outputs"]
    assert values[3]["outputs"] == values[1]["outputs"]


def test_a_reset_marks_the_stream_for_a_fresh_snapshot(make_processor, numpy_gru):
    processor = make_processor(numpy_gru)
    processor.process(event_records([("a", ev(1))]))
    processor.store.drain_dirty()
    processor.process(event_records([("a", ev(1, reset=True))], first_offset=1))
    (snapshot,) = processor.store.drain_dirty()
    assert (snapshot.key, snapshot.step) == (b"a", 1)


def test_latency_fields_come_from_the_timer(make_processor, numpy_gru):
    ticks = iter([10.0, 10.25, 10.75])  # batch start, wave start, wave end
    values = prediction_values(
        make_processor(numpy_gru, timer=lambda: next(ticks)).process(event_records([("a", ev())]))
    )
    assert values[0]["latency"] == {"queued_seconds": 0.25, "inference_seconds": 0.5}


def test_the_event_time_is_the_events_ts_else_the_record_timestamp(make_processor, numpy_gru):
    records = [
        event_record("a", ev(ts=5_000), timestamp_ms=1),
        event_record("b", ev(), timestamp_ms=7_000),
    ]
    result = make_processor(numpy_gru).process(records)
    assert [v["event_time_ms"] for v in prediction_values(result)] == [5_000, 7_000]
    assert result.event_times_ms == [5_000, 7_000]


def test_next_offsets_cover_every_record_including_dead_letters(make_processor, numpy_gru):
    records = [
        event_record("a", ev(), offset=4, partition=0),
        event_record("b", ev(), offset=9, partition=1),
        event_record("a", b"bad", offset=5, partition=0),
    ]
    assert make_processor(numpy_gru).process(records).next_offsets == {
        ("events", 0): 6,
        ("events", 1): 10,
    }


def test_processing_updates_the_metrics(make_processor, numpy_gru, metrics):
    make_processor(numpy_gru).process(
        event_records([("a", ev()), ("b", ev()), ("a", ev()), ("c", b"x")])
    )
    assert counter(metrics, "hiddenstate_events_total") == 4
    assert counter(metrics, "hiddenstate_predictions_total") == 3
    assert counter(metrics, "hiddenstate_active_streams") == 2
    assert counter(metrics, "hiddenstate_inference_seconds_count") == 2
    assert counter(metrics, "hiddenstate_wave_size_sum") == 3
    assert counter(metrics, "hiddenstate_queued_seconds_count") == 3
    assert counter(metrics, "hiddenstate_state_store_bytes") > 0


def test_idle_streams_are_evicted_after_the_ttl_and_counted(
    make_processor, numpy_gru, metrics, clock
):
    processor = make_processor(numpy_gru, idle_ttl_seconds=60)
    processor.process(event_records([("a", ev(1)), ("b", ev(1))]))
    clock.advance(45)
    processor.process(event_records([("b", ev(2))], first_offset=2))
    clock.advance(30)
    processor.process([])  # an empty poll still evicts
    assert list(processor.store.keys()) == [b"b"]
    assert counter(metrics, "hiddenstate_evictions_total", cause="ttl") == 1
    assert counter(metrics, "hiddenstate_active_streams") == 1


def test_an_evicted_stream_starts_again_from_zeros(make_processor, numpy_gru, clock):
    processor = make_processor(numpy_gru, idle_ttl_seconds=60)
    first = prediction_values(processor.process(event_records([("a", ev(1))])))
    clock.advance(61)
    again = prediction_values(processor.process(event_records([("a", ev(1))])))
    assert again[0]["step"] == 1
    assert again[0]["outputs"] == first[0]["outputs"]


def test_the_least_recently_used_stream_is_evicted_at_the_cap_and_counted(
    make_processor, numpy_gru, metrics
):
    processor = make_processor(numpy_gru, max_streams=2, max_wave_size=2)
    processor.process(event_records([("a", ev()), ("b", ev())]))
    processor.process(event_records([("a", ev())], first_offset=2))
    processor.process(event_records([("c", ev())], first_offset=3))
    assert sorted(processor.store.keys()) == [b"a", b"c"]
    assert counter(metrics, "hiddenstate_evictions_total", cause="lru") == 1


def test_a_replayed_event_the_restored_state_already_holds_is_skipped(
    make_processor, numpy_gru, metrics
):
    processor = make_processor(numpy_gru)
    processor.process(event_records([("a", ev(1)), ("a", ev(2))]))  # offsets 0, 1
    replay = processor.process(event_records([("a", ev(2)), ("a", ev(3))], first_offset=1))
    assert [v["step"] for v in prediction_values(replay)] == [3]
    assert counter(metrics, "hiddenstate_replayed_events_skipped_total") == 1


def test_an_empty_batch_gives_an_empty_result(make_processor, numpy_gru):
    result = make_processor(numpy_gru).process([])
    assert (result.predictions, result.dead_letters, result.next_offsets) == ([], [], {})


def test_a_token_model_is_served_from_token_ids(make_processor):
    model = NumpyStepModel(random_weights("lstm", task="next_token", vocabulary=["a", "b", "c"]))
    result = make_processor(model).process(
        event_records([("chat", {"x": [2]}), ("chat", {"x": [5]})])
    )
    (value,) = prediction_values(result)
    assert len(value["outputs"]["probs"]) == 3
    assert sum(value["outputs"]["probs"]) == pytest.approx(1.0, abs=1e-5)
    assert dict(result.dead_letters[0].headers)["hiddenstate.error.reason"] == b"token_out_of_range"


def test_the_outputs_list_predictions_then_dead_letters(make_processor, numpy_gru):
    result = make_processor(numpy_gru).process([event_record("a", b"x"), event_record("a", ev())])
    assert [r.topic for r in result.outputs] == ["predictions", "events.dead-letter"]


def test_make_processor_wires_the_config_and_counts_lru_evictions(numpy_gru):
    config = load_config(
        ["--input-topic", "in", "--output-topic", "out", "--model", "m.onnx", "--max-streams", "1"]
    )
    metrics = Metrics(CollectorRegistry())
    processor = make_processor(numpy_gru, config, metrics)
    result = processor.process(event_records([("a", ev()), ("b", ev()), ("c", b"?")], topic="in"))
    assert {r.topic for r in result.predictions} == {"out"}
    assert result.dead_letters[0].topic == "in.dead-letter"
    assert metrics.registry.get_sample_value("hiddenstate_evictions_total", {"cause": "lru"}) == 1


def test_the_prediction_value_is_compact_json(make_processor, numpy_gru):
    (record,) = make_processor(numpy_gru).process(event_records([("a", ev())])).predictions
    assert b" " not in record.value
    assert json.loads(record.value)["model"] == {"name": "test-gru", "version": "1"}
