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

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from pipeline.errors import KafkaSetupError
from pipeline.records import InputRecord, OutputRecord

Offsets = Mapping[tuple[str, int], int]
"""(topic, partition) -> the next offset to read, i.e. last processed offset + 1."""


# How long the producer keeps retrying one output record (a broker outage)
# before giving it up: then the server stops uncommitted and its restart
# replays. Bounds the worst drain on SIGTERM (deploy/ sizes the grace period).
DELIVERY_TIMEOUT_S = 60.0


class Source(Protocol):
    """The input topic as the loop sees it."""

    def poll(self, timeout_s: float, max_records: int) -> list[InputRecord]:
        """Records in offset order per partition; rebalance callbacks run inside this call.
        Returns as soon as records are there (at most `max_records`), or empty after
        `timeout_s`."""

    def commit(self, offsets: Offsets) -> bool:
        """Commit offsets synchronously, only after their outputs are acknowledged.
        False: not now (the group is rebalancing); keep them for the next try."""

    def lag(self) -> dict[int, int]:
        """Records behind the end of each assigned partition, where known."""

    def group_metadata(self) -> Any:
        """Opaque group identity for offsets sent inside a transaction."""

    def close(self) -> None:
        """Leave the group (or keep the static membership) and release the connection."""


class Sink(Protocol):
    """The output side: predictions, dead letters and snapshots."""

    def send(self, records: Sequence[OutputRecord]) -> None:
        """Queue records, in order; a failure surfaces in the next `flush`. A whole batch
        per call: the per-record work stays in one tight loop inside the sink."""

    def flush(self, timeout_s: float) -> None:
        """Wait until every queued record is acknowledged. `FlushTimeoutError` if some are not
        yet (call again), `DeliveryError` if one was refused for good."""

    def begin(self) -> None:
        """Exactly-once only: open a transaction for what is sent next."""

    def commit_transaction(self, offsets: Offsets, group_metadata: Any) -> None:
        """Exactly-once only: commit the input offsets with everything sent, atomically."""

    def close(self) -> None:
        """Flush what is queued and release the connection."""


RebalanceCallback = Callable[[list[int]], None]

Latest = dict[bytes, tuple[int, bytes | None]]
"""Key -> (partition, newest value); None is a tombstone."""


class ChangelogReader(Protocol):
    """Reads compacted changelog partitions for a restore."""

    def read_latest(
        self, topic: str, partitions: list[int], remaining: Callable[[int], None]
    ) -> tuple[Latest, int]:
        """The newest committed value of every key in `partitions` of `topic`, read from
        the start to the end as it is now, and how many records were read. Calls
        `remaining(n)` with the records still to read as it goes (0 at the end)."""


class Transport(Protocol):
    """One Kafka client library: makes the loop's source and sink, and reads changelogs."""

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

    def sink(self, transactional_id: str | None) -> Sink:
        """An idempotent producer; transactional when `transactional_id` is given."""

    def changelog_reader(self) -> ChangelogReader:
        """The reader the changelog restore uses."""


def unreachable(servers: Any, exc: Exception) -> KafkaSetupError:
    """The start-up error for a broker that does not answer, whichever client saw it."""
    return KafkaSetupError(
        f"cannot reach Kafka at {servers} ({exc}); check --bootstrap-servers / "
        "HIDDENSTATE_BOOTSTRAP_SERVERS, the security settings, and that the broker runs"
    )
