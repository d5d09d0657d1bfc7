"""The serving loop and its committers over the in-memory Kafka of `pipeline.testing`.

What is checked is the order of effects and who may write what: outputs
acknowledged before their offsets are committed, snapshots and offsets made
visible together, revocations checkpointed, lost partitions never written,
and a member that was evicted while it stood still unable to make anything
of its late work visible (each finding of the fault campaign, issue 10).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import pytest

from pipeline.changelog import Changelog
from pipeline.delivery import CheckpointSchedule
from pipeline.delivery.at_least_once import AtLeastOnce, SpreadSettings
from pipeline.delivery.exactly_once import ExactlyOnce
from pipeline.errors import DeliveryError, TransactionTimeoutError
from pipeline.health import LoopState
from pipeline.loop import LoopSettings, ServeLoop
from pipeline.pause import PauseWatch
from pipeline.testing import FakeKafka, ManualClock, NumpyStepModel

INPUT, OUTPUT, CHANGELOG = "events", "predictions", "events.changelog"


def ev(i: int = 0) -> bytes:
    return json.dumps({"x": [0.1 * i, -0.2 * i, 0.3]}).encode()


class Member:
    """One serving member (processor, committer, loop) over a shared `FakeKafka`."""

    def __init__(
        self,
        kafka: FakeKafka,
        make_processor: Any,
        model: NumpyStepModel,
        metrics: Any,
        *,
        exactly_once: bool = False,
        interval_s: float = 10.0,
        interval_events: int = 0,
        spread: SpreadSettings | None = None,
        pause_limit_s: float | None = None,
        transaction_timeout_s: float = 60.0,
        name: str = "m0",
    ) -> None:
        self.kafka = kafka
        self.processor = make_processor(model)
        self.health = LoopState(clock=kafka.clock)
        self.metrics = metrics
        transport = kafka.transport("group")
        self.changelog = Changelog(
            CHANGELOG,
            model.spec,
            self.processor.store,
            metrics,
            transport.changelog_reader(1.0),
            clock=kafka.clock,
        )
        schedule = CheckpointSchedule(interval_s, interval_events, kafka.clock)
        if exactly_once:
            self.committer: Any = ExactlyOnce(
                transport.transactional_sink(f"group-{name}", transaction_timeout_s),
                self.changelog.changes,
                schedule,
                metrics,
                clock=kafka.clock,
            )
        else:
            self.committer = AtLeastOnce(
                transport.sink(),
                transport.transactional_sink(f"group-{name}-states", transaction_timeout_s),
                self.changelog.changes,
                schedule,
                metrics,
                self.health.beat,
                spread,
                clock=kafka.clock,
            )
        self.pause_watch = (
            PauseWatch(pause_limit_s, clock=kafka.clock) if pause_limit_s is not None else None
        )
        self.loop = ServeLoop(
            LoopSettings(),
            self.processor,
            self.committer,
            lambda a, r, lo: transport.source(INPUT, a, r, lo, read_committed=exactly_once),
            metrics,
            self.health,
            self.changelog,
            self.pause_watch,
            clock=kafka.clock,
        )
        self.source = self.loop._source

    def serve(self, polls: int = 1) -> None:
        for _ in range(polls):
            self.loop.run_once()

    def steps(self) -> dict[bytes, int]:
        """Each stream's step count in memory now."""
        store = self.processor.store
        snapshots = {key: store.snapshot(key) for key in store.keys()}  # noqa: SIM118 (not iterable)
        return {key: s.step for key, s in snapshots.items() if s is not None}


@pytest.fixture
def kafka(clock: ManualClock) -> FakeKafka:
    broker = FakeKafka(clock, session_timeout_s=10.0)
    broker.create_topic(INPUT, 2)
    broker.create_topic(OUTPUT, 2)
    broker.create_topic(f"{INPUT}.dead-letter", 2)
    broker.create_topic(CHANGELOG, 2)
    return broker


