"""Hidden states survive restarts, crashes, rebalances and broker outages.

Each test compares what was served with a reference: every stream stepped
alone, without interruption, over the same events (`reference`).
"""

from __future__ import annotations

import json
import random
import re
import signal
import threading
import time
from collections import defaultdict

import numpy as np
import pytest
from kafka import KafkaConsumer, TopicPartition

from pipeline.devtools import local_kafka
from pipeline.errors import LocalKafkaError
from pipeline.testing import random_weights, write_onnx_step
from tests.integration.conftest import KafkaKit
from tests.integration.streams import reference, round_robin_events
from tests.ports import free_ports

STREAMS = 40


class Load:
    """Sends `events` in order, `per_second` at most, in a background thread."""

    def __init__(self, kafka, topic: str, events, per_second: float, chunk: int = 40) -> None:
        self._thread = threading.Thread(
            target=self._run, args=(kafka, topic, events, per_second, chunk)
        )
        self._thread.start()

    @staticmethod
    def _run(kafka, topic, events, per_second, chunk) -> None:
        started = time.monotonic()
        for i in range(0, len(events), chunk):
            ahead = started + i / per_second - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
            for attempt in range(30):  # the broker may be away for a while
                try:
                    kafka.produce(topic, events[i : i + chunk])
                    break
                except Exception:
                    if attempt == 29:
                        raise
                    time.sleep(1.0)

    def join(self) -> None:
        self._thread.join()


def by_source(records) -> dict[tuple[int, int], list[dict]]:
    """Predictions per source (partition, offset), in the order they were written."""
    grouped: dict[tuple[int, int], list[dict]] = defaultdict(list)
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        value = json.loads(record.value)
        value["key"] = record.key
        grouped[(value["source"]["partition"], value["source"]["offset"])].append(value)
    return grouped


def source_positions(kafka, topic: str, count: int) -> dict[tuple[int, int], tuple[bytes, int]]:
    """(partition, offset) of every input event -> (stream, index of the event in its stream)."""
    index: dict[bytes, int] = defaultdict(int)
    positions = {}
    for record in sorted(kafka.consume(topic, count=count), key=lambda r: (r.partition, r.offset)):
        positions[(record.partition, record.offset)] = (record.key, index[record.key])
        index[record.key] += 1
    return positions


def read_all(kafka, topic: str, read_committed: bool = False, timeout: float = 30.0):
    """Every record of `topic` up to its current end (committed ones only if asked)."""
    consumer = KafkaConsumer(
        bootstrap_servers=kafka.bootstrap,
        enable_auto_commit=False,
        isolation_level="read_committed" if read_committed else "read_uncommitted",
    )
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        ends = consumer.end_offsets(partitions)
        records = []
        deadline = time.monotonic() + timeout
        # Positions pass transaction markers and aborted records without returning them.
        while any(consumer.position(tp) < ends[tp] for tp in partitions):
            if time.monotonic() > deadline:
                break  # an open transaction holds the last stable offset back
            for batch in consumer.poll(timeout_ms=300).values():
                records += batch
        return records
    finally:
        consumer.close()


def serve_every_source(kafka, topic, sources, read_committed=False, timeout=120.0):
    """Read the output topic until each input (partition, offset) has a prediction."""
    deadline = time.monotonic() + timeout
    while True:
        records = read_all(kafka, topic, read_committed)
        served = by_source(records)
        if set(served) >= set(sources):
            return records
        if time.monotonic() > deadline:
            missing = sorted(set(sources) - set(served))
            raise AssertionError(f"{len(missing)} events without a prediction, e.g. {missing[:5]}")
        time.sleep(1.0)


def assert_last_prediction_of_every_event_is_the_reference(served, positions, expected):
    for source, predictions in served.items():
        key, index = positions[source]
        last = predictions[-1]
        assert last["key"] == key
        assert last["step"] == index + 1, (source, [p["step"] for p in predictions])
        np.testing.assert_allclose(last["outputs"]["y"], expected[key][index], atol=1e-5)


