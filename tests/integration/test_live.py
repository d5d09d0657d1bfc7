"""What a served model does live, against a real broker: online accuracy from delayed
labels on a labels topic, and any stream's state over HTTP.

The classifier is trained here on real data (JapaneseVowels, `export.train`, a small
GRU in seconds) and exported to ONNX; its held-out utterances are served and their
labels (`holdout-labels.jsonl`, written by the training) published afterwards. The
accuracy the server reports through its metrics is compared with two computed here,
without the server's code: from the predictions it published on the output topic, and
PyTorch's held-out accuracy from the training (`export.evaluate`).
"""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from kafka.partitioner.default import murmur2 as kafka_python_murmur2

from export import export_onnx
from export.data import SequenceSet, load_dataset
from export.evaluate import predict
from export.models import NetConfig, RecurrentNet
from export.train import LABELS_FILE, TrainConfig, train
from tests.integration.streams import round_robin_events
from tests.ports import free_port

PARTITIONS = 4
HORIZON = 64  # the default --label-horizon-steps


@dataclass
class Trained:
    model: Path
    out: Path
    net: RecurrentNet
    test: SequenceSet
    evaluation: dict[str, float]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """A speaker classifier trained on JapaneseVowels, exported; its held-out set."""
    data = load_dataset("vowels")
    out = tmp_path_factory.mktemp("gru-live")
    net = NetConfig(
        cell="gru",
        task="classification",
        n_features=12,
        n_outputs=len(data.labels or ()),
        hidden=16,
    )
    config = TrainConfig(epochs=8, batch_size=32, bptt=16, lr=1e-2, patience=3, progress=False)
    result = train(data, net, config, out, name="gru-live")
    export_onnx(result.net, out / "model.onnx", result.info)
    return Trained(out / "model.onnx", out, result.net, data.test, result.evaluation.model)


def jsonl(path: Path) -> list[tuple[bytes, bytes]]:
    """(key, value) of each line of a `{"key": ..., "value": {...}}` file."""
    pairs = []
    for line in path.read_text().splitlines():
        item = json.loads(line)
        pairs.append((item["key"].encode(), json.dumps(item["value"]).encode()))
    return pairs


def identity_of(served) -> str:
    status, body = served.get("/metrics")
    assert status == 200
    line = next(x for x in body.splitlines() if x.startswith("hiddenstate_model_info{"))
    return line.split('identity="', 1)[1].split('"', 1)[0]


def kafka_partition(key: bytes) -> int:
    """Where kafka-python's producer (murmur2, as Java's) puts `key` among PARTITIONS."""
    return (kafka_python_murmur2(key) & 0x7FFFFFFF) % PARTITIONS