@pytest.fixture
def member(kafka, make_processor, numpy_gru, metrics):
    def build(**options: Any) -> Member:
        return Member(kafka, make_processor, numpy_gru, metrics, **options)

    return build


def kinds(kafka: FakeKafka) -> list[str]:
    return [kind for kind, _ in kafka.journal]


def visible(kafka: FakeKafka, topic: str) -> list[tuple[bytes | None, int]]:
    """(key, partition) of what a read_committed reader sees of `topic`."""
    return [(r.key, p) for p, r in kafka.records(topic)]


def predictions(kafka: FakeKafka, *, committed_only: bool = True) -> list[dict[str, Any]]:
    return [
        json.loads(r.value or b"null")
        for _, r in kafka.records(OUTPUT, committed_only=committed_only)
    ]


# -- at-least-once: the order of effects ----------------------------------------------


def test_outputs_are_acknowledged_before_the_offsets_of_their_batch_are_committed(kafka, member):
    m = member(interval_s=0.0)
    kafka.produce(INPUT, [(b"a", ev(1)), (b"b", ev(2))])
    m.serve()
    order = kinds(kafka)
    assert order.index("flush") < order.index("commit")
    committed = {p: kafka.committed("group", INPUT, p) for p in (0, 1)}
    assert sum(o or 0 for o in committed.values()) == 2


def test_snapshots_and_offsets_become_visible_together_in_one_transaction(kafka, member):
    m = member(interval_s=0.0)
    kafka.produce(INPUT, [(b"a", ev(1))])
    m.serve()
    order = kinds(kafka)
    begin = order.index("begin")
    snapshot = order.index("send", order.index("flush"))
    assert begin < snapshot < order.index("commit")
    assert [key for key, _ in visible(kafka, CHANGELOG)] == [b"a"]


def test_nothing_is_committed_before_the_checkpoint_interval(kafka, member):
    m = member(interval_s=5.0)
    kafka.produce(INPUT, [(b"a", ev(1))])
    m.serve()
    assert "commit" not in kinds(kafka)
    assert visible(kafka, CHANGELOG) == []
    kafka.advance(5.0)
    m.serve()
    assert "commit" in kinds(kafka)


def test_a_checkpoint_also_follows_a_count_of_events(kafka, member):
    m = member(interval_s=60.0, interval_events=3)
    kafka.produce(INPUT, [(b"a", ev(1)), (b"a", ev(2)), (b"b", ev(3))])
    m.serve()
    assert "commit" in kinds(kafka)


def test_bad_events_are_sent_to_the_dead_letter_topic_and_their_offsets_committed(kafka, member):
    m = member(interval_s=0.0)
    kafka.produce(INPUT, [(b"a", b"not json")])
    m.serve()
    partition = kafka.partition_for(INPUT, b"a")
    assert visible(kafka, f"{INPUT}.dead-letter") == [(b"a", partition)]
    assert kafka.committed("group", INPUT, partition) == 1


def test_a_broker_outage_keeps_the_loop_waiting_and_beating_until_the_acks_come(
    kafka, member, monkeypatch
):
    m = member(interval_s=0.0)
    sink = m.committer._outputs
    real_flush = sink.flush
    waits = iter([True, True, True])

    def flush(timeout_s: float) -> None:
        kafka.clock.advance(30.0)  # each wait lasts 30 s: 90 s of outage
        kafka.down = next(waits, False)
        real_flush(timeout_s)

    monkeypatch.setattr(sink, "flush", flush)
    kafka.produce(INPUT, [(b"a", ev(1))])
    m.serve()
    assert m.health.live()[0] is True  # beaten after each failed wait, not only before
    assert predictions(kafka)[0]["step"] == 1


# A checkpoint with more changed streams than one share is spread over the next batches.
SPREAD = SpreadSettings(share_records=1, share_s=0.0)


