"""Label events: read, joined to the predictions they judge after each batch, counted per
model identity; late, unknown and malformed ones counted; waiting for their input."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from pipeline.codec import PredictionEncoder
from pipeline.errors import BadEventError, ConfigError
from pipeline.labels import LabelledProcessor, Scorer, decode_label
from pipeline.metrics import Metrics
from pipeline.records import InputRecord, OutputRecord
from pipeline.ring import PredictionRing, RecordingEncoder
from pipeline.testing import NumpyStepModel, event_record, prediction_values, random_weights

CLASSIFIER = random_weights("gru", n_features=3, hidden=6, n_outputs=4, task="classification")
REGRESSOR = random_weights("gru", n_features=3, hidden=6, n_outputs=2, task="regression", seed=1)


class Follower:
    """The labels reader, in memory: records are handed over by the test."""

    topic = "labels"

    def __init__(self) -> None:
        self.fetched: list[InputRecord] = []
        self.assigned: set[int] = set()
        self.paused: set[int] = set()
        self.closed = False

    def assign(self, partitions: Sequence[int]) -> None:
        self.assigned |= set(partitions)

    def unassign(self, partitions: Sequence[int]) -> None:
        self.assigned -= set(partitions)

    def poll(self, max_records: int) -> list[InputRecord]:
        taken = [r for r in self.fetched if r.partition not in self.paused][:max_records]
        self.fetched = [r for r in self.fetched if r not in taken]
        return taken

    def pause(self, partitions: Sequence[int]) -> None:
        self.paused |= set(partitions)

    def resume(self, partitions: Sequence[int]) -> None:
        self.paused -= set(partitions)

    def close(self) -> None:
        self.closed = True


class Sink:
    def __init__(self) -> None:
        self.sent: list[OutputRecord] = []

    def send(self, records: Sequence[OutputRecord]) -> None:
        self.sent += records

    def flush(self, timeout_s: float) -> None:
        pass

    def close(self) -> None:
        pass


class Setup:
    """A real processor on a numpy model, its ring, and the labels around it."""

    def __init__(self, make_processor, weights=CLASSIFIER, horizon=4, max_waiting=100):
        self.metrics = Metrics(CollectorRegistry())
        self.spec = weights.spec
        self.ring = PredictionRing(self.spec, horizon, max_streams=100)
        encoder = RecordingEncoder(
            PredictionEncoder(self.spec, "predictions"), self.ring, lambda: 0.0
        )
        self.inner = make_processor(NumpyStepModel(weights), encoder=encoder)
        self.follower = Follower()
        self.sink = Sink()
        self.lags: dict[int, int] = {}
        scores = self.metrics.online.register(self.spec.identity, self.spec.task)
        self.labelled = LabelledProcessor(
            self.inner,
            self.follower,
            [Scorer(self.spec, self.ring, scores)],
            self.metrics.online,
            self.sink,
            "labels.dead-letter",
            max_event_bytes=4096,
            max_waiting=max_waiting,
            lag_interval_s=0.0,
        )
        self.labelled.watch(lambda: dict(self.lags))
        self.labelled.assigned([0, 1])
        self.offsets = {0: 0, 1: 0}
        self.label_offsets = {0: 0, 1: 0}

    def events(self, *keys: str, partition: int = 0, ts: int = 1_000) -> list[InputRecord]:
        records = []
        for key in keys:
            records.append(
                event_record(
                    key,
                    {"x": [0.1, -0.2, 0.3]},
                    offset=self.offsets[partition],
                    partition=partition,
                    timestamp_ms=ts,
                )
            )
            self.offsets[partition] += 1
        return records

    def label(self, key: str | None, value, *, partition: int = 0, ts: int = 1_000) -> InputRecord:
        record = event_record(
            key,
            value if isinstance(value, (bytes, str)) else json.dumps(value),
            offset=self.label_offsets[partition],
            partition=partition,
            topic="labels",
            timestamp_ms=ts,
        )
        self.label_offsets[partition] += 1
        self.follower.fetched.append(record)
        return record

    def value(self, name: str, **labels: str) -> float:
        found = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if found is None else found

    def results(self) -> dict[str, float]:
        return {
            result: self.value(
                "hiddenstate_online_labels_total", identity=self.spec.identity, result=result
            )
            for result in ("judged", "late", "unknown_step")
        }


@pytest.fixture
def setup(make_processor):
    return Setup(make_processor)


# -- reading a label event ----------------------------------------------------------


def label_record(value, key=b"a", partition=0) -> InputRecord:
    raw = value if isinstance(value, bytes) else json.dumps(value).encode()
    return InputRecord("labels", partition, 5, key, raw, 1_000)


def test_a_label_names_its_prediction_by_step():
    label = decode_label(label_record({"step": 3, "y": 1}), 4096)
    assert (label.key, label.step, label.offset, label.y) == (b"a", 3, -1, 1)


def test_a_label_names_its_prediction_by_the_source_offset():
    label = decode_label(label_record({"offset": 0, "y": [0.5]}), 4096)
    assert (label.step, label.offset, label.y) == (-1, 0, [0.5])


@pytest.mark.parametrize(
    ("value", "key", "reason"),
    [
        ({"step": 1, "y": 0}, None, "missing_key"),
        (b"\xff", b"a", "undecodable"),
        (b"{step", b"a", "not_json"),
        ([1, 2], b"a", "schema"),
        ({"y": 0}, b"a", "schema"),
        ({"step": 1, "offset": 2, "y": 0}, b"a", "schema"),
        ({"step": 0, "y": 0}, b"a", "schema"),
        ({"step": True, "y": 0}, b"a", "schema"),
        ({"offset": -1, "y": 0}, b"a", "schema"),
        ({"step": 2}, b"a", "schema"),
    ],
    ids=[
        "no-key",
        "not-utf8",
        "not-json",
        "not-an-object",
        "neither-step-nor-offset",
        "both-step-and-offset",
        "step-zero",
        "step-boolean",
        "negative-offset",
        "no-y",
    ],
)
def test_a_label_that_cannot_be_read_names_the_reason(value, key, reason):
    with pytest.raises(BadEventError) as raised:
        decode_label(label_record(value, key=key), 4096)
    assert raised.value.reason == reason


def test_a_label_larger_than_the_event_limit_is_oversized():
    with pytest.raises(BadEventError) as raised:
        decode_label(label_record({"step": 1, "y": 0, "pad": "x" * 100}), 50)
    assert raised.value.reason == "oversized"


# -- the truth as a model sees it --------------------------------------------------------


def scorer(weights) -> Scorer:
    spec = weights.spec
    metrics = Metrics(CollectorRegistry())
    return Scorer(
        spec, PredictionRing(spec, 2, 10), metrics.online.register(spec.identity, spec.task)
    )


def test_a_class_is_given_by_index_or_by_name():
    spec = random_weights("gru", n_outputs=3, task="next_token", vocabulary=["a", "b", "c"]).spec
    metrics = Metrics(CollectorRegistry())
    judge = Scorer(
        spec, PredictionRing(spec, 2, 10), metrics.online.register(spec.identity, spec.task)
    )
    assert judge.target(2).tolist() == [2.0]
    assert judge.target("b").tolist() == [1.0]


@pytest.mark.parametrize(
    ("y", "reason"),
    [(4, "unknown_class"), (-1, "unknown_class"), ("cat", "unknown_class"), (1.5, "wrong_type")],
)
def test_a_class_outside_the_model_is_refused(y, reason):
    with pytest.raises(BadEventError) as raised:
        scorer(CLASSIFIER).target(y)
    assert raised.value.reason == reason


def test_regression_targets_are_a_list_in_the_outputs_order():
    assert scorer(REGRESSOR).target([1.5, -2]).tolist() == [1.5, -2.0]


@pytest.mark.parametrize(
    ("y", "reason"),
    [([1.0], "target_count"), ([1.0, "x"], "wrong_type"), ([1.0, float("inf")], "non_finite")],
)
def test_regression_targets_that_do_not_fit_the_output_are_refused(y, reason):
    with pytest.raises(BadEventError) as raised:
        scorer(REGRESSOR).target(y)
    assert raised.value.reason == reason


def test_a_classifier_with_a_two_dimensional_output_cannot_be_judged():
    spec = CLASSIFIER.spec
    output = spec.outputs[0]
    flat = type(output)(output.name, (2, 2), output.meaning)
    wide = type(spec)(**{**spec.__dict__, "outputs": (flat,)})
    metrics = Metrics(CollectorRegistry())
    with pytest.raises(ConfigError, match="needs a 1-D output of class probabilities"):
        Scorer(
            wide,
            PredictionRing(wide, 2, 10),
            metrics.online.register(wide.identity, "classification"),
        )


# -- joined after each batch ------------------------------------------------------------


def test_accuracy_and_log_loss_count_the_labels_against_the_served_probabilities(setup):
    served = prediction_values(setup.labelled.process(setup.events("a", "b", "a")))
    truth = {("a", 1): 0, ("b", 1): 3, ("a", 2): 2}
    for (key, step), y in truth.items():
        setup.label(key, {"step": step, "y": y})
    setup.labelled.process([])

    probs = {
        (k, v["step"]): np.array(v["outputs"]["probs"]) for k, v in zip("aba", served, strict=True)
    }
    correct = sum(int(probs[key].argmax() == y) for key, y in truth.items())
    log_loss = sum(-np.log(probs[key][y]) for key, y in truth.items())
    identity = setup.spec.identity
    assert setup.results() == {"judged": 3.0, "late": 0.0, "unknown_step": 0.0}
    assert setup.value("hiddenstate_online_correct_total", identity=identity) == correct
    assert setup.value("hiddenstate_online_log_loss_total", identity=identity) == pytest.approx(
        log_loss, rel=1e-6
    )


def test_mae_and_rmse_sums_count_the_labels_against_the_served_values(make_processor):
    setup = Setup(make_processor, weights=REGRESSOR)
    served = prediction_values(setup.labelled.process(setup.events("a", "a")))
    truth = [[1.0, 2.0], [-1.0, 0.5]]
    for step, y in enumerate(truth, start=1):
        setup.label("a", {"step": step, "y": y})
    setup.labelled.process([])

    error = np.array([v["outputs"]["y"] for v in served]) - np.array(truth)
    identity = setup.spec.identity
    assert setup.value(
        "hiddenstate_online_absolute_error_total", identity=identity
    ) == pytest.approx(np.abs(error).mean(axis=1).sum(), rel=1e-6)
    assert setup.value(
        "hiddenstate_online_squared_error_total", identity=identity
    ) == pytest.approx((error**2).mean(axis=1).sum(), rel=1e-6)


def test_late_and_unknown_labels_are_counted_apart(setup):
    setup.labelled.process(setup.events(*["a"] * 6))
    setup.label("a", {"step": 1, "y": 0})  # 6 steps ago, the horizon is 4
    setup.label("a", {"step": 9, "y": 0})  # not predicted
    setup.label("z", {"step": 1, "y": 0})  # no such stream
    setup.label("a", {"step": 5, "y": 0})
    setup.labelled.process([])
    assert setup.results() == {"judged": 1.0, "late": 1.0, "unknown_step": 2.0}


def test_a_malformed_label_is_dead_lettered_with_its_reason_and_counted(setup):
    setup.labelled.process(setup.events("a"))
    bad = setup.label("a", {"step": 1, "y": 7})
    setup.label("a", {"step": 1, "y": 1})
    setup.labelled.process([])

    (dead,) = setup.sink.sent
    headers = dict(dead.headers)
    assert (dead.topic, dead.key, dead.value) == ("labels.dead-letter", bad.key, bad.value)
    assert headers["hiddenstate.error.reason"] == b"unknown_class"
    assert headers["hiddenstate.source.topic"] == b"labels"
    assert setup.value("hiddenstate_online_malformed_labels_total", reason="unknown_class") == 1
    assert setup.results()["judged"] == 1.0


def test_a_label_newer_than_its_partitions_served_input_waits_for_it(setup):
    setup.lags = {0: 5}  # partition 0 is behind
    setup.labelled.process(setup.events("a", ts=1_000))
    setup.label("a", {"step": 2, "y": 0}, ts=2_000)  # the truth for an event not served yet
    setup.labelled.process([])
    assert setup.results()["judged"] == 0.0
    assert setup.value("hiddenstate_online_labels_waiting") == 1

    setup.labelled.process(setup.events("a", ts=2_000))
    assert setup.results() == {"judged": 1.0, "late": 0.0, "unknown_step": 0.0}
    assert setup.value("hiddenstate_online_labels_waiting") == 0


def test_a_waiting_label_is_joined_once_its_input_is_caught_up(setup):
    setup.lags = {0: 3}
    setup.labelled.process(setup.events("a", ts=1_000))
    setup.label("a", {"step": 1, "y": 0}, ts=5_000)
    setup.labelled.process([])
    assert setup.results()["judged"] == 0.0

    setup.lags = {0: 0}
    setup.labelled.process([])
    assert setup.results()["judged"] == 1.0


def test_a_labels_partition_with_too_many_waiting_is_paused_until_they_are_joined(make_processor):
    setup = Setup(make_processor, max_waiting=3)
    setup.lags = {0: 10, 1: 0}
    setup.labelled.process(setup.events("a", ts=1_000))
    for _ in range(3):
        setup.label("a", {"step": 1, "y": 0}, ts=9_000)
    setup.labelled.process([])
    assert setup.follower.paused == {0}

    setup.lags = {0: 0, 1: 0}
    setup.labelled.process([])
    assert setup.follower.paused == set()
    assert setup.results()["judged"] == 3.0


def test_revoking_a_partition_stops_its_labels_and_forgets_its_predictions(setup):
    setup.lags = {1: 4}
    setup.labelled.process(setup.events("a", partition=1, ts=1_000))
    setup.label("a", {"step": 1, "y": 0}, partition=1, ts=3_000)
    setup.labelled.process([])
    setup.labelled.revoked([1])

    assert setup.follower.assigned == {0}
    assert setup.ring.last(b"a") is None
    assert setup.results()["unknown_step"] == 1.0  # it waited and will never be judged here
    assert setup.value("hiddenstate_online_labels_waiting") == 0


def test_a_label_event_never_changes_a_hidden_state(make_processor):
    with_labels = Setup(make_processor)
    without = Setup(make_processor)
    with_labels.labelled.process(with_labels.events("a", "b"))
    without.labelled.process(without.events("a", "b"))
    for step in (1, 1, 2):
        with_labels.label("a", {"step": step, "y": 1})
    with_labels.label("b", b"not json")
    with_labels.labelled.process([])
    for key in (b"a", b"b"):
        a, b = with_labels.labelled.store.view(key), without.labelled.store.view(key)
        assert (a.step, a.offset) == (b.step, b.offset)
        np.testing.assert_array_equal(a.states[0], b.states[0])


def test_labels_are_joined_after_the_batch_that_served_their_step(setup):
    setup.label("a", {"step": 1, "y": 0}, ts=1_000)  # fetched before the event is served
    setup.labelled.process(setup.events("a", ts=1_000))
    assert setup.results()["judged"] == 1.0


def test_closing_releases_the_labels_reader(setup):
    setup.labelled.close()
    assert setup.follower.closed