def test_live_accuracy_equals_the_offline_accuracy_and_streams_show_their_exact_state(
    kafka, serve, classifier
):
    source = kafka.create_topic("vowels", partitions=PARTITIONS)
    output = kafka.create_topic("vowels-predictions", partitions=PARTITIONS)
    labels_topic = kafka.create_topic("vowels-labels", partitions=PARTITIONS)
    dead = kafka.create_topic("vowels-labels-dead", partitions=PARTITIONS)
    served = serve(
        "--model", str(classifier.model),
        "--input-topic", source,
        "--output-topic", output,
        "--labels-topic", labels_topic,
        "--labels-dead-letter-topic", dead,
        "--streams-api",
    )  # fmt: skip
    identity = identity_of(served)
    events = jsonl(classifier.out / "holdout-events.jsonl")
    # One more stream, longer than the horizon: its first step's label comes too late.
    long_stream = [(b"long", json.dumps({"x": [0.0] * 12}).encode())] * (HORIZON + 6)
    kafka.produce(source, events + long_stream)
    records = kafka.consume(output, count=len(events) + len(long_stream))

    held_out = jsonl(classifier.out / LABELS_FILE)
    late = [(b"long", b'{"step": 1, "y": 0}')]
    unknown = [(b"long", b'{"step": 71, "y": 0}'), (b"never-served", b'{"step": 1, "y": 0}')]
    malformed = [(b"utterance-0000", b"{not json"), (b"utterance-0000", b'{"step": 1, "y": 99}')]
    kafka.produce(labels_topic, held_out + late + unknown + malformed)
    served.wait_metric(
        "hiddenstate_online_labels_total", len(held_out), identity=identity, result="judged"
    )
    served.wait_metric(
        "hiddenstate_online_labels_total", 2, identity=identity, result="unknown_step"
    )
    served.wait_metric("hiddenstate_online_malformed_labels_total", 1, reason="unknown_class")

    def metric(name: str, **labels: str) -> float:
        return served.metric(name, **labels)

    judged = metric("hiddenstate_online_labels_total", identity=identity, result="judged")
    live_accuracy = metric("hiddenstate_online_correct_total", identity=identity) / judged
    live_log_loss = metric("hiddenstate_online_log_loss_total", identity=identity) / judged

    # Offline 1: the predictions the server published, judged here by the same labels.
    served_probs: dict[tuple[bytes, int], list[float]] = {}
    for record in records:
        prediction = json.loads(record.value)
        served_probs[(record.key, prediction["step"])] = prediction["outputs"]["probs"]
    truth = [(key, json.loads(value)) for key, value in held_out]
    correct = [np.argmax(served_probs[(key, v["step"])]) == v["y"] for key, v in truth]
    # Offline 2: PyTorch on the held-out sequences (what metrics.json reports).
    test = classifier.test
    probs = predict(classifier.net, test)[test.mask()]
    ordered = np.sort(probs, axis=1)
    near_ties = int((ordered[:, -1] - ordered[:, -2] < 1e-4).sum())  # argmax may differ by rounding

    assert judged == len(held_out) == test.mask().sum()
    assert live_accuracy == pytest.approx(np.mean(correct), abs=1e-6)
    assert abs(live_accuracy - classifier.evaluation["accuracy"]) <= near_ties / judged + 1e-6
    assert live_log_loss == pytest.approx(classifier.evaluation["log_loss"], rel=1e-4)
    assert metric("hiddenstate_online_labels_total", identity=identity, result="late") == 1
    assert metric("hiddenstate_online_labels_total", identity=identity, result="unknown_step") == 2
    assert metric("hiddenstate_online_malformed_labels_total", reason="not_json") == 1
    reasons = sorted(
        dict(r.headers)["hiddenstate.error.reason"].decode() for r in kafka.consume(dead, count=2)
    )
    assert reasons == ["not_json", "unknown_class"]

    # Served streams: the exact step and last prediction; others: 404 and their partition.
    last: dict[bytes, dict] = {}
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        last[record.key] = json.loads(record.value)
    lengths = dict(zip((k.encode() for k in test.keys), test.lengths.tolist(), strict=True))
    for key in [b"utterance-0000", b"utterance-0123", b"long", *list(lengths)[-2:]]:
        status, body = served.get("/streams/" + urllib.parse.quote(key))
        stream = json.loads(body)
        assert status == 200, body
        assert stream["step"] == lengths.get(key, HORIZON + 6) == last[key]["step"]
        assert stream["last_prediction"]["source"] == last[key]["source"]
        assert stream["last_prediction"]["event_time_ms"] == last[key]["event_time_ms"]
        np.testing.assert_array_equal(
            np.float32(stream["last_prediction"]["outputs"]["probs"]),
            np.float32(last[key]["outputs"]["probs"]),
        )
        assert stream["model"]["identity"] == identity
    # Where the broker put records of keys never served, by kafka-python's producer.
    scratch = kafka.create_topic("where", partitions=PARTITIONS)
    others = [f"nobody-{i}".encode() for i in range(8)]
    kafka.produce(scratch, [(key, b"{}") for key in others])
    placed = {r.key: r.partition for r in kafka.consume(scratch, count=len(others))}
    for key in others:
        status, body = served.get("/streams/" + key.decode())
        assert (status, json.loads(body)["partition"]) == (404, placed[key])
    status, body = served.get("/streams")
    overview = json.loads(body)
    assert overview["streams"] == len(lengths) + 1
    assert sorted(overview["assigned"]) == ["0", "1", "2", "3"]
    served.stop()


