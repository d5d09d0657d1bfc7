"""Exactly-once: outputs, snapshots and offsets in one transaction per checkpoint.

    first batch after a commit:  begin a transaction
    every batch:                 send its outputs into it (no wait for acks)
    every checkpoint:            send the changed states, then commit the transaction
                                 with the input offsets and the group metadata

`read_committed` readers see each prediction once: a crash aborts (or the
restart's producer, with the same transactional id, fences) everything since
the last commit, and the restart replays it from the committed offsets with
the states of that same commit. The price is latency: predictions become
visible at the commit, once per checkpoint interval (docs/durability.md).

A member that may have lost its partitions aborts its open transaction before
anything else: it could hold predictions for partitions another member now
serves. When the client does not know yet (the member was paused past its
session timeout), the broker refuses the commit because the group metadata is
of an old generation, and the transaction is aborted then.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from pipeline.delivery import Changes, CheckpointSchedule, Committed, GroupMetadata
from pipeline.errors import FencedError, TransactionAbortedError, TransactionTimeoutError
from pipeline.metrics import Metrics
from pipeline.records import BatchResult
from pipeline.transport.base import TransactionalSink


class ExactlyOnce:
    """The `Committer` of `--guarantee exactly-once`."""

    def __init__(
        self,
        sink: TransactionalSink,
        changes: Changes,
        schedule: CheckpointSchedule,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._sink = sink
        self._changes = changes
        self._schedule = schedule
        self._metrics = metrics
        self._clock = clock
        self._open = False
        self._pending: dict[tuple[str, int], int] = {}
        # Event times of predictions that become visible at the next commit.
        self._event_times: list[int] = []

    def send(self, result: BatchResult, group: GroupMetadata) -> None:
        if result.next_offsets:
            if not self._open:
                self._sink.begin()
                self._open = True
            self._sink.send(result.outputs)
            self._pending.update(result.next_offsets)
            self._event_times += result.event_times_ms
            self._schedule.count(len(result.event_times_ms) + len(result.dead_letters))
        if self._schedule.due():
            self.checkpoint(group)

    def checkpoint(self, group: GroupMetadata) -> Committed:
        started = self._schedule.begun()
        if not self._open:
            return Committed()
        snapshots = self._changes()
        self._sink.send(snapshots)
        offsets = self._pending
        try:
            self._sink.commit(offsets, group())
        except (TransactionAbortedError, TransactionTimeoutError, FencedError) as error:
            # Still open: the loop's `reset` aborts it before the rewind.
            what = (
                f"transaction of {len(self._event_times)} predictions, {len(snapshots)} "
                f"changelog records and offsets {sorted(offsets.items())} not committed: {error}"
            )
            self._pending = {}
            self._event_times = []
            raise TransactionAbortedError(what) from error
        self._open = False
        self._metrics.observe_end_to_end(self._event_times, self._clock())
        self._event_times = []
        self._pending = {}
        self._metrics.checkpoint_seconds.observe(self._clock() - started)
        return Committed(offsets, len(snapshots))

    def lose(self, partitions: Sequence[int]) -> bool:
        if not self._open:
            return False
        self.reset()  # it may hold predictions of the lost partitions
        return True

    def reset(self) -> None:
        self._pending = {}
        self._event_times = []
        if self._open:
            self._sink.abort()
            self._open = False

    def close(self) -> None:
        self._sink.close()
