"""Delivery guarantees: how served batches become durable, one committer per guarantee.

A served batch leaves three kinds of records behind: outputs (predictions and
dead letters), the changed hidden states (changelog snapshots) and the input
offsets it consumed. A committer makes them durable in the order its
guarantee needs, behind one small interface (`Committer`), so that each
guarantee reads in one place:

- `AtLeastOnce` (`at_least_once.py`, the default): outputs go out on an
  idempotent producer and are acknowledged every batch; snapshots and
  offsets go together in one transaction per checkpoint, on a second,
  transactional producer. Predictions may repeat after a crash, never go
  missing; the states a restore reads are always those of a commit.
- `ExactlyOnce` (`exactly_once.py`): outputs, snapshots and offsets all go
  in one transaction per checkpoint; `read_committed` readers see each
  prediction once.

Fencing: a member writes for a partition only while it owns it. A member
paused past the session timeout (a GC pause, a frozen node, SIGSTOP) is
evicted before it knows it, and what it sends first still reaches the
broker. Both committers therefore commit offsets inside a transaction with
the consumer's group metadata: the broker refuses that commit from a member
of an old generation (KIP-447), the transaction is aborted, and none of its
snapshots (nor, exactly-once, predictions) ever become visible. The loop
learns early too (`pipeline.pause`): it sends nothing after the process
stood still for long enough to have been evicted. Whenever uncommitted work
is thrown away, the loop rewinds every partition it holds to its last
commit: states from the changelog, positions from the committed offsets.

The loop calls a committer like this, on its one serving thread (the
rebalance callbacks run inside `poll`, between two batches):

    committer.send(result, group)      # every poll, an empty result for an idle one
    committer.checkpoint(group)        # a revocation, the stop: commit everything now
    committer.lose(partitions)         # partitions taken away: write nothing more of them
    committer.reset()                  # before a rewind: drop everything uncommitted
    committer.close()

`group` is the source's `group_metadata`, read only at the moment of a commit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pipeline.records import BatchResult, OutputRecord
from pipeline.transport import Offsets

GroupMetadata = Callable[[], Any]
"""The source's `group_metadata`, called at the moment offsets are committed."""

Changes = Callable[[], list[OutputRecord]]
"""The changelog records of every state changed since the last call (`Changelog.changes`)."""


@dataclass(frozen=True)
class Committed:
    """What a checkpoint made durable: the input offsets committed (empty: nothing was
    pending) and how many changelog records went with them."""

    offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    snapshots: int = 0


class Committer(Protocol):
    """Makes served batches durable under one delivery guarantee."""

    def send(self, result: BatchResult, group: GroupMetadata) -> None:
        """Hand over one polled batch's outputs (an empty result after an idle poll) and
        checkpoint when one is due. `TransactionAbortedError`: the broker refused a
        checkpoint (this member was evicted), everything uncommitted is dropped, and the
        loop must rewind to the last commit."""

    def checkpoint(self, group: GroupMetadata) -> Committed:
        """Commit everything handed over so far, before returning. Errors as `send`."""

    def lose(self, partitions: Sequence[int]) -> bool:
        """Partitions were taken away without a revocation: write nothing more of them.
        True when uncommitted work of other partitions had to be thrown away with them (an
        open transaction was aborted): the loop then rewinds the partitions it still holds."""

    def reset(self) -> None:
        """Throw away everything uncommitted (abort an open transaction); the loop rewinds
        every partition to its last commit next."""

    def close(self) -> None:
        """Release the producers (after a bounded flush)."""


@dataclass
class CheckpointSchedule:
    """When the next checkpoint is due: after `interval_s`, or after `interval_events`
    events (0: by time only), whichever comes first."""

    interval_s: float
    interval_events: int
    clock: Callable[[], float]
    last: float = 0.0
    events: int = 0

    def __post_init__(self) -> None:
        self.last = self.clock()

    def count(self, events: int) -> None:
        """`events` more were served since the last checkpoint."""
        self.events += events

    def due(self) -> bool:
        """True when a checkpoint should begin now."""
        if self.interval_events and self.events >= self.interval_events:
            return True
        return self.clock() - self.last >= self.interval_s

    def begun(self) -> float:
        """A checkpoint begins: the next is due one interval from now. Returns the time."""
        self.last = self.clock()
        self.events = 0
        return self.last


def without_partitions(offsets: Offsets, partitions: Sequence[int]) -> dict[tuple[str, int], int]:
    """`offsets` less those of `partitions`."""
    gone = set(partitions)
    return {tp: offset for tp, offset in offsets.items() if tp[1] not in gone}
