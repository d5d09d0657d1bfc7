"""An in-memory Kafka for unit tests of the loop and the committers: no broker, no threads.

`FakeKafka` keeps topics of partitions of records, consumer groups with
generations, committed offsets, and transactions; `FakeKafka.transport()`
gives a `Transport` whose sources and sinks follow the contract of
`pipeline.transport.base` the way the real clients do, which
`tests/contract` checks by running one battery against this fake and
against both real transports:

- a source's rebalance callbacks run only inside `poll` and `close`;
  partitions move cooperatively (revoked from the old owner at its poll,
  assigned to the new one at its next poll after that);
- a member that stops heartbeating for the session timeout (`pause()`,
  then `FakeKafka.advance(seconds)`) is evicted: its partitions go to the
  others at once, and it learns only at its next poll, as `lost`;
- records sent in a transaction are invisible to `read_committed`
  readers until committed, and hold back everything after them (the last
  stable offset) until committed or aborted;
- a commit with the group metadata of a generation the member is no longer
  in is refused (`TransactionAbortedError`), as KIP-447 has the broker do;
- a transactional sink started with an id fences the previous one
  (`FencedError` at its next commit) and aborts its open transaction; so
  does the coordinator with a transaction open longer than its timeout;
- `down = True` is a broker outage: flushes raise `FlushTimeoutError`,
  transaction calls `TransactionTimeoutError`, committed-offset fetches
  `KafkaUnavailableError`.

Time is a `ManualClock`: nothing happens unless a test says so.
`FakeKafka.journal` lists every effect in order (sends, flushes,
transaction calls, callbacks), for tests of ordering rules.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import (
    DeliveryError,
    FencedError,
    FlushTimeoutError,
    KafkaUnavailableError,
    RestoreStalledError,
    TransactionAbortedError,
    TransactionTimeoutError,
)
from pipeline.records import InputRecord, OutputRecord
from pipeline.testing.records import ManualClock
from pipeline.transport.base import (
    Latest,
    Offsets,
    RebalanceCallback,
    not_a_member,
    reads_from_there,
)

PLAIN, PENDING, COMMITTED, ABORTED = "plain", "pending", "committed", "aborted"
HEARTBEAT_S = 3.0  # both clients' default heartbeat interval


@dataclass
class FakeRecord:
    """One record of a partition; `state` says whether a `read_committed` reader sees it."""

    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()
    timestamp_ms: int = 1_700_000_000_000
    state: str = PLAIN
    transactional_id: str | None = None


@dataclass(frozen=True)
class FakeGroupMetadata:
    """What a member knows of its group when it commits inside a transaction."""

    group_id: str
    generation: int
    member_id: str


@dataclass
class _Member:
    member_id: str
    last_heartbeat: float
    paused: bool = False


@dataclass
class _Group:
    generation: int = 0
    members: dict[str, _Member] = field(default_factory=dict)
    owners: dict[tuple[str, int], str] = field(default_factory=dict)
    committed: dict[tuple[str, int], int] = field(default_factory=dict)


class FakeKafka:
    """The in-memory broker: create topics, produce test input, read what was written."""

    def __init__(self, clock: ManualClock | None = None, session_timeout_s: float = 10.0) -> None:
        self.clock = clock or ManualClock()
        self.session_timeout_s = session_timeout_s
        self.topics: dict[str, list[list[FakeRecord]]] = {}
        self.groups: dict[str, _Group] = {}
        self.journal: list[tuple[str, Any]] = []
        self.down = False
        self.refused_topics: set[str] = set()
        self._epochs: dict[str, int] = {}
        # transactional id -> (when its open transaction began, its timeout)
        self._open: dict[str, tuple[float, float]] = {}
        # member id -> when the coordinator dropped it (it learns at its next heartbeat)
        self._evicted: dict[str, float] = {}
        self._ids = itertools.count()

    # -- topics -----------------------------------------------------------------------

    def create_topic(self, name: str, partitions: int = 1) -> str:
        """A topic of `partitions` empty partitions; returns its name."""
        self.topics.setdefault(name, [[] for _ in range(partitions)])
        return name

    def partition_for(self, topic: str, key: bytes | None) -> int:
        """The partition a keyed record goes to: a stable hash of the key."""
        return int(hashlib.md5(key or b"").hexdigest(), 16) % len(self.topics[topic])

    def produce(self, topic: str, pairs: Sequence[tuple[bytes | None, bytes | None]]) -> None:
        """Test input: append plain (key, value) records, partitioned by key."""
        for key, value in pairs:
            self._append(topic, self.partition_for(topic, key), key, value)

    def records(self, topic: str, *, committed_only: bool = True) -> list[tuple[int, FakeRecord]]:
        """(partition, record) of every record a reader would see, in partition order."""
        return [
            (p, r)
            for p in range(len(self.topics.get(topic, [])))
            for r in self._readable(topic, p, committed_only)
        ]

    def _append(
        self,
        topic: str,
        partition: int,
        key: bytes | None,
        value: bytes | None,
        headers: tuple[tuple[str, bytes], ...] = (),
        state: str = PLAIN,
        transactional_id: str | None = None,
    ) -> FakeRecord:
        log = self.topics[topic][partition]
        record = FakeRecord(len(log), key, value, headers, state=state)
        record.transactional_id = transactional_id
        log.append(record)
        return record

    def _readable(self, topic: str, partition: int, committed_only: bool) -> list[FakeRecord]:
        log = self.topics[topic][partition]
        if not committed_only:
            return list(log)
        # Everything from the first open transaction's record on waits for it.
        stable = next((r.offset for r in log if r.state == PENDING), len(log))
        return [r for r in log[:stable] if r.state in (PLAIN, COMMITTED)]

    def last_stable_offset(self, topic: str, partition: int) -> int:
        """Where `read_committed` readers stop: the first record of an open transaction."""
        log = self.topics[topic][partition]
        return next((r.offset for r in log if r.state == PENDING), len(log))

    # -- groups -----------------------------------------------------------------------

    def committed(self, group_id: str, topic: str, partition: int) -> int | None:
        """The group's committed offset of a partition (None: none yet)."""
        return self._group(group_id).committed.get((topic, partition))

    def advance(self, seconds: float) -> None:
        """Time passes: members that run heartbeat, paused ones past the session are evicted,
        and transactions open past their timeout are aborted (their producer fenced)."""
        self.clock.advance(seconds)
        now = self.clock()
        for transactional_id, (began, timeout_s) in list(self._open.items()):
            if now - began >= timeout_s:
                self._start_producer(transactional_id)
                self.journal.append(("transaction-timed-out", transactional_id))
        for group in self.groups.values():
            for member in list(group.members.values()):
                if not member.paused:
                    member.last_heartbeat = now
                elif now - member.last_heartbeat >= self.session_timeout_s:
                    self._leave(group, member.member_id)
                    self._evicted[member.member_id] = now
                    self.journal.append(("evicted", member.member_id))

    def evict(self, group_id: str, member_id: str) -> None:
        """The coordinator drops a member (an admin's LeaveGroup on its behalf, or its
        session expiring): it learns at its next poll, as `lost`."""
        group = self._group(group_id)
        if member_id in group.members:
            self._leave(group, member_id)
            self._evicted[member_id] = self.clock()
            self.journal.append(("evicted", member_id))

    def _group(self, group_id: str) -> _Group:
        return self.groups.setdefault(group_id, _Group())

    def _join(self, group: _Group) -> str:
        member_id = f"member-{next(self._ids)}"
        group.members[member_id] = _Member(member_id, self.clock())
        group.generation += 1
        return member_id

    def _leave(self, group: _Group, member_id: str) -> None:
        group.members.pop(member_id, None)
        group.owners = {tp: m for tp, m in group.owners.items() if m != member_id}
        group.generation += 1

    def _target(self, group: _Group, topic: str, member_id: str) -> set[int]:
        """Partitions round-robin over the members, in the order they joined."""
        members = sorted(group.members, key=lambda m: int(m.rsplit("-", 1)[1]))
        if member_id not in members:
            return set()
        partitions = range(len(self.topics[topic]))
        return {p for p in partitions if members[p % len(members)] == member_id}

    # -- transactions -----------------------------------------------------------------

    def _start_producer(self, transactional_id: str) -> int:
        """A producer starts with this id: fence the previous one, abort its transaction."""
        epoch = self._epochs.get(transactional_id, -1) + 1
        self._epochs[transactional_id] = epoch
        self._end(transactional_id, ABORTED)
        return epoch

    def _end(self, transactional_id: str, state: str) -> None:
        self._open.pop(transactional_id, None)
        for partitions in self.topics.values():
            for log in partitions:
                for record in log:
                    if record.state == PENDING and record.transactional_id == transactional_id:
                        record.state = state

    def transport(self, group_id: str = "group", *, reset_to: str = "earliest") -> FakeTransport:
        """A `Transport` over this broker for consumers in `group_id`."""
        return FakeTransport(self, group_id, reset_to)


