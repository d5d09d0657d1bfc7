"""Rolling out a new model version over a real broker: v2 in shadow beside v1, then promoted.

Each test compares what was served with a reference computed without the server: the
model's numpy twin (`pipeline.testing.NumpyStepModel`, the ONNX operators' equations)
stepping each stream alone from its first event.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from pipeline.testing import StepWeights, random_weights, write_onnx_step
from tests.integration.streams import reference as stream_reference
from tests.integration.streams import round_robin_events
from tests.integration.test_durability import read_all

STREAMS = 40
Sent = list[tuple[bytes, bytes]]


@pytest.fixture(scope="module")
def v1() -> StepWeights:
    return random_weights("gru", n_features=3, hidden=8, layers=2, n_outputs=4, task="classification", name="clf-it", seed=11)  # fmt: skip


@pytest.fixture(scope="module")
def v2() -> StepWeights:
    """The next version: another cell, hidden size and depth, the same features."""
    return random_weights("lstm", n_features=3, hidden=12, layers=1, n_outputs=4, task="classification", name="clf-it", version="2", seed=12)  # fmt: skip


@pytest.fixture(scope="module")
def files(v1: StepWeights, v2: StepWeights, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:  # fmt: skip
    folder = tmp_path_factory.mktemp("rollout-models")
    return {"v1": write_onnx_step(v1, folder / "v1.onnx"), "v2": write_onnx_step(v2, folder / "v2.onnx")}  # fmt: skip


def events(count: int, seed: int) -> Sent:
    """`count` events of each of STREAMS streams, interleaved."""
    return round_robin_events(STREAMS, count, seed)


def reference(weights: StepWeights, sent: Sent) -> dict[bytes, list[list[float]]]:
    """Stream -> the class probabilities of each of its events, stepped alone from zeros."""
    return stream_reference(weights, sent, output="probs")


def newest(records, since: dict[int, int] | None = None) -> dict[bytes, list[dict]]:
    """Stream -> its predictions in offset order (the last one per input event), only those
    of input offsets at or after `since[partition]`."""
    last: dict[tuple[int, int], dict] = {}
    for record in records:
        value = json.loads(record.value)
        value["key"] = record.key
        source = (value["source"]["partition"], value["source"]["offset"])
        if since is None or source[1] >= since.get(source[0], 0):
            last[source] = value
    grouped: dict[bytes, list[dict]] = defaultdict(list)
    for _, value in sorted(last.items()):
        grouped[value["key"]].append(value)
    return grouped


def assert_equal_to_the_reference(served: dict[bytes, list[dict]], expected, first_step: int):
    """Every stream's predictions are steps `first_step`, `first_step + 1`, ... of its stream,
    each equal to the reference's prediction for that event."""
    assert set(served) == {f"s{i}".encode() for i in range(STREAMS)}
    for key, predictions in served.items():
        steps = [p["step"] for p in predictions]
        assert steps == list(range(first_step, first_step + len(predictions))), (key, steps)
        got = [p["outputs"]["probs"] for p in predictions]
        wanted = expected[key][first_step - 1 : first_step - 1 + len(predictions)]
        np.testing.assert_allclose(got, wanted, atol=1e-5)


def wait_for(kafka, topic: str, count: int, read_committed: bool = False):
    """Every record of `topic` once it holds `count` (fails after a minute)."""
    kafka.consume(topic, count=count, read_committed=read_committed)
    return read_all(kafka, topic, read_committed)


def topics(kafka) -> tuple[str, str, list[str]]:
    source = kafka.create_topic("rollout-events", partitions=4)
    output = kafka.create_topic("rollout-predictions", partitions=4)
    args = [
        "--input-topic", source, "--output-topic", output,
        "--checkpoint-interval-seconds", "0.3", "--checkpoint-interval-events", "0",
    ]  # fmt: skip
    return source, output, args


