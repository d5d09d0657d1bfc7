"""A reader of a topic co-partitioned with the input that follows the input's assignment.

The labels topic (`--labels-topic`, `pipeline.labels`) has the input's partition count
and keys, so the label of a stream read from input partition p is in labels partition
p. Subscribing one consumer group to both topics would not keep them together: the
assignor may give input p and labels p to different members. So the labels are read
by a consumer of their own that joins no group and is assigned by hand whatever the
input's rebalance callbacks say: `assign(p)` when input p is assigned, `unassign(p)`
when it is revoked or lost.

Where a newly assigned partition is read from: its end at the moment of the assignment
(its high watermark; with a transaction open there, the reader waits for it). The
predictions a label judges live only in this process's memory (`pipeline.ring`), so a
label published before the assignment has nothing here to judge; reading from the end
also means no label is judged twice by one process. docs/durability.md says what that
means across restarts and rebalances.

The loop calls these from its serving thread only (assign and unassign from the
rebalance callbacks, which run while that thread waits inside the input's `poll`), so
an implementation needs no locking. `poll` never waits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from pipeline.config import KafkaConfig
from pipeline.records import InputRecord


class Follower(Protocol):
    """A consumer without a group, assigned the partitions of one topic by hand."""

    topic: str

    def assign(self, partitions: Sequence[int]) -> None:
        """Start reading `partitions` (not held yet) from their end as it is now."""

    def unassign(self, partitions: Sequence[int]) -> None:
        """Stop reading `partitions`; records of them fetched already are never returned."""

    def poll(self, max_records: int) -> list[InputRecord]:
        """The records fetched so far (at most `max_records`), each partition's in offset
        order; never waits."""

    def pause(self, partitions: Sequence[int]) -> None:
        """Fetch nothing more of `partitions` until `resume` (backpressure)."""

    def resume(self, partitions: Sequence[int]) -> None:
        """Fetch `partitions` again."""

    def close(self) -> None:
        """Release the connection."""


def open_follower(transport: str, kafka: KafkaConfig, topic: str) -> Follower:
    """The follower of `topic` for the named transport (`kafka-python` or `confluent`),
    with the input's connection and security settings."""
    if transport == "confluent":
        from pipeline.transport.follower_confluent import ConfluentFollower

        return ConfluentFollower(kafka.librdkafka_config(), topic)
    from pipeline.transport.follower_kafka_python import KafkaPythonFollower

    return KafkaPythonFollower(kafka.client_kwargs(), topic)
