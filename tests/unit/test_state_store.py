import tracemalloc

import numpy as np
import pytest

from pipeline.model_spec import StateSpec
from pipeline.state_store import Snapshot, StateStore

H = StateSpec(name="h", output="h_out", shape=(2, 3))
C = StateSpec(name="c", output="c_out", shape=(4,))


class Evictions:
    def __init__(self):
        self.counts: dict[str, int] = {}

    def __call__(self, cause: str, count: int) -> None:
        self.counts[cause] = self.counts.get(cause, 0) + count


def make_store(max_streams=100, ttl=0.0, capacity=2, on_evict=None) -> StateStore:
    return StateStore(
        (H, C),
        max_streams=max_streams,
        idle_ttl_seconds=ttl,
        initial_capacity=capacity,
        on_evict=on_evict,
    )


def acquire(store, keys, now=0.0, partition=0, offset=0):
    return store.acquire(keys, [partition] * len(keys), [offset] * len(keys), now)


def step(store, keys, value, now=0.0, partition=0, offset=0):
    """Acquire `keys` and write `value` into every state element."""
    slots = acquire(store, keys, now, partition, offset)
    store.scatter(slots, [np.full((len(keys), *s.shape), value, np.float32) for s in (H, C)])
    return slots


def test_a_new_stream_starts_from_zeros_at_step_zero():
    store = make_store()
    slots = acquire(store, [b"a"])
    h, c = store.gather(slots)
    assert h.shape == (1, 2, 3)
    assert c.shape == (1, 4)
    assert not h.any()
    assert not c.any()
    assert store.steps(slots).tolist() == [0]


def test_a_known_stream_keeps_its_slot():
    store = make_store()
    first = acquire(store, [b"a", b"b"])
    assert acquire(store, [b"b", b"a"]).tolist() == first[::-1].tolist()


def test_scatter_then_gather_round_trips_and_counts_a_step():
    store = make_store()
    slots = step(store, [b"a", b"b"], 1.5)
    h, c = store.gather(slots)
    assert (h == 1.5).all()
    assert (c == 1.5).all()
    assert store.steps(slots).tolist() == [1, 1]


def test_gather_returns_copies_not_views():
    store = make_store()
    slots = step(store, [b"a"], 1.0)
    store.gather(slots)[0][:] = 9.0
    assert (store.gather(slots)[0] == 1.0).all()


def test_capacity_doubles_and_keeps_existing_states():
    store = make_store(capacity=2)
    step(store, [b"a", b"b"], 2.0)
    step(store, [b"c", b"d", b"e"], 3.0)
    assert store.capacity == 8
    assert len(store) == 5
    assert (store.gather(acquire(store, [b"a", b"b"]))[0] == 2.0).all()


def test_capacity_never_passes_max_streams():
    store = make_store(max_streams=5, capacity=4)
    acquire(store, [b"a", b"b", b"c", b"d", b"e"])
    assert store.capacity == 5


def test_at_the_cap_the_least_recently_used_stream_is_evicted_and_counted():
    evictions = Evictions()
    store = make_store(max_streams=3, on_evict=evictions)
    for key in (b"a", b"b", b"c"):
        step(store, [key], 1.0)
    acquire(store, [b"a"])  # a is now more recent than b and c
    acquire(store, [b"d"])
    assert sorted(store.keys()) == [b"a", b"c", b"d"]
    assert evictions.counts == {"lru": 1}


def test_an_evicted_stream_gets_a_tombstone_with_its_partition():
    store = make_store(max_streams=1)
    step(store, [b"a"], 1.0, partition=4)
    acquire(store, [b"b"])
    assert store.drain_tombstones() == [(b"a", 4)]
    assert store.drain_tombstones() == []


def test_eviction_never_picks_a_stream_of_the_current_call():
    store = make_store(max_streams=3)
    acquire(store, [b"a", b"b", b"c"])
    acquire(store, [b"c", b"d"])  # c is in the call: a and b are the candidates
    assert b"c" in store
    assert b"d" in store


def test_more_streams_in_one_call_than_the_cap_is_refused():
    with pytest.raises(ValueError, match="3 streams in one call, the store holds 2"):
        acquire(make_store(max_streams=2), [b"a", b"b", b"c"])


def test_an_evicted_stream_comes_back_from_zeros_and_its_tombstone_is_dropped():
    store = make_store(max_streams=1)
    step(store, [b"a"], 5.0)
    acquire(store, [b"b"])
    slots = acquire(store, [b"a"])
    assert not store.gather(slots)[0].any()
    assert store.steps(slots).tolist() == [0]
    assert [key for key, _ in store.drain_tombstones()] == [b"b"]


def test_idle_streams_are_evicted_after_the_ttl_and_counted():
    evictions = Evictions()
    store = make_store(ttl=10.0, on_evict=evictions)
    acquire(store, [b"old"], now=0.0)
    acquire(store, [b"new"], now=8.0)
    assert store.evict_idle(now=12.0) == 1
    assert list(store.keys()) == [b"new"]
    assert evictions.counts == {"ttl": 1}
    assert store.drain_tombstones() == [(b"old", 0)]


