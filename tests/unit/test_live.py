"""The wiring of serve's live features: nothing at all when they are off; the ring sees
every prediction; the assignment reaches them after the loop's own callbacks; a shadow
model's predictions are judged by the same labels under its own identity."""

from __future__ import annotations

import json

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from pipeline.codec import Event, PredictionEncoder
from pipeline.config import load_config
from pipeline.labels import LabelledProcessor
from pipeline.live import Live
from pipeline.metrics import Metrics
from pipeline.processor import make_processor
from pipeline.ring import RecordingEncoder
from pipeline.shadow import make_shadow
from pipeline.testing import NumpyStepModel, event_record, random_weights
from tests.unit.test_labels import Follower, Sink

SPEC = random_weights("gru", n_features=3, hidden=4, n_outputs=2).spec
REQUIRED = ["--input-topic", "events", "--output-topic", "predictions", "--model", "m.onnx"]


def live(*flags: str) -> Live:
    return Live(load_config([*REQUIRED, *flags], {}), SPEC, Metrics(CollectorRegistry()))


class Source:
    """What the loop's source factory returns; only its lag is read here."""

    def lag(self) -> dict[int, int]:
        return {}


def test_without_labels_or_the_streams_api_nothing_is_wrapped():
    off = live()
    encoder = PredictionEncoder(SPEC, "predictions")
    processor = object()
    factory = object()
    assert off.ring is None
    assert off.encoder(encoder) is encoder
    assert off.processor(processor, transport=None) is processor  # type: ignore[arg-type]
    assert off.following(factory) is factory  # type: ignore[arg-type]
    assert off.streams_app(4, processor) is None  # type: ignore[arg-type]


def test_the_streams_api_alone_keeps_one_prediction_per_stream():
    on = live("--streams-api")
    assert on.ring is not None
    assert on.ring.horizon == 1
    assert isinstance(on.encoder(PredictionEncoder(SPEC, "predictions")), RecordingEncoder)


def test_the_assignment_reaches_the_api_after_the_loops_callbacks_and_revocation_forgets():
    on = live("--streams-api")
    assert on.ring is not None
    calls: list[tuple[str, list[int], frozenset[int]]] = []

    def loop(kind: str):
        return lambda partitions: calls.append((kind, partitions, on.assigned))

    callbacks = {}

    def make_source(assigned, revoked, lost):
        callbacks.update(assigned=assigned, revoked=revoked, lost=lost)
        return Source()

    on.following(make_source)(loop("assigned"), loop("revoked"), loop("lost"))
    record = event_record("a", {"x": [0, 0, 0]}, partition=1)
    on.ring.record(
        [Event(b"a", [0.0] * 3, 0, False, record)],
        {"y": np.zeros((1, 2), np.float32)},
        np.array([1]),
        0.0,
    )
    callbacks["assigned"]([0, 1])
    callbacks["revoked"]([1])
    callbacks["lost"]([0])

    assert calls == [
        ("assigned", [0, 1], frozenset()),
        ("revoked", [1], frozenset({0, 1})),
        ("lost", [0], frozenset({0})),
    ]
    assert on.assigned == frozenset()
    assert on.ring.last(b"a") is None


# -- a shadow model judged by the same labels ---------------------------------------

V1 = random_weights("gru", n_features=3, hidden=6, layers=2, n_outputs=4, task="classification", name="clf", seed=1)  # fmt: skip
V2 = random_weights("lstm", n_features=3, hidden=5, n_outputs=4, task="classification", name="clf", version="2", seed=2)  # fmt: skip
SHADOWED = [*REQUIRED, "--shadow-model", "v2.onnx", "--labels-topic", "labels"]


class Transport:
    """What `Live.processor` asks of the transport: its name and a producer."""

    name = "kafka-python"

    def sink(self) -> Sink:
        return Sink()


