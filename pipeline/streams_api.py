"""`GET /streams/{key}` and `GET /streams`: what one stream's model believes now.

Off unless `--streams-api` (`HIDDENSTATE_STREAMS_API`): predictions and hidden states
can be sensitive (a fraud score, a diagnosis). On the metrics port, or on a port of
its own (`--streams-api-port`, `--streams-api-host`) that a NetworkPolicy can keep to
the clients that may read it (docs/operations.md, deploy/components/streams-api).

- `GET /streams/{key}` (the key percent-encoded, any bytes): 200 with the stream's
  step, partition, when it was last updated, the model identity and its last
  prediction (outputs, source topic/partition/offset, event time); `?state=1` adds the
  hidden state tensors as nested lists. A key this replica does not hold: 404 with the
  partition the key maps to under Kafka's default partitioner (murmur2, what Java's,
  kafka-python's and librdkafka's `murmur2_random` producers use), so a router or a
  person knows which member to ask.
- `GET /streams`: streams held per assigned partition.

Reads never hold up the serving loop for longer than one row's copy: the store and
the prediction ring are read under their own locks (`StateStore.view`,
`PredictionRing.last`), which the loop holds per wave. The two are written one after
the other within a wave, so a read checks that the prediction is of the step the state
is at; if a wave comes between the two reads it reads again. A stream restored from the
changelog has no prediction in this process until its next event: `last_prediction`
is null then.
"""

from __future__ import annotations

import json
import time
import urllib.parse
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

import numpy as np
from numpy.typing import NDArray

from pipeline.health import Environ, StartResponse
from pipeline.model_spec import ModelSpec
from pipeline.ring import LastPrediction, PredictionRing
from pipeline.state_store import StateStore, StreamView

