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

A state that missed the first events of its stream (a shadow model that joined
the stream mid-way, `pipeline.shadow`) is written as `HSS2`, the same layout
with a third number after the offset: how many events it missed. Every other
snapshot stays `HSS1`, byte for byte what earlier versions wrote and read.

A snapshot whose header names another model identity or state spec (a model
roll-out) is not applied: that stream starts fresh, counted and logged.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from pipeline.errors import KafkaSetupError
from pipeline.metrics import Metrics
from pipeline.model_spec import ModelSpec
from pipeline.records import OutputRecord
from pipeline.state_store import Rows, Snapshot, StateStore
from pipeline.transport import ChangelogReader
from pipeline.transport.topics import Topics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decoded:
    """Snapshots decoded by `SnapshotCodec.decode_many`: row `i` is `values[indexes[i]]`."""

    indexes: NDArray[np.intp]
    steps: NDArray[np.int64]
    offsets: NDArray[np.int64]
    states: list[NDArray[np.float32]]  # one [len(indexes), *shape] array per state tensor
    missed: NDArray[np.int64]  # events of each stream its state missed (0: warm)


_MAGIC = b"HSS1"  # step, source offset
_MAGIC_MISSED = b"HSS2"  # step, source offset, events missed
_NUMBERS = struct.Struct("<qq")


class _Layout:
    """One snapshot format of one model: its header, how many i64 numbers follow it, and
    the numpy structured row that holds a whole value."""

    def __init__(self, magic: bytes, label: bytes, numbers: int, state_size: int) -> None:
        self.header = magic + struct.pack("<H", len(label)) + label
        self.numbers = numbers
        self.states_at = len(self.header) + 8 * numbers
        self.length = self.states_at + 4 * state_size
        self.row = np.dtype(
            [
                ("header", np.uint8, (len(self.header),)),
                ("numbers", "<i8", (numbers,)),
                ("states", "<f4", (state_size,)),
            ]
        )
        self.header_row = np.frombuffer(self.header, dtype=np.uint8)

    def fits(self, value: bytes) -> bool:
        return len(value) == self.length and value.startswith(self.header)

    def encode(self, numbers: Sequence[Any], states: NDArray[np.float32]) -> list[bytes]:
        """Values of `len(states)` snapshots: `numbers[j]` is column j of the numbers,
        `states` the flattened `[count, state_size]` states."""
        count = len(states)
        table = np.empty(count, dtype=self.row)
        table["header"] = self.header_row
        for column, values in enumerate(numbers):
            table["numbers"][:, column] = values
        table["states"] = states
        data = table.tobytes()
        size = self.length
        return [data[start : start + size] for start in range(0, count * size, size)]

    def decode(
        self, values: Sequence[bytes], candidates: NDArray[np.intp] | None = None
    ) -> tuple[Any, Any]:
        """(indexes into `values` of the snapshots in this layout, their table) among
        `candidates` (indexes of values not decoded yet; None: all of them)."""
        if candidates is None:  # map(): the per-value work of a whole restore stays in C
            lengths = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
            sized = np.flatnonzero(lengths == self.length)
        else:
            lengths = np.fromiter(
                (len(values[i]) for i in candidates.tolist()),
                dtype=np.int64,
                count=len(candidates),
            )
            sized = candidates[lengths == self.length]
        if len(sized) == len(values):
            data = b"".join(values)
        else:
            data = b"".join([values[i] for i in sized.tolist()])
        table = np.frombuffer(data, dtype=self.row) if data else np.empty(0, self.row)
        fits = (table["header"] == self.header_row).all(axis=1)
        return sized[fits], table[fits]


