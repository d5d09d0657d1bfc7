"""The client-neutral seam: what the serving loop and the changelog need of Kafka.

`Source` and `Sink` are the two small protocols the serving loop talks to;
`ChangelogReader` is what the changelog restore reads through; a `Transport`
makes all three for one Kafka client library. This module imports no client:
each implementation lives in a module of its own (`kafka_python`,
`confluent`) and `pipeline.transport.open_transport` picks one by name.

Every implementation gives the loop the same contract: records in offset
order per partition, rebalance callbacks only while the serving thread waits
inside `poll` or `close` (never during a batch), explicit offset commits, and
Kafka transactions for exactly-once. Nothing else in `pipeline` touches a
client type, so the loop is unit-tested with in-memory doubles.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from pipeline.errors import FencedError, KafkaSetupError, RestoreStalledError
from pipeline.records import InputRecord, OutputRecord

Offsets = Mapping[tuple[str, int], int]
"""(topic, partition) -> the next offset to read, i.e. last processed offset + 1."""


# How long the producer keeps retrying one output record (a broker outage)
# before giving it up: then the server stops uncommitted and its restart
# replays. Bounds the worst drain on SIGTERM (deploy/ sizes the grace period).
DELIVERY_TIMEOUT_S = 60.0

# How long one transaction call (begin excepted: it is local) may take before the
# transaction's fate counts as unknown. The sink then replaces its producer: a new
# one with the same transactional id finishes or aborts the old transaction.
TRANSACTION_CALL_TIMEOUT_S = 30.0


class Source(Protocol):
    """The input topic as the loop sees it: a consumer in a group, with explicit offsets.

    Contract (`tests/contract` runs it against every implementation, the fakes of
    `pipeline.testing` included):

    - `poll` returns each partition's records in offset order, at most `max_records`;
    - the rebalance callbacks run only inside `poll` and `close`, on behalf of the
      thread that called them, never while that thread is between two calls;
    - `assigned(partitions)` runs before any record of those partitions is returned;
    - `revoked(partitions)` runs while the partitions are still this member's: what it
      commits counts, and no other member reads them until it returns;
    - `lost(partitions)` runs instead when the member was evicted from the group
      (its session expired, it was fenced): another member may own them already;
    - `close` runs `revoked` for everything still held, then leaves the group.
    """

    def poll(self, timeout_s: float, max_records: int) -> list[InputRecord]:
        """Records in offset order per partition; rebalance callbacks run inside this call.
        Returns as soon as records are there (at most `max_records`), or empty after
        `timeout_s`."""

    def seek_to_committed(
        self, partitions: Sequence[int], reading_from: Mapping[int, int] | None = None
    ) -> dict[int, int | None]:
        """Move the position of each assigned partition back to its committed offset (where
        the group has none: where `auto_offset_reset` says), so the next poll returns its
        records from there again; a partition whose committed offset is `reading_from[p]`
        (the first offset the last poll returned of it) is left where it is. Returns the
        committed offsets (None: none yet). Partitions this member no longer holds are
        skipped. `KafkaUnavailableError` if the broker does not answer in time."""

    def lag(self) -> dict[int, int]:
        """Records behind the end of each assigned partition, where known."""

    def group_metadata(self) -> Any:
        """The member's group identity (group, generation, member id) for offsets sent
        inside a transaction: the broker refuses them from a member that is no longer in
        that generation (KIP-447), which is what fences a member that was evicted.
        `TransactionAbortedError` once the client knows the member is gone (it reset its
        generation to -1, which the broker would accept from a transaction)."""

    def close(self) -> None:
        """Revoke what is held (the callback runs), leave the group (a static member keeps
        its membership until the session times out) and release the connection."""


class Sink(Protocol):
    """An idempotent producer: predictions and dead letters (at-least-once)."""

    def send(self, records: Sequence[OutputRecord]) -> None:
        """Queue records, in order; a failure surfaces in the next `flush`. A whole batch
        per call: the per-record work stays in one tight loop inside the sink."""

    def flush(self, timeout_s: float) -> None:
        """Wait until every queued record is acknowledged. `FlushTimeoutError` if some are not
        yet (call again), `DeliveryError` if one was refused for good."""

    def close(self) -> None:
        """Flush what is queued (for a bounded time) and release the connection."""


class TransactionalSink(Sink, Protocol):
    """A transactional producer (one transactional id): what it sends between `begin` and
    `commit` becomes visible to `read_committed` readers all at once, or never.

    Its transactional id is stable per member: a restarted member's producer fences
    its predecessor's (`init_transactions` aborts the open transaction at once)."""

    def begin(self) -> None:
        """Open a transaction for what is sent next."""

    def commit(self, offsets: Offsets, group_metadata: Any) -> None:
        """Add the input offsets to the open transaction and commit it. Raises
        `TransactionAbortedError` when the broker refused it (the member was evicted from
        that generation): nothing of it is visible, call `abort`; `TransactionTimeoutError`
        when it did not finish within `TRANSACTION_CALL_TIMEOUT_S` (its fate is unknown
        until `abort`); `FencedError` when a producer with the same transactional id took
        over (this process is a zombie: it must stop)."""

    def abort(self) -> None:
        """End the open transaction (if any) with nothing of it visible, so that its state
        is known again: abort it, then replace the producer by one with the same
        transactional id, whose start resolves what an abort could not (after a commit
        timed out, the abort is not tried). `TransactionTimeoutError` if that does not
        finish in time: call again (each call waits one bound at most); `FencedError` when
        fenced too often (two live servers with one id)."""