_PREFIX = b"/streams/"
# What a stream believes now; never a cached copy of it.
HEADERS = (("Content-Type", "application/json"), ("Cache-Control", "no-store"))
_RETRIES = 5  # reads again while a wave is between the state and the ring (microseconds)
_M = 0x5BD1E995


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 hash of `data` (org.apache.kafka.common.utils.Utils.murmur2), as
    a signed 32-bit integer."""
    length = len(data)
    h = (0x9747B28C ^ length) & 0xFFFFFFFF
    whole = length - length % 4
    for i in range(0, whole, 4):
        k = int.from_bytes(data[i : i + 4], "little")
        k = (k * _M) & 0xFFFFFFFF
        k ^= k >> 24
        k = (k * _M) & 0xFFFFFFFF
        h = ((h * _M) & 0xFFFFFFFF) ^ k
    rest = length % 4
    if rest == 3:
        h ^= data[whole + 2] << 16
    if rest >= 2:
        h ^= data[whole + 1] << 8
    if rest >= 1:
        h ^= data[whole]
        h = (h * _M) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * _M) & 0xFFFFFFFF
    h ^= h >> 15
    return h - (1 << 32) if h >= 1 << 31 else h


def partition_for(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner gives a keyed record:
    `toPositive(murmur2(key)) % partitions`."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def stdlib_dumps(body: dict[str, Any]) -> bytes:
    """The body as compact JSON with the standard library (arrays as `stdlib_array` made
    them)."""
    return json.dumps(body, separators=(",", ":")).encode()


def stdlib_array(array: NDArray[np.float32]) -> Any:
    """An array as nested lists of numbers of nine significant digits, which read back as
    exactly the float32 they were."""
    values = [float(f"{v:.9g}") for v in array.ravel().tolist()]
    if array.ndim == 0:
        return values[0]
    return np.array(values, dtype=object).reshape(array.shape).tolist()


try:
    # The `fast` extra: numpy arrays written in C, each float32 as the shortest decimal
    # that reads back as it (what the prediction records hold): about 90 us for a
    # stream with its state, against 500 us through the standard library.
    from orjson import OPT_SERIALIZE_NUMPY
    from orjson import dumps as _orjson_dumps

    def _dumps(body: dict[str, Any]) -> bytes:
        return _orjson_dumps(body, option=OPT_SERIALIZE_NUMPY)

    def _json_array(array: NDArray[np.float32]) -> Any:
        if array.ndim == 0:
            return float(array)
        return np.ascontiguousarray(array)  # orjson writes it as nested lists

except ImportError:  # without it: the standard library
    _dumps = stdlib_dumps
    _json_array = stdlib_array


def _iso(seconds: float) -> str:
    return (
        datetime.fromtimestamp(seconds, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def _text(key: bytes) -> str:
    return key.decode("utf-8", "backslashreplace")


class StreamsApi:
    """The WSGI app of `/streams` and `/streams/{key}` over one model's store and ring.

    `partitions` is the input topic's partition count (at start: a topic given more
    partitions later maps keys differently until the server restarts); `assigned` says
    which input partitions this replica holds now.
    """

    def __init__(
        self,
        spec: ModelSpec,
        store: StateStore,
        ring: PredictionRing,
        input_topic: str,
        partitions: int,
        assigned: Callable[[], frozenset[int]],
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._spec = spec
        self._store = store
        self._ring = ring
        self._topic = input_topic
        self._partitions = partitions
        self._assigned = assigned
        self._sleep = sleep
        self._model = {"name": spec.name, "version": spec.version, "identity": spec.identity}

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        """The WSGI app (on the metrics port, behind `pipeline.health.health_app`)."""
        method = environ.get("REQUEST_METHOD", "GET")
        # wsgiref decodes the percent-escapes of the path as ISO-8859-1 (PEP 3333), so
        # encoding it back gives the path's bytes exactly.
        path = environ.get("PATH_INFO", "").encode("latin-1")
        status, data = self.answer(method, path, environ.get("QUERY_STRING", ""))
        start_response(status, [*HEADERS, ("Content-Length", str(len(data)))])
        return [b"" if method == "HEAD" else data]

    def answer(self, method: str, path: bytes, query: str) -> tuple[str, bytes]:
        """(status line, JSON body) for `method` on `path` (percent-escapes decoded)."""
        if method not in ("GET", "HEAD"):
            status, body = "405 Method Not Allowed", {"error": f"{method} is not served: use GET"}
        elif path in (b"/streams", b"/streams/"):
            status, body = "200 OK", self.overview()
        elif path.startswith(_PREFIX):
            state = urllib.parse.parse_qs(query).get("state", ["0"])[-1].lower()
            status, body = self.stream(path[len(_PREFIX) :], state in ("1", "true", "yes"))
        else:
            shown = path.decode("utf-8", "backslashreplace")
            status, body = "404 Not Found", {"error": f"no such path {shown!r}: try /streams"}
        return status, _dumps(body) + b"\n"

    def overview(self) -> dict[str, Any]:
        """Streams held per assigned input partition."""
        held = self._store.streams_by_partition()
        assigned = sorted(self._assigned())
        return {
            "model": self._model,
            "input_topic": self._topic,
            "partitions": self._partitions,
            "assigned": {str(p): held.get(p, 0) for p in assigned},
            "streams": sum(held.get(p, 0) for p in assigned),
        }

    def stream(self, key: bytes, with_state: bool) -> tuple[str, dict[str, Any]]:
        """(status, body) of `GET /streams/{key}`."""
        view, last = self._read(key)
        if view is None:
            partition = partition_for(key, self._partitions)
            assigned = sorted(self._assigned())
            where = (
                "this replica holds that partition but has no state for the key (never seen, "
                "or evicted)"
                if partition in assigned
                else "another replica holds that partition: ask it"
            )
            return "404 Not Found", {
                "error": f"stream not held by this replica: {where}",
                "key": _text(key),
                "partition": partition,
                "assigned": assigned,
            }
        body: dict[str, Any] = {
            "key": _text(key),
            "model": self._model,
            "partition": view.partition,
            "step": view.step,
            "updated_at": _iso(last.updated_at if last is not None else view.last_seen),
            "last_prediction": None
            if last is None
            else {
                "step": last.step,
                "source": {
                    "topic": self._topic,
                    "partition": last.partition,
                    "offset": last.offset,
                },
                "event_time_ms": last.event_time_ms,
                "outputs": {name: _json_array(values) for name, values in last.outputs.items()},
            },
        }
        if with_state:
            body["state"] = {
                spec.name: _json_array(array)
                for spec, array in zip(self._spec.states, view.states, strict=True)
            }
        return "200 OK", body

    def _read(self, key: bytes) -> tuple[StreamView | None, LastPrediction | None]:
        """The stream's state and, when it belongs to the same step, its last prediction."""
        for _ in range(_RETRIES):
            view = self._store.view(key)
            if view is None:
                return None, None
            last = self._ring.last(key)
            if last is None:
                return view, None  # restored from the changelog: nothing predicted here yet
            if (last.step, last.partition, last.offset) == (view.step, view.partition, view.offset):
                return view, last
            self._sleep(0.001)  # a wave between the two reads: read both again
        # Still apart: the state was restored (a rewind) and no event followed yet.
        return self._store.view(key), None