@pytest.fixture
def durable_args(kafka, gru_model):
    """Topics and flags for one durable run: 4 partitions, frequent checkpoints."""
    source = kafka.create_topic("events", partitions=4)
    output = kafka.create_topic("predictions", partitions=4)
    args = [
        "--model",
        str(gru_model),
        "--input-topic",
        source,
        "--output-topic",
        output,
        "--checkpoint-interval-seconds",
        "0.3",
        "--checkpoint-interval-events",
        "0",
    ]
    return source, output, args


def test_a_restarted_server_continues_every_stream_where_it_stopped(
    kafka, serve, durable_args, gru_weights
):
    source, output, args = durable_args
    sent = round_robin_events(STREAMS, steps=20)
    half = len(sent) // 2
    kafka.produce(source, sent[:half])
    first = serve(*args)
    kafka.consume(output, count=half)
    assert first.stop() == 0
    kafka.produce(source, sent[half:])
    second = serve(*args)
    records = kafka.consume(output, count=len(sent))
    second.wait_metric("hiddenstate_restored_streams_total", STREAMS)
    second.stop()

    positions = source_positions(kafka, source, len(sent))
    served = by_source(records)
    assert set(served) == set(positions)
    assert all(len(p) == 1 for p in served.values())
    assert_last_prediction_of_every_event_is_the_reference(
        served, positions, reference(gru_weights, sent)
    )
    assert "restored 40 streams" in second.log()


def test_kill_9_under_load_loses_nothing_and_the_last_prediction_of_every_event_is_exact(
    kafka, serve, durable_args, gru_weights
):
    source, output, args = durable_args
    args += ["--instance-id", "pod-0"]
    sent = round_robin_events(STREAMS, steps=250)
    load = Load(kafka, source, sent, per_second=1500)
    rng = random.Random(11)
    kills = 0
    while kills < 3:
        served = serve(*args)
        time.sleep(rng.uniform(1.0, 2.0))
        served.stop(signal.SIGKILL)
        kills += 1
    final = serve(*args)
    load.join()
    positions = source_positions(kafka, source, len(sent))
    records = serve_every_source(kafka, output, positions)
    final.stop()

    served = by_source(records)
    assert set(served) == set(positions)
    assert_last_prediction_of_every_event_is_the_reference(
        served, positions, reference(gru_weights, sent)
    )
    assert sum(len(p) for p in served.values()) > len(sent) or kills == 0  # crashes do repeat some


def test_exactly_once_gives_one_committed_prediction_per_event_across_kill_9(
    kafka, serve, durable_args, gru_weights
):
    source, output, args = durable_args
    args += ["--instance-id", "pod-0", "--guarantee", "exactly-once"]
    sent = round_robin_events(STREAMS, steps=200, seed=5)
    load = Load(kafka, source, sent, per_second=1500)
    rng = random.Random(12)
    for _ in range(3):
        served = serve(*args)
        time.sleep(rng.uniform(1.0, 2.0))
        served.stop(signal.SIGKILL)
    final = serve(*args)
    load.join()
    positions = source_positions(kafka, source, len(sent))
    serve_every_source(kafka, output, positions, read_committed=True)
    final.stop()
    records = read_all(kafka, output, read_committed=True)

    served = by_source(records)
    assert set(served) == set(positions)
    assert {len(p) for p in served.values()} == {1}
    assert_last_prediction_of_every_event_is_the_reference(
        served, positions, reference(gru_weights, sent)
    )


