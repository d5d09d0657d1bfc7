"""The wiring of serve's live features: nothing at all when they are off; the ring sees
every prediction; the assignment reaches them after the loop's own callbacks."""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry

from pipeline.codec import Event, PredictionEncoder
from pipeline.config import load_config
from pipeline.live import Live
from pipeline.metrics import Metrics
from pipeline.ring import RecordingEncoder
from pipeline.testing import event_record, random_weights

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
