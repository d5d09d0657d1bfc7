"""The serving loop: poll, step, publish, acknowledge, checkpoint.

    poll ──> Processor.process ──> send predictions + dead letters
                                      │ at-least-once: flush (wait for acks) every batch
                                      ▼
    every checkpoint interval: write changed states to the changelog, wait for
    their acks, then commit the input offsets (exactly-once: all of it, with
    the predictions, in one Kafka transaction)

At-least-once, a checkpoint with many changed streams is spread over the
next batches: the changed states are copied at once (so they match the
offsets to commit), then each batch sends a share of their snapshots before
its own flush, and the offsets are committed after the flush that
acknowledged the last share. Sending tens of thousands of snapshots at once
stopped the loop for 25 ms (confluent) to 150 ms (kafka-python): the events
waiting meanwhile were the latency's tail (docs/benchmarks.md).

Offsets are committed only after everything produced from them is
acknowledged, so a crash can repeat predictions but never lose one. The loop is
effectively single-threaded: the rebalance callbacks run while the serving
thread waits inside `poll` (`pipeline.transport`), between two batches, so no
batch is ever half done when partitions move.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from pipeline.errors import DeliveryError, FlushTimeoutError
from pipeline.health import LoopState
from pipeline.metrics import Metrics
from pipeline.records import BatchResult, InputRecord, OutputRecord
from pipeline.state_store import StateStore
from pipeline.transport import RebalanceCallback, Sink, Source

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoopSettings:
    """The loop's part of the configuration."""

    poll_timeout_s: float = 0.1
    max_poll_records: int = 2000
    checkpoint_interval_s: float = 5.0
    checkpoint_interval_events: int = 0  # 0: by time only
    exactly_once: bool = False
    # How long one wait for acknowledgements lasts before the loop beats its
    # liveness heartbeat and waits again (the producer's own delivery timeout
    # decides when a record is given up).
    flush_wait_s: float = 5.0
    # Consumer lag is read at most this often: a gauge scraped every few
    # seconds gains nothing from a reading per poll, which costs a client call
    # and a labelled gauge update per partition.
    lag_interval_s: float = 1.0
    # A spread checkpoint sends, per batch, snapshots in shares of this many
    # records for as long as this budget lasts (at least one share).
    checkpoint_share_records: int = 200
    checkpoint_share_s: float = 0.002


class BatchProcessor(Protocol):
    """What the loop needs of the processor (`pipeline.processor.Processor`)."""

    store: StateStore

    def process(self, records: Sequence[InputRecord]) -> BatchResult:
        """Serve one polled batch; an empty one still runs idle eviction."""
        ...


class Checkpointer(Protocol):
    """Durable state (the changelog). Without one a checkpoint only commits offsets."""

    def changes(self) -> list[OutputRecord]:
        """The changelog records of every change since the last call, to send: snapshots
        of changed streams (their states copied now), then tombstones of evicted ones.
        Each record's partition is the input partition its stream was read from."""
        ...

    def restore(self, partitions: list[int]) -> None:
        """Load the states of newly assigned input partitions before they are served."""
        ...


SourceFactory = Callable[[RebalanceCallback, RebalanceCallback, RebalanceCallback], Source]


@dataclass
class _Spread:
    """An at-least-once checkpoint in progress: its changelog records, sent a share
    per batch, and the offsets it commits once the last share is acknowledged."""

    records: list[OutputRecord]
    offsets: dict[tuple[str, int], int]
    started: float
    sent: int = 0

    @property
    def all_sent(self) -> bool:
        return self.sent == len(self.records)


