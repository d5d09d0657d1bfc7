"""Roll-outs over the in-memory Kafka: a shadow's states checkpointed with the served model's
(one transaction), restored and rewound with them, warmed up from the input topic, and
promoted without a cold start, or refused when too many streams are cold."""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from pipeline import rollout
from pipeline.changelog import Changelog
from pipeline.codec import EventDecoder, PredictionEncoder
from pipeline.config import load_config, model_changelog
from pipeline.delivery import CheckpointSchedule
from pipeline.delivery.at_least_once import AtLeastOnce
from pipeline.delivery.exactly_once import ExactlyOnce
from pipeline.health import LoopState
from pipeline.loop import LoopSettings, ServeLoop
from pipeline.metrics import Metrics
from pipeline.processor import make_processor
from pipeline.records import InputRecord
from pipeline.rollout import Checkpoints, PromotionRefusedError, recent_events
from pipeline.shadow import make_shadow
from pipeline.testing import FakeKafka, ManualClock, NumpyStepModel, StepWeights, random_weights

INPUT, OUTPUT, SHADOW_OUTPUT = "events", "predictions", "predictions.shadow"


@pytest.fixture(scope="module")
def v1() -> StepWeights:
    return random_weights("gru", n_features=3, hidden=8, layers=2, n_outputs=3, task="classification", name="clf", seed=1)  # fmt: skip


@pytest.fixture(scope="module")
def v2() -> StepWeights:
    return random_weights("lstm", n_features=3, hidden=6, layers=1, n_outputs=3, task="classification", name="clf", version="2", seed=2)  # fmt: skip


class FakeHistory:
    """`InputHistory` over a `FakeKafka` topic; counts the reads."""

    def __init__(self, kafka: FakeKafka, topic: str) -> None:
        self._kafka = kafka
        self._topic = topic
        self.reads: list[tuple[int, int, int]] = []

    def bounds(self, partition: int) -> tuple[int, int]:
        return 0, len(self._kafka.topics[self._topic][partition])

    def read(self, partition: int, start: int, end: int, progress: Any) -> list[InputRecord]:
        self.reads.append((partition, start, end))
        progress()
        log = self._kafka.topics[self._topic][partition][start:end]
        return [
            InputRecord(self._topic, partition, r.offset, r.key, r.value, r.timestamp_ms)
            for r in log
        ]


class Server:
    """One `hiddenstate serve` over the fake broker: `primary` served, `shadow` beside it."""

    def __init__(
        self,
        kafka: FakeKafka,
        primary: StepWeights,
        shadow: StepWeights | None = None,
        *flags: str,
        exactly_once: bool = False,
        interval_s: float = 0.0,
        name: str = "pod-0",
    ) -> None:
        argv = ["--input-topic", INPUT, "--output-topic", OUTPUT, "--model", "served.onnx"]
        if shadow is not None:
            argv += ["--shadow-model", "shadow.onnx"]
        settings = load_config([*argv, *flags], {})
        self.metrics = Metrics(CollectorRegistry())
        self.health = LoopState(clock=kafka.clock)
        transport = kafka.transport("group")
        reader = transport.changelog_reader(1.0)
        twin = None
        shadow_changelog = None
        if shadow is not None:
            encoder = PredictionEncoder(shadow.spec, SHADOW_OUTPUT, by_source_partition=True)
            twin = make_shadow(
                NumpyStepModel(shadow),
                primary.spec,
                settings,
                self.metrics.rollout,
                encoder,
                clock=kafka.clock,
            )
        self.processor = make_processor(
            NumpyStepModel(primary), settings, self.metrics, clock=kafka.clock, shadow=twin
        )
        primary_changelog = Changelog(
            kafka.create_topic(model_changelog(INPUT, primary.spec), 2),
            primary.spec,
            self.processor.store,
            self.metrics,
            reader,
            clock=kafka.clock,
        )
        if twin is not None and shadow is not None:
            shadow_changelog = Changelog(
                kafka.create_topic(model_changelog(INPUT, shadow.spec), 2),
                shadow.spec,
                twin.store,
                self.metrics,
                reader,
                clock=kafka.clock,
            )
        self.history = FakeHistory(kafka, INPUT)
        self.checkpoints = Checkpoints(
            primary_changelog,
            self.processor.store,
            settings.rollout,
            self.metrics.rollout,
            identity=primary.spec.identity,
            shadow=twin,
            shadow_changelog=shadow_changelog,
            history=self.history,
            decoder=EventDecoder(primary.spec.input, 65536),
        )
        schedule = CheckpointSchedule(interval_s, 0, kafka.clock)
        if exactly_once:
            committer: Any = ExactlyOnce(
                transport.transactional_sink(f"group-{name}", 60.0),
                self.checkpoints.changes,
                schedule,
                self.metrics,
                clock=kafka.clock,
            )
        else:
            committer = AtLeastOnce(
                transport.sink(),
                transport.transactional_sink(f"group-{name}-states", 60.0),
                self.checkpoints.changes,
                schedule,
                self.metrics,
                self.health.beat,
                clock=kafka.clock,
            )
        self.loop = ServeLoop(
            LoopSettings(),
            self.processor,
            committer,
            lambda a, r, lo: transport.source(INPUT, a, r, lo, read_committed=exactly_once),
            self.metrics,
            self.health,
            self.checkpoints,
            clock=kafka.clock,
        )

    def serve(self, polls: int = 1) -> None:
        for _ in range(polls):
            self.loop.run_once()

    def stop(self) -> None:
        self.loop.stop()
        self.loop.run()

    def shadow_snapshot(self, key: bytes) -> Any:
        assert self.processor.shadow is not None
        return self.processor.shadow.store.snapshot(key)

    def sample(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels)


