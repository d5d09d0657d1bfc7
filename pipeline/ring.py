"""The last predictions of every stream: what a delayed label judges, and what
`GET /streams/{key}` shows as the stream's last prediction.

Per stream, a ring of the last `horizon` predictions of one model: every output's
values and the source offset of the event each answered, at position `step % horizon`.
Layout as in the state store (`pipeline.state_store`): one float32 slab
`[capacity, horizon, outputs]`, one int64 slab of offsets `[capacity, horizon]`, and
per-stream columns (first and last step of the current run, partition, event time,
update time, last use), so recording a wave is a few numpy calls, not a Python
object per stream.

A *run* is the unbroken sequence of steps a stream took since it started, was reset,
was restored from the changelog or was evicted and came back: steps within a run are
consecutive (each prediction is the previous step + 1). A prediction whose step does
not follow the last one recorded starts a new run and forgets the old one, so a label
never judges a prediction of an earlier run that happens to carry the same step
number. The ring has its own key index and its own least-recently-used eviction at
the same cap as the store: it needs no hook into the store, and a second ring (a
shadow model's) works the same way.

Thread safety: the serving loop writes (`record`, `drop_partition`) and joins labels;
the HTTP thread of the streams API reads one stream (`last`). Every method holds
`lock`, so a reader never sees a half-written row (numpy may release the GIL in the
middle of a fancy-index write).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import repeat
from operator import itemgetter
from typing import TypeVar

import numpy as np
from numpy.typing import NDArray

from pipeline.codec import Event
from pipeline.formats import Encoder
from pipeline.model_spec import ModelSpec
from pipeline.records import OutputRecord

_EMPTY = -2  # last step of a row that holds no run: no step follows it
_FREE = np.iinfo(np.int64).max  # last use of a free row: never the least recent
_Item = TypeVar("_Item", bound=np.generic)
_KEY, _EVENT_TIME, _RECORD = itemgetter(0), itemgetter(2), itemgetter(4)  # Event's fields
_PARTITION, _OFFSET = itemgetter(1), itemgetter(2)  # InputRecord's fields


@dataclass(frozen=True)
class LastPrediction:
    """A copy of one stream's newest prediction."""

    step: int
    partition: int
    offset: int
    event_time_ms: int
    updated_at: float  # wall time (seconds since the epoch) it was recorded
    outputs: dict[str, NDArray[np.float32]]  # by output name, each its per-stream shape


@dataclass(frozen=True)
class Found:
    """What `PredictionRing.find` made of a batch of labels: per label, `result` is
    `judged`, `late` or `unknown_step`; `values[i]` is label `i`'s prediction (all
    outputs flattened, `[len(labels), width]`) where it was judged, zeros elsewhere."""

    result: NDArray[np.int8]
    values: NDArray[np.float32]


JUDGED, LATE, UNKNOWN = 0, 1, 2
RESULTS = ("judged", "late", "unknown_step")
"""The `result` of a label, by its code in `Found.result`."""


