"""The serving loop's ordering rules, with an in-memory source and sink.

What is checked is the order of effects: outputs acknowledged before offsets
are committed, snapshots before offsets, everything in one transaction in
exactly-once mode, revocations checkpointed, lost partitions not.
"""

from __future__ import annotations

from typing import Any

import pytest

from pipeline.errors import DeliveryError, FlushTimeoutError
from pipeline.health import LoopState
from pipeline.loop import LoopSettings, ServeLoop
from pipeline.records import InputRecord, OutputRecord
from pipeline.testing import event_records


def ev(i: int = 0) -> dict[str, Any]:
    return {"x": [0.1 * i, -0.2 * i, 0.3]}


class Journal:
    """Everything the fakes were asked to do, in order."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, Any]] = []

    def add(self, what: str, detail: Any = None) -> None:
        self.entries.append((what, detail))

    def kinds(self) -> list[str]:
        return [what for what, _ in self.entries]


class FakeSource:
    """Returns the batches it was given, one per poll; runs rebalance callbacks on demand."""

    def __init__(self, journal: Journal, on_assigned, on_revoked, on_lost) -> None:
        self.journal = journal
        self.batches: list[list[InputRecord]] = []
        self.callbacks = {"assigned": on_assigned, "revoked": on_revoked, "lost": on_lost}
        self.defer_commits = 0

    def poll(self, timeout_s: float, max_records: int) -> list[InputRecord]:
        return self.batches.pop(0) if self.batches else []

    def commit(self, offsets) -> bool:
        if self.defer_commits:
            self.defer_commits -= 1
            self.journal.add("commit-deferred", dict(offsets))
            return False
        self.journal.add("commit", dict(offsets))
        return True

    def lag(self) -> dict[int, int]:
        return {}

    def group_metadata(self) -> str:
        return "group-metadata"

    def close(self) -> None:
        self.journal.add("source-close")

    def rebalance(self, kind: str, partitions: list[int]) -> None:
        self.callbacks[kind](partitions)


class FakeSink:
    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.records: list[OutputRecord] = []

    def send(self, records) -> None:
        for record in records:
            self.journal.add("send", record.topic)
            self.records.append(record)

    def flush(self, timeout_s: float) -> None:
        self.journal.add("flush")

    def begin(self) -> None:
        self.journal.add("begin")

    def commit_transaction(self, offsets, group_metadata) -> None:
        self.journal.add("commit-transaction", (dict(offsets), group_metadata))

    def close(self) -> None:
        self.journal.add("sink-close")


class FakeCheckpointer:
    """Writes one snapshot record per changed stream, like the changelog does."""

    def __init__(self, journal: Journal, store, health=None) -> None:
        self.journal = journal
        self.store = store
        self.health = health
        self.ready_while_restoring = None

    def changes(self) -> list[OutputRecord]:
        return [
            OutputRecord("changelog", s.key, b"v", (), s.partition)
            for s in self.store.drain_dirty()
        ]

    def restore(self, partitions: list[int]) -> None:
        self.journal.add("restore", partitions)
        self.ready_while_restoring = self.health.ready()[0] if self.health else None


@pytest.fixture
def journal() -> Journal:
    return Journal()


@pytest.fixture
def make_loop(journal, make_processor, numpy_gru, metrics, clock):
    """A loop over fakes; returns (loop, source, processor)."""

    def build(checkpointer: bool = True, **settings: Any):
        processor = make_processor(numpy_gru)
        health = LoopState(clock=clock)
        holder: dict[str, FakeSource] = {}

        def make_source(on_assigned, on_revoked, on_lost):
            holder["source"] = FakeSource(journal, on_assigned, on_revoked, on_lost)
            return holder["source"]

        loop = ServeLoop(
            LoopSettings(**{"checkpoint_interval_s": 10.0, **settings}),
            processor,
            FakeSink(journal),
            make_source,
            metrics,
            health,
            FakeCheckpointer(journal, processor.store, health) if checkpointer else None,
            clock=clock,
        )
        return loop, holder["source"], processor

    return build


def test_outputs_are_flushed_before_the_offsets_of_their_batch_are_committed(make_loop, journal):
    loop, source, _ = make_loop(checkpoint_interval_s=0.0)
    source.batches = [event_records([("a", ev(1)), ("b", ev(2))])]
    loop.run_once()
    kinds = journal.kinds()
    assert kinds.index("flush") < kinds.index("commit")
    assert ("commit", {("events", 0): 2}) in journal.entries


def test_snapshots_are_acknowledged_before_the_offsets_are_committed(make_loop, journal):
    loop, source, _ = make_loop(checkpoint_interval_s=0.0)
    source.batches = [event_records([("a", ev(1))])]
    loop.run_once()
    kinds = journal.kinds()
    snapshot = journal.entries.index(("send", "changelog"))
    last_flush = len(kinds) - 1 - kinds[::-1].index("flush")
    assert snapshot < last_flush < kinds.index("commit")


def test_nothing_is_committed_before_the_checkpoint_interval(make_loop, journal, clock):
    loop, source, _ = make_loop(checkpoint_interval_s=5.0)
    source.batches = [event_records([("a", ev(1))])]
    loop.run_once()
    assert "commit" not in journal.kinds()
    clock.advance(5.0)
    loop.run_once()
    assert ("commit", {("events", 0): 1}) in journal.entries


def test_a_checkpoint_also_follows_a_count_of_events(make_loop, journal):
    loop, source, _ = make_loop(checkpoint_interval_s=60.0, checkpoint_interval_events=3)
    source.batches = [event_records([("a", ev(1)), ("a", ev(2)), ("b", ev(3))])]
    loop.run_once()
    assert ("commit", {("events", 0): 3}) in journal.entries


def test_offsets_of_a_commit_deferred_by_a_rebalance_go_with_the_next_checkpoint(
    make_loop, journal, clock
):
    loop, source, _ = make_loop(checkpoint_interval_s=1.0)
    source.defer_commits = 1
    source.batches = [event_records([("a", ev(1))])]
    clock.advance(1.0)
    loop.run_once()
    source.batches = [event_records([("a", ev(2))], first_offset=1)]
    clock.advance(1.0)
    loop.run_once()
    assert journal.entries[-1] == ("commit", {("events", 0): 2})
    assert ("commit-deferred", {("events", 0): 1}) in journal.entries


def test_stop_finishes_with_a_checkpoint_and_closes_the_source_before_the_sink(make_loop, journal):
    loop, source, _ = make_loop()
    source.batches = [event_records([("a", ev(1))])]
    loop.run_once()
    loop.stop()
    loop.run()
    assert journal.kinds()[-3:] == ["commit", "source-close", "sink-close"]
    assert ("commit", {("events", 0): 1}) in journal.entries


def test_revoked_partitions_are_checkpointed_then_their_streams_dropped(make_loop, journal):
    loop, source, processor = make_loop()
    source.rebalance("assigned", [0, 1])
    source.batches = [event_records([("a", ev(1)), ("b", ev(2))], partitions=2)]
    loop.run_once()
    keys_before = set(processor.store.keys())
    source.rebalance("revoked", [0, 1])
    assert keys_before == {b"a", b"b"}
    assert "commit" in journal.kinds()
    assert ("send", "changelog") in journal.entries
    assert set(processor.store.keys()) == set()
    assert loop.assigned == frozenset()


def test_lost_partitions_are_dropped_without_writing_or_committing(make_loop, journal):
    loop, source, processor = make_loop()
    source.rebalance("assigned", [0])
    source.batches = [event_records([("a", ev(1))])]
    loop.run_once()
    source.rebalance("lost", [0])
    assert "commit" not in journal.kinds()
    assert ("send", "changelog") not in journal.entries
    assert len(processor.store) == 0
    loop.stop()
    loop.run()
    assert ("commit", {}) in journal.entries


def test_assigned_partitions_are_restored_and_the_loop_reports_them(make_loop, journal, metrics):
    loop, source, _ = make_loop()
    source.rebalance("assigned", [2, 3])
    assert ("restore", [2, 3]) in journal.entries
    assert loop._checkpointer.ready_while_restoring is False
    assert loop._health.ready()[0] is True
    assert loop.assigned == frozenset({2, 3})
    assert metrics.registry.get_sample_value("hiddenstate_assigned_partitions") == 2


def test_exactly_once_puts_outputs_snapshots_and_offsets_in_one_transaction(make_loop, journal):
    loop, source, _ = make_loop(exactly_once=True, checkpoint_interval_s=0.0)
    source.batches = [event_records([("a", ev(1))])]
    loop.run_once()
    assert journal.kinds() == ["begin", "send", "send", "commit-transaction"]
    assert journal.entries[-1] == ("commit-transaction", ({("events", 0): 1}, "group-metadata"))
    assert "flush" not in journal.kinds()


def test_exactly_once_opens_no_transaction_for_an_empty_poll(make_loop, journal):
    loop, _, _ = make_loop(exactly_once=True, checkpoint_interval_s=0.0)
    loop.run_once()
    assert journal.kinds() == []


def test_bad_events_are_sent_to_the_dead_letter_topic_and_still_committed(make_loop, journal):
    loop, source, _ = make_loop(checkpoint_interval_s=0.0)
    source.batches = [event_records([("a", b"not json"), ("b", ev(1))])]
    loop.run_once()
    assert sorted(d for k, d in journal.entries if k == "send") == [
        "changelog",
        "events.dead-letter",
        "predictions",
    ]
    assert ("commit", {("events", 0): 2}) in journal.entries


def test_a_broker_outage_keeps_the_loop_waiting_and_beating_until_the_acks_come(
    make_loop, journal, clock
):
    loop, source, _ = make_loop(checkpoint_interval_s=0.0)
    sink = loop._sink
    outage = iter([True, True])
    beats: list[float] = []

    def flush(timeout_s: float) -> None:
        clock.advance(30.0)
        if next(outage, False):
            raise FlushTimeoutError("broker away")
        journal.add("flush")

    sink.flush = flush
    loop._health.beat = lambda: beats.append(clock())
    source.batches = [event_records([("a", ev(1))])]
    loop.run_once()
    assert len(beats) >= 3  # the iteration's own beat and one per failed wait
    assert ("commit", {("events", 0): 1}) in journal.entries


# A checkpoint with more changed streams than one share is spread over the next batches.
SPREAD = {"checkpoint_share_records": 1, "checkpoint_share_s": 0.0}


def sent_snapshots(journal) -> int:
    return journal.entries.count(("send", "changelog"))


def test_a_large_checkpoint_is_spread_and_commits_its_offsets_after_the_last_share(
    make_loop, journal, clock
):
    loop, source, _ = make_loop(checkpoint_interval_s=1.0, **SPREAD)
    source.batches = [event_records([("a", ev(1)), ("b", ev(2)), ("c", ev(3))])]
    clock.advance(1.0)
    loop.run_once()  # serves the batch, then begins the checkpoint: one share of three
    assert sent_snapshots(journal) == 1
    assert "commit" not in journal.kinds()
    source.batches = [event_records([("d", ev(4))], first_offset=3)]
    loop.run_once()  # the second share goes before this batch's flush
    assert sent_snapshots(journal) == 2
    assert "commit" not in journal.kinds()
    source.batches = [event_records([("e", ev(5))], first_offset=4)]
    loop.run_once()  # the last share, its flush, then the commit of the checkpoint's offsets
    kinds = journal.kinds()
    assert sent_snapshots(journal) == 3
    last_share = len(kinds) - 1 - kinds[::-1].index("send")
    assert last_share < kinds.index("flush", last_share) < kinds.index("commit")
    assert ("commit", {("events", 0): 3}) in journal.entries  # not the later batches' offsets


def test_an_idle_poll_finishes_a_spread_checkpoint(make_loop, journal, clock):
    loop, source, _ = make_loop(checkpoint_interval_s=1.0, **SPREAD)
    source.batches = [event_records([("a", ev(1)), ("b", ev(2)), ("c", ev(3))])]
    clock.advance(1.0)
    loop.run_once()
    loop.run_once()  # nothing polled
    assert sent_snapshots(journal) == 3
    assert journal.kinds()[-2:] == ["flush", "commit"]
    assert ("commit", {("events", 0): 3}) in journal.entries


def test_a_revocation_finishes_a_spread_checkpoint_before_dropping_streams(
    make_loop, journal, clock
):
    loop, source, processor = make_loop(checkpoint_interval_s=1.0, **SPREAD)
    source.rebalance("assigned", [0])
    source.batches = [event_records([("a", ev(1)), ("b", ev(2)), ("c", ev(3))])]
    clock.advance(1.0)
    loop.run_once()
    source.rebalance("revoked", [0])
    assert sent_snapshots(journal) == 3
    assert ("commit", {("events", 0): 3}) in journal.entries
    assert len(processor.store) == 0


def test_a_spread_checkpoint_sends_nothing_more_of_lost_partitions(make_loop, journal, clock):
    loop, source, _ = make_loop(checkpoint_interval_s=1.0, **SPREAD)
    source.rebalance("assigned", [0, 1])
    records = event_records([(k, ev(i)) for i, k in enumerate("abcdef")], partitions=2)
    assert {r.partition for r in records} == {0, 1}
    source.batches = [records]
    clock.advance(1.0)
    loop.run_once()  # one share sent
    source.rebalance("lost", [1])
    loop.stop()
    loop.run()
    snapshots = [r for r in loop._sink.records if r.topic == "changelog"]
    assert all(r.partition == 0 for r in snapshots[1:])
    assert {r.key for r in snapshots} >= {r.key for r in records if r.partition == 0}
    commits = [offsets for kind, offsets in journal.entries if kind == "commit"]
    assert commits
    assert all(partition == 0 for offsets in commits for _, partition in offsets)


def test_each_rebalance_callback_is_counted_by_its_kind(make_loop, metrics):
    _, source, _ = make_loop()
    source.rebalance("assigned", [0, 1])
    source.rebalance("revoked", [1])
    source.rebalance("lost", [0])
    source.rebalance("assigned", [0])
    counts = {
        kind: metrics.registry.get_sample_value("hiddenstate_rebalances_total", {"kind": kind})
        for kind in ("assigned", "revoked", "lost")
    }
    assert counts == {"assigned": 2, "revoked": 1, "lost": 1}


def test_a_deferred_commit_is_counted_as_a_commit_failure(make_loop, metrics, clock):
    loop, source, _ = make_loop(checkpoint_interval_s=1.0)
    source.defer_commits = 1
    source.batches = [event_records([("a", ev(1))])]
    clock.advance(1.0)
    loop.run_once()
    assert metrics.registry.get_sample_value("hiddenstate_commit_failures_total") == 1


def test_a_refused_output_is_counted_before_the_loop_stops(make_loop, metrics):
    loop, source, _ = make_loop()
    sink = loop._sink

    def refuse(timeout_s: float) -> None:
        raise DeliveryError("Kafka refused an output record: MessageSizeTooLarge")

    sink.flush = refuse
    source.batches = [event_records([("a", ev(1))])]
    with pytest.raises(DeliveryError, match="MessageSizeTooLarge"):
        loop.run_once()
    assert metrics.registry.get_sample_value("hiddenstate_delivery_errors_total") == 1
