"""A shadow model stepped beside the served one: same waves, own states, own predictions,
compared live; warm and cold streams; the same streams held as the served model."""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import numpy as np
import pytest

from pipeline.codec import PredictionEncoder
from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.metrics import Metrics
from pipeline.processor import Processor, make_processor
from pipeline.shadow import Comparison, Shadow, check_shadow, make_shadow
from pipeline.testing import NumpyStepModel, StepWeights, event_record, random_weights

SHADOW_TOPIC = "predictions.shadow"


@pytest.fixture(scope="module")
def v1() -> StepWeights:
    return random_weights("gru", n_features=3, hidden=8, layers=2, n_outputs=4, task="classification", name="clf", seed=1)  # fmt: skip


@pytest.fixture(scope="module")
def v2() -> StepWeights:
    """Another version of the same classifier: another cell, hidden size and depth."""
    return random_weights("lstm", n_features=3, hidden=5, layers=1, n_outputs=4, task="classification", name="clf", version="2", seed=2)  # fmt: skip


def config(*flags: str) -> Any:
    return load_config(
        [
            "--input-topic", "events", "--output-topic", "predictions", "--model", "v1.onnx",
            "--shadow-model", "v2.onnx", *flags,
        ],
        {},
    )  # fmt: skip


def pair(
    primary: StepWeights, secondary: StepWeights, metrics: Metrics, clock: Any, *flags: str
) -> tuple[Processor, NumpyStepModel, NumpyStepModel]:
    """A processor serving `primary` with `secondary` in shadow, wired as serve wires them."""
    served, shadowed = NumpyStepModel(primary), NumpyStepModel(secondary)
    settings = config(*flags)
    encoder = PredictionEncoder(secondary.spec, SHADOW_TOPIC, by_source_partition=True)
    shadow = make_shadow(shadowed, primary.spec, settings, metrics.rollout, encoder, clock=clock)
    processor = make_processor(served, settings, metrics, clock=clock, shadow=shadow)
    return processor, served, shadowed


def x(i: int, k: int) -> list[float]:
    return [0.1 * i - 0.2, 0.05 * k, (-1.0) ** k * 0.3]


def record(key: str, i: int, k: int, offset: int, **extra: Any) -> Any:
    return event_record(key, {"x": x(i, k), **extra}, offset=offset)


def stepped_alone(weights: StepWeights, inputs: list[list[float]]) -> list[list[float]]:
    """The output of each event of one stream, stepping the model over it from zeros."""
    model = NumpyStepModel(weights)
    states = [np.zeros((1, *s.shape), np.float32) for s in weights.spec.states]
    outputs = []
    for features in inputs:
        y, states = model.step(np.asarray([features], np.float32), states)
        outputs.append(y["probs"][0].tolist())
    return outputs


def shadow_of(processor: Processor) -> Shadow:
    assert processor.shadow is not None
    return processor.shadow


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_the_shadow_steps_once_per_wave_beside_the_served_model(v1, v2, metrics, clock):
    processor, served, shadowed = pair(v1, v2, metrics, clock)
    records = [record(k, i, 0, offset=i) for i, k in enumerate("abc")]
    records += [record("a", 0, 1, offset=3), record("a", 0, 2, offset=4)]
    processor.process(records)
    assert (served.calls, shadowed.calls) == (3, 3)


def test_shadow_predictions_equal_stepping_the_shadow_model_alone(v1, v2, metrics, clock):
    processor, _, _ = pair(v1, v2, metrics, clock)
    inputs: dict[str, list[list[float]]] = defaultdict(list)
    offset = 0
    for k in range(4):
        batch = []
        for i, key in enumerate("abc"):
            batch.append(record(key, i, k, offset=offset))
            inputs[key].append(x(i, k))
            offset += 1
        result = processor.process(batch)
    got: dict[bytes, list[float]] = {}
    for r in result.shadow_predictions:
        got[r.key] = json.loads(r.value)["outputs"]["probs"]
    for key in "abc":
        np.testing.assert_allclose(got[key.encode()], stepped_alone(v2, inputs[key])[-1], atol=1e-6)


def test_shadow_predictions_go_to_their_topic_with_the_shadows_identity(v1, v2, metrics, clock):
    processor, _, _ = pair(v1, v2, metrics, clock)
    result = processor.process([record("a", 0, 0, offset=0)])
    (prediction,) = result.shadow_predictions
    value = json.loads(prediction.value)
    assert (prediction.topic, prediction.key) == (SHADOW_TOPIC, b"a")
    assert (value["model"], value["step"]) == ({"name": "clf", "version": "2"}, 1)
    assert result.outputs == [*result.predictions, prediction]