RebalanceCallback = Callable[[list[int]], None]

Latest = dict[bytes, tuple[int, bytes | None]]
"""Key -> (partition, newest value); None is a tombstone."""


class ChangelogReader(Protocol):
    """Reads compacted changelog partitions for a restore."""

    def read_latest(
        self, topic: str, partitions: list[int], remaining: Callable[[int], None]
    ) -> tuple[Latest, int]:
        """The newest committed value of every key in `partitions` of `topic`, and how many
        records were read. Reads from the start up to the end as it was when the call began
        (the high watermark), so a transaction still open there is waited for: its records
        are behind every committed one that follows it. Calls `remaining(n)` with the
        records still to read after each fetch (0 at the end); `RestoreStalledError` if no
        position moves for the reader's stall timeout while some are still to read."""


# The least time a restore may go without moving before it gives up (the broker is
# away, or an open transaction of a crashed member holds the end back for longer than
# its timeout should): the server then exits with the reason. Never less than twice
# the transaction timeout, which bounds how long an open transaction can hold it.
RESTORE_STALL_TIMEOUT_S = 120.0


class Transport(Protocol):
    """One Kafka client library: makes the loop's source and sinks, and reads changelogs."""

    name: str

    def source(
        self,
        topic: str,
        on_assigned: RebalanceCallback,
        on_revoked: RebalanceCallback,
        on_lost: RebalanceCallback,
        *,
        read_committed: bool,
    ) -> Source:
        """A consumer of `topic` in the configured group (cooperative rebalancing)."""

    def sink(self) -> Sink:
        """An idempotent producer."""

    def transactional_sink(
        self, transactional_id: str, transaction_timeout_s: float
    ) -> TransactionalSink:
        """A transactional producer; its transactions are aborted by the broker when they
        stay open longer than `transaction_timeout_s`."""

    def changelog_reader(self, stall_timeout_s: float) -> ChangelogReader:
        """The reader the changelog restore uses; see `ChangelogReader` for the timeout."""