@pytest.fixture
def kafka() -> FakeKafka:
    broker = FakeKafka(ManualClock(), session_timeout_s=10.0)
    for topic in (INPUT, OUTPUT, SHADOW_OUTPUT, f"{INPUT}.dead-letter"):
        broker.create_topic(topic, 2)
    return broker


class Streams:
    """Events sent to the fake input topic, remembered per stream for the reference."""

    def __init__(self, kafka: FakeKafka) -> None:
        self._kafka = kafka
        self.sent: dict[bytes, list[list[float]]] = defaultdict(list)

    def send(self, keys: str, count: int = 1) -> None:
        for _ in range(count):
            pairs = []
            for key in keys.encode():
                stream = bytes([key])
                k = len(self.sent[stream])
                features = [0.1 * key % 1.0 - 0.4, 0.07 * k, (-1.0) ** k * 0.3]
                self.sent[stream].append(features)
                pairs.append((stream, json.dumps({"x": features}).encode()))
            self._kafka.produce(INPUT, pairs)

    def reference(self, weights: StepWeights, key: bytes, inputs: list[list[float]] | None = None):
        """The outputs of each event of a stream, stepping the model alone from zeros."""
        model = NumpyStepModel(weights)
        states = [np.zeros((1, *s.shape), np.float32) for s in weights.spec.states]
        outputs = []
        for features in self.sent[key] if inputs is None else inputs:
            y, states = model.step(np.asarray([features], np.float32), states)
            outputs.append(y["probs"][0].tolist())
        return outputs


def written(kafka: FakeKafka, topic: str, *, committed_only: bool = True) -> list[dict[str, Any]]:
    values = []
    for _, r in kafka.records(topic, committed_only=committed_only):
        value = json.loads(r.value or b"null")
        value["key"] = r.key
        values.append(value)
    return values


def by_stream(values: list[dict[str, Any]]) -> dict[bytes, list[dict[str, Any]]]:
    grouped: dict[bytes, list[dict[str, Any]]] = defaultdict(list)
    for value in sorted(values, key=lambda v: (v["source"]["partition"], v["source"]["offset"])):
        grouped[value["key"]].append(value)
    return grouped


# -- one checkpoint, one transaction --------------------------------------------------


def test_both_changelogs_and_the_offsets_commit_in_one_transaction(kafka, v1, v2):
    server = Server(kafka, v1, v2)
    Streams(kafka).send("a")
    server.serve()
    journal = kafka.journal
    begin = next(i for i, (kind, _) in enumerate(journal) if kind == "begin")
    commit = next(i for i, (kind, _) in enumerate(journal) if kind == "commit")
    inside = {topic for kind, topic in journal[begin:commit] if kind == "send"}
    assert inside == {model_changelog(INPUT, v1.spec), model_changelog(INPUT, v2.spec)}
    assert [r.key for _, r in kafka.records(model_changelog(INPUT, v2.spec))] == [b"a"]


