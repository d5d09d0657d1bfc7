"""Durable hidden states: the changelog topic, its snapshots and the restore.

Kafka Streams' model applied to hidden states:

- The changelog is a compacted topic, co-partitioned with the input topic:
  the state of a stream read from input partition p lives in changelog
  partition p under the stream's key. Compaction keeps the newest snapshot
  of every stream; a tombstone (null value) forgets an evicted one.
- A checkpoint writes the snapshots of the streams changed since the last
  one, waits for their acknowledgement, and only then commits the input
  offsets (`pipeline.loop`). A hidden state is a pure function of its
  stream's events, so restore + replay from the committed offset gives back
  the exact state; events the snapshot already holds are skipped
  (`StateStore.already_applied`).
- On assignment, the newly assigned partitions' snapshots are read to the
  end of the changelog before any of their events is served.

A snapshot value is binary: a header that names the model identity and the
state spec, then step and source offset, then the float32 state bytes:

    b"HSS1" | u16 n | identity+spec (n bytes, UTF-8) | i64 step | i64 offset | states

A snapshot whose header names another model identity or state spec (a model
roll-out) is not applied: that stream starts fresh, counted and logged.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from kafka import KafkaConsumer, TopicPartition

from pipeline.errors import KafkaSetupError
from pipeline.metrics import Metrics
from pipeline.model_spec import ModelSpec
from pipeline.records import OutputRecord
from pipeline.state_store import Snapshot, StateStore
from pipeline.transport import Sink, Topics

log = logging.getLogger(__name__)

_MAGIC = b"HSS1"
_NUMBERS = struct.Struct("<qq")  # step, source offset


class SnapshotCodec:
    """Encodes and decodes one model's snapshots; refuses those of any other model."""

    def __init__(self, spec: ModelSpec) -> None:
        states = ";".join(f"{s.name}:{'x'.join(map(str, s.shape))}:{s.dtype}" for s in spec.states)
        label = f"{spec.identity}|{states}".encode()
        self._header = _MAGIC + struct.pack("<H", len(label)) + label
        self._sizes = [int(np.prod(s.shape)) for s in spec.states]
        self._shapes = [s.shape for s in spec.states]
        self._state_bytes = sum(self._sizes) * 4
        self.length = len(self._header) + _NUMBERS.size + self._state_bytes

    def encode(self, snapshot: Snapshot) -> bytes:
        """The changelog value of one stream's snapshot."""
        states = b"".join(
            np.ascontiguousarray(a, dtype=np.float32).tobytes() for a in snapshot.states
        )
        return self._header + _NUMBERS.pack(snapshot.step, snapshot.offset) + states

    def fits(self, value: bytes) -> bool:
        """True when `value` is a snapshot of this model (identity, state spec and length)."""
        return len(value) == self.length and value.startswith(self._header)

    def numbers(self, value: bytes) -> tuple[int, int]:
        """(step, source offset) of a value that `fits`."""
        step, offset = _NUMBERS.unpack_from(value, len(self._header))
        return int(step), int(offset)

    def states(self, values: Sequence[bytes]) -> list[np.ndarray[Any, np.dtype[np.float32]]]:
        """The states of many values that `fit`, decoded at once: one array per
        state tensor, `[len(values), *shape]`."""
        start = len(self._header) + _NUMBERS.size
        flat = np.frombuffer(b"".join(v[start:] for v in values), dtype=np.float32)
        flat = flat.reshape(len(values), sum(self._sizes))
        arrays = []
        column = 0
        for size, shape in zip(self._sizes, self._shapes, strict=True):
            arrays.append(flat[:, column : column + size].reshape(len(values), *shape).copy())
            column += size
        return arrays


def ensure_topic(topics: Topics, name: str, partitions: int) -> None:
    """Create the changelog (compacted, one partition per input partition) if missing;
    refuse one whose partition count or cleanup policy breaks co-partitioning."""
    count = topics.ensure(name, partitions, {"cleanup.policy": "compact"})
    if count != partitions:
        raise KafkaSetupError(
            f"changelog topic {name!r} has {count} partitions, the input topic {partitions}: "
            "the state of input partition p must live in changelog partition p. Give the "
            "changelog as many partitions (kafka-topics --alter), or choose a new one with "
            "--changelog-topic (streams then start fresh)"
        )
    policy = topics.topic_config(name).get("cleanup.policy", "")
    if "compact" not in policy:
        raise KafkaSetupError(
            f"changelog topic {name!r} has cleanup.policy={policy!r}; it must be compacted "
            "(cleanup.policy=compact) or old snapshots are lost to retention"
        )