class ServeLoop:
    """Serves until `stop()`; then finishes its batch, checkpoints and leaves the group."""

    def __init__(
        self,
        settings: LoopSettings,
        processor: BatchProcessor,
        sink: Sink,
        make_source: SourceFactory,
        metrics: Metrics,
        health: LoopState,
        checkpointer: Checkpointer | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._processor = processor
        self._sink = sink
        self._metrics = metrics
        self._health = health
        self._checkpointer = checkpointer
        self._clock = clock
        self._stopping = False
        self._assigned: set[int] = set()
        self._pending_offsets: dict[tuple[str, int], int] = {}
        self._events_since_checkpoint = 0
        self._last_checkpoint = clock()
        self._last_lag = float("-inf")
        self._in_transaction = False
        self._spread: _Spread | None = None
        # Exactly-once: event times of predictions that become visible at the next commit.
        self._uncommitted_event_times: list[int] = []
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
            self._checkpoint()
            log.info("stopped cleanly: outputs flushed and offsets committed")
        finally:
            self._close()

    def run_once(self) -> None:
        """One poll and everything that follows from it."""
        self._health.beat()
        records = self._source.poll(self._settings.poll_timeout_s, self._settings.max_poll_records)
        if records:
            self._begin_transaction_if_needed()
        result = self._processor.process(records)
        if records:
            self._sink.send(result.outputs)
            if self._settings.exactly_once:
                self._uncommitted_event_times += result.event_times_ms
            else:
                self._send_checkpoint_share()  # acknowledged by the flush that follows
                self._flush()
                self._metrics.observe_end_to_end(result.event_times_ms, self._clock())
                self._commit_if_checkpoint_sent()
            self._pending_offsets.update(result.next_offsets)
            self._events_since_checkpoint += len(records)
        elif self._spread is not None:
            self._finish_spread()  # idle: no waiting events to protect, finish it now
        now = self._clock()
        if now - self._last_lag >= self._settings.lag_interval_s:
            self._last_lag = now
            for partition, lag in self._source.lag().items():
                self._metrics.set_lag(partition, lag)
        if self._spread is None and self._checkpoint_due():
            if self._settings.exactly_once:
                self._checkpoint()
            else:
                self._begin_spread()

    def _flush(self) -> None:
        """Wait for every output's acknowledgement, however long the broker is away,
        beating the liveness heartbeat meanwhile: an outage is not a stuck loop.
        Records the producer gives up on (after its delivery timeout) raise
        `DeliveryError`, which stops the server uncommitted."""
        while True:
            try:
                self._sink.flush(self._settings.flush_wait_s)
                return
            except FlushTimeoutError:
                self._health.beat()
                log.warning("outputs not acknowledged yet; still waiting for the broker")
            except DeliveryError:
                self._metrics.count_delivery_error()
                raise

    def _checkpoint_due(self) -> bool:
        by_events = self._settings.checkpoint_interval_events
        if by_events and self._events_since_checkpoint >= by_events:
            return True
        return self._clock() - self._last_checkpoint >= self._settings.checkpoint_interval_s

    def _begin_transaction_if_needed(self) -> None:
        if self._settings.exactly_once and not self._in_transaction:
            self._sink.begin()
            self._in_transaction = True

    def _checkpoint(self) -> None:
        """Changed states to the changelog, wait for acks, then commit the input offsets,
        all before returning (a revocation, the stop, exactly-once)."""
        if not self._settings.exactly_once:
            if self._spread is not None:
                self._finish_spread()
            self._begin_spread()
            if self._spread is not None:
                self._finish_spread()
            return
        started = self._clock()
        self._last_checkpoint = started
        self._events_since_checkpoint = 0
        if not self._in_transaction:
            return
        if self._checkpointer is not None:
            self._sink.send(self._checkpointer.changes())
        self._sink.commit_transaction(self._pending_offsets, self._source.group_metadata())
        self._in_transaction = False
        self._metrics.observe_end_to_end(self._uncommitted_event_times, self._clock())
        self._uncommitted_event_times = []
        self._pending_offsets = {}
        self._metrics.checkpoint_seconds.observe(self._clock() - started)

    def _begin_spread(self) -> None:
        """At-least-once: copy the changes and take the offsets they cover; send the first
        share. A checkpoint that fits in one share finishes here, like a plain one."""
        started = self._clock()
        self._last_checkpoint = started
        self._events_since_checkpoint = 0
        records = self._checkpointer.changes() if self._checkpointer is not None else []
        self._spread = _Spread(records, self._pending_offsets, started)
        self._pending_offsets = {}
        self._send_checkpoint_share()
        if self._spread.all_sent:
            if records:
                self._flush()
            self._commit_if_checkpoint_sent()

    def _send_checkpoint_share(self) -> None:
        spread = self._spread
        if spread is None or spread.all_sent:
            return
        share = self._settings.checkpoint_share_records
        deadline = time.perf_counter() + self._settings.checkpoint_share_s
        while True:
            self._sink.send(spread.records[spread.sent : spread.sent + share])
            spread.sent = min(spread.sent + share, len(spread.records))
            if spread.all_sent or time.perf_counter() >= deadline:
                return

    def _finish_spread(self) -> None:
        spread = self._spread
        if spread is None:
            return
        self._sink.send(spread.records[spread.sent :])
        spread.sent = len(spread.records)
        self._flush()
        self._commit_if_checkpoint_sent()

    def _commit_if_checkpoint_sent(self) -> None:
        """After a flush: commit the spread checkpoint's offsets once all of it is sent
        (and so acknowledged). A deferred commit leaves them pending for the next one."""
        spread = self._spread
        if spread is None or not spread.all_sent:
            return
        self._spread = None
        if not self._source.commit(spread.offsets):
            self._metrics.count_commit_failure()
            # Rebalancing: retry with the next checkpoint. Offsets taken since are newer.
            self._pending_offsets = {**spread.offsets, **self._pending_offsets}
            return
        self._metrics.checkpoint_seconds.observe(self._clock() - spread.started)

    def _on_assigned(self, partitions: list[int]) -> None:
        log.info("assigned input partitions %s", partitions)
        self._metrics.count_rebalance("assigned")
        if self._checkpointer is not None:
            self._health.set_restoring(True)
            try:
                self._checkpointer.restore(partitions)
            finally:
                self._health.set_restoring(False)
        self._assigned |= set(partitions)
        self._publish_assignment()

    def _on_revoked(self, partitions: list[int]) -> None:
        log.info("giving up input partitions %s", partitions)
        self._metrics.count_rebalance("revoked")
        try:
            self._checkpoint()
        except Exception:
            if self._settings.exactly_once:
                raise  # the transaction's fate is unknown: restart from the last commit
            # At-least-once: the next owner replays from the last commit; nothing is lost.
            log.exception("checkpoint before giving up partitions %s failed", partitions)
        dropped = sum(self._processor.store.drop_partition(p) for p in partitions)
        log.info("dropped %d streams of partitions %s", dropped, partitions)
        for partition in partitions:
            self._metrics.forget_partition(partition)
        self._assigned -= set(partitions)
        self._publish_assignment()

    def _on_lost(self, partitions: list[int]) -> None:
        """Partitions taken away without a revocation (this member was evicted from the
        group): another member may own them already, so nothing may be written for
        them. Their streams are dropped; the owner replays from the last commit."""
        log.warning("lost input partitions %s: dropping their streams unwritten", partitions)
        self._metrics.count_rebalance("lost")
        dropped = sum(self._processor.store.drop_partition(p) for p in partitions)
        self._pending_offsets = {
            tp: offset for tp, offset in self._pending_offsets.items() if tp[1] not in partitions
        }
        spread = self._spread
        if spread is not None:  # its snapshots of those partitions not sent yet never will be
            spread.records[spread.sent :] = [
                r for r in spread.records[spread.sent :] if r.partition not in partitions
            ]
            spread.offsets = {
                tp: offset for tp, offset in spread.offsets.items() if tp[1] not in partitions
            }
        log.info("dropped %d streams of lost partitions %s", dropped, partitions)
        for partition in partitions:
            self._metrics.forget_partition(partition)
        self._assigned -= set(partitions)
        self._publish_assignment()

    def _publish_assignment(self) -> None:
        self._health.set_assigned(len(self._assigned))
        self._metrics.assigned_partitions.set(len(self._assigned))

    def _close(self) -> None:
        # The source first: closing it revokes the partitions, and the revocation
        # checkpoints through the sink.
        try:
            self._source.close()
        finally:
            self._sink.close()
