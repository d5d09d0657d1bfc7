"""The checker itself: it must see each anomaly it reports, or the campaign proves nothing.

Fast (no broker): the records are built by hand; the snapshot decoding is
checked against the server's own encoder, the one place the two must agree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest

from pipeline.changelog import SnapshotCodec
from pipeline.state_store import Snapshot
from pipeline.testing import random_weights
from tests.chaos.checker import _decode, judge
from tests.chaos.producer import Delivered, written
from tests.chaos.reference import Truth


@dataclass
class Record:
    """What the checker reads of a Kafka message."""

    partition_: int
    offset_: int
    key_: bytes | None
    value_: bytes | None
    headers_: list[tuple[str, bytes]] | None = None

    def partition(self) -> int:
        return self.partition_

    def offset(self) -> int:
        return self.offset_

    def key(self) -> bytes | None:
        return self.key_

    def value(self) -> bytes | None:
        return self.value_

    def headers(self) -> list[tuple[str, bytes]] | None:
        return self.headers_


STATE = np.arange(4, dtype=np.float32)


def truth(step: int) -> Truth:
    return Truth(b"s0", step, {"y": np.array([step, -step], np.float32)}, {"h": STATE * step})


# s0 has three events at input offsets 10, 11, 12 of partition 0; offset 13 is a bad one.
DELIVERED = [Delivered(b"s0", i, 0, 10 + i, (0.0,)) for i in range(3)] + [
    Delivered(b"s0", -1, 0, 13, ())
]
TRUTHS = {(0, 10 + i): truth(i + 1) for i in range(3)}


def prediction(
    offset: int, at: int, step: int | None = None, y: list[float] | None = None
) -> Record:
    step = offset - 9 if step is None else step
    value = {
        "source": {"partition": 0, "offset": offset},
        "step": step,
        "outputs": {"y": y if y is not None else [step, -step]},
    }
    return Record(0, at, b"s0", json.dumps(value).encode())


DEAD = [
    Record(
        0,
        0,
        b"s0",
        b"{not json",
        [("hiddenstate.source.partition", b"0"), ("hiddenstate.source.offset", b"13")],
    )
]


def snapshot(step: int, offset: int, state: np.ndarray, at: int) -> Record:
    spec = random_weights("gru", n_features=1, hidden=4, layers=1, n_outputs=2).spec
    value = SnapshotCodec(spec).encode(Snapshot(b"s0", 0, offset, step, [state.reshape(1, 4)]))
    return Record(0, at, b"s0", value)


def report_of(outputs, dead=DEAD, changelog=(), exactly_once=False):
    return judge(
        list(outputs),
        list(dead),
        {"changelog": list(changelog)},
        DELIVERED,
        TRUTHS,
        exactly_once=exactly_once,
        final_round={(0, 12)},
    )


GOOD = [prediction(10, 0), prediction(11, 1), prediction(12, 2)]


def test_a_clean_run_passes():
    report = report_of(GOOD, changelog=[snapshot(2, 11, STATE * 2, 0)])
    assert report.ok
    assert (report.events, report.predictions, report.snapshots) == (3, 3, 1)


def test_an_event_without_a_prediction_is_lost():
    assert report_of(GOOD[:2]).lost == 1


def test_a_prediction_off_the_reference_is_a_wrong_value_and_counts_after_the_final_restart():
    report = report_of([*GOOD[:2], prediction(12, 2, y=[3.0, -2.9])])
    assert (report.wrong_values, report.streams_wrong_after_final_restart) == (1, 1)
    assert not report.ok


def test_a_prediction_with_the_wrong_step_is_counted():
    assert report_of([GOOD[0], prediction(11, 1, step=5), GOOD[2]]).wrong_steps == 1


def test_a_replay_under_at_least_once_is_a_duplicate_not_a_reordering():
    report = report_of([*GOOD, prediction(11, 3), prediction(12, 4)])
    assert (report.duplicates, report.order_violations, report.ok) == (2, 0, True)


def test_under_exactly_once_any_repeat_is_out_of_order():
    report = report_of([*GOOD, prediction(12, 3)], exactly_once=True)
    assert (report.duplicates, report.order_violations) == (1, 1)


def test_a_new_event_written_before_an_older_one_is_out_of_order():
    written = [prediction(10, 0), prediction(12, 1), prediction(11, 2)]
    assert report_of(written).order_violations == 1


def test_a_bad_event_missing_from_the_dead_letter_topic_is_counted():
    assert report_of(GOOD, dead=[]).dead_letters_missing == 1


def test_a_snapshot_older_than_the_one_before_it_is_stale():
    changelog = [snapshot(3, 12, STATE * 3, 0), snapshot(2, 11, STATE * 2, 1)]
    assert report_of(GOOD, changelog=changelog).stale_snapshots == 1


def test_a_snapshot_whose_state_no_uninterrupted_run_had_is_counted():
    changelog = [snapshot(2, 11, STATE * 2 + 0.5, 0)]
    assert report_of(GOOD, changelog=changelog).snapshots_matching_no_state == 1


@pytest.mark.parametrize("step", [1, 7])
def test_the_documented_snapshot_format_reads_what_the_server_writes(step):
    state = np.linspace(-1, 1, 4, dtype=np.float32) * step
    decoded = _decode(snapshot(step, 1234, state, 0).value())
    assert decoded[:2] == (step, 1234)
    np.testing.assert_array_equal(decoded[2], state)


class _Message:
    def __init__(self, partition: int, offset: int, key: bytes, value: bytes) -> None:
        self._p, self._o, self._k, self._v = partition, offset, key, value

    def partition(self) -> int:
        return self._p

    def offset(self) -> int:
        return self._o

    def key(self) -> bytes:
        return self._k

    def value(self) -> bytes:
        return self._v


def test_the_events_the_log_holds_are_numbered_per_stream_in_offset_order():
    """A write the producer was told failed (the broker killed under it) is in the log, and
    the servers stepped it: the reference steps the log, not the producer's record."""
    log = [
        _Message(0, 7, b"s1", b'{"x": [3.0]}'),
        _Message(0, 5, b"s1", b'{"x": [1.0]}'),
        _Message(0, 6, b"s1", b"{not json"),
    ]
    assert [(e.offset, e.index, e.x) for e in written(log)] == [
        (5, 0, (1.0,)),
        (6, -1, ()),
        (7, 1, (3.0,)),
    ]
