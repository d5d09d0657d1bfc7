import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.config import ProcessingConfig, TopicsConfig
from pipeline.processor import Processor
from pipeline.state_store import StateStore
from pipeline.testing import event_record, prediction_values
from pipeline.waves import plan_waves

TOPICS = TopicsConfig(input_topic="events", output_topic="predictions")


def test_wave_k_holds_each_streams_kth_event():
    assert plan_waves(["a", "b", "a", "c", "a"], max_wave_size=10) == [[0, 1, 3], [2], [4]]


def test_a_wave_above_the_cap_is_cut_in_pieces_before_the_next_wave():
    assert plan_waves(["a", "b", "c", "a"], max_wave_size=2) == [[0, 1], [2], [3]]


def test_an_empty_batch_has_no_waves():
    assert plan_waves([], max_wave_size=4) == []


def test_a_cap_below_one_is_refused():
    with pytest.raises(ValueError, match="max_wave_size must be >= 1"):
        plan_waves(["a"], max_wave_size=0)


@given(keys=st.lists(st.sampled_from("abcdefg"), max_size=60), cap=st.integers(1, 8))
def test_any_batch_is_planned_into_valid_waves(keys, cap):
    waves = plan_waves(keys, cap)
    flat = [i for wave in waves for i in wave]
    assert sorted(flat) == list(range(len(keys)))  # every event exactly once
    assert all(len(wave) <= cap for wave in waves)
    assert all(len({keys[i] for i in wave}) == len(wave) for wave in waves)
    for key in set(keys):  # each stream's events keep their order across waves
        assert [i for i in flat if keys[i] == key] == [i for i, k in enumerate(keys) if k == key]


# --------------------------------------------------------------------------- end to end

STREAMS = ["s0", "s1", "s2", "s3", "s4"]
events = st.lists(
    st.tuples(
        st.sampled_from(STREAMS),
        st.lists(st.floats(-3, 3, width=32), min_size=3, max_size=3),
        st.sampled_from([False, False, False, False, True]),  # reset now and then
    ),
    min_size=1,
    max_size=40,
)


def run(model, batches, max_wave_size):
    store = StateStore(model.spec.states, max_streams=100, initial_capacity=2)
    processor = Processor(
        model, store, topics=TOPICS, processing=ProcessingConfig(max_wave_size=max_wave_size)
    )
    out = []
    for batch in batches:
        out += prediction_values(processor.process(batch))
    return out


def records_for(batch_events, first_offset=0):
    return [
        event_record(key, {"x": x, "reset": reset}, offset=first_offset + i)
        for i, (key, x, reset) in enumerate(batch_events)
    ]


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(batch=events, cap=st.integers(1, 6), split=st.integers(0, 40))
def test_waves_give_the_same_predictions_as_stepping_each_stream_alone(ort_gru, batch, cap, split):
    # Interleaved, batched in waves of up to `cap`, possibly split over two polls ...
    records = records_for(batch)
    together = run(ort_gru, [records[:split], records[split:]], cap)
    # ... equals each stream on its own, one event per call.
    alone = {}
    for key in STREAMS:
        own = [r for r in records if r.key == key.encode()]
        for record, value in zip(own, run(ort_gru, [[r] for r in own], 1), strict=True):
            alone[record.offset] = value
    assert len(together) == len(records)
    for value in together:
        reference = alone[value["source"]["offset"]]
        assert value["step"] == reference["step"]
        np.testing.assert_allclose(value["outputs"]["y"], reference["outputs"]["y"], atol=1e-5)


def test_the_property_test_sees_resets(ort_gru):
    records = records_for([("s0", [1, 1, 1], False), ("s0", [1, 1, 1], True)])
    values = run(ort_gru, [records], 4)
    assert [v["step"] for v in values] == [1, 1]
    assert json.dumps(values[0]["outputs"]) == json.dumps(values[1]["outputs"])


def test_the_module_docstring_example_holds():
    import doctest

    import pipeline.waves

    assert doctest.testmod(pipeline.waves).failed == 0