def test_the_served_predictions_are_the_same_with_or_without_a_shadow(
    v1, v2, metrics, clock, make_processor
):
    records = [record(k, i, n, offset=3 * n + i) for n in range(3) for i, k in enumerate("abc")]
    alone = make_processor(NumpyStepModel(v1)).process(records)
    processor, _, _ = pair(v1, v2, Metrics(type(metrics.registry)()), clock)
    beside = processor.process(records)

    def served(result: Any) -> list[tuple[bytes, int, list[float]]]:
        values = [(r.key, json.loads(r.value)) for r in result.predictions]
        return [(key, v["step"], v["outputs"]["probs"]) for key, v in values]

    assert served(beside) == served(alone)


def test_a_stream_the_shadow_sees_from_its_first_event_is_warm(v1, v2, metrics, clock):
    processor, _, _ = pair(v1, v2, metrics, clock)
    processor.process([record("a", 0, 0, offset=0), record("a", 0, 1, offset=1)])
    shadow_of(processor).publish(clock(), force=True)
    assert sample(metrics, "hiddenstate_shadow_streams", warmth="warm") == 1
    assert sample(metrics, "hiddenstate_shadow_streams", warmth="cold") == 0


def test_a_stream_the_shadow_joins_mid_stream_is_cold_having_missed_the_events_before(
    v1, v2, metrics, clock
):
    processor, _, _ = pair(v1, v2, metrics, clock)
    processor.process([record("a", 0, k, offset=k) for k in range(3)])
    shadow = shadow_of(processor)
    shadow.store.drop_partition(0)  # as if the shadow had been started only now
    processor.process([record("a", 0, 3, offset=3)])
    snapshot = shadow.store.snapshot(b"a")
    assert snapshot is not None
    assert (snapshot.step, snapshot.missed) == (1, 3)
    shadow.publish(clock(), force=True)
    assert sample(metrics, "hiddenstate_shadow_streams", warmth="cold") == 1


def test_a_reset_makes_a_cold_stream_warm_in_the_shadow(v1, v2, metrics, clock):
    processor, _, _ = pair(v1, v2, metrics, clock)
    processor.process([record("a", 0, k, offset=k) for k in range(2)])
    shadow = shadow_of(processor)
    shadow.store.drop_partition(0)
    processor.process([record("a", 0, 2, offset=2)])
    processor.process([record("a", 0, 3, offset=3, reset=True)])
    snapshot = shadow.store.snapshot(b"a")
    assert snapshot is not None
    assert (snapshot.step, snapshot.missed) == (1, 0)


def test_the_shadow_forgets_the_streams_the_served_store_evicts_at_its_cap(v1, v2, metrics, clock):
    processor, _, _ = pair(v1, v2, metrics, clock, "--max-streams", "2")
    for offset, key in enumerate("abc"):
        processor.process([record(key, 0, 0, offset=offset)])
    assert sorted(shadow_of(processor).store.keys()) == sorted(processor.store.keys())
    assert b"a" not in shadow_of(processor).store


def test_the_shadow_forgets_idle_streams_with_the_served_store(v1, v2, metrics, clock):
    processor, _, _ = pair(v1, v2, metrics, clock, "--idle-ttl-seconds", "10")
    processor.process([record("a", 0, 0, offset=0)])
    clock.advance(11.0)
    processor.process([])
    assert len(shadow_of(processor).store) == 0


def test_an_evicted_stream_that_returns_starts_from_zeros_in_both_models(v1, v2, metrics, clock):
    processor, _, _ = pair(v1, v2, metrics, clock, "--max-streams", "1")
    processor.process([record("a", 0, 0, offset=0)])
    processor.process([record("b", 0, 0, offset=1)])  # evicts a
    result = processor.process([record("a", 0, 1, offset=2)])
    value = json.loads(result.shadow_predictions[0].value)
    assert value["step"] == 1
    np.testing.assert_allclose(
        value["outputs"]["probs"], stepped_alone(v2, [x(0, 1)])[0], atol=1e-6
    )


def test_dropping_a_partition_drops_the_shadows_streams_too(v1, v2, metrics, clock):
    processor, _, _ = pair(v1, v2, metrics, clock)
    processor.process([record("a", 0, 0, offset=0)])
    assert processor.drop_partition(0) == 1
    assert len(shadow_of(processor).store) == 0


def test_the_largest_absolute_difference_of_each_output_is_observed_per_event(
    v1, v2, metrics, clock
):
    processor, _, _ = pair(v1, v2, metrics, clock)
    result = processor.process([record("a", 0, 0, offset=0), record("b", 1, 0, offset=1)])
    served = [json.loads(r.value)["outputs"]["probs"] for r in result.predictions]
    shadowed = [json.loads(r.value)["outputs"]["probs"] for r in result.shadow_predictions]
    expected = sum(max(abs(p - q) for p, q in zip(a, b, strict=True)) for a, b in zip(served, shadowed, strict=True))  # fmt: skip
    count = sample(metrics, "hiddenstate_shadow_abs_difference_count", output="probs")
    total = sample(metrics, "hiddenstate_shadow_abs_difference_sum", output="probs")
    assert count == 2
    assert total == pytest.approx(expected, abs=1e-6)


