"""The recording producer: librdkafka sends the events, and every one it reports delivered is
kept with its partition and offset. What the checker holds the server to is this record."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from confluent_kafka import KafkaError, Message, Producer

FEATURES = 3


@dataclass(frozen=True)
class Delivered:
    """One event the broker acknowledged."""

    key: bytes
    index: int  # position in its stream among the valid events (-1: a bad event)
    partition: int
    offset: int
    x: tuple[float, ...]


def features(stream: int, index: int, seed: int) -> tuple[float, ...]:
    """The features of event `index` of stream `stream`: reproducible from the seed alone."""
    rng = np.random.default_rng((seed, stream, index))
    return tuple(float(v) for v in rng.normal(size=FEATURES).round(4))


@dataclass
class RecordingProducer:
    """Sends `streams` streams round robin at `rate` events/s from a thread; one in
    `bad_every` sends is not JSON (it must reach the dead-letter topic)."""

    bootstrap: str
    topic: str
    streams: int
    rate: float
    seed: int = 0
    bad_every: int = 97
    delivered: list[Delivered] = field(default_factory=list)
    # Acknowledged without an offset: librdkafka can report an event delivered with its
    # offset unknown (seen right after a broker kill, the write retried by the idempotent
    # producer). Kept by stream and index, to be found in the log.
    unplaced: list[Delivered] = field(default_factory=list)
    failed: int = 0

    def __post_init__(self) -> None:
        self._producer = Producer(
            {
                "bootstrap.servers": self.bootstrap,
                "enable.idempotence": True,  # retries never reorder nor repeat a stream's events
                "linger.ms": 5,
                "message.timeout.ms": 300_000,  # outlast any broker restart of the campaign
            }
        )
        self._next = [0] * self.streams
        self._sent = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._crash: BaseException | None = None

    def start(self) -> RecordingProducer:
        self._thread = threading.Thread(target=self._run, name="chaos-producer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sending and wait for every outstanding delivery report. A sending thread
        that died says so here: a run whose load stopped early tested less than it claims."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._crash is not None:
            raise RuntimeError(
                f"the recording producer stopped sending after {self._sent} events: {self._crash!r}"
            ) from self._crash
        self.flush()

    def flush(self) -> None:
        left = self._producer.flush(300)
        if left:
            raise RuntimeError(f"{left} events never acknowledged by the broker")

    def send_round(self) -> None:
        """One more event of every stream, now (the final restart's round)."""
        for stream in range(self.streams):
            self._send(stream, bad=False)
        self.flush()

    def _run(self) -> None:
        try:
            self._send_at_rate()
        except BaseException as exc:  # re-raised by stop()
            self._crash = exc

    def _send_at_rate(self) -> None:
        started = time.monotonic()
        stream = 0
        while not self._stop.is_set():
            due = started + self._sent / self.rate - time.monotonic()
            if due > 0:
                time.sleep(min(due, 0.05))
                continue
            self._send(stream, bad=self._sent % self.bad_every == self.bad_every - 1)
            stream = (stream + 1) % self.streams
            self._producer.poll(0)

    def _send(self, stream: int, bad: bool) -> None:
        key = f"s{stream}".encode()
        if bad:
            index, x, value = -1, (), b"{not json"
        else:
            index = self._next[stream]
            self._next[stream] += 1
            x = features(stream, index, self.seed)
            value = json.dumps({"x": list(x)}).encode()

        def report(error: KafkaError | None, message: Message) -> None:
            self.record(Delivered(key, index, -1, -1, x), error, message)

        while True:
            try:
                self._producer.produce(self.topic, value, key, on_delivery=report)
                break
            except BufferError:
                self._producer.poll(0.1)
        self._sent += 1

    def record(self, event: Delivered, error: KafkaError | None, message: Message) -> None:
        """librdkafka's report on `event` (its partition and offset not known yet)."""
        with self._lock:
            if error is not None:
                self.failed += 1
                return
            partition, offset = message.partition(), message.offset()
            placed = replace(event, partition=-1 if partition is None else partition)
            if offset is None or offset < 0:
                self.unplaced.append(placed)
            else:
                self.delivered.append(replace(placed, offset=offset))

    def not_in_log(self, log: list[Delivered]) -> int:
        """The events reported delivered that `log` (`written`) lacks: by position, or by
        stream and index for those acknowledged without an offset."""
        at = {(e.partition, e.offset) for e in log}
        events = {(e.key, e.index) for e in log if e.index >= 0}
        missing = sum((e.partition, e.offset) not in at for e in self.delivered)
        return missing + sum(e.index >= 0 and (e.key, e.index) not in events for e in self.unplaced)


def written(records: list[Any]) -> list[Delivered]:
    """The events as the input topic holds them (`checker.read_topic` of it), each with its
    index in its stream: what the servers read, so what the reference must step. When the
    broker is killed, a write can persist although librdkafka reported it failed (the
    answer was lost with the broker and the retry was refused), so the producer's own
    record of deliveries may lack events that are in the log."""
    events: list[Delivered] = []
    next_index: dict[bytes, int] = {}
    for message in sorted(records, key=lambda m: (m.partition(), m.offset())):
        key = message.key()
        try:
            x = tuple(float(v) for v in json.loads(message.value())["x"])
        except (ValueError, KeyError, TypeError):
            events.append(Delivered(key, -1, message.partition(), message.offset(), ()))
            continue
        index = next_index.get(key, 0)
        next_index[key] = index + 1
        events.append(Delivered(key, index, message.partition(), message.offset(), x))
    return events