def test_under_exactly_once_shadow_predictions_become_visible_with_the_served_ones(kafka, v1, v2):
    server = Server(kafka, v1, v2, exactly_once=True, interval_s=5.0)
    Streams(kafka).send("ab")
    server.serve()
    assert written(kafka, SHADOW_OUTPUT) == []
    assert len(written(kafka, SHADOW_OUTPUT, committed_only=False)) == 2
    kafka.advance(5.0)
    server.serve()
    assert (len(written(kafka, OUTPUT)), len(written(kafka, SHADOW_OUTPUT))) == (2, 2)


def test_an_aborted_exactly_once_transaction_takes_the_shadow_predictions_with_it(kafka, v1, v2):
    server = Server(kafka, v1, v2, exactly_once=True, interval_s=5.0)
    Streams(kafka).send("ab")
    server.serve()
    server.loop._throw_away("test")
    server.serve(2)  # rewound, served again
    kafka.advance(5.0)
    server.serve()
    assert len(written(kafka, SHADOW_OUTPUT, committed_only=False)) == 4
    assert sorted(p["key"] for p in written(kafka, SHADOW_OUTPUT)) == [b"a", b"b"]


# -- restores and rewinds take both models back together ------------------------------


def test_a_restart_restores_both_models_and_continues_each_stream_exactly(kafka, v1, v2):
    streams = Streams(kafka)
    first = Server(kafka, v1, v2)
    streams.send("abc", 3)
    first.serve(2)
    first.stop()
    second = Server(kafka, v1, v2)
    streams.send("abc", 2)
    second.serve(2)
    shadowed = by_stream(written(kafka, SHADOW_OUTPUT))
    served = by_stream(written(kafka, OUTPUT))
    for key in (b"a", b"b", b"c"):
        assert [p["step"] for p in shadowed[key]] == [1, 2, 3, 4, 5]
        np.testing.assert_allclose(
            [p["outputs"]["probs"] for p in shadowed[key]], streams.reference(v2, key), atol=1e-6
        )
        np.testing.assert_allclose(
            [p["outputs"]["probs"] for p in served[key]], streams.reference(v1, key), atol=1e-6
        )


def test_a_rewind_takes_both_models_back_to_the_last_commit(kafka, v1, v2):
    streams = Streams(kafka)
    server = Server(kafka, v1, v2, interval_s=60.0)
    streams.send("a")
    server.serve()
    server.loop._committer.checkpoint(server.loop._source.group_metadata)
    streams.send("a")
    server.serve()  # a at step 2 in both, uncommitted
    server.loop._throw_away("test")
    server.serve(2)  # rewound to step 1, event 2 served again
    assert server.shadow_snapshot(b"a").step == 2
    last = by_stream(written(kafka, SHADOW_OUTPUT))[b"a"]
    assert [p["step"] for p in last] == [1, 2, 2]
    np.testing.assert_allclose(last[-1]["outputs"]["probs"], streams.reference(v2, b"a")[1], atol=1e-6)  # fmt: skip


# -- promotion --------------------------------------------------------------------


def test_a_promoted_model_continues_every_stream_as_if_it_had_served_it_from_its_first_event(
    kafka, v1, v2
):
    streams = Streams(kafka)
    alone = Server(kafka, v1)
    streams.send("abcd", 3)
    alone.serve(2)
    alone.stop()
    shadowed = Server(kafka, v1, v2, "--shadow-warmup-events", "100")
    streams.send("abcd", 2)
    shadowed.serve(2)
    shadowed.stop()
    before = len(written(kafka, OUTPUT))
    promoted = Server(kafka, v2, v1)  # v1 kept as the shadow, for a roll-back
    streams.send("abcd", 2)
    promoted.serve(2)
    after = by_stream(written(kafka, OUTPUT)[before:])
    for key in (b"a", b"b", b"c", b"d"):
        assert [p["model"]["version"] for p in after[key]] == ["2", "2"]
        assert [p["step"] for p in after[key]] == [6, 7]
        np.testing.assert_allclose(
            [p["outputs"]["probs"] for p in after[key]],
            streams.reference(v2, key)[5:],
            atol=1e-6,
        )
    assert promoted.sample("hiddenstate_restored_cold_streams_total") == 0