class FakeTransport:
    """`Transport` over a `FakeKafka`."""

    name = "fake"

    def __init__(self, kafka: FakeKafka, group_id: str, reset_to: str) -> None:
        self.kafka = kafka
        self.group_id = group_id
        self.reset_to = reset_to

    def source(
        self,
        topic: str,
        on_assigned: RebalanceCallback,
        on_revoked: RebalanceCallback,
        on_lost: RebalanceCallback,
        *,
        read_committed: bool,
    ) -> FakeSource:
        return FakeSource(self, topic, on_assigned, on_revoked, on_lost, read_committed)

    def sink(self) -> FakeSink:
        return FakeSink(self.kafka)

    def transactional_sink(
        self, transactional_id: str, transaction_timeout_s: float
    ) -> FakeTransactionalSink:
        return FakeTransactionalSink(self.kafka, transactional_id, transaction_timeout_s)

    def changelog_reader(self, stall_timeout_s: float) -> FakeChangelogReader:
        return FakeChangelogReader(self.kafka, stall_timeout_s)


class FakeSource:
    """`Source` over a `FakeKafka`: one member of a consumer group."""

    def __init__(
        self,
        transport: FakeTransport,
        topic: str,
        on_assigned: RebalanceCallback,
        on_revoked: RebalanceCallback,
        on_lost: RebalanceCallback,
        read_committed: bool,
    ) -> None:
        self._kafka = transport.kafka
        self._group_id = transport.group_id
        self._group = self._kafka._group(transport.group_id)
        self._reset_to = transport.reset_to
        self._topic = topic
        self._callbacks = {"assigned": on_assigned, "revoked": on_revoked, "lost": on_lost}
        self._read_committed = read_committed
        self.member_id = self._kafka._join(self._group)
        self._generation = self._group.generation
        self.owned: set[int] = set()
        self._positions: dict[int, int] = {}
        self._paused = False
        self._running_since = self._kafka.clock()
        self.closed = False

    # -- what tests do to a member ----------------------------------------------------

    def pause(self) -> None:
        """The process stands still: no more heartbeats (SIGSTOP)."""
        self._kafka._group(self._group_id).members[self.member_id].paused = True
        self._paused = True

    def resume(self) -> None:
        """The process runs again (SIGCONT); if it was evicted, its next heartbeat, a
        heartbeat interval later, or its next poll tells it."""
        self._paused = False
        self._running_since = self._kafka.clock()
        member = self._group.members.get(self.member_id)
        if member is not None:
            member.paused = False
            member.last_heartbeat = self._kafka.clock()

    # -- the Source protocol ----------------------------------------------------------

    def poll(self, timeout_s: float, max_records: int) -> list[InputRecord]:
        self._rebalance()
        records: list[InputRecord] = []
        for partition in sorted(self.owned):
            readable = self._kafka._readable(self._topic, partition, self._read_committed)
            if partition not in self._positions:
                self._positions[partition] = self._start_position(partition)
            position = self._positions[partition]
            for record in readable:
                if len(records) >= max_records:
                    break
                if record.offset >= position:
                    records.append(
                        InputRecord(
                            self._topic,
                            partition,
                            record.offset,
                            record.key,
                            record.value,
                            record.timestamp_ms,
                            record.headers,
                        )
                    )
                    self._positions[partition] = record.offset + 1
        return records

    def seek_to_committed(
        self, partitions: Sequence[int], reading_from: Mapping[int, int] | None = None
    ) -> dict[int, int | None]:
        if self._kafka.down:
            raise KafkaUnavailableError("the fake broker is down")
        committed: dict[int, int | None] = {}
        for partition in partitions:
            if partition in self.owned:
                committed[partition] = offset = self._group.committed.get((self._topic, partition))
                if not reads_from_there(partition, offset, reading_from):
                    self._positions[partition] = self._start_position(partition)
        self._kafka.journal.append(("seek", dict(committed)))
        return committed

    def lag(self) -> dict[int, int]:
        return {
            p: len(self._kafka.topics[self._topic][p]) - self._positions[p]
            for p in self.owned
            if p in self._positions
        }

    def group_metadata(self) -> FakeGroupMetadata:
        evicted_at = self._kafka._evicted.get(self.member_id)
        # A heartbeat since both the eviction and the resume: the client knows.
        if (
            evicted_at is not None
            and not self._paused
            and self._kafka.clock() - max(evicted_at, self._running_since) >= HEARTBEAT_S
        ):
            raise TransactionAbortedError(not_a_member(self._group_id))
        return FakeGroupMetadata(self._group_id, self._generation, self.member_id)

    def close(self) -> None:
        if self.owned:
            self._callback("revoked", sorted(self.owned))
        for partition in self.owned:
            self._group.owners.pop((self._topic, partition), None)
        self.owned = set()
        if self.member_id in self._group.members:
            self._kafka._leave(self._group, self.member_id)
        self.closed = True
        self._kafka.journal.append(("source-close", self.member_id))

    # -- inside poll ------------------------------------------------------------------

    def _rebalance(self) -> None:
        group, kafka = self._group, self._kafka
        member = group.members.get(self.member_id)
        if member is None:  # evicted while it stood still: it learns now, then rejoins
            lost, self.owned = sorted(self.owned), set()
            if lost:
                self._callback("lost", lost)
            self.member_id = kafka._join(group)
        else:
            member.last_heartbeat = kafka.clock()
        self._generation = group.generation
        target = kafka._target(group, self._topic, self.member_id)
        revoked = sorted(self.owned - target)
        if revoked:
            self._callback("revoked", revoked)
            for partition in revoked:
                group.owners.pop((self._topic, partition), None)
            self.owned -= set(revoked)
        free = [p for p in sorted(target - self.owned) if (self._topic, p) not in group.owners]
        if free:
            for partition in free:
                group.owners[(self._topic, partition)] = self.member_id
                # Fetched after the callback, as both clients do: kafka-python and
                # librdkafka ask for a new partition's committed offset once the assigned
                # callback has returned (and wait out a transaction's pending offsets).
                self._positions.pop(partition, None)
            self.owned |= set(free)
            self._callback("assigned", free)

    def _start_position(self, partition: int) -> int:
        committed = self._group.committed.get((self._topic, partition))
        if committed is not None:
            return committed
        return (
            0 if self._reset_to == "earliest" else len(self._kafka.topics[self._topic][partition])
        )

    def _callback(self, kind: str, partitions: list[int]) -> None:
        self._kafka.journal.append((kind, partitions))
        self._callbacks[kind](partitions)


