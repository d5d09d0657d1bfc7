"""The transport contract (`pipeline.transport.base`), one battery for every implementation:
kafka-python, confluent-kafka and the in-memory fake that the loop's unit tests use.

What the loop relies on, and each test checks: records in offset order; rebalance
callbacks only inside `poll`/`close`, `assigned` before the records, cooperative
moves revoked before they are assigned elsewhere, an evicted member told `lost`
(not `revoked`); transactions visible together or never; a commit refused for a
member no longer in its generation (what fences a paused zombie); a producer fenced
by its successor; committed offsets a rewind goes back to; refused records and an
unreachable broker reported as errors within their bounds, never as a hang.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import pytest

from pipeline.errors import (
    DeliveryError,
    FencedError,
    FlushTimeoutError,
    KafkaUnavailableError,
    RestoreStalledError,
    TransactionAbortedError,
    TransactionTimeoutError,
)
from pipeline.records import OutputRecord
from pipeline.transport import base
from pipeline.transport.base import Source, Transport
from tests.contract.hanging import write_hanging_transaction

pytestmark = pytest.mark.integration


class Member:
    """A source and what its callbacks said, each with whether it came inside a call."""

    def __init__(self, transport: Transport, topic: str, *, read_committed: bool = True) -> None:
        self.events: list[tuple[str, list[int], bool]] = []
        self.held: set[int] = set()
        self._inside = False

        def callback(kind: str) -> Any:
            def run(partitions: list[int]) -> None:
                self.events.append((kind, partitions, self._inside))
                if kind == "assigned":
                    self.held |= set(partitions)
                else:
                    self.held -= set(partitions)

            return run

        self.source: Source = transport.source(
            topic,
            callback("assigned"),
            callback("revoked"),
            callback("lost"),
            read_committed=read_committed,
        )
        self.records: list[Any] = []

    def poll(self, timeout_s: float = 0.5) -> list[Any]:
        self._inside = True
        try:
            records = self.source.poll(timeout_s, 1000)
        finally:
            self._inside = False
        self.records += records
        return records

    def close(self) -> None:
        self._inside = True
        try:
            self.source.close()
        finally:
            self._inside = False

    def kinds(self) -> list[str]:
        return [kind for kind, _, _ in self.events]


def poll_until(harness: Any, condition: Any, *members: Member, attempts: int = 80) -> None:
    """Poll every member in turn until `condition()` holds (bounded)."""
    for _ in range(attempts):
        for member in members:
            member.poll(0.25)
        if condition():
            return
        harness.wait(0.25)
    raise AssertionError("the condition did not hold after all polls")


def until_both_assigned(harness: Any, evicted: Member, other: Member) -> None:
    """Poll until the two members hold both partitions, the one to evict some of them: the
    first to join may hold both for a while, and a member holding nothing has nothing to
    lose."""
    poll_until(
        harness, lambda: evicted.held and len(evicted.held) + len(other.held) == 2, evicted, other
    )


def group() -> str:
    return f"contract-{uuid.uuid4().hex[:8]}"


def pairs(count: int) -> list[tuple[bytes, bytes]]:
    return [(f"k{i % 7}".encode(), f"v{i}".encode()) for i in range(count)]


def test_poll_returns_each_partitions_records_in_offset_order(harness):
    topic = harness.topic(partitions=2)
    harness.produce(topic, pairs(60))
    member = Member(harness.transport(group()), topic)
    poll_until(harness, lambda: len(member.records) >= 60, member)
    for partition in (0, 1):
        offsets = [r.offset for r in member.records if r.partition == partition]
        assert offsets == sorted(offsets)
        assert offsets == list(range(len(offsets)))
    member.close()


def test_assigned_runs_inside_poll_before_any_record_of_its_partitions(harness):
    topic = harness.topic(partitions=2)
    harness.produce(topic, pairs(10))
    member = Member(harness.transport(group()), topic)
    assert member.events == []  # nothing happens outside a call
    poll_until(harness, lambda: len(member.records) >= 10, member)
    assigned = [(p, inside) for kind, p, inside in member.events if kind == "assigned"]
    assert all(inside for _, inside in assigned)
    assert sorted(p for partitions, _ in assigned for p in partitions) == [0, 1]
    member.close()


def test_a_member_that_joins_takes_partitions_revoked_first_from_the_other(harness):
    topic = harness.topic(partitions=2)
    name = group()
    first = Member(harness.transport(name), topic)
    poll_until(harness, lambda: first.held == {0, 1}, first)
    second = Member(harness.transport(name), topic)
    poll_until(harness, lambda: len(second.held) == 1 and len(first.held) == 1, first, second)
    revoked = [p for kind, p, _ in first.events if kind == "revoked"]
    assert [sorted(second.held)] == revoked  # what moved, and only that
    assert "lost" not in first.kinds()
    assert all(inside for _, _, inside in first.events + second.events)
    first.close()
    second.close()


def test_close_revokes_everything_still_held(harness):
    topic = harness.topic(partitions=2)
    member = Member(harness.transport(group()), topic)
    poll_until(harness, lambda: member.held == {0, 1}, member)
    member.close()
    assert member.events[-1] == ("revoked", [0, 1], True)


def test_an_evicted_member_learns_it_as_lost_not_revoked(harness):
    topic = harness.topic(partitions=2)
    name = group()
    transport = harness.transport(name)
    evicted, other = Member(transport, topic), Member(transport, topic)
    until_both_assigned(harness, evicted, other)
    held = sorted(evicted.held)
    # The first to join may have given a partition to the other before the eviction (a
    # revocation, fresh-clone CI): only what follows the eviction counts.
    before = len(evicted.events)
    harness.evict(name, evicted.source)
    poll_until(harness, lambda: "lost" in evicted.kinds()[before:], evicted)
    assert ("lost", held, True) in evicted.events[before:]
    assert "revoked" not in evicted.kinds()[before:]
    evicted.close()
    other.close()


def sink_records(topic: str, count: int, partition: int = 0) -> list[OutputRecord]:
    return [OutputRecord(topic, b"k", f"r{i}".encode(), (), partition) for i in range(count)]


def test_a_committed_transaction_makes_its_records_and_offsets_visible_together(harness):
    source_topic, out = harness.topic(partitions=1), harness.topic(partitions=1)
    name = group()
    transport = harness.transport(name)
    member = Member(transport, source_topic, read_committed=True)
    poll_until(harness, lambda: member.held == {0}, member)
    sink = transport.transactional_sink(f"{name}-tx", 30.0)
    sink.begin()
    sink.send(sink_records(out, 3))
    assert harness.read(out, committed=True) == []
    sink.commit({(source_topic, 0): 7}, member.source.group_metadata())
    assert [v for _, _, v in harness.read(out, committed=True)] == [b"r0", b"r1", b"r2"]
    assert harness.committed(name, source_topic, 0) == 7
    sink.close()
    member.close()


def test_an_aborted_transaction_is_never_visible_to_read_committed(harness):
    out = harness.topic(partitions=1)
    sink = harness.transport(group()).transactional_sink(f"tx-{uuid.uuid4().hex[:6]}", 30.0)
    sink.begin()
    sink.send(sink_records(out, 3))
    sink.abort()
    sink.begin()
    sink.send(sink_records(out, 1))
    sink.commit({}, None)
    assert [v for _, _, v in harness.read(out, committed=True)] == [b"r0"]
    sink.close()


def test_a_commit_with_the_group_metadata_of_an_evicted_member_is_refused(harness):
    """The fence of a paused zombie: it still holds its old group metadata when it wakes."""
    source_topic, out = harness.topic(partitions=2), harness.topic(partitions=1)
    name = group()
    transport = harness.transport(name)
    zombie, other = Member(transport, source_topic), Member(transport, source_topic)
    poll_until(harness, lambda: len(zombie.held) == 1 and len(other.held) == 1, zombie, other)
    stale = zombie.source.group_metadata()
    sink = transport.transactional_sink(f"{name}-zombie", 30.0)
    sink.begin()
    sink.send(sink_records(out, 2))
    harness.evict(name, zombie.source)
    with pytest.raises(TransactionAbortedError):
        sink.commit({(source_topic, min(zombie.held)): 5}, stale)
    sink.abort()
    assert harness.read(out, committed=True) == []
    assert harness.committed(name, source_topic, min(zombie.held)) is None
    sink.close()
    zombie.close()
    other.close()


def test_a_producer_started_with_the_same_transactional_id_fences_the_first(harness):
    out = harness.topic(partitions=1)
    transport = harness.transport(group())
    transactional_id = f"tx-{uuid.uuid4().hex[:6]}"
    first = transport.transactional_sink(transactional_id, 30.0)
    first.begin()
    first.send(sink_records(out, 2))
    first.flush(10.0)
    second = transport.transactional_sink(transactional_id, 30.0)  # a restart
    with pytest.raises((FencedError, TransactionAbortedError)):
        first.commit({}, None)
    second.begin()
    second.send(sink_records(out, 1))
    second.commit({}, None)
    assert [v for _, _, v in harness.read(out, committed=True)] == [b"r0"]
    second.close()


def test_seek_to_committed_reads_again_from_the_committed_offset(harness):
    topic = harness.topic(partitions=1)
    harness.produce(topic, pairs(10))
    name = group()
    transport = harness.transport(name)
    member = Member(transport, topic)
    poll_until(harness, lambda: len(member.records) >= 10, member)
    sink = transport.transactional_sink(f"{name}-tx", 30.0)
    sink.begin()
    sink.commit({(topic, 0): 4}, member.source.group_metadata())
    assert member.source.seek_to_committed([0]) == {0: 4}
    member.records = []
    poll_until(harness, lambda: len(member.records) >= 6, member)
    assert [r.offset for r in member.records] == [4, 5, 6, 7, 8, 9]
    sink.close()
    member.close()


def test_a_record_the_broker_refuses_for_good_is_a_delivery_error_at_flush(harness):
    out = harness.topic(partitions=1, **{"max.message.bytes": "1024"})
    sink = harness.transport(group()).sink()
    sink.send([OutputRecord(out, b"k", b"x" * 20_000, (), 0)])
    with pytest.raises(DeliveryError):
        flush_until_answered(sink)
    sink.close()


def flush_until_answered(sink: Any, attempts: int = 30) -> None:
    """A refusal for good comes after the client's own retries: wait for the answer."""
    for _ in range(attempts):
        try:
            sink.flush(1.0)
            return
        except FlushTimeoutError:
            continue