def test_a_stream_seen_within_the_ttl_stays():
    store = make_store(ttl=10.0)
    acquire(store, [b"a"], now=0.0)
    assert store.evict_idle(now=10.0) == 0


def test_a_zero_ttl_never_evicts():
    store = make_store(ttl=0.0)
    acquire(store, [b"a"], now=0.0)
    assert store.evict_idle(now=1e12) == 0


def test_a_freed_slot_is_reused():
    store = make_store(ttl=1.0, capacity=2)
    acquire(store, [b"a", b"b"], now=0.0)
    store.evict_idle(now=5.0)
    acquire(store, [b"c", b"d"], now=5.0)
    assert store.capacity == 2


def test_reset_zeros_state_and_step_and_marks_the_stream_dirty():
    store = make_store()
    slots = step(store, [b"a"], 3.0)
    store.drain_dirty()
    assert store.reset(b"a") is True
    assert not store.gather(slots)[0].any()
    assert store.steps(slots).tolist() == [0]
    assert [s.key for s in store.drain_dirty()] == [b"a"]


def test_reset_of_an_unknown_stream_says_so():
    assert make_store().reset(b"nobody") is False


def test_dropping_a_partition_forgets_its_streams_without_tombstones():
    store = make_store(max_streams=3)
    step(store, [b"a", b"b"], 1.0, partition=0)
    step(store, [b"c"], 1.0, partition=1)
    acquire(store, [b"d"], partition=1)  # evicts a (LRU): a tombstone on partition 0
    assert store.drop_partition(0) == 1
    assert sorted(store.keys()) == [b"c", b"d"]
    assert store.drain_tombstones() == []
    assert [s.key for s in store.drain_dirty()] == [b"c"]


def test_drain_dirty_returns_each_changed_stream_once():
    store = make_store()
    step(store, [b"a", b"b"], 1.0)
    acquire(store, [b"c"])  # acquired, never stepped: nothing to save
    assert sorted(s.key for s in store.drain_dirty()) == [b"a", b"b"]
    assert store.drain_dirty() == []


def test_a_snapshot_records_state_step_partition_and_offset():
    store = make_store()
    step(store, [b"a"], 2.0, partition=3, offset=41)
    snap = store.snapshot(b"a")
    assert (snap.key, snap.partition, snap.offset, snap.step) == (b"a", 3, 41, 1)
    assert (snap.states[0] == 2.0).all()
    assert snap.states[1].shape == (4,)


def test_a_snapshot_of_an_unknown_stream_is_none():
    assert make_store().snapshot(b"a") is None


def test_a_snapshot_restores_into_another_store_as_clean():
    source = make_store()
    step(source, [b"a"], 2.5, partition=1, offset=9)
    target = make_store()
    target.restore(source.snapshot(b"a"), now=0.0)
    snap = target.snapshot(b"a")
    assert (snap.partition, snap.offset, snap.step) == (1, 9, 1)
    assert (snap.states[0] == 2.5).all()
    assert target.drain_dirty() == []


def test_a_snapshot_of_another_shape_is_refused():
    bad = Snapshot(
        key=b"a",
        partition=0,
        offset=0,
        step=1,
        states=(np.zeros((2, 2), np.float32), np.zeros(4, np.float32)),
    )
    with pytest.raises(ValueError, match=r"state 'h' has shape \[1, 2, 2\], expected \[1, 2, 3\]"):
        make_store().restore(bad, now=0.0)


def test_a_repeated_key_in_one_call_gets_one_slot():
    store = make_store()
    slots = acquire(store, [b"a", b"a"])
    assert slots[0] == slots[1]
    assert len(store) == 1


def test_nbytes_counts_slabs_and_columns():
    store = make_store(capacity=4)
    state_bytes = 4 * (2 * 3 + 4) * 4
    assert state_bytes < store.nbytes < state_bytes + 4 * 64


def test_memory_per_stream_is_the_state_plus_a_small_constant():
    # bench/measure_state_store.py measures 100k streams for docs/state-store.md;
    # this guards the order of magnitude.
    n = 20_000
    keys = [b"device-%08d" % i for i in range(n)]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    store = StateStore((H,), max_streams=n, initial_capacity=1024)
    for start in range(0, n, 256):
        chunk = keys[start : start + 256]
        store.acquire(chunk, np.zeros(len(chunk)), np.zeros(len(chunk)), 0.0)
    per_stream = (tracemalloc.get_traced_memory()[0] - before) / n
    tracemalloc.stop()
    assert per_stream - H.nbytes < 256