class FakeSink:
    """`Sink` over a `FakeKafka`: records are written when `flush` acknowledges them."""

    def __init__(self, kafka: FakeKafka) -> None:
        self._kafka = kafka
        self._queued: list[OutputRecord] = []

    def send(self, records: Sequence[OutputRecord]) -> None:
        for record in records:
            self._kafka.journal.append(("send", record.topic))
            self._queued.append(record)

    def flush(self, timeout_s: float) -> None:
        if self._kafka.down:
            raise FlushTimeoutError(f"{len(self._queued)} output records not acknowledged yet")
        queued, self._queued = self._queued, []
        refused = [r for r in queued if r.topic in self._kafka.refused_topics]
        for record in queued:
            if record not in refused:
                self._write(record, PLAIN)
        self._kafka.journal.append(("flush", None))
        if refused:
            raise DeliveryError(f"Kafka refused {len(refused)} output records")

    def close(self) -> None:
        self._kafka.journal.append(("sink-close", None))

    def _write(self, record: OutputRecord, state: str, transactional_id: str | None = None) -> None:
        kafka = self._kafka
        kafka.create_topic(record.topic, 1)
        partition = (
            record.partition
            if record.partition is not None
            else kafka.partition_for(record.topic, record.key)
        )
        kafka._append(
            record.topic,
            partition,
            record.key,
            record.value,
            record.headers,
            state,
            transactional_id,
        )