class StallWatch:
    """For a changelog reader: `RestoreStalledError` when no partition's position moved
    for `timeout_s` while some are still to read. Halfway there, `probe` is asked once
    what holds the positions (`hanging.find_quietly`: the transactions open there, and
    their coordinator's word on each), and what it says goes into the error."""

    def __init__(
        self,
        topic: str,
        timeout_s: float,
        probe: Callable[[str, Mapping[int, int]], str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._topic = topic
        self._timeout_s = timeout_s
        self._probe = probe
        self._clock = clock
        self._positions: dict[int, int] = {}
        self._since = clock()
        self._found: str | None = None

    def check(self, positions: Mapping[int, int], ends: Mapping[int, int]) -> None:
        """`positions` and `ends` of the partitions still to read (empty: done)."""
        now = self._clock()
        if not positions or any(self._positions.get(p, -1) < o for p, o in positions.items()):
            self._positions = dict(positions)
            self._since = now
            self._found = None
            return
        stood = now - self._since
        if self._probe is not None and self._found is None and stood > self._timeout_s / 2:
            self._found = self._probe(self._topic, positions)
        if stood > self._timeout_s:
            where = ", ".join(f"[{p}] at {positions[p]} of {ends[p]}" for p in sorted(positions))
            found = f"; {self._found}" if self._found else ""
            raise RestoreStalledError(
                f"restoring from {self._topic}: no progress for {self._timeout_s:.0f} s "
                f"({where}); the broker is away, or a transaction left open there outlives "
                f"the transaction timeout{found}"
            )


class FenceCount:
    """For a transactional sink: how often its producer was fenced lately. A fence alone
    is recoverable (the broker aborted a transaction that outlived its timeout, during an
    outage, bumps the epoch too); three within `window_s` mean another live server has
    this transactional id, and `check` raises `FencedError` instead of fencing it back."""

    def __init__(self, transactional_id: str, most: int = 3, window_s: float = 300.0) -> None:
        self._id = transactional_id
        self._most = most
        self._window_s = window_s
        self._times: list[float] = []

    def count(self) -> None:
        """The producer was just fenced."""
        now = time.monotonic()
        self._times = [t for t in self._times if now - t < self._window_s] + [now]

    def check(self) -> None:
        """Before a new producer takes the id over: `FencedError` if fenced too often."""
        now = time.monotonic()
        if len([t for t in self._times if now - t < self._window_s]) >= self._most:
            raise FencedError(
                f"{fenced(self._id)}; fenced {self._most} times within {self._window_s:.0f} s"
            )


def fenced(transactional_id: str) -> str:
    """What to say when a producer with `transactional_id` was fenced."""
    return (
        f"another producer with transactional id {transactional_id!r} took over (two servers "
        "with the same --instance-id, or the broker aborted a transaction that outlived "
        "its timeout)"
    )


def reads_from_there(
    partition: int, committed: int | None, reading_from: Mapping[int, int] | None
) -> bool:
    """For `Source.seek_to_committed`: whether the client reads `partition` from where a seek
    would put it already (the first offset the last poll returned is the committed one, or
    there is none and the reset policy chose the start), so seeking would only return
    those records again."""
    if reading_from is None or partition not in reading_from:
        return False
    return committed is None or reading_from[partition] == committed


def not_a_member(group_id: str) -> str:
    """What to say when a member asked for its group metadata is no longer in the group."""
    return (
        f"this member is no longer in consumer group {group_id!r} (its session expired or it "
        "was removed): nothing it served since its last commit may be committed"
    )


def unauthorized(transactional_id: str) -> str:
    """What to say when the broker does not let this client use `transactional_id`."""
    return (
        f"the broker does not let this client use transactional id {transactional_id!r}: "
        "grant it WRITE and DESCRIBE on that TransactionalId (states and offsets are "
        "committed in transactions under both guarantees)"
    )


def unreachable(servers: Any, exc: Exception) -> KafkaSetupError:
    """The start-up error for a broker that does not answer, whichever client saw it."""
    return KafkaSetupError(
        f"cannot reach Kafka at {servers} ({exc}); check --bootstrap-servers / "
        "HIDDENSTATE_BOOTSTRAP_SERVERS, the security settings, and that the broker runs"
    )