def wait_until(what: str, condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} after {timeout:.0f} s")
        time.sleep(0.2)


def held(replica) -> set[int]:
    """The input partitions a replica holds, as its GET /streams says."""
    return {int(p) for p in json.loads(replica.get("/streams")[1])["assigned"]}


def test_each_replica_judges_the_labels_of_the_partitions_it_holds_after_a_rebalance(
    kafka, serve, gru_model
):
    source = kafka.create_topic("events", partitions=PARTITIONS)
    output = kafka.create_topic("predictions", partitions=PARTITIONS)
    labels_topic = kafka.create_topic("labels", partitions=PARTITIONS)
    args = (
        "--model", str(gru_model),
        "--input-topic", source,
        "--output-topic", output,
        "--labels-topic", labels_topic,
        "--streams-api",
    )  # fmt: skip
    first = serve(*args)
    before = round_robin_events(streams=24, steps=3, seed=4)
    kafka.produce(source, before)
    kafka.consume(output, count=len(before))
    second = serve(*args)
    wait_until(
        "the rebalance did not give each replica two partitions",
        lambda: (
            len(held(first)) == len(held(second)) == 2
            and held(first) | held(second) == set(range(PARTITIONS))
        ),
    )
    after = round_robin_events(streams=24, steps=2, seed=5)
    kafka.produce(source, after)
    kafka.consume(output, count=len(before) + len(after))
    # The truth for steps 4 and 5, predicted after the rebalance by whoever holds the stream.
    labels = [
        (f"s{i}".encode(), json.dumps({"step": step, "y": [0.0, 0.0]}).encode())
        for step in (4, 5)
        for i in range(24)
    ]
    kafka.produce(labels_topic, labels)

    def total(result: str) -> float:
        return sum(
            replica.metric("hiddenstate_online_labels_total", result=result)
            for replica in (first, second)
        )

    wait_until("not every label was judged", lambda: total("judged") >= len(labels))
    assert {r: total(r) for r in ("judged", "late", "unknown_step")} == {
        "judged": len(labels),
        "late": 0,
        "unknown_step": 0,
    }
    for replica, other in ((first, second), (second, first)):
        for i in range(24):
            status, body = replica.get(f"/streams/s{i}")
            if kafka_partition(f"s{i}".encode()) in held(replica):
                assert (status, json.loads(body)["step"]) == (200, 5)
            else:
                assert status == 404
                assert json.loads(body)["partition"] in held(other)
    first.stop()
    second.stop()


def test_the_streams_api_is_off_unless_asked_and_can_have_a_port_of_its_own(
    kafka, serve, gru_model
):
    source = kafka.create_topic("events", partitions=2)
    output = kafka.create_topic("predictions", partitions=2)
    args = ("--model", str(gru_model), "--input-topic", source, "--output-topic", output)
    plain = serve(*args, "--group-id", "plain")
    port = free_port()
    apart = serve(*args, "--group-id", "apart", "--streams-api", "--streams-api-port", str(port))
    kafka.produce(source, round_robin_events(streams=2, steps=3))
    apart.wait_metric("hiddenstate_predictions_total", 6)

    assert plain.get("/streams/s0")[0] == 404
    assert apart.get("/streams/s0")[0] == 404  # not on the metrics port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/streams/s0", timeout=5) as response:
        assert json.loads(response.read())["step"] == 3
    plain.stop()
    apart.stop()