class FakeTransactionalSink(FakeSink):
    """`TransactionalSink` over a `FakeKafka`: sends land at once, invisible until commit."""

    def __init__(self, kafka: FakeKafka, transactional_id: str, timeout_s: float = 60.0) -> None:
        super().__init__(kafka)
        self.transactional_id = transactional_id
        self._timeout_s = timeout_s
        self._epoch = kafka._start_producer(transactional_id)
        self._open = False
        self.replaced = 0  # how many times `abort` had to start a new producer

    def send(self, records: Sequence[OutputRecord]) -> None:
        for record in records:
            self._kafka.journal.append(("send", record.topic))
            self._write(record, PENDING, self.transactional_id)

    def flush(self, timeout_s: float) -> None:
        if self._kafka.down:
            raise FlushTimeoutError("the fake broker is down")

    def begin(self) -> None:
        self._kafka.journal.append(("begin", self.transactional_id))
        self._kafka._open[self.transactional_id] = (self._kafka.clock(), self._timeout_s)
        self._open = True

    def commit(self, offsets: Offsets, group_metadata: Any) -> None:
        kafka = self._kafka
        if kafka.down:
            raise TransactionTimeoutError("the fake broker is down")
        if kafka._epochs[self.transactional_id] != self._epoch:
            raise FencedError(f"transactional id {self.transactional_id} was taken over")
        if offsets:
            group = kafka.groups[group_metadata.group_id]
            if (
                group_metadata.member_id not in group.members
                or group_metadata.generation != group.generation
            ):
                kafka.journal.append(("commit-refused", dict(offsets)))
                raise TransactionAbortedError(
                    f"generation {group_metadata.generation} of {group_metadata.member_id} "
                    f"is not the group's ({group.generation})"
                )
            group.committed.update(offsets)
        kafka._end(self.transactional_id, COMMITTED)
        kafka.journal.append(("commit", dict(offsets)))
        self._open = False

    def abort(self) -> None:
        kafka = self._kafka
        if not self._open:
            return
        if kafka.down:
            raise TransactionTimeoutError("the fake broker is down")
        if kafka._epochs[self.transactional_id] == self._epoch:
            kafka._end(self.transactional_id, ABORTED)
        kafka.journal.append(("abort", self.transactional_id))
        self._open = False
        # As the real sinks do: a new producer with the same id takes over.
        self._epoch = kafka._start_producer(self.transactional_id)
        self.replaced += 1


