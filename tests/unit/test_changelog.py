"""Snapshot encoding: exact round trips, and refusal of any other model's snapshots."""

from __future__ import annotations

import numpy as np

from pipeline.changelog import SnapshotCodec
from pipeline.state_store import Rows, Snapshot
from pipeline.testing import random_weights


def lstm_spec(seed: int = 0, hidden: int = 4):
    return random_weights("lstm", n_features=2, hidden=hidden, layers=2, seed=seed).spec


def snapshot(spec, key=b"k", step=7, offset=41, fill=0.5):
    states = tuple(
        np.full(s.shape, fill, np.float32) + np.arange(np.prod(s.shape)).reshape(s.shape)
        for s in spec.states
    )
    return Snapshot(key=key, partition=3, offset=offset, step=step, states=states)


def test_a_snapshot_round_trips_bit_for_bit():
    spec = lstm_spec()
    codec = SnapshotCodec(spec)
    original = snapshot(spec)
    value = codec.encode(original)
    assert codec.fits(value)
    assert codec.numbers(value) == (7, 41)
    decoded = codec.states([value])
    for array, state in zip(decoded, original.states, strict=True):
        np.testing.assert_array_equal(array[0], state)


def test_many_snapshots_decode_at_once_in_order():
    spec = lstm_spec()
    codec = SnapshotCodec(spec)
    values = [codec.encode(snapshot(spec, fill=float(i))) for i in range(5)]
    h, c = codec.states(values)
    assert h.shape == (5, 2, 4)
    assert c.shape == (5, 2, 4)
    assert [float(h[i, 0, 0]) for i in range(5)] == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_the_value_length_is_header_numbers_and_state_bytes():
    spec = lstm_spec()
    codec = SnapshotCodec(spec)
    assert len(codec.encode(snapshot(spec))) == codec.length
    assert codec.length > spec.state_bytes + 16


def test_a_snapshot_of_another_model_identity_does_not_fit():
    ours, retrained = SnapshotCodec(lstm_spec(seed=0)), SnapshotCodec(lstm_spec(seed=1))
    assert not ours.fits(retrained.encode(snapshot(lstm_spec(seed=1))))


def test_a_snapshot_of_another_state_shape_does_not_fit():
    small, large = lstm_spec(hidden=4), lstm_spec(hidden=5)
    assert not SnapshotCodec(small).fits(SnapshotCodec(large).encode(snapshot(large)))


def test_bytes_that_are_no_snapshot_do_not_fit():
    assert not SnapshotCodec(lstm_spec()).fits(b'{"x": [1, 2]}')


def rows_of(snapshots: list[Snapshot]) -> Rows:
    return Rows(
        keys=[s.key for s in snapshots],
        partitions=np.array([s.partition for s in snapshots], np.int32),
        offsets=np.array([s.offset for s in snapshots], np.int64),
        steps=np.array([s.step for s in snapshots], np.int64),
        states=tuple(
            np.stack([s.states[i] for s in snapshots]) if snapshots else np.zeros((0, 2, 4))
            for i in range(2)
        ),
    )


def test_encoding_many_gives_the_same_bytes_as_encoding_each():
    spec = lstm_spec()
    codec = SnapshotCodec(spec)
    snapshots = [snapshot(spec, key=b"k%d" % i, step=i, offset=10 * i, fill=i) for i in range(4)]
    assert codec.encode_many(rows_of(snapshots)) == [codec.encode(s) for s in snapshots]
    assert codec.encode_many(rows_of([])) == []


def test_decoding_many_keeps_the_fitting_values_and_says_which_they_are():
    spec = lstm_spec()
    codec = SnapshotCodec(spec)
    other = lstm_spec(seed=1)
    values = [
        codec.encode(snapshot(spec, step=3, offset=30, fill=1.0)),
        SnapshotCodec(other).encode(snapshot(other)),  # another model: same length, other header
        b"not a snapshot",
        codec.encode(snapshot(spec, step=5, offset=50, fill=2.0)),
    ]
    decoded = codec.decode_many(values)
    assert decoded.indexes.tolist() == [0, 3]
    assert decoded.steps.tolist() == [3, 5]
    assert decoded.offsets.tolist() == [30, 50]
    for state, expected in zip(decoded.states, snapshot(spec, fill=2.0).states, strict=True):
        np.testing.assert_array_equal(state[1], expected)
    assert len(codec.decode_many([]).indexes) == 0


def missed_snapshot(spec, missed, **kwargs):
    plain = snapshot(spec, **kwargs)
    return Snapshot(plain.key, plain.partition, plain.offset, plain.step, plain.states, missed)


def test_a_snapshot_that_missed_no_event_is_written_as_before():
    spec = lstm_spec()
    value = SnapshotCodec(spec).encode(missed_snapshot(spec, 0))
    assert value.startswith(b"HSS1")
    assert value == SnapshotCodec(spec).encode(snapshot(spec))


def test_a_snapshot_that_missed_events_round_trips_with_their_count():
    spec = lstm_spec()
    codec = SnapshotCodec(spec)
    value = codec.encode(missed_snapshot(spec, 12, step=3, offset=40))
    assert value.startswith(b"HSS2")
    assert codec.fits(value)
    assert codec.numbers(value) == (3, 40)
    decoded = codec.decode_many([value])
    assert (decoded.steps.tolist(), decoded.offsets.tolist(), decoded.missed.tolist()) == (
        [3],
        [40],
        [12],
    )
    for state, expected in zip(decoded.states, snapshot(spec).states, strict=True):
        np.testing.assert_array_equal(state[0], expected)


def test_many_snapshots_some_of_which_missed_events_encode_and_decode_in_order():
    spec = lstm_spec()
    codec = SnapshotCodec(spec)
    snapshots = [
        missed_snapshot(spec, i % 2 * (i + 5), key=b"k%d" % i, step=i, offset=10 * i, fill=i)
        for i in range(5)
    ]
    rows = rows_of(snapshots)
    rows = Rows(rows.keys, rows.partitions, rows.offsets, rows.steps, rows.states,
                np.array([s.missed for s in snapshots], np.int64))  # fmt: skip
    values = codec.encode_many(rows)
    assert values == [codec.encode(s) for s in snapshots]
    decoded = codec.decode_many(values)
    order = np.argsort(decoded.indexes)
    assert decoded.missed[order].tolist() == [0, 6, 0, 8, 0]
    assert decoded.steps[order].tolist() == [0, 1, 2, 3, 4]
    assert [float(decoded.states[0][i, 0, 0]) for i in order] == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_a_snapshot_of_another_model_that_missed_events_does_not_fit():
    ours, theirs = lstm_spec(seed=0), lstm_spec(seed=1)
    value = SnapshotCodec(theirs).encode(missed_snapshot(theirs, 4))
    assert not SnapshotCodec(ours).fits(value)
    assert len(SnapshotCodec(ours).decode_many([value]).indexes) == 0