def test_flush_while_the_broker_does_not_answer_is_a_timeout_not_a_hang(harness):
    outage = harness.outage()
    out_topic = outage.topic()
    sink = outage.transport.sink()
    sink.send([OutputRecord(out_topic, b"k", b"before", (), 0)])
    sink.flush(30.0)  # as in a server: the topic is known before the broker goes away
    outage.cut()
    try:
        sink.send([OutputRecord(out_topic, b"k", b"v", (), 0)])
        started = time.monotonic()
        with pytest.raises(FlushTimeoutError):
            sink.flush(1.0)
        assert time.monotonic() - started < 10.0
    finally:
        outage.restore()


def test_a_transaction_commit_while_the_broker_does_not_answer_ends_within_its_bound(
    harness, monkeypatch
):
    """kafka-python's own commit waited forever here (issue 10, finding 3)."""
    outage = harness.outage()
    sink = outage.transport.transactional_sink(f"tx-{uuid.uuid4().hex[:6]}", 30.0)
    sink.begin()
    sink.send(sink_records(outage.topic(), 1))
    sink.flush(30.0)  # sent: the commit must reach the coordinator to end it
    monkeypatch.setattr(base, "TRANSACTION_CALL_TIMEOUT_S", 3.0)
    for module in ("kafka_python", "confluent"):
        monkeypatch.setattr(f"pipeline.transport.{module}.TRANSACTION_CALL_TIMEOUT_S", 3.0)
    outage.cut()
    outcome: list[BaseException | None] = []

    def commit() -> None:
        try:
            sink.commit({}, None)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=commit, daemon=True)
    worker.start()
    worker.join(timeout=30.0)
    outage.restore()
    assert outcome, "commit still blocked 30 s after the broker stopped answering"
    assert isinstance(outcome[0], TransactionTimeoutError | TransactionAbortedError), outcome