class PredictionRing:
    """The last `horizon` predictions of each of at most `max_streams` streams."""

    def __init__(
        self,
        spec: ModelSpec,
        horizon: int,
        max_streams: int,
        initial_capacity: int = 1024,
    ) -> None:
        if horizon < 1 or max_streams < 1:
            raise ValueError(
                f"a prediction ring needs horizon >= 1 and max_streams >= 1, "
                f"got {horizon} and {max_streams}"
            )
        self.identity = spec.identity
        self.horizon = horizon
        self.lock = threading.Lock()
        self._outputs = [
            (o.name, o.shape, int(np.prod(o.shape, dtype=np.int64))) for o in spec.outputs
        ]
        self._width = sum(size for _, _, size in self._outputs)
        self._max_streams = max_streams
        capacity = max(1, min(initial_capacity, max_streams))
        self._values = np.zeros((capacity, horizon, self._width), dtype=np.float32)
        self._offsets = np.full((capacity, horizon), -1, dtype=np.int64)
        self._first = np.full(capacity, _EMPTY, dtype=np.int64)
        self._last = np.full(capacity, _EMPTY, dtype=np.int64)
        self._partition = np.full(capacity, -1, dtype=np.int32)
        self._event_time = np.zeros(capacity, dtype=np.int64)
        self._updated = np.zeros(capacity, dtype=np.float64)
        self._last_used = np.full(capacity, _FREE, dtype=np.int64)
        self._keys: list[bytes | None] = [None] * capacity
        self._index: dict[bytes, int] = {}
        self._free: list[int] = []
        self._high_water = 0
        self._tick = 0

    def __len__(self) -> int:
        return len(self._index)

    @property
    def width(self) -> int:
        """Values per prediction: the sizes of every output, added up."""
        return self._width

    @property
    def nbytes(self) -> int:
        """Bytes of the slabs and per-stream columns (the key index not included)."""
        arrays = (
            self._values,
            self._offsets,
            self._first,
            self._last,
            self._partition,
            self._event_time,
            self._updated,
            self._last_used,
        )
        return sum(a.nbytes for a in arrays)

    @staticmethod
    def bytes_per_stream(spec: ModelSpec, horizon: int) -> int:
        """The slab and column bytes one stream takes: `horizon` x (4 bytes per output
        value + an 8-byte offset), plus 44 bytes of columns."""
        width = sum(int(np.prod(o.shape, dtype=np.int64)) for o in spec.outputs)
        return horizon * (4 * width + 8) + 8 + 8 + 4 + 8 + 8 + 8

    # ------------------------------------------------------------------ the serving loop

    def record(
        self,
        events: Sequence[Event],
        outputs: dict[str, NDArray[np.float32]],
        steps: NDArray[np.int64],
        now: float,
    ) -> None:
        """Keep the predictions of one wave (distinct streams): row `i` of `outputs` and
        `steps` answered `events[i]`."""
        count = len(events)
        if not count:
            return
        if len(self._outputs) == 1:
            name, _, size = self._outputs[0]
            values = np.asarray(outputs[name], np.float32).reshape(count, size)
        else:
            values = np.concatenate(
                [
                    np.asarray(outputs[name], np.float32).reshape(count, size)
                    for name, _, size in self._outputs
                ],
                axis=1,
            )
        # map() over item getters keeps the per-event work in C (a comprehension per
        # column cost twice as much); an Event's record is its last field.
        keys = list(map(_KEY, events))
        records = list(map(_RECORD, events))
        partitions = np.fromiter(map(_PARTITION, records), np.int32, count)
        offsets = np.fromiter(map(_OFFSET, records), np.int64, count)
        times = np.fromiter(map(_EVENT_TIME, events), np.int64, count)
        steps = np.asarray(steps, dtype=np.int64)
        with self.lock:
            rows = self._rows(keys)
            restart = steps != self._last[rows] + 1
            if restart.any():
                self._first[rows[restart]] = steps[restart]
            self._last[rows] = steps
            if self.horizon == 1:
                self._values[rows, 0] = values
                self._offsets[rows, 0] = offsets
            else:
                positions = steps % self.horizon
                self._values[rows, positions] = values
                self._offsets[rows, positions] = offsets
            self._partition[rows] = partitions
            self._event_time[rows] = times
            self._updated[rows] = now

    def drop_partition(self, partition: int) -> int:
        """Forget the streams of a partition this replica no longer holds; returns how many."""
        with self.lock:
            hw = self._high_water
            rows = np.flatnonzero(
                (self._last_used[:hw] != _FREE) & (self._partition[:hw] == partition)
            )
            self._remove(rows)
            return len(rows)

    def find(
        self,
        keys: Sequence[bytes],
        partitions: Sequence[int],
        steps: Sequence[int],
        offsets: Sequence[int],
    ) -> Found:
        """The predictions that labels judge. Label `i` names stream `keys[i]`, read from
        `partitions[i]`, and either a step (`steps[i] >= 1`, `offsets[i] = -1`) or the
        source offset of the event (`offsets[i] >= 0`, `steps[i] = -1`).

        - `judged`: the stream's current run holds that prediction;
        - `late`: it was predicted, but `horizon` or more steps ago (left the ring);
        - `unknown_step`: no such prediction here: a stream this replica does not hold,
          another partition, a step not predicted yet, or one of an earlier run
          (before a reset, a restore or an eviction).
        """
        count = len(keys)
        h = self.horizon
        step = np.asarray(steps, dtype=np.int64).reshape(count)
        offset = np.asarray(offsets, dtype=np.int64).reshape(count)
        result = np.full(count, UNKNOWN, dtype=np.int8)
        values = np.zeros((count, self._width), dtype=np.float32)
        if not count:
            return Found(result, values)
        with self.lock:
            index = self._index
            rows = np.fromiter(map(index.get, keys, repeat(-1)), dtype=np.int64, count=count)
            held = rows >= 0
            safe = np.where(held, rows, 0)
            held &= self._partition[safe] == np.asarray(partitions, dtype=np.int32)
            first, last = self._first[safe], self._last[safe]
            # The oldest step the ring still holds of the current run.
            oldest = np.maximum(first, last - h + 1)
            position = np.zeros(count, dtype=np.int64)

            by_step = held & (step >= 1)
            late = by_step & (step <= last - h)
            hit = by_step & (step >= oldest) & (step <= last)
            position[hit] = step[hit] % h

            by_offset = held & (offset >= 0)
            if by_offset.any():
                chosen = np.flatnonzero(by_offset)
                ring_offsets = self._offsets[rows[chosen]]  # [n, h]
                # Position p holds the newest step s <= last with s % h == p.
                slot_steps = last[chosen, None] - (last[chosen, None] - np.arange(h)) % h
                valid = slot_steps >= oldest[chosen, None]
                match = valid & (ring_offsets == offset[chosen, None])
                found = match.any(axis=1)
                hit[chosen[found]] = True
                position[chosen[found]] = match[found].argmax(axis=1)
                # Not found: older than everything held of a full ring is late (it was
                # predicted and has left); anything else is not known here.
                full = (last[chosen] - first[chosen] + 1) >= h
                held_offsets = np.where(valid, ring_offsets, np.iinfo(np.int64).max)
                older = offset[chosen] < held_offsets.min(axis=1)
                late[chosen[~found & full & older]] = True

            result[late] = LATE
            result[hit] = JUDGED
            if hit.any():
                values[hit] = self._values[rows[hit], position[hit]]
        return Found(result, values)

    # ------------------------------------------------------------------ the HTTP thread

    def last(self, key: bytes) -> LastPrediction | None:
        """A copy of the stream's newest prediction, or None if the ring holds none."""
        with self.lock:
            row = self._index.get(key)
            if row is None:
                return None
            step = int(self._last[row])
            values = self._values[row, step % self.horizon].copy()
            found = LastPrediction(
                step=step,
                partition=int(self._partition[row]),
                offset=int(self._offsets[row, step % self.horizon]),
                event_time_ms=int(self._event_time[row]),
                updated_at=float(self._updated[row]),
                outputs={},
            )
        start = 0
        for name, shape, size in self._outputs:
            found.outputs[name] = values[start : start + size].reshape(shape)
            start += size
        return found

    # ------------------------------------------------------------------ internals

    def _rows(self, keys: list[bytes]) -> NDArray[np.int64]:
        """Rows of distinct `keys`, taking fresh rows for unknown ones (evicting the least
        recently used at the cap, never one of `keys`); all marked used now."""
        self._tick += 1
        index = self._index
        rows = np.fromiter(map(index.get, keys, repeat(-1)), dtype=np.int64, count=len(keys))
        missing = np.flatnonzero(rows < 0)
        if len(missing):
            self._last_used[rows[rows >= 0]] = self._tick  # not evictable below
            new_keys = [keys[i] for i in missing.tolist()]
            fresh = self._take(len(new_keys))
            index.update(zip(new_keys, fresh, strict=True))
            for key, row in zip(new_keys, fresh, strict=True):
                self._keys[row] = key
            fresh_rows = np.asarray(fresh, dtype=np.int64)
            self._first[fresh_rows] = _EMPTY
            self._last[fresh_rows] = _EMPTY
            rows[missing] = fresh_rows
        self._last_used[rows] = self._tick
        return rows

    def _take(self, count: int) -> list[int]:
        available = len(self._free) + len(self._keys) - self._high_water
        if count > available and len(self._keys) < self._max_streams:
            target = len(self._keys)
            while (
                target - self._high_water + len(self._free) < count and target < self._max_streams
            ):
                target *= 2
            self._grow(min(target, self._max_streams))
            available = len(self._free) + len(self._keys) - self._high_water
        if count > available:
            self._evict(count - available)
        reused = min(count, len(self._free))
        taken = self._free[len(self._free) - reused :]
        del self._free[len(self._free) - reused :]
        start = self._high_water
        self._high_water += count - reused
        return [*taken, *range(start, self._high_water)]

    def _grow(self, capacity: int) -> None:
        extra = capacity - len(self._keys)

        def more(array: NDArray[_Item], fill: float) -> NDArray[_Item]:
            pad = np.full((extra, *array.shape[1:]), fill, dtype=array.dtype)
            return np.concatenate([array, pad])

        self._values = more(self._values, 0)
        self._offsets = more(self._offsets, -1)
        self._first = more(self._first, _EMPTY)
        self._last = more(self._last, _EMPTY)
        self._partition = more(self._partition, -1)
        self._event_time = more(self._event_time, 0)
        self._updated = more(self._updated, 0)
        self._last_used = more(self._last_used, _FREE)
        self._keys.extend([None] * extra)

    def _evict(self, count: int) -> None:
        used = self._last_used[: self._high_water]
        victims = (
            np.argpartition(used, count - 1)[:count] if count < len(used) else np.arange(len(used))
        )
        if (used[victims] >= self._tick).any():
            raise ValueError(
                "cannot evict a stream of the current call: the call exceeds max_streams"
            )
        self._remove(victims.astype(np.int64))

    def _remove(self, rows: NDArray[np.int64]) -> None:
        for row in rows.tolist():
            key = self._keys[row]
            if key is None:
                continue
            del self._index[key]
            self._keys[row] = None
            self._free.append(row)
        self._last_used[rows] = _FREE
        self._partition[rows] = -1
        self._first[rows] = _EMPTY
        self._last[rows] = _EMPTY


class RecordingEncoder:
    """An `Encoder` that keeps each wave's predictions in a ring, then encodes them with
    the encoder it wraps: how the ring sees every prediction of the model whose outputs
    this encoder writes, without a hook in the processor. `clock` gives the wall time
    each prediction is recorded at."""

    def __init__(self, inner: Encoder, ring: PredictionRing, clock: Callable[[], float]) -> None:
        self._inner = inner
        self._ring = ring
        self._clock = clock

    def encode_wave(
        self,
        events: Sequence[Event],
        outputs: dict[str, NDArray[np.float32]],
        steps: NDArray[np.int64],
        queued_seconds: float,
        inference_seconds: float,
    ) -> list[OutputRecord]:
        """Record the wave in the ring, then the inner encoder's records."""
        self._ring.record(events, outputs, steps, self._clock())
        return self._inner.encode_wave(events, outputs, steps, queued_seconds, inference_seconds)