def test_a_large_checkpoint_is_spread_and_commits_its_offsets_after_the_last_share(kafka, member):
    m = member(interval_s=1.0, spread=SPREAD)
    m.serve()  # joins: both partitions assigned
    kafka.produce(INPUT, [(b"a", ev(1)), (b"b", ev(2)), (b"c", ev(3))])
    kafka.advance(1.0)
    m.serve()  # serves the batch, then begins the checkpoint: one share of three
    assert len(kafka.records(CHANGELOG, committed_only=False)) == 1
    assert "commit" not in kinds(kafka)
    kafka.produce(INPUT, [(b"d", ev(4))])
    m.serve()  # the second share
    assert "commit" not in kinds(kafka)
    kafka.produce(INPUT, [(b"e", ev(5))])
    m.serve()  # the last share, then the commit of the checkpoint's offsets
    assert sorted(key for key, _ in visible(kafka, CHANGELOG)) == [b"a", b"b", b"c"]
    committed = sum(kafka.committed("group", INPUT, p) or 0 for p in (0, 1))
    assert committed == 3  # not the later batches' offsets


def test_an_idle_poll_finishes_a_spread_checkpoint(kafka, member):
    m = member(interval_s=1.0, spread=SPREAD)
    kafka.produce(INPUT, [(b"a", ev(1)), (b"b", ev(2)), (b"c", ev(3))])
    kafka.advance(1.0)
    m.serve()
    m.serve()  # nothing polled
    assert len(visible(kafka, CHANGELOG)) == 3
    assert kinds(kafka)[-1] == "commit"


def test_stop_finishes_with_a_checkpoint_and_closes_the_source_before_the_producers(kafka, member):
    m = member()
    kafka.produce(INPUT, [(b"a", ev(1))])
    m.serve()
    m.loop.stop()
    m.loop.run()
    order = kinds(kafka)
    assert order.index("commit") < order.index("source-close") < order.index("sink-close")
    assert visible(kafka, CHANGELOG) == [(b"a", kafka.partition_for(INPUT, b"a"))]


def test_the_stop_says_which_offsets_it_committed(kafka, member, caplog):
    m = member()
    kafka.produce(INPUT, [(b"a", ev(1))])
    m.serve()
    m.loop.stop()
    with caplog.at_level(logging.INFO, logger="pipeline.loop"):
        m.loop.run()
    partition = kafka.partition_for(INPUT, b"a")
    assert f"offsets {INPUT}[{partition}]@1 committed" in caplog.text


def test_a_stop_whose_checkpoint_is_refused_says_so_instead_of_claiming_a_clean_stop(
    kafka, member, caplog
):
    m = member()
    kafka.produce(INPUT, [(b"a", ev(1))])
    m.serve()
    m.source.pause()
    kafka.advance(11.0)  # evicted: its checkpoint is of a generation that is gone
    m.loop.stop()
    with caplog.at_level(logging.INFO, logger="pipeline.loop"):
        m.loop.run()
    assert "stopping without the last checkpoint" in caplog.text
    assert "stopped:" not in caplog.text


# -- rebalances ---------------------------------------------------------------------


def test_assigned_partitions_are_restored_before_they_are_served_and_reported(
    kafka, member, metrics
):
    m = member()
    m.serve()
    assert ("restore", [0, 1]) in kafka.journal
    assert m.loop.assigned == frozenset({0, 1})
    assert m.health.ready()[0] is True
    assert metrics.registry.get_sample_value("hiddenstate_assigned_partitions") == 2


def test_a_restore_that_makes_progress_beats_liveness(kafka, member, monkeypatch):
    m = member()
    beats: list[str] = []
    monkeypatch.setattr(m.health, "beat", lambda: beats.append("beat"))
    m.serve()
    assert len(beats) >= 2  # the iteration's own beat, and the restore's progress