def test_after_a_commit_that_timed_out_with_records_unsent_the_abort_ends_within_its_bound(
    harness, monkeypatch
):
    """kafka-python's `close(timeout=0)` flushes first and raised its own timeout while
    records waited for the broker: the server died with a traceback (the fault campaign:
    broker restarts and network cuts, both guarantees)."""
    outage = harness.outage()
    topic = outage.topic()
    sink = outage.transport.transactional_sink(f"tx-{uuid.uuid4().hex[:6]}", 30.0)
    sink.begin()
    sink.send(sink_records(topic, 1))
    sink.flush(30.0)
    monkeypatch.setattr(base, "TRANSACTION_CALL_TIMEOUT_S", 3.0)
    for module in ("kafka_python", "confluent"):
        monkeypatch.setattr(f"pipeline.transport.{module}.TRANSACTION_CALL_TIMEOUT_S", 3.0)
    outage.cut()
    outcomes: list[BaseException | None] = []

    def commit_then_abort() -> None:
        sink.send(sink_records(topic, 5))  # these never reach the broker
        for call in (lambda: sink.commit({}, None), sink.abort):
            try:
                call()
                outcomes.append(None)
            except BaseException as exc:
                outcomes.append(exc)

    worker = threading.Thread(target=commit_then_abort, daemon=True)
    worker.start()
    worker.join(timeout=60.0)
    outage.restore()
    assert len(outcomes) == 2, "commit and abort still blocked 60 s after the broker went away"
    expected = (TransactionTimeoutError, TransactionAbortedError)
    assert all(o is None or isinstance(o, expected) for o in outcomes), outcomes
    assert outcomes[0] is not None


