"""GET /streams/{key} and GET /streams over HTTP: a stream's step, last prediction and
state as the server holds them, 404 with Kafka's partition for keys held elsewhere, and
reads that never see half a write."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pytest
from kafka.partitioner.default import murmur2 as kafka_python_murmur2

from pipeline.codec import PredictionEncoder
from pipeline.health import HealthServer, LoopState
from pipeline.model_spec import StateSpec
from pipeline.ring import PredictionRing, RecordingEncoder
from pipeline.state_store import Snapshot, StateStore
from pipeline.streams_api import (
    HEADERS,
    StreamsApi,
    murmur2,
    partition_for,
    stdlib_array,
    stdlib_dumps,
)
from pipeline.streams_server import StreamsServer
from pipeline.testing import NumpyStepModel, event_record, prediction_values, random_weights

WEIGHTS = random_weights("gru", n_features=3, hidden=4, n_outputs=3, task="classification")
PARTITIONS = 4


def get(port: int, path: str, method: str = "GET") -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            body = response.read()
            return response.status, json.loads(body) if body else {}
    except urllib.error.HTTPError as error:
        body = error.read()
        return error.code, json.loads(body) if body else {}


class Served:
    """A processor on a numpy model whose store and ring the API reads."""

    def __init__(self, make_processor, assigned=frozenset({0, 2})):
        spec = WEIGHTS.spec
        self.ring = PredictionRing(spec, horizon=1, max_streams=100)
        encoder = RecordingEncoder(
            PredictionEncoder(spec, "predictions"), self.ring, lambda: 1_700_000_000.5
        )
        self.processor = make_processor(NumpyStepModel(WEIGHTS), encoder=encoder)
        self.assigned = set(assigned)
        self.api = StreamsApi(
            spec,
            self.processor.store,
            self.ring,
            "events",
            PARTITIONS,
            lambda: frozenset(self.assigned),
        )

    def serve(self, key: str, partition: int, count: int = 1, first_offset: int = 0) -> list[dict]:
        records = [
            event_record(
                key,
                {"x": [0.1 * i, 0.2, -0.3], "ts": 1_000 + i},
                offset=first_offset + i,
                partition=partition,
            )
            for i in range(count)
        ]
        return prediction_values(self.processor.process(records))


@pytest.fixture
def served(make_processor):
    return Served(make_processor)


@pytest.fixture
def port(served, metrics):
    with HealthServer(
        metrics.registry,
        LoopState(),
        host="127.0.0.1",
        port=0,
        poll_interval=0.01,
        streams=served.api,
    ) as server:
        yield server.port


# -- Kafka's partitioner ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("21", -973932308),
        ("foobar", -790332482),
        ("a-little-bit-long-string", -985981536),
        ("a-little-bit-longer-string", -1486304829),
        ("lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
        ("abc", 479470107),
    ],
)
def test_murmur2_is_kafkas(text, expected):
    """The expected values are those of Kafka's own UtilsTest.testMurmur2."""
    assert murmur2(text.encode()) == expected


def test_a_key_maps_to_the_partition_kafka_pythons_producer_sends_it_to():
    """kafka-python's DefaultPartitioner: murmur2, masked positive, modulo the count."""
    keys = [f"stream-{i}".encode() for i in range(200)] + [bytes(range(256)), b"\x00"]
    expected = [(kafka_python_murmur2(k) & 0x7FFFFFFF) % 7 for k in keys]
    assert [partition_for(k, 7) for k in keys] == expected


# -- one stream ---------------------------------------------------------------------------


def test_a_served_stream_shows_its_step_and_last_prediction(served, port):
    predictions = served.serve("u1", partition=2, count=3)
    status, body = get(port, "/streams/u1")
    last = predictions[-1]
    assert status == 200
    assert body["key"] == "u1"
    assert (body["step"], body["partition"]) == (3, 2)
    assert body["last_prediction"]["step"] == 3
    assert (
        body["last_prediction"]["source"]
        == last["source"]
        == {"topic": "events", "partition": 2, "offset": 2}
    )
    assert body["last_prediction"]["event_time_ms"] == last["event_time_ms"] == 1_002
    assert (
        np.float32(body["last_prediction"]["outputs"]["probs"]).tolist()
        == np.float32(last["outputs"]["probs"]).tolist()
    )
    assert body["model"] == {
        "name": WEIGHTS.spec.name,
        "version": "1",
        "identity": WEIGHTS.spec.identity,
    }
    assert body["updated_at"] == "2023-11-14T22:13:20.500Z"
    assert "state" not in body


def test_state_1_adds_the_hidden_state_tensors_as_the_store_holds_them(served, port):
    served.serve("u1", partition=0, count=2)
    status, body = get(port, "/streams/u1?state=1")
    (held,) = served.processor.store.view(b"u1").states
    assert status == 200
    assert np.float32(body["state"]["h"]).tolist() == held.tolist()
    assert np.asarray(body["state"]["h"]).shape == (1, 4)