def test_argmax_agreements_of_two_classifiers_are_counted(v1, v2, metrics, clock):
    processor, _, _ = pair(v1, v2, metrics, clock)
    records = [record(k, i, 0, offset=i) for i, k in enumerate("abcdef")]
    result = processor.process(records)
    served = [np.argmax(json.loads(r.value)["outputs"]["probs"]) for r in result.predictions]
    shadowed = [np.argmax(json.loads(r.value)["outputs"]["probs"]) for r in result.shadow_predictions]  # fmt: skip
    agreed = sum(a == b for a, b in zip(served, shadowed, strict=True))
    assert sample(metrics, "hiddenstate_shadow_argmax_agreements_total", output="probs") == agreed


def test_a_model_agrees_with_itself_on_every_argmax_and_differs_by_nothing(v1, metrics, clock):
    retrained = random_weights("gru", n_features=3, hidden=8, layers=2, n_outputs=4, task="classification", name="clf", seed=1)  # fmt: skip
    same_weights_other_version = StepWeights(
        spec=type(retrained.spec)(**{**retrained.spec.__dict__, "version": "1b"}),
        cell=retrained.cell,
        hidden=retrained.hidden,
        layers=retrained.layers,
        head_w=retrained.head_w,
        head_b=retrained.head_b,
    )
    processor, _, _ = pair(v1, same_weights_other_version, metrics, clock)
    processor.process([record(k, i, 0, offset=i) for i, k in enumerate("abc")])
    assert sample(metrics, "hiddenstate_shadow_argmax_agreements_total", output="probs") == 3
    assert sample(metrics, "hiddenstate_shadow_abs_difference_sum", output="probs") == 0


def test_outputs_of_another_shape_are_not_compared():
    served = random_weights("gru", n_outputs=4, task="classification").spec
    shadow = random_weights("gru", n_outputs=5, task="classification", seed=3).spec
    assert Comparison.of(served, shadow) == Comparison(outputs=(), argmax=())


def test_a_regressor_beside_a_classifier_is_compared_by_difference_only():
    served = random_weights("gru", n_outputs=2, task="classification").spec
    shadow = random_weights("gru", n_outputs=2, task="regression", seed=3).spec
    shadow_probs = type(shadow)(
        **{**shadow.__dict__, "outputs": served.outputs}
    )  # same output name and shape, another task
    assert Comparison.of(served, shadow_probs) == Comparison(outputs=("probs",), argmax=())


def test_a_shadow_with_other_features_is_refused_naming_them():
    served = random_weights("gru", n_features=3).spec
    other = random_weights("gru", n_features=4, seed=3).spec
    with pytest.raises(ConfigError, match=r"missing \[\], extra \['f3'\]") as refused:
        check_shadow(served, other, "v1.onnx", "v2.onnx")
    assert "--shadow-model / HIDDENSTATE_SHADOW_MODEL" in str(refused.value)


def test_a_shadow_with_the_features_in_another_order_is_refused():
    served = random_weights("gru", n_features=3).spec
    shuffled = type(served)(
        **{
            **random_weights("gru", n_features=3, seed=3).spec.__dict__,
            "input": type(served.input)(features=("f2", "f1", "f0")),
        }
    )
    with pytest.raises(ConfigError, match="the same names in another order"):
        check_shadow(served, shuffled, "v1.onnx", "v2.onnx")


def test_the_served_model_itself_is_refused_as_its_shadow():
    served = random_weights("gru").spec
    with pytest.raises(ConfigError, match="is the same model as --model"):
        check_shadow(served, served, "v1.onnx", "copy.onnx")


def test_the_state_store_gauge_counts_both_models_states(v1, v2, metrics, clock):
    processor, _, _ = pair(v1, v2, metrics, clock)
    processor.process([record(k, i, 0, offset=i) for i, k in enumerate("abc")])
    expected = processor.store.nbytes + shadow_of(processor).store.nbytes
    assert sample(metrics, "hiddenstate_state_store_bytes") == expected


def test_shadow_predictions_go_to_the_partition_of_their_input_event(v1, v2, metrics, clock):
    processor, _, _ = pair(v1, v2, metrics, clock)
    records = [event_record("a", {"x": x(0, 0)}, partition=3), event_record("b", {"x": x(1, 0)}, partition=1)]  # fmt: skip
    result = processor.process(records)
    assert [(r.key, r.partition) for r in result.shadow_predictions] == [(b"a", 3), (b"b", 1)]


def test_an_encoder_that_partitions_by_key_is_given_the_input_partitions(v1, v2, metrics, clock):
    served, shadowed = NumpyStepModel(v1), NumpyStepModel(v2)
    settings = config()
    by_key = PredictionEncoder(v2.spec, SHADOW_TOPIC)  # as a registry format's encoder does
    shadow = make_shadow(shadowed, v1.spec, settings, metrics.rollout, by_key, clock=clock)
    processor = make_processor(served, settings, metrics, clock=clock, shadow=shadow)
    result = processor.process([event_record("a", {"x": x(0, 0)}, partition=2)])
    assert [r.partition for r in result.shadow_predictions] == [2]