def test_the_changelog_reader_waits_for_an_open_transaction_and_reads_what_follows_it(harness):
    topic = harness.topic(partitions=1)
    transport = harness.transport(group())
    held = transport.transactional_sink(f"tx-{uuid.uuid4().hex[:6]}", 2.0)
    held.begin()
    held.send([OutputRecord(topic, b"held", b"never", (), 0)])
    held.flush(10.0)
    later = transport.transactional_sink(f"tx-{uuid.uuid4().hex[:6]}", 30.0)
    later.begin()
    later.send([OutputRecord(topic, b"after", b"committed", (), 0)])
    later.commit({}, None)
    # The first one's producer is gone (crashed): the broker aborts it at its timeout.
    latest, _ = transport.changelog_reader(60.0).read_latest(topic, [0], lambda n: None)
    assert latest == {b"after": (0, b"committed")}
    later.close()


def test_poll_while_the_broker_resets_its_connections_returns_nothing_and_serves_after(harness):
    """kafka-python 3's poll raised a reset connection out of its coordinator, and the
    server died with a traceback (the fault campaign: broker restarts, network cuts)."""
    outage = harness.outage()
    topic = outage.topic()
    member = Member(outage.transport, topic)
    poll_until(harness, lambda: member.held == {0}, member)
    outage.reset()
    try:
        for _ in range(12):
            assert member.poll(0.25) == []
            harness.wait(0.25)
    finally:
        outage.restore()
    sink = outage.transport.sink()
    sink.send([OutputRecord(topic, b"k", b"after", (), 0)])
    sink.flush(30.0)
    poll_until(harness, lambda: [r.value for r in member.records] == [b"after"], member)


