"""Load for the benchmark: events in (a backlog, or a paced rate), predictions read back.

Both sides use confluent-kafka (librdkafka), whatever the subject under test
uses, so that the load generator and the reader cost the 2-core machine as
little as possible and the same for every subject.

- `fill(...)`: a backlog of events, written as fast as the broker takes them.
- `python bench/load.py pace ...` (run as a subprocess, so it has its own
  interpreter): events at a schedule of rising rates, each event's `ts` stamped
  with the wall clock when it is handed to the producer.
- `Reader`: a thread that reads an output topic from its start and records,
  per prediction, when it arrived here and its `event_time_ms`: end-to-end
  latency is arrival - event time, i.e. event time -> prediction acknowledged
  by the broker and fetched by a reader.

Events: key `device-NNNNNNN` (round-robin over the streams), value
`{"x":[8 numbers],"ts":<ms>}`; the feature vectors come from a fixed pool of
random rows (the values do not change the cost).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic

FEATURES = 8
_POOL = 4096  # distinct feature vectors, cycled


def _feature_pool(seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    rows = rng.normal(size=(_POOL, FEATURES)).round(4).tolist()
    return [json.dumps(row, separators=(",", ":")).encode() for row in rows]


def stream_key(i: int) -> bytes:
    return b"device-%07d" % i


def _producer(bootstrap: str, linger_ms: float) -> Producer:
    return Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": linger_ms,
            "batch.size": 1_000_000,
            "queue.buffering.max.messages": 2_000_000,
            "queue.buffering.max.kbytes": 1_048_576,
            # Java's partitioner, as kafka-python and hiddenstate's sinks use.
            "partitioner": "murmur2_random",
        }
    )


def create_topic(bootstrap: str, name: str, partitions: int, **config: str) -> None:
    """Create `name` and wait until it exists."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(name, partitions, 1, config=config)])
    futures[name].result(timeout=30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        topic = admin.list_topics(name, timeout=5).topics.get(name)
        if topic is not None and topic.error is None and len(topic.partitions) == partitions:
            return
        time.sleep(0.1)
    raise TimeoutError(f"topic {name} has no partitions after 30 s")


def delete_topics(bootstrap: str, names: list[str]) -> None:
    """Best effort: the benchmark's topics are large and used once."""
    if not names:
        return
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.delete_topics(names, operation_timeout=30).values():
        try:
            future.result(timeout=60)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.UNKNOWN_TOPIC_OR_PART:  # already gone is fine
                print(f"delete topic: {exc}", file=sys.stderr)


def fill(bootstrap: str, topic: str, streams: int, count: int, first_stream: int = 0) -> float:
    """Send `count` events round-robin over `streams` streams; returns seconds taken."""
    pool = _feature_pool()
    producer = _producer(bootstrap, 20)
    started = time.perf_counter()
    ts = b"%d" % int(time.time() * 1000)
    for i in range(count):
        value = b'{"x":' + pool[i % _POOL] + b',"ts":' + ts + b"}"
        while True:
            try:
                producer.produce(topic, value, stream_key(first_stream + i % streams))
                break
            except BufferError:
                producer.poll(0.01)  # the local queue is full: let librdkafka send
        if i % 10_000 == 0:
            producer.poll(0)
            ts = b"%d" % int(time.time() * 1000)
    producer.flush(120)
    return time.perf_counter() - started


def pace(
    bootstrap: str, topic: str, streams: int, schedule: list[tuple[float, float]]
) -> tuple[int, float]:
    """Send at each (rate events/s, seconds) of `schedule` in turn; returns the events
    sent and the wall-clock ms when the first stage began.

    Every millisecond or so, the events due by now are sent, each stamped
    with the current wall-clock milliseconds as `ts`. The producer lingers
    5 ms, librdkafka's default, as a typical producer would
    (`BENCH_LINGER_MS` changes it)."""
    pool = _feature_pool()
    producer = _producer(bootstrap, float(os.environ.get("BENCH_LINGER_MS", "5")))
    sent = 0
    began = time.time() * 1000
    for rate, seconds in schedule:
        started = time.monotonic()
        stage_sent = 0
        while True:
            elapsed = time.monotonic() - started
            if elapsed >= seconds:
                break
            due = int(elapsed * rate) - stage_sent
            ts = b"%d" % int(time.time() * 1000)
            for _ in range(due):
                value = b'{"x":' + pool[sent % _POOL] + b',"ts":' + ts + b"}"
                try:
                    producer.produce(topic, value, stream_key(sent % streams))
                except BufferError:
                    producer.poll(0.001)
                    continue
                sent += 1
                stage_sent += 1
            producer.poll(0)
            time.sleep(0.001)
    producer.flush(60)
    return sent, began


@dataclass
class Reader:
    """Reads `topic` from its start in a thread; `arrivals` and `event_times` in ms.

    The event time is found by a byte search, not a JSON parse, so that the
    reader stays cheap at 100k predictions per second."""

    bootstrap: str
    topic: str
    partitions: int
    # b'"ts":' reads events instead of predictions; None counts records without reading
    # an event time (predictions in a binary format: bench/formats.py measures throughput)
    marker: bytes | None = b'"event_time_ms":'
    arrivals: list[float] = field(default_factory=list)
    event_times: list[int] = field(default_factory=list)
    # The record's own timestamp: for a prediction, when the server handed it to its
    # producer (CreateTime), which splits the latency into before and after that.
    produced: list[int] = field(default_factory=list)
    # keep_values: every record's value too (bench/latency_breakdown.py reads the
    # prediction's own latency fields; costs memory, for short gentle runs)
    keep_values: bool = False
    values: list[bytes] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Reader:
        self._thread = threading.Thread(target=self._run, name="reader", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def count(self) -> int:
        return len(self.arrivals)

    def _run(self) -> None:
        consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": "bench-reader",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 5,
                "isolation.level": "read_uncommitted",
            }
        )
        consumer.assign(
            [TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in range(self.partitions)]
        )
        find = self.marker
        skip = len(find or b"")
        try:
            while not self._stop.is_set():
                # consume(n, timeout) waits for n messages or the timeout: take what is
                # here now, or wait for the first message only.
                messages = consumer.consume(10_000, 0)
                if not messages:
                    first = consumer.poll(0.05)
                    if first is None:
                        continue
                    messages = [first, *consumer.consume(9_999, 0)]
                now_ms = time.time() * 1000
                times = []
                produced = []
                if find is None:
                    self.arrivals += [now_ms] * len(messages)
                    continue
                for message in messages:
                    value = message.value()
                    if value is None:
                        continue
                    produced.append(message.timestamp()[1])
                    if self.keep_values:
                        self.values.append(value)
                    start = value.find(find) + skip
                    while value[start] == 32:  # json.dumps writes a space after the colon
                        start += 1
                    end = start
                    while 48 <= value[end] <= 57:  # the digits of the number
                        end += 1
                    times.append(int(value[start:end]))
                self.event_times += times
                self.produced += produced
                self.arrivals += [now_ms] * len(times)
        finally:
            consumer.close()


def main() -> int:
    parser = argparse.ArgumentParser(description="paced benchmark load (a subprocess)")
    parser.add_argument("command", choices=["pace", "fill"])
    parser.add_argument("--bootstrap-servers", default="127.0.0.1:9092")
    parser.add_argument("--topic", required=True)
    parser.add_argument("--streams", type=int, required=True)
    parser.add_argument(
        "--schedule", default="[]", help="pace: JSON list of [rate, seconds] stages"
    )
    parser.add_argument("--count", type=int, default=0, help="fill: events")
    args = parser.parse_args()
    began = time.time() * 1000
    if args.command == "pace":
        schedule = json.loads(args.schedule)
        sent, began = pace(args.bootstrap_servers, args.topic, args.streams, schedule)
    else:
        fill(args.bootstrap_servers, args.topic, args.streams, args.count)
        sent = args.count
    print(json.dumps({"sent": sent, "started_ms": began}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