def test_a_key_of_any_bytes_is_asked_for_percent_encoded(served, port):
    key = "utt/ä 1"
    served.serve(key, partition=0)
    status, body = get(port, "/streams/" + urllib.parse.quote(key, safe=""))
    assert (status, body["key"], body["step"]) == (200, key, 1)


def test_a_stream_restored_from_the_changelog_has_no_last_prediction_yet(served, port):
    store = served.processor.store
    store.restore(Snapshot(b"r", 0, 41, 9, (np.ones((1, 4), np.float32),)), now=1_700_000_000.0)
    status, body = get(port, "/streams/r")
    assert (status, body["step"], body["last_prediction"]) == (200, 9, None)
    assert body["updated_at"] == "2023-11-14T22:13:20.000Z"


def test_a_key_not_held_here_is_404_with_the_partition_kafka_puts_it_on(served, port):
    key = next(f"k{i}" for i in range(100) if partition_for(f"k{i}".encode(), PARTITIONS) == 3)
    status, body = get(port, f"/streams/{key}")
    assert status == 404
    assert (body["partition"], body["assigned"]) == (3, [0, 2])
    assert "another replica holds that partition" in body["error"]


def test_a_key_of_a_held_partition_without_a_state_says_so(served, port):
    key = next(f"k{i}" for i in range(100) if partition_for(f"k{i}".encode(), PARTITIONS) == 2)
    status, body = get(port, f"/streams/{key}")
    assert (status, body["partition"]) == (404, 2)
    assert "this replica holds that partition but has no state for the key" in body["error"]


def test_a_trailing_slash_is_the_overview(served, port):
    served.serve("a", partition=0)
    assert get(port, "/streams/")[1]["streams"] == 1


def test_only_get_and_head_are_served(served, port):
    served.serve("u1", partition=0)
    assert get(port, "/streams/u1", method="POST")[0] == 405
    assert get(port, "/streams/u1", method="HEAD") == (200, {})


def test_without_orjson_arrays_are_nine_digit_numbers_that_read_back_exactly():
    values = np.array([[0.1, 1 / 3], [-2.5e-8, 7.0]], np.float32)
    written = json.loads(stdlib_dumps({"v": stdlib_array(values)}))["v"]
    assert np.float32(written).tolist() == values.tolist()
    assert stdlib_array(np.float32(0.25).reshape(())) == 0.25


# -- all streams ----------------------------------------------------------------------------


def test_the_overview_counts_streams_per_assigned_partition(served, port):
    for key in ("a", "b", "c"):
        served.serve(key, partition=0)
    served.serve("d", partition=2)
    status, body = get(port, "/streams")
    assert status == 200
    assert (body["assigned"], body["streams"], body["partitions"]) == (
        {"0": 3, "2": 1},
        4,
        PARTITIONS,
    )


def test_an_assigned_partition_without_streams_counts_zero(served, port):
    served.assigned = {0, 1}
    served.serve("a", partition=0)
    assert get(port, "/streams")[1]["assigned"] == {"0": 1, "1": 0}


# -- where it is served --------------------------------------------------------------------


def test_the_metrics_port_does_not_answer_streams_when_the_api_is_off(metrics):
    with HealthServer(
        metrics.registry, LoopState(), host="127.0.0.1", port=0, poll_interval=0.01
    ) as server:
        request = urllib.request.Request(f"http://127.0.0.1:{server.port}/streams")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=5)
    assert refused.value.code == 404


def test_the_api_on_a_port_of_its_own_answers_streams(served):
    served.serve("u1", partition=0)
    with StreamsServer(served.api, "127.0.0.1", 0, headers=HEADERS) as server:
        status, body = get(server.port, "/streams/u1?state=1")
    assert (status, body["step"], np.asarray(body["state"]["h"]).shape) == (200, 1, (1, 4))


# -- reads beside the serving loop ------------------------------------------------------------


def test_a_read_never_sees_a_state_half_written_or_of_another_step():
    """A writer steps one stream with states whose every value is the new step number,
    while readers check that each read state is uniform and equal to the step read with
    it. The state is large (4 MB) so that numpy releases the GIL while it copies it; the
    store's lock is what keeps reads whole."""
    spec = StateSpec("h", "h_out", (1_000_000,))
    store = StateStore([spec], max_streams=4)
    ring = PredictionRing(WEIGHTS.spec, 1, 4)
    api = StreamsApi(WEIGHTS.spec, store, ring, "events", 1, lambda: frozenset({0}))
    slots = store.acquire([b"s"], [0], [0], 0.0)
    done = threading.Event()
    torn: list[str] = []

    def write() -> None:
        for step in range(1, 150):
            store.acquire([b"s"], [0], [step], 0.0)
            store.scatter(slots, [np.full((1, 1_000_000), step, np.float32)])
        done.set()

    def read() -> None:
        while not done.is_set():
            view, _ = api._read(b"s")
            values = view.states[0]
            if not (values.min() == values.max() == view.step):
                torn.append(f"step {view.step}: values {values.min()}..{values.max()}")

    threads = [threading.Thread(target=write), *(threading.Thread(target=read) for _ in range(2))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert torn == []