class FakeChangelogReader:
    """`ChangelogReader` over a `FakeKafka` (`read_committed`). Like the real readers, it
    waits for a transaction open before the end: here, time passes on the fake clock (in
    half seconds) until the coordinator aborts it at its timeout, or the stall bound."""

    def __init__(self, kafka: FakeKafka, stall_timeout_s: float = 120.0) -> None:
        self._kafka = kafka
        self._stall_timeout_s = stall_timeout_s

    def read_latest(
        self, topic: str, partitions: list[int], remaining: Callable[[int], None]
    ) -> tuple[Latest, int]:
        kafka = self._kafka
        if topic not in kafka.topics:
            remaining(0)
            return {}, 0
        waited = 0.0
        while any(
            kafka.last_stable_offset(topic, p) < len(kafka.topics[topic][p]) for p in partitions
        ):
            if waited >= self._stall_timeout_s:
                raise RestoreStalledError(
                    f"restoring from {topic}: an open transaction held it for {waited:.0f} s"
                )
            remaining(sum(len(kafka.topics[topic][p]) for p in partitions))
            kafka.advance(0.5)
            waited += 0.5
        latest: Latest = {}
        read = 0
        for partition in partitions:
            for record in kafka._readable(topic, partition, committed_only=True):
                latest[record.key or b""] = (partition, record.value)
                read += 1
        remaining(0)
        kafka.journal.append(("restore", list(partitions)))
        return latest, read