def test_a_promoted_model_continues_every_stream_exactly_as_if_it_had_served_it_from_its_first_event(
    kafka, serve, files, v1, v2
):
    source, output, args = topics(kafka)
    shadow_output = f"{output}.shadow"
    first, second, third = events(5, seed=1), events(5, seed=2), events(5, seed=3)
    everything = first + second + third

    kafka.produce(source, first)  # v1 alone: v2 does not exist yet
    alone = serve("--model", str(files["v1"]), *args)
    wait_for(kafka, output, len(first))
    assert alone.stop() == 0

    kafka.produce(source, second)  # v2 in shadow, warmed up from the events before it came
    shadowed = serve("--model", str(files["v1"]), "--shadow-model", str(files["v2"]),
                     "--shadow-warmup-events", "1000", *args)  # fmt: skip
    shadow_records = wait_for(kafka, shadow_output, len(second))
    shadowed.wait_metric("hiddenstate_shadow_streams", STREAMS, warmth="warm")
    cold_while_shadowed = shadowed.metric("hiddenstate_shadow_streams", warmth="cold")
    agreements = shadowed.metric("hiddenstate_shadow_argmax_agreements_total", output="probs")
    compared = shadowed.metric("hiddenstate_shadow_abs_difference_count", output="probs")
    assert shadowed.stop() == 0

    before = kafka.end_offsets(source)
    kafka.produce(source, third)  # promoted: v2 serves, v1 kept in shadow for a roll-back
    promoted = serve("--model", str(files["v2"]), "--shadow-model", str(files["v1"]), *args)
    records = wait_for(kafka, output, len(everything))
    promoted.wait_metric("hiddenstate_restored_streams_total", 2 * STREAMS)
    cold_at_promotion = promoted.metric("hiddenstate_restored_cold_streams_total")
    promoted_log = promoted.log()
    assert promoted.stop() == 0

    expected = reference(v2, everything)
    after = newest(records, since=before)
    assert {p["model"]["version"] for stream in after.values() for p in stream} == {"2"}
    assert_equal_to_the_reference(after, expected, first_step=11)
    assert cold_at_promotion == 0
    assert "promotion refused" not in promoted_log
    # While it was the shadow, v2 already predicted exactly that, from its warmed-up states.
    assert_equal_to_the_reference(newest(shadow_records), expected, first_step=6)
    assert cold_while_shadowed == 0
    assert compared == len(second)
    assert 0 <= agreements <= compared


def test_a_promotion_with_cold_streams_is_refused_with_their_count_and_served_when_forced(
    kafka, serve, files
):
    source, output, args = topics(kafka)
    kafka.produce(source, events(3, seed=4))
    alone = serve("--model", str(files["v1"]), *args)
    wait_for(kafka, output, 3 * STREAMS)
    assert alone.stop() == 0
    kafka.produce(source, events(1, seed=5))  # the shadow joins every stream mid-way
    shadowed = serve("--model", str(files["v1"]), "--shadow-model", str(files["v2"]), *args)
    wait_for(kafka, f"{output}.shadow", STREAMS)
    shadowed.wait_metric("hiddenstate_shadow_streams", STREAMS, warmth="cold")
    assert shadowed.stop() == 0

    refused = serve("--model", str(files["v2"]), *args, ready=False)
    assert refused.wait_exit() == 1
    assert f"promotion refused: {STREAMS} of the {STREAMS} streams restored" in refused.log()

    kafka.produce(source, events(1, seed=6))
    forced = serve("--model", str(files["v2"]), "--force-promotion", *args)
    records = wait_for(kafka, output, 5 * STREAMS)
    assert forced.metric("hiddenstate_restored_cold_streams_total") == STREAMS
    assert forced.stop() == 0
    versions = [json.loads(r.value)["model"]["version"] for r in records]
    assert versions.count("2") == STREAMS


def test_under_exactly_once_each_event_has_one_committed_prediction_of_each_model(
    kafka, serve, files
):
    source, output, args = topics(kafka)
    sent = events(4, seed=7)
    kafka.produce(source, sent)
    served = serve("--model", str(files["v1"]), "--shadow-model", str(files["v2"]),
                   "--guarantee", "exactly-once", *args)  # fmt: skip
    predictions = wait_for(kafka, output, len(sent), read_committed=True)
    shadowed = wait_for(kafka, f"{output}.shadow", len(sent), read_committed=True)
    assert served.stop() == 0
    for records, version in ((predictions, "1"), (shadowed, "2")):
        sources = [(json.loads(r.value)["source"]["partition"], json.loads(r.value)["source"]["offset"]) for r in records]  # fmt: skip
        assert len(sources) == len(set(sources)) == len(sent)
        assert {json.loads(r.value)["model"]["version"] for r in records} == {version}


def test_a_shadow_output_topic_not_co_partitioned_with_the_input_is_refused_at_start(
    kafka, serve, files
):
    *_, args = topics(kafka)
    narrow = kafka.create_topic("rollout-shadow", partitions=2)
    refused = serve("--model", str(files["v1"]), "--shadow-model", str(files["v2"]),
                    "--shadow-output-topic", narrow, *args, ready=False)  # fmt: skip
    assert refused.wait_exit() == 1
    assert f"shadow output topic {narrow!r} has 2 partitions, the input topic 4" in refused.log()


def test_a_shadow_with_other_features_is_refused_at_start_naming_them(
    kafka, serve, files, tmp_path
):
    *_, args = topics(kafka)
    other = write_onnx_step(
        random_weights("gru", n_features=4, name="clf-it", version="3", task="classification"),
        tmp_path / "v3.onnx",
    )
    refused = serve("--model", str(files["v1"]), "--shadow-model", str(other), *args, ready=False)
    assert refused.wait_exit() == 1
    assert "missing [], extra ['f3']" in refused.log()