def test_without_a_warm_up_the_promotion_of_a_shadow_that_joined_mid_stream_is_refused(
    kafka, v1, v2
):
    streams = Streams(kafka)
    alone = Server(kafka, v1)
    streams.send("ab", 2)
    alone.serve(2)
    alone.stop()
    shadowed = Server(kafka, v1, v2)
    streams.send("a")  # b gets no event while the shadow runs: it is cold too
    shadowed.serve(2)
    shadowed.stop()
    promoted = Server(kafka, v2)
    with pytest.raises(PromotionRefusedError, match=r"2 of the 2 streams restored") as refused:
        promoted.serve()
    assert "--force-promotion / HIDDENSTATE_FORCE_PROMOTION" in str(refused.value)
    assert promoted.sample("hiddenstate_restored_cold_streams_total") == 2


def test_a_refused_promotion_writes_nothing(kafka, v1, v2):
    streams = Streams(kafka)
    alone = Server(kafka, v1)
    streams.send("ab", 2)
    alone.serve(2)
    alone.stop()
    joined = Server(kafka, v1, v2)
    joined.serve()  # the shadow joins both streams: cold placeholders, written
    joined.stop()
    topics = (model_changelog(INPUT, v2.spec), OUTPUT)
    before = [len(kafka.records(t, committed_only=False)) for t in topics]
    promoted = Server(kafka, v2)
    with pytest.raises(PromotionRefusedError):
        promoted.serve()
    promoted.loop._close()
    assert [len(kafka.records(t, committed_only=False)) for t in topics] == before


def test_a_forced_promotion_serves_and_a_later_restart_is_not_refused(kafka, v1, v2):
    streams = Streams(kafka)
    alone = Server(kafka, v1)
    streams.send("ab", 2)
    alone.serve(2)
    alone.stop()
    joined = Server(kafka, v1, v2)
    joined.serve()
    joined.stop()
    forced = Server(kafka, v2, None, "--force-promotion")
    streams.send("ab")
    forced.serve(2)
    forced.stop()
    later = Server(kafka, v2)
    streams.send("ab")
    later.serve(2)
    assert forced.sample("hiddenstate_restored_cold_streams_total") == 2
    assert later.sample("hiddenstate_restored_cold_streams_total") == 0
    # A cold placeholder starts from zeros: v2 saw a's last two events only.
    assert [p["step"] for p in by_stream(written(kafka, OUTPUT))[b"a"]][-2:] == [1, 2]


def test_a_forced_promotion_keeps_the_old_models_states_in_shadow_for_cold_streams(kafka, v1, v2):
    streams = Streams(kafka)
    alone = Server(kafka, v1)
    streams.send("a", 2)
    alone.serve(2)
    alone.stop()
    joined = Server(kafka, v1, v2)
    joined.serve()  # v2 holds a as a cold placeholder
    joined.stop()
    forced = Server(kafka, v2, v1, "--force-promotion")
    streams.send("a")
    forced.serve(2)
    (old,) = written(kafka, SHADOW_OUTPUT)
    assert (old["model"]["version"], old["step"]) == ("1", 3)
    np.testing.assert_allclose(old["outputs"]["probs"], streams.reference(v1, b"a")[-1], atol=1e-6)


def test_cold_streams_within_the_allowed_fraction_are_promoted(kafka, v1, v2):
    streams = Streams(kafka)
    alone = Server(kafka, v1)
    streams.send("a", 2)
    alone.serve(2)
    alone.stop()
    shadowed = Server(kafka, v1, v2)
    streams.send("bcd")  # new streams: seen from their first event
    shadowed.serve(2)
    shadowed.stop()
    promoted = Server(kafka, v2, None, "--promotion-max-cold-fraction", "0.25")
    promoted.serve()
    assert promoted.sample("hiddenstate_restored_cold_streams_total") == 1
    assert promoted.loop.assigned == frozenset({0, 1})


# -- warm-up --------------------------------------------------------------------------


def test_a_warm_up_limited_to_n_events_leaves_longer_streams_cold_from_the_last_n(kafka, v1, v2):
    streams = Streams(kafka)
    alone = Server(kafka, v1)
    streams.send("a", 5)
    alone.serve(2)
    alone.stop()
    shadowed = Server(kafka, v1, v2, "--shadow-warmup-events", "2")
    shadowed.serve()
    snapshot = shadowed.shadow_snapshot(b"a")
    assert (snapshot.step, snapshot.missed) == (2, 3)
    streams.send("a")
    shadowed.serve()
    (prediction,) = written(kafka, SHADOW_OUTPUT)
    expected = streams.reference(v2, b"a", streams.sent[b"a"][3:])[-1]
    np.testing.assert_allclose(prediction["outputs"]["probs"], expected, atol=1e-6)