def test_scaling_one_to_three_to_one_consumers_moves_states_exactly(
    kafka, serve, durable_args, gru_weights
):
    source, output, args = durable_args
    sent = round_robin_events(STREAMS, steps=250, seed=7)
    load = Load(kafka, source, sent, per_second=1200)
    # Dynamic membership: a member that stops leaves the group at once (a static
    # member's partitions would wait for the session timeout instead).
    first = serve(*args)
    time.sleep(2.0)
    others = [serve(*args, ready=False) for _ in range(2)]
    for other in others:
        other.wait_ready()
    time.sleep(2.0)
    for other in others:
        assert other.stop() == 0
    load.join()
    positions = source_positions(kafka, source, len(sent))
    records = serve_every_source(kafka, output, positions)
    first.stop()

    served = by_source(records)
    assert set(served) == set(positions)
    expected = reference(gru_weights, sent)
    for source_position, predictions in served.items():
        key, index = positions[source_position]
        for prediction in predictions:  # every copy, not only the last
            assert prediction["step"] == index + 1
            np.testing.assert_allclose(prediction["outputs"]["y"], expected[key][index], atol=1e-5)
    assert any("restored" in o.log() and "streams of partitions" in o.log() for o in others)


def test_a_snapshot_of_another_model_is_discarded_counted_and_the_stream_starts_fresh(
    kafka, serve, durable_args, tmp_path
):
    source, output, args = durable_args
    changelog = f"{source}.shared.changelog"
    other = write_onnx_step(
        random_weights(
            "gru", n_features=3, hidden=8, layers=2, n_outputs=2, name="gru-it", seed=99
        ),
        tmp_path / "retrained.onnx",
    )
    kafka.produce(source, round_robin_events(STREAMS, steps=3))
    first = serve(*args, "--changelog-topic", changelog)
    kafka.consume(output, count=3 * STREAMS)
    first.stop()
    before = kafka.end_offsets(source)
    kafka.produce(source, round_robin_events(STREAMS, steps=1, seed=9))
    second = serve(
        *[other if a.endswith(".onnx") else a for a in map(str, args)],
        "--changelog-topic",
        changelog,
    )
    records = kafka.consume(output, count=4 * STREAMS)
    discarded = second.metric("hiddenstate_snapshots_discarded_total", reason="incompatible_model")
    second.stop()

    assert discarded == STREAMS
    values = [json.loads(r.value) for r in records]
    after = [v["step"] for v in values if v["source"]["offset"] >= before[v["source"]["partition"]]]
    assert after == [1] * STREAMS
    assert "not applied (incompatible_model)" in second.log()


@pytest.fixture
def private_broker(tmp_path):
    """A broker of this test's own, which it may stop and start (the session's stays up)."""
    ports = free_ports(2)
    kafka = local_kafka.LocalKafka(home=tmp_path / "kafka", port=ports[0], controller_port=ports[1])
    try:
        local_kafka.start(kafka)
    except LocalKafkaError as error:
        pytest.skip(f"a second local broker cannot start here: {error}")
    yield kafka
    local_kafka.stop(kafka)


def test_the_server_rides_out_a_broker_restart_by_itself_and_loses_nothing(
    private_broker, serve, gru_model, gru_weights, serve_transport
):
    """By itself, but for one known defect: librdkafka's `send_offsets_to_transaction` can
    block past its timeout after a broker restart (confluentinc/librdkafka#5456), and the
    watchdog then exits 70 for a restart, as Kubernetes gives it (seen in 2 of 3 runs
    here). The test restarts it once then, and only then; kafka-python rides it out."""
    kit = KafkaKit(private_broker.bootstrap)
    source = kit.create_topic("events", partitions=2)
    output = kit.create_topic("predictions", partitions=2)
    args = (
        "--bootstrap-servers",
        private_broker.bootstrap,
        "--model",
        str(gru_model),
        "--input-topic",
        source,
        "--output-topic",
        output,
        "--checkpoint-interval-seconds",
        "0.3",
        "--checkpoint-interval-events",
        "0",
    )
    served = serve(*args)
    sent = round_robin_events(STREAMS, steps=150, seed=3)
    load = Load(kit, source, sent, per_second=800)
    time.sleep(2.5)
    local_kafka.stop(private_broker)
    time.sleep(5.0)
    local_kafka.start(private_broker)
    load.join()
    positions = source_positions(kit, source, len(sent))
    deadline = time.monotonic() + 240.0
    restarts = 0
    while True:
        try:
            records = serve_every_source(kit, output, positions, timeout=5.0)
            break
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            code = served.process.poll()
            if code is None:
                continue
            assert (serve_transport, code, restarts) == ("confluent", 70, 0), served.log()
            assert re.search(r'transport/confluent\.py", line \d+ in commit', served.log())
            restarts += 1
            served = serve(*args)
    still_running = served.process.poll() is None
    served.stop()
    kit.close()

    assert still_running, served.log()
    served_by_source = by_source(records)
    assert set(served_by_source) == set(positions)
    assert_last_prediction_of_every_event_is_the_reference(
        served_by_source, positions, reference(gru_weights, sent)
    )