class Served:
    """`hiddenstate serve`'s wiring of a served model, its shadow and the labels, on numpy
    models, with the labels reader in memory."""

    def __init__(self, monkeypatch, shadow_weights=V2, flags=SHADOWED) -> None:
        self.follower = Follower()
        monkeypatch.setattr("pipeline.live.open_follower", lambda *_: self.follower)
        config = load_config(list(flags), {})
        self.metrics = Metrics(CollectorRegistry())
        self.live = Live(config, V1.spec, self.metrics, clock=lambda: 0.0)
        self.shadow = make_shadow(
            NumpyStepModel(shadow_weights),
            V1.spec,
            config,
            self.metrics.rollout,
            PredictionEncoder(shadow_weights.spec, "predictions.shadow", by_source_partition=True),
        )
        self.live.judge_shadow(self.shadow)
        encoder = self.live.encoder(PredictionEncoder(V1.spec, "predictions"))
        inner = make_processor(
            NumpyStepModel(V1), config, self.metrics, encoder=encoder, shadow=self.shadow
        )
        self.processor = self.live.processor(inner, Transport())  # type: ignore[arg-type]
        if isinstance(self.processor, LabelledProcessor):
            self.processor.watch(lambda: {0: 0})  # caught up: labels are due at once
            self.processor.assigned([0])
        self.offset = 0

    def serve(self, key: str, count: int) -> tuple[list[list[float]], list[list[float]]]:
        """`count` events of `key`; the served model's and the shadow's first outputs."""
        records = []
        for k in range(count):
            features = {"x": [0.1 * k - 0.2, 0.05 * k, (-1.0) ** k * 0.3]}
            records.append(event_record(key, features, offset=self.offset, timestamp_ms=1_000))
            self.offset += 1
        result = self.processor.process(records)
        return _probs(result.predictions), _probs(result.shadow_predictions)

    def label(self, key: str, value: dict[str, int]) -> None:
        self.follower.fetched.append(
            event_record(key, value, offset=len(self.follower.fetched), topic="labels")
        )

    def judge(self) -> None:
        self.processor.process([])  # labels are joined after a batch, an empty one too

    def value(self, name: str, identity: str, **labels: str) -> float:
        found = self.metrics.registry.get_sample_value(name, {"identity": identity, **labels})
        return 0.0 if found is None else found


def _probs(records: list) -> list[list[float]]:
    return [next(iter(json.loads(r.value)["outputs"].values())) for r in records]


def _scores(probs: list[list[float]], y: int) -> tuple[int, float]:
    """(correct, log-loss sum) of `probs` judged by the class `y`, as `Scorer` counts."""
    correct = sum(int(np.argmax(p) == y) for p in probs)
    return correct, float(sum(-np.log(max(p[y], 1e-12)) for p in probs))


def test_labels_judge_the_shadows_predictions_of_the_same_events_under_its_own_identity(
    monkeypatch,
):
    served = Served(monkeypatch)
    primary, shadow = served.serve("a", 3)
    for step in (1, 2, 3):
        served.label("a", {"step": step, "y": 2})
    served.judge()

    for identity, probs in ((V1.spec.identity, primary), (V2.spec.identity, shadow)):
        correct, log_loss = _scores(probs, 2)
        assert served.value("hiddenstate_online_labels_total", identity, result="judged") == 3
        assert served.value("hiddenstate_online_correct_total", identity) == correct
        assert served.value("hiddenstate_online_log_loss_total", identity) == pytest.approx(
            log_loss, abs=1e-6
        )
    assert primary != shadow  # two models, two sets of predictions judged


def test_a_stream_the_shadow_joined_mid_way_is_judged_at_the_served_models_step(monkeypatch):
    served = Served(monkeypatch)
    served.serve("a", 3)
    served.shadow.store.drop_partition(0)  # as if the shadow had been started only now
    served.shadow.ring.drop_partition(0)  # type: ignore[union-attr]
    _, (late_joiner,) = served.serve("a", 1)  # served step 4, the shadow's step 1
    served.label("a", {"step": 4, "y": 1})
    served.label("a", {"step": 1, "y": 1})  # the shadow never predicted the served step 1
    served.judge()

    shadow = V2.spec.identity
    assert served.value("hiddenstate_online_labels_total", shadow, result="judged") == 1
    assert served.value("hiddenstate_online_labels_total", shadow, result="unknown_step") == 1
    assert served.value("hiddenstate_online_log_loss_total", shadow) == pytest.approx(
        _scores([late_joiner], 1)[1], abs=1e-6
    )
    assert served.value("hiddenstate_online_labels_total", V1.spec.identity, result="judged") == 2


def test_a_shadow_of_another_task_is_not_judged_and_the_log_says_why(monkeypatch, caplog):
    regressor = random_weights("gru", n_features=3, hidden=4, n_outputs=4, name="clf", version="3")
    served = Served(monkeypatch, shadow_weights=regressor)
    served.serve("a", 1)
    served.label("a", {"step": 1, "y": 0})
    served.judge()

    assert served.shadow.ring is None
    assert "they differ in task, so a label does not mean the same to both" in caplog.text
    identity = regressor.spec.identity
    assert (
        served.metrics.registry.get_sample_value(
            "hiddenstate_online_labels_total", {"identity": identity, "result": "judged"}
        )
        is None
    )
    assert served.value("hiddenstate_online_labels_total", V1.spec.identity, result="judged") == 1


def test_without_labels_a_shadow_keeps_no_ring(monkeypatch):
    served = Served(monkeypatch, flags=[*REQUIRED, "--shadow-model", "v2.onnx", "--streams-api"])
    assert served.shadow.ring is None
