"""The in-memory hidden states of every stream this consumer serves.

Layout (why: one ORT call per wave needs `[batch, *shape]` arrays, and memory
per stream must be the state bytes plus a small constant):

- one float32 "slab" per state tensor, `[capacity, *state_shape]`; a stream is
  one row ("slot") of every slab, so a wave's states are `slab[slots]` (one
  gather) and its new states one scatter back;
- a dict stream key -> slot, and a list slot -> key;
- per-slot columns in numpy arrays, not per-stream Python objects: step count,
  last-seen time (idle TTL), last-used tick (LRU), source partition, last
  offset, dirty flag, and the events of the stream the state missed (a shadow
  model that joined the stream mid-way: `pipeline.shadow`; 0 for a state that
  has seen every event since the stream started or was last reset);
- a free list of slots; capacity doubles when full, up to `max_streams`; at
  the cap the least recently used streams are evicted, in one numpy
  `argpartition` per call rather than a linked list per stream.

Eviction (LRU or idle TTL) forgets a stream: its next event starts from zeros,
and a tombstone is queued so that the changelog forgets it too. Dropping a
revoked partition forgets its streams without tombstones: the new owner
restores them from the changelog. docs/state-store.md has the measured memory.

Threads: the serving loop is the only writer. The streams API reads one stream
from its HTTP thread (`view`, `streams_by_partition`), so every method that
changes the index, the columns or the slabs holds `lock` (re-entrant), and so do
those two readers: numpy may release the GIL in the middle of a fancy-index
write, and a reader must never see half a row, or a slot handed to another key
between two reads. Uncontended, the lock costs well under a microsecond per
call, i.e. per wave.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import cast

import numpy as np
from numpy.typing import ArrayLike, NDArray

from pipeline.model_spec import StateSpec

_FREE = np.iinfo(np.int64).max  # last-used tick of a free slot: never the least recent
Slots = NDArray[np.int64]


@dataclass(frozen=True)
class Rows:
    """Many streams' snapshots as columns: row `i` of every field is stream `keys[i]`.
    What a checkpoint drains (one fancy-index copy per column, no object per stream)."""

    keys: list[bytes]
    partitions: NDArray[np.int32]
    offsets: NDArray[np.int64]
    steps: NDArray[np.int64]
    states: tuple[NDArray[np.float32], ...]  # one [len(keys), *shape] array per state tensor
    # Events of each stream its state never saw (0: warm; see the module docstring).
    missed: NDArray[np.int64] | None = None

    def missed_or_zeros(self) -> NDArray[np.int64]:
        """`missed`, or zeros when it was not given."""
        if self.missed is None:
            return np.zeros(len(self.keys), dtype=np.int64)
        return self.missed


@dataclass(frozen=True)
class StreamView:
    """One stream as the store holds it now, copied out under the lock (the streams API)."""

    key: bytes
    partition: int
    offset: int
    step: int
    last_seen: float  # wall time of the stream's last event
    states: tuple[NDArray[np.float32], ...]


@dataclass(frozen=True)
class Snapshot:
    """One stream's state, copied out: what the changelog writes and restore takes."""

    key: bytes
    partition: int
    offset: int
    step: int
    states: tuple[NDArray[np.float32], ...]
    missed: int = 0


