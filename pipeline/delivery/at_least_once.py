"""At-least-once: outputs acknowledged every batch, states and offsets in one transaction.

    every batch:       send outputs ──> wait for their acks ──> (a share of the checkpoint)
    every checkpoint:  copy the changed states; begin a transaction on the state
                       producer; send the snapshots, a share before each of the next
                       batches; then commit the transaction with the input offsets the
                       copies cover (offsets of outputs all acknowledged already)

Offsets are committed only after everything produced from them is
acknowledged, so a crash can repeat predictions but never lose one.

Snapshots and offsets share one transaction, committed with the consumer's
group metadata: a member that was evicted (paused past its session timeout)
can still send snapshots, but its commit is refused and they are never
visible to a restore, which reads `read_committed`. Without that, a woken
member's snapshots of partitions another member had moved on with became the
newest records of their streams, and the next restore started those streams
from stale states that the replay then skipped ahead of.

The spread: a checkpoint with tens of thousands of changed streams sent at
once stopped the loop for 25 ms (confluent) to 150 ms (kafka-python), and the
events waiting meanwhile were the latency's tail (docs/benchmarks.md); so each
batch sends a share of the snapshots, for `share_s` at most. An idle poll, a
revocation and the stop finish a spread at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pipeline.delivery import (
    Changes,
    CheckpointSchedule,
    Committed,
    GroupMetadata,
    without_partitions,
)
from pipeline.errors import (
    FencedError,
    FlushTimeoutError,
    TransactionAbortedError,
    TransactionTimeoutError,
)
from pipeline.metrics import Metrics
from pipeline.records import BatchResult, OutputRecord
from pipeline.transport import Sink
from pipeline.transport.base import TransactionalSink

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpreadSettings:
    """How a checkpoint is spread and how long one wait for acknowledgements lasts."""

    # Per batch, snapshots are sent in shares of this many records for as long as
    # `share_s` lasts (at least one share).
    share_records: int = 200
    share_s: float = 0.002
    # One wait for acknowledgements lasts this long; then the loop beats its liveness
    # heartbeat and waits again (the producer's delivery timeout decides when a record
    # is given up).
    flush_wait_s: float = 5.0


@dataclass
class _Spread:
    """A checkpoint in progress: its changelog records, sent a share per batch inside an
    open transaction, and the offsets it commits once the last share is sent."""

    records: list[OutputRecord]
    offsets: dict[tuple[str, int], int]
    started: float
    sent: int = 0

    @property
    def all_sent(self) -> bool:
        return self.sent == len(self.records)


class AtLeastOnce:
    """The `Committer` of `--guarantee at-least-once`."""

    def __init__(
        self,
        outputs: Sink,
        states: TransactionalSink,
        changes: Changes,
        schedule: CheckpointSchedule,
        metrics: Metrics,
        beat: Callable[[], None],
        settings: SpreadSettings | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._outputs = outputs
        self._states = states
        self._changes = changes
        self._schedule = schedule
        self._metrics = metrics
        self._beat = beat
        self._settings = settings or SpreadSettings()
        self._clock = clock
        self._pending: dict[tuple[str, int], int] = {}
        self._spread: _Spread | None = None
        # A transaction is open on the state producer (a spread in progress, or one whose
        # commit failed and that `reset` still has to abort).
        self._open = False

    def send(self, result: BatchResult, group: GroupMetadata) -> None:
        if result.next_offsets:
            self._outputs.send(result.outputs)
            wait_for_acks(self._outputs, self._settings.flush_wait_s, self._beat)
            self._metrics.observe_end_to_end(result.event_times_ms, self._clock())
            self._pending.update(result.next_offsets)
            self._schedule.count(len(result.event_times_ms) + len(result.dead_letters))
            self._send_share()
        elif self._spread is not None:
            self._send_rest()  # idle: no waiting events to protect, finish it now
        if self._spread is not None and self._spread.all_sent:
            self._commit(group)
        if self._spread is None and self._schedule.due():
            self._begin()
            if self._spread is not None and self._spread.all_sent:
                self._commit(group)

    def checkpoint(self, group: GroupMetadata) -> Committed:
        committed = Committed()
        if self._spread is not None:
            self._send_rest()
            committed = self._commit(group)
        self._begin()
        if self._spread is not None:
            self._send_rest()
            later = self._commit(group)
            committed = Committed(
                {**committed.offsets, **later.offsets}, committed.snapshots + later.snapshots
            )
        return committed

    def lose(self, partitions: Sequence[int]) -> bool:
        self._pending = without_partitions(self._pending, partitions)
        if not self._open:
            return False
        # Its transaction may hold snapshots of the lost partitions already: abort it.
        # The snapshots of the others in it are gone too, so the loop rewinds those.
        self.reset()
        return True

    def reset(self) -> None:
        self._pending = {}
        self._spread = None
        if self._open:
            self._states.abort()
            self._open = False

    def close(self) -> None:
        try:
            self._outputs.close()
        finally:
            self._states.close()

    def _begin(self) -> None:
        """Copy the changes and take the offsets they cover; open the transaction and send
        the first share. Nothing changed and no offsets to commit: no transaction."""
        started = self._schedule.begun()
        records = self._changes()
        if not records and not self._pending:
            return
        self._states.begin()
        self._open = True
        self._spread = _Spread(records, self._pending, started)
        self._pending = {}
        self._send_share()

    def _send_share(self) -> None:
        spread = self._spread
        if spread is None or spread.all_sent:
            return
        share = self._settings.share_records
        deadline = time.perf_counter() + self._settings.share_s
        while True:
            self._states.send(spread.records[spread.sent : spread.sent + share])
            spread.sent = min(spread.sent + share, len(spread.records))
            if spread.all_sent or time.perf_counter() >= deadline:
                return

    def _send_rest(self) -> None:
        spread = self._spread
        if spread is not None:
            self._states.send(spread.records[spread.sent :])
            spread.sent = len(spread.records)

    def _commit(self, group: GroupMetadata) -> Committed:
        """Commit the spread's transaction: its snapshots and offsets become visible
        together, or (refused, timed out) never, and the loop rewinds."""
        spread = self._spread
        if spread is None:
            return Committed()
        self._spread = None
        try:
            self._states.commit(spread.offsets, group())
        except (TransactionAbortedError, TransactionTimeoutError, FencedError) as error:
            # Still open: the loop's `reset` aborts it before the rewind.
            self._pending = {}
            raise TransactionAbortedError(
                f"checkpoint of {len(spread.records)} changelog records and offsets "
                f"{_describe(spread.offsets)} not committed: {error}"
            ) from error
        self._open = False
        self._metrics.checkpoint_seconds.observe(self._clock() - spread.started)
        return Committed(spread.offsets, len(spread.records))


def wait_for_acks(sink: Sink, wait_s: float, beat: Callable[[], None]) -> None:
    """Wait for every output's acknowledgement, however long the broker is away, beating
    the liveness heartbeat meanwhile: an outage is not a stuck loop. Records the producer
    gives up on (after its delivery timeout) raise `DeliveryError`, which stops the server
    uncommitted."""
    while True:
        try:
            sink.flush(wait_s)
            return
        except FlushTimeoutError:
            beat()
            log.warning("outputs not acknowledged yet; still waiting for the broker")


def _describe(offsets: dict[tuple[str, int], int]) -> str:
    return ", ".join(f"{t}[{p}]@{o}" for (t, p), o in sorted(offsets.items())) or "(none)"