def test_dead_lettered_events_are_not_replayed_by_the_warm_up(kafka, v1, v2):
    streams = Streams(kafka)
    alone = Server(kafka, v1)
    streams.send("a")
    kafka.produce(INPUT, [(b"a", b"not json")])
    streams.send("a")
    alone.serve(2)
    alone.stop()
    shadowed = Server(kafka, v1, v2, "--shadow-warmup-events", "10")
    streams.send("a")
    shadowed.serve(2)
    (prediction,) = written(kafka, SHADOW_OUTPUT)
    assert prediction["step"] == 3
    np.testing.assert_allclose(prediction["outputs"]["probs"], streams.reference(v2, b"a")[-1], atol=1e-6)  # fmt: skip
    assert shadowed.sample("hiddenstate_shadow_warmup_events_total") == 2


def test_a_shadow_changelog_left_behind_makes_its_streams_cold_and_the_warm_up_catches_up(
    kafka, v1, v2
):
    streams = Streams(kafka)
    together = Server(kafka, v1, v2)
    streams.send("ab", 2)
    together.serve(2)
    together.stop()
    alone = Server(kafka, v1)  # the shadow's changelog stops here
    streams.send("ab", 2)
    alone.serve(2)
    alone.stop()
    again = Server(kafka, v1, v2, "--shadow-warmup-events", "100")
    streams.send("ab")
    again.serve(2)
    shadowed = by_stream(written(kafka, SHADOW_OUTPUT))
    for key in (b"a", b"b"):
        assert [p["step"] for p in shadowed[key]] == [1, 2, 5]
        np.testing.assert_allclose(shadowed[key][-1]["outputs"]["probs"], streams.reference(v2, key)[-1], atol=1e-6)  # fmt: skip


def test_a_roll_back_to_a_model_dropped_at_the_promotion_warns_of_its_older_states(
    kafka, v1, v2, caplog
):
    streams = Streams(kafka)
    together = Server(kafka, v1, v2)
    streams.send("a", 2)
    together.serve(2)
    together.stop()
    promoted = Server(kafka, v2)  # v1 dropped: its changelog stops here
    streams.send("a")
    promoted.serve(2)
    promoted.stop()
    with caplog.at_level(logging.WARNING, logger="pipeline.rollout"):
        Server(kafka, v1, v2).serve()
    assert "1 streams of partitions [0, 1]: the states of clf@1" in caplog.text


def test_recent_events_read_back_in_doubling_spans_until_every_stream_has_its_events(
    kafka, v1, monkeypatch
):
    monkeypatch.setattr(rollout, "_FIRST_LOOK_BACK", 2)
    streams = Streams(kafka)
    streams.send("a", 3)
    streams.send("b", 6)
    partition = kafka.partition_for(INPUT, b"a")
    assert kafka.partition_for(INPUT, b"b") == partition  # one partition holds both
    history = FakeHistory(kafka, INPUT)
    decoder = EventDecoder(v1.spec.input, 65536)
    found = recent_events(history, decoder, partition, {b"a": 3, b"b": 2}, {b"a": 8, b"b": 8})
    assert [e.record.offset for e in found[b"a"]] == [0, 1, 2]
    assert [e.record.offset for e in found[b"b"]] == [7, 8]
    assert history.reads == [(partition, 0, 9)]  # the first span, 2 x 5 events, reached back


def test_the_look_back_doubles_up_to_its_longest_span(kafka, v1, monkeypatch):
    monkeypatch.setattr(rollout, "_FIRST_LOOK_BACK", 1)
    monkeypatch.setattr(rollout, "_LONGEST_LOOK_BACK", 4)
    streams = Streams(kafka)
    streams.send("a", 2)
    streams.send("b", 10)
    partition = kafka.partition_for(INPUT, b"a")
    history = FakeHistory(kafka, INPUT)
    decoder = EventDecoder(v1.spec.input, 65536)
    found = recent_events(history, decoder, partition, {b"a": 2}, {b"a": 1})
    assert [e.record.offset for e in found[b"a"]] == [0, 1]
    assert history.reads == [(partition, 0, 2)]  # from a's last event: 2 x its 2 events
    found = recent_events(history, decoder, partition, {b"a": 2}, {b"a": 11})
    assert [e.record.offset for e in found[b"a"]] == [0, 1]
    spans = [end - start for _, start, end in history.reads[1:]]
    assert spans == [4, 4, 4]  # 12 records back to a's first two, never more than 4 at once