class StateStore:
    """Hidden states by stream key; see the module docstring for the layout.

    `on_evict(cause, count)` is called after evictions, `cause` being "lru" or
    "ttl": the processor counts them in `hiddenstate_evictions_total`.
    `on_forget(keys)` is called with the keys of the streams evicted (not of those
    dropped with a partition): a shadow's store forgets the same streams
    (`pipeline.shadow`), so that both models start them afresh together.
    """

    def __init__(
        self,
        states: Sequence[StateSpec],
        *,
        max_streams: int,
        idle_ttl_seconds: float = 0.0,
        initial_capacity: int = 1024,
        on_evict: Callable[[str, int], None] | None = None,
        on_forget: Callable[[list[bytes]], None] | None = None,
    ) -> None:
        if max_streams < 1:
            raise ValueError(f"max_streams must be >= 1, got {max_streams}")
        self._specs = tuple(states)
        self._max_streams = max_streams
        self._ttl = idle_ttl_seconds
        self._on_evict = on_evict
        self._on_forget = on_forget
        capacity = max(1, min(initial_capacity, max_streams))
        self._slabs = [np.zeros((capacity, *s.shape), dtype=np.float32) for s in self._specs]
        self._keys: list[bytes | None] = [None] * capacity
        self._steps = np.zeros(capacity, dtype=np.int64)
        self._last_seen = np.zeros(capacity, dtype=np.float64)
        self._last_used = np.full(capacity, _FREE, dtype=np.int64)
        self._partition = np.full(capacity, -1, dtype=np.int32)
        self._offset = np.full(capacity, -1, dtype=np.int64)
        self._dirty = np.zeros(capacity, dtype=np.bool_)
        self._missed = np.zeros(capacity, dtype=np.int64)
        self._index: dict[bytes, int] = {}
        self._free: list[int] = []
        self._high_water = 0  # slots [0, high_water) have been handed out at least once
        self._tick = 0
        self._tombstones: dict[bytes, int] = {}  # evicted key -> its partition
        self.lock = threading.RLock()

    # ------------------------------------------------------------------ size

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def held(self, keys: Sequence[bytes]) -> NDArray[np.bool_]:
        """For each key, whether its stream is held now."""
        return np.fromiter(map(self._index.__contains__, keys), dtype=np.bool_, count=len(keys))

    def keys(self) -> Iterator[bytes]:
        """The stream keys held now."""
        return iter(list(self._index))

    @property
    def capacity(self) -> int:
        """Rows allocated in each slab (grows by doubling up to `max_streams`)."""
        return len(self._keys)

    @property
    def max_streams(self) -> int:
        """The cap beyond which the least recently used stream is evicted."""
        return self._max_streams

    @property
    def nbytes(self) -> int:
        """Bytes of the slabs and per-slot columns (the dict and keys not included)."""
        columns = (
            self._steps,
            self._last_seen,
            self._last_used,
            self._partition,
            self._offset,
            self._dirty,
            self._missed,
        )
        return sum(s.nbytes for s in self._slabs) + sum(c.nbytes for c in columns)

    # ------------------------------------------------------------------ the hot path

    def acquire(
        self, keys: Sequence[bytes], partitions: ArrayLike, offsets: ArrayLike, now: float
    ) -> Slots:
        """Slots for `keys` (one wave), creating zero states for unknown streams.

        Marks every key used now (LRU, idle TTL) and records its source partition
        and offset. At the cap, evicts the least recently used streams, never one
        of `keys`; so `len(keys)` must not exceed `max_streams`.
        """
        if len(keys) > self._max_streams:
            raise ValueError(
                f"{len(keys)} streams in one call, the store holds {self._max_streams}"
            )
        with self.lock:
            return self._acquire(keys, partitions, offsets, now)

    def _acquire(
        self, keys: Sequence[bytes], partitions: ArrayLike, offsets: ArrayLike, now: float
    ) -> Slots:
        self._tick += 1
        index = self._index
        # map() over the dict's own methods: the per-key work stays in C.
        slots = np.fromiter(map(index.get, keys, repeat(-1)), dtype=np.int64, count=len(keys))
        missing = np.flatnonzero(slots < 0)
        if len(missing):
            # Touch the known ones first so that eviction cannot pick them.
            self._last_used[slots[slots >= 0]] = self._tick
            missing_keys = [keys[i] for i in missing.tolist()]
            new_keys = list(dict.fromkeys(missing_keys))  # a key repeated in `keys`: one slot
            self._make_room(len(new_keys))
            fresh = self._take_slots(len(new_keys))
            index.update(zip(new_keys, fresh, strict=True))
            for key, slot in zip(new_keys, fresh, strict=True):
                self._keys[slot] = key
            if self._tombstones:
                for key in new_keys:
                    self._tombstones.pop(key, None)  # it comes back: the new state supersedes it
            fresh_slots = np.asarray(fresh, dtype=np.int64)
            self._clear(fresh_slots)
            slots[missing] = (
                fresh_slots
                if len(new_keys) == len(missing_keys)
                else np.fromiter(map(index.__getitem__, missing_keys), np.int64, len(missing))
            )
        self._last_used[slots] = self._tick
        self._last_seen[slots] = now
        self._partition[slots] = partitions
        self._offset[slots] = offsets
        return slots

    def gather(self, slots: Slots) -> list[NDArray[np.float32]]:
        """Copies of the states of `slots`: one `[len(slots), *shape]` array per state tensor."""
        return [slab[slots] for slab in self._slabs]

    def scatter(self, slots: Slots, states: Sequence[NDArray[np.float32]]) -> None:
        """Write the new states of `slots` (distinct), count one step each, mark them dirty."""
        with self.lock:
            for slab, new in zip(self._slabs, states, strict=True):
                slab[slots] = new
            self._steps[slots] += 1
            self._dirty[slots] = True

    def steps(self, slots: Slots) -> NDArray[np.int64]:
        """Steps taken by each of `slots` since it started (or was reset)."""
        return self._steps[slots]

    def missed(self, slots: Slots) -> NDArray[np.int64]:
        """Events of each of `slots`' stream that its state never saw (0: warm)."""
        return self._missed[slots]

    def set_missed(self, slots: Slots, missed: ArrayLike) -> None:
        """Record how many events of each of `slots`' stream its state never saw."""
        with self.lock:
            self._missed[slots] = missed

    def reset_slots(self, slots: Slots) -> None:
        """Zero the states, step counts and missed counts of `slots`, marked dirty: the
        streams start afresh, as `reset` does for one."""
        with self.lock:
            self._clear(slots)
            self._dirty[slots] = True

    # ------------------------------------------------------------------ per stream

    def reset(self, key: bytes) -> bool:
        """Zero a stream's state and step count; it is dirty, so the next checkpoint
        writes the fresh state. Returns False for an unknown stream (already zeros)."""
        with self.lock:
            slot = self._index.get(key)
            if slot is None:
                return False
            self._clear(np.asarray([slot], dtype=np.int64))
            self._dirty[slot] = True
            return True

    def snapshot(self, key: bytes) -> Snapshot | None:
        """A copy of one stream's state, or None for an unknown stream."""
        slot = self._index.get(key)
        return None if slot is None else self._snapshot(slot)

    def view(self, key: bytes) -> StreamView | None:
        """One stream's step, source, last-seen time and states, copied consistently
        (safe from another thread), or None for a stream the store does not hold."""
        with self.lock:
            slot = self._index.get(key)
            if slot is None:
                return None
            return StreamView(
                key=key,
                partition=int(self._partition[slot]),
                offset=int(self._offset[slot]),
                step=int(self._steps[slot]),
                last_seen=float(self._last_seen[slot]),
                states=tuple(slab[slot].copy() for slab in self._slabs),
            )

    def streams_by_partition(self) -> dict[int, int]:
        """How many streams the store holds of each source partition (safe from another
        thread); partitions without streams are absent."""
        with self.lock:
            hw = self._high_water
            held = self._partition[:hw][self._last_used[:hw] != _FREE]
        partitions, counts = np.unique(held, return_counts=True)
        return dict(zip(partitions.tolist(), counts.tolist(), strict=True))

    def restore(self, snapshot: Snapshot, now: float) -> None:
        """Put a stream back as a snapshot recorded it (from the changelog); not dirty."""
        if len(snapshot.states) != len(self._specs):
            raise ValueError(
                f"snapshot of {snapshot.key!r}: {len(snapshot.states)} states, "
                f"the model has {len(self._specs)}"
            )
        self.restore_many(
            [snapshot.key],
            [snapshot.partition],
            [snapshot.offset],
            [snapshot.step],
            [array[np.newaxis] for array in snapshot.states],
            now,
            missed=[snapshot.missed],
        )

    def restore_many(
        self,
        keys: Sequence[bytes],
        partitions: ArrayLike,
        offsets: ArrayLike,
        steps: ArrayLike,
        states: Sequence[NDArray[np.float32]],
        now: float,
        missed: ArrayLike | None = None,
    ) -> None:
        """Put many streams back at once (a changelog restore): `states[i]` is
        `[len(keys), *shape]` for state tensor i, `missed[i]` the events stream i's
        state never saw (default 0). Keys must be distinct. Restored streams are not
        dirty: the changelog already holds them."""
        for spec, array in zip(self._specs, states, strict=True):
            if array.shape[1:] != spec.shape or len(array) != len(keys):
                raise ValueError(
                    f"restore: state {spec.name!r} has shape {list(array.shape)}, "
                    f"expected [{len(keys)}, {', '.join(map(str, spec.shape))}]"
                )
        partitions = np.asarray(partitions, dtype=np.int32)
        offsets = np.asarray(offsets, dtype=np.int64)
        steps = np.asarray(steps, dtype=np.int64)
        missing = (
            np.zeros(len(keys), dtype=np.int64)
            if missed is None
            else np.asarray(missed, dtype=np.int64)
        )
        # At most max_streams per acquire: a restore larger than the cap keeps the
        # last streams read, like the LRU order of a live run would.
        chunk = self._max_streams
        for start in range(0, len(keys), chunk):
            part = slice(start, start + chunk)
            with self.lock:  # per chunk: a stream is readable whole, not half restored
                slots = self._acquire(keys[part], partitions[part], offsets[part], now)
                for slab, array in zip(self._slabs, states, strict=True):
                    slab[slots] = array[part]
                self._steps[slots] = steps[part]
                self._missed[slots] = missing[part]
                self._dirty[slots] = False

    def already_applied(
        self, keys: Sequence[bytes], partitions: ArrayLike, offsets: ArrayLike
    ) -> NDArray[np.bool_]:
        """For each event, whether its state already holds it: the stream's last
        event came from the same partition at this offset or later. True only for
        replays (after a restore from a snapshot newer than the committed offset),
        since offsets only grow within a partition."""
        index = self._index
        slots = np.fromiter(map(index.get, keys, repeat(-1)), dtype=np.int64, count=len(keys))
        known = slots >= 0
        found = slots[known]
        applied = np.zeros(len(keys), dtype=np.bool_)
        applied[known] = (self._partition[found] == np.asarray(partitions)[known]) & (
            self._offset[found] >= np.asarray(offsets)[known]
        )
        return applied

    # ------------------------------------------------------------------ housekeeping

    def evict_idle(self, now: float) -> int:
        """Forget streams not seen for `idle_ttl_seconds` (tombstones queued); returns how many."""
        if self._ttl <= 0:
            return 0
        with self.lock:
            hw = self._high_water
            idle = (self._last_used[:hw] != _FREE) & (self._last_seen[:hw] < now - self._ttl)
            victims = np.flatnonzero(idle)
            forgotten = self._remove(victims, tombstone=True)
        if len(victims) and self._on_evict is not None:
            self._on_evict("ttl", len(victims))
        if forgotten and self._on_forget is not None:
            self._on_forget(forgotten)
        return len(victims)

    def drop_partition(self, partition: int) -> int:
        """Forget the streams read from `partition` (revoked), without tombstones: the
        changelog keeps them for the next owner. Returns how many were dropped."""
        with self.lock:
            hw = self._high_water
            mask = (self._last_used[:hw] != _FREE) & (self._partition[:hw] == partition)
            victims = np.flatnonzero(mask)
            self._remove(victims, tombstone=False)
            self._tombstones = {k: p for k, p in self._tombstones.items() if p != partition}
            return len(victims)

    def forget(self, keys: Sequence[bytes]) -> int:
        """Forget the streams of `keys` that are held (tombstones queued), as an eviction
        would, without calling `on_evict` or `on_forget`; returns how many there were."""
        with self.lock:
            index = self._index
            slots = np.fromiter((index[k] for k in keys if k in index), dtype=np.int64, count=-1)
            self._remove(slots, tombstone=True)
            return len(slots)

    def rows(self, partitions: Collection[int], *, with_states: bool = True) -> Rows:
        """Copies of the streams read from `partitions`, as columns (nothing changes:
        unlike `drain_dirty_rows`, no stream is marked clean). Without `with_states`, the
        states are left out (`states` is empty): only the columns are copied."""
        slots = self._slots_of(partitions)
        keys = self._keys
        return Rows(
            keys=[cast(bytes, keys[slot]) for slot in slots.tolist()],  # used slots hold a key
            partitions=self._partition[slots],
            offsets=self._offset[slots],
            steps=self._steps[slots],
            states=tuple(slab[slots] for slab in self._slabs) if with_states else (),
            missed=self._missed[slots],
        )

    def count_cold(self, partitions: Collection[int] | None = None) -> tuple[int, int]:
        """(streams whose state missed events, streams) among those read from `partitions`
        (None: every stream held)."""
        if partitions is None:
            hw = self._high_water
            used = self._last_used[:hw] != _FREE
            return int(np.count_nonzero(self._missed[:hw][used])), int(np.count_nonzero(used))
        slots = self._slots_of(partitions)
        return int(np.count_nonzero(self._missed[slots])), len(slots)

    def accept_missed(self, partitions: Collection[int]) -> int:
        """Stop counting the streams of `partitions` as having missed events, and mark
        them dirty so that their next snapshots say so too; returns how many there were.
        (A promotion that accepted them: `pipeline.shadow`.)"""
        with self.lock:
            slots = self._slots_of(partitions)
            cold = slots[self._missed[slots] > 0]
            self._missed[cold] = 0
            self._dirty[cold] = True
            return len(cold)

    def drain_dirty_rows(self) -> Rows:
        """The streams changed since the last drain, as columns; they are clean afterwards."""
        slots = np.flatnonzero(self._dirty[: self._high_water])
        self._dirty[slots] = False
        keys = self._keys
        return Rows(
            keys=[cast(bytes, keys[slot]) for slot in slots.tolist()],  # dirty slots hold a key
            partitions=self._partition[slots],
            offsets=self._offset[slots],
            steps=self._steps[slots],
            states=tuple(slab[slots] for slab in self._slabs),
            missed=self._missed[slots],
        )

    def drain_dirty(self) -> list[Snapshot]:
        """Snapshots of the streams changed since the last drain; they are clean afterwards."""
        rows = self.drain_dirty_rows()
        missed = rows.missed_or_zeros()
        return [
            Snapshot(
                key=key,
                partition=int(rows.partitions[i]),
                offset=int(rows.offsets[i]),
                step=int(rows.steps[i]),
                states=tuple(state[i] for state in rows.states),
                missed=int(missed[i]),
            )
            for i, key in enumerate(rows.keys)
        ]

    def drain_tombstones(self) -> list[tuple[bytes, int]]:
        """`(key, partition)` of the streams evicted since the last drain."""
        tombstones, self._tombstones = list(self._tombstones.items()), {}
        return tombstones

    # ------------------------------------------------------------------ internals

    def _snapshot(self, slot: int) -> Snapshot:
        key = self._keys[slot]
        if key is None:
            raise KeyError(f"slot {slot} holds no stream")
        return Snapshot(
            key=key,
            partition=int(self._partition[slot]),
            offset=int(self._offset[slot]),
            step=int(self._steps[slot]),
            states=tuple(slab[slot].copy() for slab in self._slabs),
            missed=int(self._missed[slot]),
        )

    def _slots_of(self, partitions: Collection[int]) -> Slots:
        """The used slots of streams read from `partitions`."""
        hw = self._high_water
        used = (self._last_used[:hw] != _FREE) & np.isin(
            self._partition[:hw], np.fromiter(partitions, dtype=np.int32)
        )
        return np.flatnonzero(used).astype(np.int64)

    def _clear(self, slots: Slots) -> None:
        for slab in self._slabs:
            slab[slots] = 0.0
        self._steps[slots] = 0
        self._missed[slots] = 0
        self._dirty[slots] = False

    def _take_slots(self, count: int) -> list[int]:
        """`count` unused slots (room was made): freed ones first, then never-used ones."""
        reused = min(count, len(self._free))
        taken = self._free[len(self._free) - reused :][::-1]  # last freed first, like pop()
        del self._free[len(self._free) - reused :]
        start = self._high_water
        self._high_water += count - reused
        return [*taken, *range(start, self._high_water)]

    def _make_room(self, needed: int) -> None:
        """Grow, then evict least recently used, until `needed` slots are free."""
        available = len(self._free) + self.capacity - self._high_water
        if needed > available and self.capacity < self._max_streams:
            target = self.capacity
            while (
                target - self._high_water + len(self._free) < needed and target < self._max_streams
            ):
                target *= 2
            self._grow(min(target, self._max_streams))
            available = len(self._free) + self.capacity - self._high_water
        if needed > available:
            self._evict_lru(needed - available)

    def _grow(self, capacity: int) -> None:
        extra = capacity - self.capacity
        self._slabs = [
            np.concatenate([slab, np.zeros((extra, *slab.shape[1:]), dtype=np.float32)])
            for slab in self._slabs
        ]
        self._keys.extend([None] * extra)
        self._steps = np.concatenate([self._steps, np.zeros(extra, dtype=np.int64)])
        self._last_seen = np.concatenate([self._last_seen, np.zeros(extra, dtype=np.float64)])
        self._last_used = np.concatenate([self._last_used, np.full(extra, _FREE, dtype=np.int64)])
        self._partition = np.concatenate([self._partition, np.full(extra, -1, dtype=np.int32)])
        self._offset = np.concatenate([self._offset, np.full(extra, -1, dtype=np.int64)])
        self._dirty = np.concatenate([self._dirty, np.zeros(extra, dtype=np.bool_)])
        self._missed = np.concatenate([self._missed, np.zeros(extra, dtype=np.int64)])

    def _evict_lru(self, count: int) -> None:
        used = self._last_used[: self._high_water]
        victims = (
            np.argpartition(used, count - 1)[:count] if count < len(used) else np.arange(len(used))
        )
        if (used[victims] >= self._tick).any():
            raise ValueError(
                "cannot evict a stream of the current call: the call exceeds max_streams"
            )
        forgotten = self._remove(victims.astype(np.int64), tombstone=True)
        if self._on_evict is not None:
            self._on_evict("lru", count)
        if forgotten and self._on_forget is not None:
            self._on_forget(forgotten)

    def _remove(self, slots: Slots, *, tombstone: bool) -> list[bytes]:
        """Free `slots`; returns the keys they held."""
        removed = []
        for slot in slots.tolist():
            key = self._keys[slot]
            if key is None:
                continue
            del self._index[key]
            if tombstone:
                self._tombstones[key] = int(self._partition[slot])
            self._keys[slot] = None
            self._free.append(slot)
            removed.append(key)
        self._last_used[slots] = _FREE
        self._partition[slots] = -1
        self._dirty[slots] = False
        return removed
