"""The serving loop: poll, step, hand over to the committer, rewind when it must.

    poll ──> Processor.process ──> committer.send(result)      (pipeline.delivery)
      │                               at-least-once: outputs acknowledged every batch,
      │                               states + offsets in one transaction per checkpoint
      │                               exactly-once: everything in one transaction
      └─ rebalance callbacks run inside poll, between two batches:
           assigned -> restore their states from the changelog, then serve them
           revoked  -> checkpoint everything, then drop their streams
           lost     -> write nothing more of them; drop their streams

What the loop itself owns is the rewind: whenever uncommitted work had to be
thrown away (a checkpoint the broker refused, a lost partition under an open
transaction, a stand-still long enough to have been evicted), every partition
it still holds goes back to its last commit: its streams are dropped, its
states restored from the changelog and its position moved back to the
committed offset. A hidden state is a pure function of its stream's events,
so restore + replay gives back exactly the states of an uninterrupted run.

The loop is effectively single-threaded: the rebalance callbacks run while
the serving thread waits inside `poll` (`pipeline.transport.base`), so no
batch is ever half done when partitions move.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
)

from pipeline.delivery import Committer
from pipeline.errors import (
    DeliveryError,
    KafkaUnavailableError,
    TransactionAbortedError,
    TransactionTimeoutError,
)
from pipeline.health import LoopState
from pipeline.metrics import Metrics
from pipeline.pause import PauseWatch
from pipeline.records import BatchResult, InputRecord, OutputRecord
from pipeline.transport import RebalanceCallback, Source

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoopSettings:
    """The loop's part of the configuration."""

    poll_timeout_s: float = 0.1
    max_poll_records: int = 2000
    # Consumer lag is read at most this often: a gauge scraped every few
    # seconds gains nothing from a reading per poll, which costs a client call
    # and a labelled gauge update per partition.
    lag_interval_s: float = 1.0
    # How long a rewind keeps trying while the broker is away (it needs the
    # committed offsets and the changelog) before the server exits with the reason.
    outage_patience_s: float = 300.0


class BatchProcessor(Protocol):
    """What the loop needs of the processor (`pipeline.processor.Processor`)."""

    def process(self, records: Sequence[InputRecord]) -> BatchResult:
        """Serve one polled batch; an empty one still runs idle eviction."""
        ...

    def drop_partition(self, partition: int) -> int:
        """Forget the streams of `partition` (every model's); returns how many."""
        ...


class Checkpointer(Protocol):
    """Durable state (the changelog). Without one a checkpoint only commits offsets."""

    def changes(self) -> list[OutputRecord]:
        """The changelog records of every change since the last call, to send: snapshots
        of changed streams (their states copied now), then tombstones of evicted ones.
        Each record's partition is the input partition its stream was read from."""
        ...

    def restore(self, partitions: list[int], progress: Callable[[], None]) -> None:
        """Load the states of `partitions` into the store before they are served, calling
        `progress()` whenever records arrive."""
        ...


SourceFactory = Callable[[RebalanceCallback, RebalanceCallback, RebalanceCallback], Source]