def test_revoked_partitions_are_checkpointed_then_their_streams_dropped(kafka, member):
    first = member(name="m0")
    first.serve()
    kafka.produce(INPUT, [(b"a", ev(1)), (b"b", ev(2)), (b"c", ev(3)), (b"d", ev(4))])
    first.serve()
    member(name="m1")  # joins: one partition moves to it
    first.serve()
    moved = next(p for kind, p in kafka.journal if kind == "revoked")
    assert len(moved) == 1
    assert all(kafka.committed("group", INPUT, p) for p in moved)
    kept = {k for k, p in visible(kafka, CHANGELOG) if p not in moved}
    assert set(first.processor.store.keys()) == kept


def test_lost_partitions_are_dropped_without_writing_or_committing(kafka, member):
    m = member()
    m.serve()
    kafka.produce(INPUT, [(b"a", ev(1))])
    m.serve()
    m.source.pause()
    kafka.advance(11.0)
    m.source.resume()
    m.serve()  # learns it was evicted, rejoins, gets both partitions back
    order = kinds(kafka)
    lost, back = order.index("lost"), order.index("assigned", order.index("lost"))
    assert "revoked" not in order
    assert [k for k in order[lost:back] if k in ("send", "flush", "commit")] == []
    assert len(m.processor.store) <= 1  # only what it served since it is back


# -- finding 1: a woken member's snapshots never win ---------------------------------


def freeze_during_next_batch(kafka: FakeKafka, m: Member, seconds: float, meanwhile: Any) -> None:
    """In `m`'s next iteration, right after it served the polled batch, the process stands
    still for `seconds` (SIGSTOP); `meanwhile()` runs while it does. Then it goes on where it
    was, sending and committing, without the poll that would tell it it was evicted."""
    process = m.processor.process

    def frozen(records: Any) -> Any:
        result = process(records)
        m.source.pause()
        kafka.advance(seconds)
        meanwhile()
        m.source.resume()
        m.processor.process = process
        return result

    m.processor.process = frozen
    m.serve()


KEYS = [f"s{i}".encode() for i in range(6)]


def mid_spread(kafka: FakeKafka, member: Any, **options: Any) -> Member:
    """A member with a spread checkpoint in progress (its transaction open): 4 of its 6
    snapshots sent, the last 2 go with the next batch, and then it commits."""
    a = member(name="a", interval_s=1.0, spread=SpreadSettings(4, 0.0), **options)
    a.serve()
    kafka.produce(INPUT, [(k, ev(1)) for k in KEYS])
    kafka.advance(1.0)
    a.serve()
    return a


def test_a_member_evicted_mid_checkpoint_cannot_commit_its_snapshots_when_it_wakes(kafka, member):
    a = mid_spread(kafka, member)
    kafka.produce(INPUT, [(k, ev(2)) for k in KEYS])
    freeze_during_next_batch(kafka, a, 11.0, meanwhile=lambda: None)
    assert "commit-refused" in kinds(kafka)
    assert visible(kafka, CHANGELOG) == []
    assert kafka.committed("group", INPUT, 0) is None


def test_snapshots_of_a_member_evicted_mid_checkpoint_never_win_over_the_new_owners(kafka, member):
    a = mid_spread(kafka, member, transaction_timeout_s=10.5)
    others: list[Member] = []

    def take_over() -> None:  # the transaction timed out too: the new owner restores
        b = member(name="b", interval_s=0.0)
        kafka.produce(INPUT, [(k, ev(2)) for k in KEYS])
        b.serve(2)
        others.append(b)

    kafka.produce(INPUT, [(k, ev(3)) for k in KEYS])
    freeze_during_next_batch(kafka, a, 11.0, meanwhile=take_over)
    a.serve(2)  # learns it was evicted
    b = others[0]
    b.serve(2)
    for stopping in (a, b):
        stopping.loop.stop()
        stopping.loop.run()
    c = member(name="c", interval_s=0.0)
    c.serve()  # restores everything from the changelog
    assert c.steps() == {k: 3 for k in KEYS}


# -- finding 2: exactly-once never commits work of a lost partition ------------------