@pytest.mark.parametrize(
    ("partitions", "config", "message"),
    [
        (2, {"cleanup.policy": "compact"}, "has 2 partitions, the input topic 4"),
        (4, {"cleanup.policy": "delete"}, "cleanup.policy='delete'; it must be compacted"),
    ],
    ids=["partition-count", "not-compacted"],
)
def test_a_changelog_that_breaks_co_partitioning_is_refused_at_start(
    kafka, serve, durable_args, partitions, config, message
):
    _, _, args = durable_args
    changelog = kafka.create_topic("changelog", partitions=partitions, **config)
    served = serve(*args, "--changelog-topic", changelog, ready=False)
    assert served.wait_exit() == 1
    assert message in served.log()


def test_an_evicted_stream_gets_a_tombstone_in_the_changelog(kafka, serve, durable_args):
    source, _, args = durable_args
    changelog = f"{source}.evictions.changelog"
    served = serve(*args, "--changelog-topic", changelog, "--max-streams", "2")
    x = b'{"x": [0.1, 0.2, 0.3]}'
    for sent, key in enumerate((b"a", b"b", b"c"), start=1):  # c evicts a
        kafka.produce(source, [(key, x)])
        served.wait_metric("hiddenstate_events_total", sent)
        # a's state must reach the changelog before c evicts it, else there is
        # nothing to delete and only the tombstone is written.
        served.wait_metric("hiddenstate_snapshots_written_total", sent, kind="state")
    served.wait_metric("hiddenstate_snapshots_written_total", 1, kind="tombstone")
    served.stop()

    records = read_all(kafka, changelog)
    history = [
        (r.key, r.value is None) for r in sorted(records, key=lambda r: r.offset) if r.key == b"a"
    ]
    assert history[-1] == (b"a", True)
    assert (b"a", False) in history


def test_a_static_member_restarted_within_the_session_timeout_keeps_its_partitions(
    kafka, serve, durable_args
):
    _, _, args = durable_args
    steady = serve(*args, "--instance-id", "pod-0")
    crashing = serve(*args, "--instance-id", "pod-1", ready=False)
    crashing.wait_ready()
    # Wait out the first rebalance: the first member holds all four partitions until it
    # has revoked two, and the second is ready before it is assigned any.
    steady.wait_metric_is("hiddenstate_assigned_partitions", 2)
    crashing.wait_metric_is("hiddenstate_assigned_partitions", 2)
    held = steady.metric("hiddenstate_assigned_partitions")
    crashing.stop(signal.SIGKILL)
    restarted = serve(*args, "--instance-id", "pod-1")
    time.sleep(3.0)
    after = steady.metric("hiddenstate_assigned_partitions")
    restarted_held = restarted.metric("hiddenstate_assigned_partitions")
    steady_log = steady.log()
    steady.stop()
    restarted.stop()

    assert (held, after, restarted_held) == (2, 2, 2)
    assert steady_log.count("giving up input partitions") == 1  # only the first split