class ServeLoop:
    """Serves until `stop()`; then finishes its batch, checkpoints and leaves the group."""

    def __init__(
        self,
        settings: LoopSettings,
        processor: BatchProcessor,
        committer: Committer,
        make_source: SourceFactory,
        metrics: Metrics,
        health: LoopState,
        checkpointer: Checkpointer | None = None,
        pause: PauseWatch | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._processor = processor
        self._committer = committer
        self._metrics = metrics
        self._health = health
        self._checkpointer = checkpointer
        self._pause = pause
        self._clock = clock
        self._stopping = False
        self._assigned: set[int] = set()
        self._last_lag = float("-inf")
        # Partitions whose streams were thrown away ahead of their last commit: the loop
        # takes them back to it (`_rewind`) as soon as the next poll returns.
        self._to_rewind: set[int] = set()
        self._rewind_due = False
        # Partitions assigned during the last poll, restored right after it (`_take_over`).
        self._to_take_over: set[int] = set()
        self._source = make_source(self._on_assigned, self._on_revoked, self._on_lost)

    @property
    def assigned(self) -> frozenset[int]:
        """Input partitions this consumer serves now."""
        return frozenset(self._assigned)

    def stop(self) -> None:
        """Ask the loop to leave after the batch in hand (safe from a signal handler)."""
        self._stopping = True

    def run(self) -> None:
        """Serve until stopped. A server fault (not bad input) ends the loop uncommitted,
        so the restart replays from the last checkpoint."""
        try:
            while not self._stopping:
                self.run_once()
            self._final_checkpoint()
        finally:
            self._close()

    def run_once(self) -> None:
        """One poll and everything that follows from it."""
        self._health.beat()
        if self._pause is not None:
            self._pause.mark()
        records = self._source.poll(self._settings.poll_timeout_s, self._settings.max_poll_records)
        if self._rewind_due:
            self._rewind()  # what this poll returned is read again
            return
        if self._to_take_over:
            records = self._take_over(records)
        result = self._processor.process(records)
        stood_still = self._pause.stood_still() if self._pause is not None else 0.0
        if stood_still:
            # Rewound after the next poll, which tells the client whether it was evicted.
            self._throw_away(
                f"the process stood still for {stood_still:.1f} s, long enough to have been "
                "evicted from the group; nothing of the batch in hand was sent"
            )
            return
        try:
            self._committer.send(result, self._source.group_metadata)
        except (TransactionAbortedError, TransactionTimeoutError) as error:
            self._metrics.count_commit_failure()
            self._throw_away(str(error))
            return
        except DeliveryError:
            self._metrics.count_delivery_error()
            raise
        now = self._clock()
        if now - self._last_lag >= self._settings.lag_interval_s:
            self._last_lag = now
            for partition, lag in self._source.lag().items():
                self._metrics.set_lag(partition, lag)

    def _final_checkpoint(self) -> None:
        """The stop's checkpoint, and a log line that says what it made durable."""
        try:
            committed = self._committer.checkpoint(self._source.group_metadata)
        except TransactionAbortedError as error:
            log.warning(
                "stopping without the last checkpoint (%s); the next owner of these "
                "partitions replays from the commit before it",
                error,
            )
            return
        if committed.offsets:
            log.info(
                "stopped: outputs acknowledged; %d changelog records and the offsets %s committed",
                committed.snapshots,
                ", ".join(f"{t}[{p}]@{o}" for (t, p), o in sorted(committed.offsets.items())),
            )
        else:
            log.info("stopped: nothing was left to commit")

    def _throw_away(self, reason: str) -> None:
        """Uncommitted work was thrown away: the streams in memory are ahead of the last
        commit, so none of them may reach a checkpoint. Drop them all now; right after the
        next poll (or this one, from a callback) `_rewind` takes the partitions back to it."""
        log.warning("throwing away everything uncommitted: %s", reason)
        self._health.beat()  # what failed may have waited its whole bound
        try:
            self._committer.reset()  # abort an open transaction before anything else
        except KafkaUnavailableError as error:
            log.warning("the abort waits for the broker (%s); the rewind tries again", error)
        for partition in self._assigned:
            self._processor.drop_partition(partition)
        self._to_rewind |= self._assigned
        self._rewind_due = True

    def _rewind(self) -> None:
        """Back to the last commit, right after a poll: every partition held goes back to its
        committed offset (what that poll returned is read again), and the streams that were
        thrown away are restored from the changelog (those of partitions assigned since were
        restored on assignment)."""
        partitions = sorted(self._assigned)
        behind = sorted(self._to_rewind & self._assigned)
        self._to_rewind.clear()
        self._rewind_due = False
        log.warning("rewinding partitions %s to their last commit", behind)
        self._metrics.rewinds.inc()
        committed = self._seek_then_restore(partitions, behind, reset=True)
        log.info("partitions %s back at their committed offsets %s", partitions, committed)

    def _take_over(self, records: list[InputRecord]) -> list[InputRecord]:
        """The partitions assigned during the poll that returned `records`: to their
        committed offsets, then their states from the changelog; what the poll returned of
        them is read again. In this order because a member that lost them may still commit
        a transaction it had begun while it owned them (its offsets were accepted before,
        its end comes after): offsets read first are never ahead of the states read after
        them, and states ahead of the offsets are what the replay guard is for. The other
        order restored states older than offsets that such a commit moved meanwhile, and
        their streams skipped the events in between (the fault campaign: a paused member,
        at-least-once). Of what the poll returned, the records below those offsets were
        committed already; the rest are served (and skipped by the replay guard when the
        seek makes the next poll return them again)."""
        partitions = sorted(self._to_take_over & self._assigned)
        self._to_take_over.clear()
        if not partitions:
            return records
        reading_from: dict[int, int] = {}
        for r in records:
            reading_from.setdefault(r.partition, r.offset)
        committed = self._seek_then_restore(partitions, partitions, reset=False, at=reading_from)
        log.info("partitions %s taken over at their committed offsets %s", partitions, committed)
        return [
            r
            for r in records
            if r.partition not in committed or r.offset >= (committed[r.partition] or 0)
        ]

    def _seek_then_restore(
        self,
        partitions: list[int],
        restore: list[int],
        *,
        reset: bool,
        at: Mapping[int, int] | None = None,
    ) -> dict[int, int | None]:
        """`partitions` to their committed offsets, then `restore` from the changelog. The
        broker may be away (that may be why work was thrown away): try again until it
        answers, beating liveness meanwhile, for a bounded time."""
        committed: dict[int, int | None] = {}
        for attempt in Retrying(
            retry=retry_if_exception_type(KafkaUnavailableError),
            stop=stop_after_delay(self._settings.outage_patience_s),
            wait=wait_exponential(multiplier=0.5, max=5.0),
            before_sleep=self._waiting_for_the_broker,
            reraise=True,
        ):
            with attempt:
                if reset:
                    self._committer.reset()
                committed = self._source.seek_to_committed(partitions, at)
                if restore:
                    self._restore(restore)
        return committed

    def _waiting_for_the_broker(self, state: RetryCallState) -> None:
        self._health.beat()
        log.warning(
            "rewind not done yet (attempt %d, %.0f s so far): %s",
            state.attempt_number,
            state.seconds_since_start,
            state.outcome.exception() if state.outcome is not None else "",
        )

    def _restore(self, partitions: list[int]) -> None:
        if self._checkpointer is None:
            return
        self._health.set_restoring(True)
        try:
            self._checkpointer.restore(partitions, self._health.beat)
        finally:
            self._health.set_restoring(False)

    def _on_assigned(self, partitions: list[int]) -> None:
        log.info("assigned input partitions %s", partitions)
        self._metrics.count_rebalance("assigned")
        self._assigned |= set(partitions)
        # Restored right after this poll, from their commit (`_take_over` says why then).
        self._to_take_over |= set(partitions)
        self._to_rewind -= set(partitions)
        self._publish_assignment()

    def _on_revoked(self, partitions: list[int]) -> None:
        log.info("giving up input partitions %s", partitions)
        self._metrics.count_rebalance("revoked")
        try:
            self._committer.checkpoint(self._source.group_metadata)
        except TransactionAbortedError as error:
            # Nothing of it is visible: the next owner replays these partitions from
            # their last commit, and this member rewinds the ones it keeps.
            self._metrics.count_commit_failure()
            self._throw_away(f"the checkpoint before giving up {partitions} failed: {error}")
        self._drop(partitions)

    def _on_lost(self, partitions: list[int]) -> None:
        """Partitions taken away without a revocation (this member was evicted from the
        group): another member may own them already, so nothing may be written for
        them. Their streams are dropped; the owner replays from the last commit."""
        log.warning("lost input partitions %s: dropping their streams unwritten", partitions)
        self._metrics.count_rebalance("lost")
        try:
            aborted = self._committer.lose(partitions)
        except KafkaUnavailableError as error:
            aborted = True  # the abort did not finish; the rewind tries again
            log.warning("aborting the open transaction waits for the broker: %s", error)
        if aborted:
            self._throw_away(f"the open transaction held work of the lost partitions {partitions}")
        self._drop(partitions)

    def _drop(self, partitions: list[int]) -> None:
        dropped = sum(self._processor.drop_partition(p) for p in partitions)
        log.info("dropped %d streams of partitions %s", dropped, partitions)
        for partition in partitions:
            self._metrics.forget_partition(partition)
        self._assigned -= set(partitions)
        self._to_rewind -= set(partitions)
        self._to_take_over -= set(partitions)
        self._publish_assignment()

    def _publish_assignment(self) -> None:
        self._health.set_assigned(len(self._assigned))
        self._metrics.assigned_partitions.set(len(self._assigned))

    def _close(self) -> None:
        # The source first: closing it revokes the partitions, and the revocation
        # checkpoints through the committer's producers.
        try:
            self._source.close()
        finally:
            self._committer.close()