def test_exactly_once_aborts_its_open_transaction_when_it_learns_partitions_are_lost(kafka, member):
    m = member(exactly_once=True, interval_s=10.0)
    m.serve()
    kafka.produce(INPUT, [(b"a", ev(1)), (b"b", ev(2))])
    m.serve()  # predictions in the open transaction
    m.source.pause()
    kafka.advance(9.0)
    kafka.advance(2.0)  # evicted at 11 s, the transaction still within its timeout
    m.source.resume()
    m.serve()  # lost: abort first
    order = kinds(kafka)
    assert order.index("lost") < order.index("abort")
    assert predictions(kafka) == []
    kafka.advance(10.0)
    m.serve(3)  # rejoined: served again, committed once

    assert sorted(p["step"] for p in predictions(kafka)) == [1, 1]


def test_exactly_once_commit_by_a_member_that_does_not_know_it_was_evicted_is_refused(
    kafka, member
):
    a = member(name="a", exactly_once=True, interval_s=5.0)
    a.serve()
    kafka.produce(INPUT, [(b"a", ev(1)), (b"b", ev(2))])
    a.serve()  # in the open transaction
    kafka.produce(INPUT, [(b"c", ev(3))])
    freeze_during_next_batch(kafka, a, 11.0, meanwhile=lambda: None)  # commit is due
    assert "commit-refused" in kinds(kafka)
    assert predictions(kafka) == []
    b = member(name="b", exactly_once=True, interval_s=0.0)
    b.serve(2)
    a.serve(2)
    steps = sorted(p["step"] for p in predictions(kafka))
    assert steps == [1, 1, 1]  # one committed prediction per event


# -- finding 5: a failed revocation checkpoint leaves nothing behind to commit ------


def test_offsets_of_a_partition_whose_revocation_checkpoint_failed_are_never_committed(
    kafka, member, monkeypatch
):
    first = member(name="m0", interval_s=60.0)
    first.serve()
    kafka.produce(INPUT, [(f"s{i}".encode(), ev(i)) for i in range(8)])
    first.serve()
    states = first.committer._states
    commit = states.commit
    failures = iter([TransactionTimeoutError("the broker did not answer in time")])

    def commit_failing_once(offsets: Any, group: Any) -> None:
        error = next(failures, None)
        if error is not None:
            raise error
        commit(offsets, group)

    monkeypatch.setattr(states, "commit", commit_failing_once)
    member(name="m1")
    first.serve()  # the revocation's checkpoint fails: thrown away, the rest rewound
    moved = next(p for kind, p in kafka.journal if kind == "revoked")
    first.serve(2)  # serves the partition it keeps again
    first.loop.stop()
    first.loop.run()
    for partition in moved:
        assert kafka.committed("group", INPUT, partition) is None
    assert [p for _, p in visible(kafka, CHANGELOG) if p in moved] == []
    kept = [p for p in (0, 1) if p not in moved]
    assert all(kafka.committed("group", INPUT, p) for p in kept)


# -- learning early: a stand-still longer than the session sends nothing -------------


def test_a_batch_served_after_a_long_stand_still_is_not_sent_but_rewound(
    kafka, member, monkeypatch
):
    m = member(interval_s=0.0, pause_limit_s=5.0)
    m.serve()
    kafka.produce(INPUT, [(b"a", ev(1))])
    real_poll = m.source.poll

    def poll_while_the_process_stands_still(timeout_s: float, most: int) -> Any:
        records = real_poll(timeout_s, most)
        kafka.clock.advance(6.0)  # SIGSTOP, then SIGCONT: no heartbeat missed yet here
        return records

    monkeypatch.setattr(m.source, "poll", poll_while_the_process_stands_still)
    m.loop.run_once()
    monkeypatch.undo()
    assert predictions(kafka, committed_only=False) == []
    m.serve(2)  # rewound after the next poll, served again
    assert [p["step"] for p in predictions(kafka)] == [1]


# -- rewinds give back the exact states ----------------------------------------------