def test_seek_to_committed_while_the_broker_resets_its_connections_is_unavailable_then_done(
    harness,
):
    """kafka-python 3's `committed()` let its own connection error out of its search for the
    group coordinator; the loop retries only `KafkaUnavailableError`, and a member taking
    partitions over during a network cut died with a traceback (the fault campaign of
    commit 4bf6188: network cut, at-least-once, kafka-python)."""
    outage = harness.outage()
    topic = outage.topic()
    member = Member(outage.transport, topic)
    poll_until(harness, lambda: member.held == {0}, member)
    outage.reset()
    back = threading.Timer(3.0, outage.restore)
    back.start()
    answers: list[object] = []
    deadline = time.monotonic() + 60.0
    try:
        while time.monotonic() < deadline:  # as the loop does, bounded: until it answers
            try:
                answers.append(member.source.seek_to_committed([0]))
                break
            except KafkaUnavailableError as exc:
                answers.append(type(exc))
                time.sleep(0.25)
    finally:
        back.join()
        outage.restore()
    assert answers[-1] == {0: None}
    assert set(answers[:-1]) <= {KafkaUnavailableError}
    member.close()


def test_a_changelog_restore_rides_out_a_broker_that_resets_its_connections_for_a_while(harness):
    """kafka-python's reader let the client's connection error out of the rebalance
    callback here, and the server died with a traceback (the fault campaign: a broker
    restart during a restore, at-least-once)."""
    if harness.name == "fake":
        pytest.skip("the fake's changelog reader has no connections to lose")
    outage = harness.outage()
    topic = outage.topic()
    sink = outage.transport.sink()
    sink.send([OutputRecord(topic, b"k%d" % i, b"v%d" % i, (), 0) for i in range(300)])
    sink.flush(30.0)
    cuts: list[threading.Timer] = []

    def remaining(count: int) -> None:
        if not cuts:  # the first call: assigned, about to read
            outage.reset()
            cuts.append(threading.Timer(4.0, outage.restore))
            cuts[0].start()

    try:
        latest, read = outage.transport.changelog_reader(60.0).read_latest(topic, [0], remaining)
    finally:
        for timer in cuts:
            timer.join()
        outage.restore()
    assert (len(cuts), read) == (1, 300)
    assert latest == {b"k%d" % i: (0, b"v%d" % i) for i in range(300)}


def test_an_evicted_member_cannot_commit_with_what_its_client_knows_later(harness):
    """Both clients reset an evicted member to generation -1 at its next heartbeat (or keep
    the old generation until they rejoin), and the broker would take a transactional
    commit of generation -1: either the source refuses to hand out group metadata, or the
    commit made with it is refused."""
    source_topic, out = harness.topic(partitions=2), harness.topic(partitions=1)
    name = group()
    transport = harness.transport(name)
    evicted, other = Member(transport, source_topic), Member(transport, source_topic)
    until_both_assigned(harness, evicted, other)
    partition = min(evicted.held)
    harness.evict(name, evicted.source)
    harness.wait(4.0)  # past a heartbeat interval, without a poll
    sink = transport.transactional_sink(f"{name}-late", 30.0)
    sink.begin()
    sink.send(sink_records(out, 1))
    with pytest.raises(TransactionAbortedError):
        sink.commit({(source_topic, partition): 9}, evicted.source.group_metadata())
    sink.abort()
    assert harness.read(out, committed=True) == []
    assert harness.committed(name, source_topic, partition) is None
    sink.close()
    evicted.close()
    other.close()


def test_a_restore_behind_a_hanging_transaction_stops_at_its_bound_and_names_it(harness):
    """A transaction its coordinator no longer tracks holds a restore back for good (the
    fault campaign: a graceful stop of a single-node broker skipped a commit's markers).
    Only its coordinator knows whether it committed, so the reader neither guesses nor
    reads past it: it stops at its bound, and says which transaction and how to end it."""
    if harness.name == "fake":
        pytest.skip("the fake has no coordinators to lose track of a transaction")
    outage = harness.outage()
    topic = outage.topic()
    write_hanging_transaction(outage.bootstrap, topic, b"held", b"never")
    sink = outage.transport.sink()
    sink.send([OutputRecord(topic, b"after", b"committed", (), 0)])
    sink.flush(30.0)
    reader = outage.transport.changelog_reader(20.0)
    said = rf"hanging transaction of producer id \d+ \(epoch 0\) holds {topic}\[0\] from offset 0"
    with pytest.raises(RestoreStalledError, match=said + r".* is Empty.*--start-offset 0"):
        reader.read_latest(topic, [0], lambda n: None)