class Changelog:
    """The `Checkpointer` of the serving loop: writes changes, restores partitions."""

    def __init__(
        self,
        topic: str,
        spec: ModelSpec,
        store: StateStore,
        metrics: Metrics,
        client_kwargs: Mapping[str, Any],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.topic = topic
        self._spec = spec
        self._codec = SnapshotCodec(spec)
        self._store = store
        self._metrics = metrics
        self._client_kwargs = dict(client_kwargs)
        self._clock = clock

    def write_changes(self, sink: Sink) -> int:
        """Queue snapshots of the streams changed since the last call, and tombstones
        of those evicted, on `sink`, each to its input partition. Returns how many."""
        snapshots = self._store.drain_dirty()
        for snapshot in snapshots:
            sink.send(
                OutputRecord(
                    self.topic, snapshot.key, self._codec.encode(snapshot), (), snapshot.partition
                )
            )
        tombstones = self._store.drain_tombstones()
        for key, partition in tombstones:
            sink.send(OutputRecord(self.topic, key, None, (), partition))
        self._metrics.snapshots_written.labels("state").inc(len(snapshots))
        self._metrics.snapshots_written.labels("tombstone").inc(len(tombstones))
        return len(snapshots) + len(tombstones)

    def restore(self, partitions: list[int]) -> None:
        """Read the changelog partitions of newly assigned input partitions to their end
        and put their streams' newest states into the store."""
        started = time.monotonic()
        latest, read = self._read(partitions)
        restored, discarded = self._apply(latest)
        seconds = time.monotonic() - started
        self._metrics.restore_seconds.observe(seconds)
        self._metrics.restored_streams.inc(restored)
        log.info(
            "restored %d streams of partitions %s from %s: %d records in %.2f s "
            "(%.0f records/s); %d snapshots of another model discarded",
            restored,
            partitions,
            self.topic,
            read,
            seconds,
            read / seconds if seconds > 0 else 0.0,
            discarded,
        )

    def _read(self, partitions: list[int]) -> tuple[dict[bytes, tuple[int, bytes | None]], int]:
        """The newest value of every key in `partitions` (None: tombstone), and the count read."""
        consumer = KafkaConsumer(
            group_id=None,
            enable_auto_commit=False,
            # Snapshots of an aborted exactly-once transaction never happened.
            isolation_level="read_committed",
            max_poll_records=10_000,
            fetch_max_bytes=64 * 1024 * 1024,
            max_partition_fetch_bytes=16 * 1024 * 1024,
            **self._client_kwargs,
        )
        try:
            assigned = [TopicPartition(self.topic, p) for p in partitions]
            consumer.assign(assigned)
            consumer.seek_to_beginning(*assigned)
            ends = consumer.end_offsets(assigned)
            remaining = {tp: end for tp, end in ends.items() if end > 0}
            total = sum(remaining.values())
            self._metrics.restore_remaining_records.set(total)
            latest: dict[bytes, tuple[int, bytes | None]] = {}
            read = 0
            while remaining:
                for tp, records in consumer.poll(timeout_ms=500).items():
                    for record in records:
                        latest[record.key] = (tp.partition, record.value)
                    read += len(records)
                for tp in list(remaining):
                    # The position passes the end even when the last records are
                    # transaction markers, which are never returned.
                    if consumer.position(tp) >= remaining[tp]:
                        del remaining[tp]
                self._metrics.restore_remaining_records.set(
                    max(0, total - read) if remaining else 0
                )
            return latest, read
        finally:
            consumer.close()

    def _apply(self, latest: Mapping[bytes, tuple[int, bytes | None]]) -> tuple[int, int]:
        codec = self._codec
        keys: list[bytes] = []
        partitions: list[int] = []
        values: list[bytes] = []
        discarded = {"incompatible_model": 0, "malformed": 0}
        for key, (partition, value) in latest.items():
            if value is None:
                continue  # a tombstone: the stream was forgotten
            if codec.fits(value):
                keys.append(key)
                partitions.append(partition)
                values.append(value)
            else:
                discarded["incompatible_model" if value.startswith(_MAGIC) else "malformed"] += 1
        for reason, count in discarded.items():
            if count:
                self._metrics.snapshots_discarded.labels(reason).inc(count)
                log.warning(
                    "%d changelog snapshots in %s not applied (%s): those streams start fresh "
                    "under %s",
                    count,
                    self.topic,
                    reason,
                    self._spec.identity,
                )
        if keys:
            numbers = [codec.numbers(v) for v in values]
            self._store.restore_many(
                keys,
                partitions,
                [offset for _, offset in numbers],
                [step for step, _ in numbers],
                codec.states(values),
                self._clock(),
            )
        return len(keys), sum(discarded.values())