def test_a_rewind_restores_the_states_of_the_last_commit_and_replays_from_it(
    kafka, member, numpy_gru
):
    m = member(interval_s=60.0)
    kafka.produce(INPUT, [(b"a", ev(1))])
    m.serve()
    m.committer.checkpoint(m.source.group_metadata)  # committed: a at step 1
    kafka.produce(INPUT, [(b"a", ev(2))])
    m.serve()  # a at step 2, uncommitted
    m.loop._throw_away("test")
    m.serve()  # rewinds: a back at step 1, reads event 2 again
    m.serve()
    assert m.steps() == {b"a": 2}
    outputs = [p["outputs"]["y"] for p in predictions(kafka)]
    np.testing.assert_allclose(outputs[-1], outputs[-2], atol=1e-6)


# -- taking over: the old owner's late commit skips nothing ---------------------------


def test_a_member_taking_over_is_not_set_back_by_a_late_commit_of_the_old_owner(kafka, member):
    """The fault campaign (pause, at-least-once, kafka-python): a member paused with a
    checkpoint whose offsets the broker had accepted ended that transaction when it woke,
    after the new owner had restored the partitions' states but before its client fetched
    their committed offsets (which waited for that transaction). The new owner served from
    the late commit's offsets with the states before it: 5,738 predictions whose streams
    skipped the events in between. Here the late commit lands while the new owner
    restores, as it did there."""
    old = member(name="m0", interval_s=60.0)
    kafka.produce(INPUT, [(b"a", ev(1))])
    old.serve()
    old.committer.checkpoint(old.source.group_metadata)  # committed: a at step 1
    kafka.produce(INPUT, [(b"a", ev(2))])
    old.serve()  # a at step 2, not committed yet
    old.source.pause()
    kafka.advance(11.0)  # past the session: the group drops the old owner
    new = member(name="m1", interval_s=60.0)
    restore = new.changelog.restore
    late: list[bool] = []

    def restore_then_the_late_commit(partitions: list[int], progress: Any) -> None:
        restore(partitions, progress)
        if not late:  # the old owner's transaction ends: a at step 2 and its offset
            late.append(True)
            old.committer.checkpoint(new.source.group_metadata)

    new.changelog.restore = restore_then_the_late_commit  # type: ignore[method-assign]
    new.serve()  # joins and takes both partitions over
    kafka.produce(INPUT, [(b"a", ev(3))])
    new.serve(polls=2)
    assert late == [True]
    assert new.steps() == {b"a": 3}


# -- counted ------------------------------------------------------------------------


def test_each_rebalance_callback_is_counted_by_its_kind(kafka, member, metrics):
    first = member(name="m0")
    first.serve()  # assigned [0, 1]
    second = member(name="m1")
    first.serve()  # revoked one
    second.serve()  # assigned it
    first.source.pause()
    kafka.advance(11.0)
    first.source.resume()
    first.serve()  # lost the other, assigned nothing back (m1 holds both now)
    counts = {
        kind: metrics.registry.get_sample_value("hiddenstate_rebalances_total", {"kind": kind})
        for kind in ("assigned", "revoked", "lost")
    }
    assert counts == {"assigned": 2, "revoked": 1, "lost": 1}


def test_a_refused_checkpoint_is_counted_as_a_commit_failure_and_a_rewind(kafka, member, metrics):
    a = mid_spread(kafka, member)
    kafka.produce(INPUT, [(k, ev(2)) for k in KEYS])
    freeze_during_next_batch(kafka, a, 11.0, meanwhile=lambda: None)
    a.serve()
    assert metrics.registry.get_sample_value("hiddenstate_commit_failures_total") == 1
    assert metrics.registry.get_sample_value("hiddenstate_rewinds_total") == 1


def test_a_refused_output_is_counted_before_the_loop_stops(kafka, member, metrics):
    m = member(interval_s=0.0)
    kafka.refused_topics.add(OUTPUT)
    kafka.produce(INPUT, [(b"a", ev(1))])
    with pytest.raises(DeliveryError):
        m.serve()
    assert metrics.registry.get_sample_value("hiddenstate_delivery_errors_total") == 1