def test_restore_many_puts_states_steps_and_offsets_back_clean():
    store = make_store()
    h = np.arange(2 * 2 * 3, dtype=np.float32).reshape(2, 2, 3)
    c = np.ones((2, 4), np.float32)
    store.restore_many([b"a", b"b"], [1, 2], [10, 20], [5, 6], [h, c], now=0.0)
    snapshot = store.snapshot(b"b")
    assert (snapshot.partition, snapshot.offset, snapshot.step) == (2, 20, 6)
    np.testing.assert_array_equal(snapshot.states[0], h[1])
    assert store.drain_dirty() == []


def test_an_event_at_or_before_the_restored_offset_is_already_applied():
    store = make_store()
    h, c = np.zeros((1, 2, 3), np.float32), np.zeros((1, 4), np.float32)
    store.restore_many([b"a"], [1], [10], [5], [h, c], now=0.0)
    applied = store.already_applied([b"a", b"a", b"a", b"b"], [1, 1, 2, 1], [9, 11, 3, 0])
    assert applied.tolist() == [True, False, False, False]


def test_a_new_stream_has_missed_no_event():
    store = make_store()
    assert store.missed(acquire(store, [b"a"])).tolist() == [0]


def test_the_missed_count_travels_with_the_snapshot_and_back():
    store = make_store()
    slots = step(store, [b"a"], 1.0, offset=7)
    store.set_missed(slots, [5])
    snapshot = store.snapshot(b"a")
    other = make_store()
    other.restore(snapshot, now=0.0)
    assert other.snapshot(b"a").missed == 5


def test_drained_rows_carry_the_missed_counts():
    store = make_store()
    slots = step(store, [b"a", b"b"], 1.0)
    store.set_missed(slots[:1], [3])
    rows = store.drain_dirty_rows()
    assert dict(zip(rows.keys, rows.missed.tolist(), strict=True)) == {b"a": 3, b"b": 0}


def test_a_reset_clears_the_missed_count():
    store = make_store()
    store.set_missed(step(store, [b"a"], 1.0), [4])
    store.reset(b"a")
    assert store.snapshot(b"a").missed == 0


def test_reset_slots_zero_states_steps_and_missed_and_mark_them_dirty():
    store = make_store()
    slots = step(store, [b"a"], 1.0)
    store.set_missed(slots, [2])
    store.drain_dirty_rows()
    store.reset_slots(slots)
    snapshot = store.snapshot(b"a")
    assert (snapshot.step, snapshot.missed, float(snapshot.states[0].max())) == (0, 0, 0.0)
    assert store.drain_dirty_rows().keys == [b"a"]


def test_evicted_keys_are_handed_to_on_forget_at_the_cap_and_after_the_ttl():
    forgotten: list[bytes] = []
    store = StateStore((H, C), max_streams=2, idle_ttl_seconds=10.0, on_forget=forgotten.extend)
    acquire(store, [b"a"], now=0.0)
    acquire(store, [b"b"], now=5.0)
    acquire(store, [b"c"], now=6.0)  # a is the least recently used
    store.evict_idle(now=15.5)  # b idle 10.5 s
    assert forgotten == [b"a", b"b"]


def test_a_dropped_partition_is_not_handed_to_on_forget():
    forgotten: list[bytes] = []
    store = StateStore((H, C), max_streams=10, on_forget=forgotten.extend)
    acquire(store, [b"a"], partition=3)
    store.drop_partition(3)
    assert forgotten == []


def test_forget_removes_held_streams_with_tombstones_and_skips_unknown_ones():
    store = make_store()
    acquire(store, [b"a", b"b"], partition=1)
    assert store.forget([b"a", b"zz"]) == 1
    assert list(store.keys()) == [b"b"]
    assert store.drain_tombstones() == [(b"a", 1)]


def test_rows_copy_the_streams_of_some_partitions_without_cleaning_them():
    store = make_store()
    step(store, [b"a"], 1.0, partition=0, offset=4)
    step(store, [b"b"], 2.0, partition=1, offset=9)
    rows = store.rows([1])
    assert (rows.keys, rows.offsets.tolist(), rows.steps.tolist()) == ([b"b"], [9], [1])
    assert sorted(store.drain_dirty_rows().keys) == [b"a", b"b"]


def test_cold_streams_are_counted_by_partition():
    store = make_store()
    store.set_missed(step(store, [b"a", b"b"], 1.0, partition=0), [2, 0])
    store.set_missed(step(store, [b"c"], 1.0, partition=1), [1])
    assert store.count_cold([0]) == (1, 2)
    assert store.count_cold() == (2, 3)


def test_accepting_missed_events_clears_them_and_marks_those_streams_dirty():
    store = make_store()
    store.set_missed(step(store, [b"a", b"b"], 1.0, partition=0), [2, 0])
    store.drain_dirty_rows()
    assert store.accept_missed([0]) == 1
    assert store.count_cold([0]) == (0, 2)
    assert store.drain_dirty_rows().keys == [b"a"]


def test_rows_without_states_copy_only_the_columns():
    store = make_store()
    step(store, [b"a"], 1.0, offset=4)
    rows = store.rows([0], with_states=False)
    assert (rows.keys, rows.offsets.tolist(), rows.states) == ([b"a"], [4], ())