class SnapshotCodec:
    """Encodes and decodes one model's snapshots; refuses those of any other model.

    Every snapshot of one model has the same length, so many of them are one
    numpy structured array (`header`, `numbers` = step and offset, `states`):
    a checkpoint encodes all its snapshots with one `tobytes()` and a restore
    decodes all of a partition's with one `frombuffer`, instead of a struct
    call and a copy per stream (`encode_many`, `decode_many`). States that
    missed events (`HSS2`) are a second such table.
    """

    def __init__(self, spec: ModelSpec) -> None:
        states = ";".join(f"{s.name}:{'x'.join(map(str, s.shape))}:{s.dtype}" for s in spec.states)
        label = f"{spec.identity}|{states}".encode()
        self._sizes = [int(np.prod(s.shape)) for s in spec.states]
        self._shapes = [s.shape for s in spec.states]
        self._warm = _Layout(_MAGIC, label, 2, sum(self._sizes))
        self._cold = _Layout(_MAGIC_MISSED, label, 3, sum(self._sizes))
        self._header = self._warm.header
        self.length = self._warm.length

    def encode_many(self, rows: Rows) -> list[bytes]:
        """The changelog values of many streams' snapshots, in row order."""
        count = len(rows.keys)
        if not count:
            return []
        states = np.concatenate(
            [np.asarray(a, dtype=np.float32).reshape(count, -1) for a in rows.states], axis=1
        )
        missed = rows.missed
        if missed is None or not missed.any():
            return self._warm.encode((rows.steps, rows.offsets), states)
        values: list[bytes] = [b""] * count
        for layout, chosen in (
            (self._warm, np.flatnonzero(missed == 0)),
            (self._cold, np.flatnonzero(missed != 0)),
        ):
            numbers = [rows.steps[chosen], rows.offsets[chosen], missed[chosen]]
            encoded = layout.encode(numbers[: layout.numbers], states[chosen])
            for i, value in zip(chosen.tolist(), encoded, strict=True):
                values[i] = value
        return values

    def decode_many(self, values: Sequence[bytes]) -> Decoded:
        """Every value at once: which of them are snapshots of this model (indexes
        into `values`), and their steps, source offsets, states and missed events."""
        indexes, table = self._warm.decode(values)
        missed = np.zeros(len(table), dtype=np.int64)
        if len(indexes) < len(values):
            rest = np.setdiff1d(np.arange(len(values)), indexes, assume_unique=True)
            cold_indexes, cold = self._cold.decode(values, rest)
            if len(cold_indexes):
                indexes = np.concatenate([indexes, cold_indexes])
                missed = np.concatenate([missed, cold["numbers"][:, 2]])
                steps_offsets = np.concatenate([table["numbers"], cold["numbers"][:, :2]])
                flat = np.concatenate([table["states"], cold["states"]])
                return self._decoded(indexes, steps_offsets, flat, missed)
        return self._decoded(indexes, table["numbers"], table["states"], missed)

    def _decoded(
        self, indexes: NDArray[np.intp], numbers: Any, flat: Any, missed: NDArray[np.int64]
    ) -> Decoded:
        arrays = []
        column = 0
        for size, shape in zip(self._sizes, self._shapes, strict=True):
            arrays.append(flat[:, column : column + size].reshape(len(flat), *shape))
            column += size
        return Decoded(
            indexes=indexes,
            steps=numbers[:, 0].copy(),
            offsets=numbers[:, 1].copy(),
            states=[np.ascontiguousarray(a) for a in arrays],
            missed=np.ascontiguousarray(missed, dtype=np.int64),
        )

    def encode(self, snapshot: Snapshot) -> bytes:
        """The changelog value of one stream's snapshot."""
        states = b"".join(
            np.ascontiguousarray(a, dtype=np.float32).tobytes() for a in snapshot.states
        )
        if snapshot.missed:
            numbers = struct.pack("<qqq", snapshot.step, snapshot.offset, snapshot.missed)
            return self._cold.header + numbers + states
        return self._header + _NUMBERS.pack(snapshot.step, snapshot.offset) + states

    def fits(self, value: bytes) -> bool:
        """True when `value` is a snapshot of this model (identity, state spec and length)."""
        return self._warm.fits(value) or self._cold.fits(value)

    def numbers(self, value: bytes) -> tuple[int, int]:
        """(step, source offset) of a value that `fits`."""
        layout = self._warm if self._warm.fits(value) else self._cold
        step, offset = _NUMBERS.unpack_from(value, len(layout.header))
        return int(step), int(offset)

    def states(self, values: Sequence[bytes]) -> list[np.ndarray[Any, np.dtype[np.float32]]]:
        """The states of many values that `fit`, decoded at once: one array per
        state tensor, `[len(values), *shape]`."""
        warm = self._warm
        flat = np.frombuffer(
            b"".join(v[warm.states_at if warm.fits(v) else self._cold.states_at :] for v in values),
            dtype=np.float32,
        )
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
        reader: ChangelogReader,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.topic = topic
        self._spec = spec
        self._codec = SnapshotCodec(spec)
        self._store = store
        self._metrics = metrics
        self._reader = reader
        self._clock = clock

    def changes(self) -> list[OutputRecord]:
        """The changelog records of the streams changed since the last call (their states
        copied now) and tombstones of those evicted, each to its input partition."""
        rows = self._store.drain_dirty_rows()
        topic = self.topic
        values = self._codec.encode_many(rows)
        records = [
            OutputRecord(topic, key, value, (), partition)
            for key, value, partition in zip(
                rows.keys, values, rows.partitions.tolist(), strict=True
            )
        ]
        tombstones = self._store.drain_tombstones()
        records += [OutputRecord(topic, key, None, (), partition) for key, partition in tombstones]
        self._metrics.snapshots_written.labels("state").inc(len(values))
        self._metrics.snapshots_written.labels("tombstone").inc(len(tombstones))
        return records

    def restore(self, partitions: list[int], progress: Callable[[], None]) -> None:
        """Read the changelog partitions of newly assigned input partitions to their end
        and put their streams' newest states into the store. `progress()` is called as
        records arrive (the loop beats its liveness with it: a long restore that moves
        is not a stuck server)."""
        started = time.monotonic()

        def remaining(records: int) -> None:
            self._metrics.restore_remaining_records.set(records)
            progress()

        latest, read = self._reader.read_latest(self.topic, partitions, remaining)
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

    def _apply(self, latest: Mapping[bytes, tuple[int, bytes | None]]) -> tuple[int, int]:
        keys: list[bytes] = []
        partitions: list[int] = []
        values: list[bytes] = []
        for key, (partition, value) in latest.items():
            if value is not None:  # None: a tombstone, the stream was forgotten
                keys.append(key)
                partitions.append(partition)
                values.append(value)
        decoded = self._codec.decode_many(values)
        if len(decoded.indexes) < len(values):
            self._count_discarded(values, decoded.indexes)
        if len(decoded.indexes):
            fit = decoded.indexes.tolist()
            self._store.restore_many(
                [keys[i] for i in fit],
                [partitions[i] for i in fit],
                decoded.offsets,
                decoded.steps,
                decoded.states,
                self._clock(),
                missed=decoded.missed,
            )
        return len(decoded.indexes), len(values) - len(decoded.indexes)

    def _count_discarded(self, values: Sequence[bytes], fit: NDArray[np.intp]) -> None:
        """Count and log the values that are not snapshots of this model, by reason."""
        unfit = np.ones(len(values), dtype=bool)
        unfit[fit] = False
        discarded = {"incompatible_model": 0, "malformed": 0}
        for i in np.flatnonzero(unfit).tolist():
            ours = values[i].startswith((_MAGIC, _MAGIC_MISSED))
            discarded["incompatible_model" if ours else "malformed"] += 1
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
