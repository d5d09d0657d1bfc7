"""What holds a stalled restore: the transactions open on the partitions it reads, and
what their coordinator says of each (KIP-664's DescribeProducers and ListTransactions).

A changelog restore reads to the end of each partition as it was when the restore began,
so it waits for every transaction open there: their snapshots may still be committed. A
transaction normally ends within its timeout. A *hanging* one never does: its records are
on the partition but its coordinator has nothing open for its producer, so no marker will
ever end it, and every `read_committed` reader of the partition stands still before it.

The server does not end one itself. Kafka's tool can only abort it
(`kafka-transactions.sh abort`), and an abort is right only if the coordinator aborted
the transaction: the fault campaign met one that the coordinator had *committed*
(`CompleteCommit` in `__transaction_state`) while writing none of its markers, during a
single-node broker's graceful stop; aborting its changelog records there restored states
older than the offsets committed with them (docs/durability.md, "The fault campaign").
Which outcome is right only the coordinator's log says, so the decision stays with an
operator, and this module says what the operator needs to decide.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from kafka import KafkaAdminClient, TopicPartition

log = logging.getLogger(__name__)

# The coordinator's states in which it will still end a transaction by itself.
TRACKED_STATES = frozenset({"Ongoing", "PrepareCommit", "PrepareAbort", "PrepareEpochFence"})


@dataclass(frozen=True)
class OpenTransaction:
    """A transaction that a partition holds open (DescribeProducers)."""

    topic: str
    partition: int
    producer_id: int
    producer_epoch: int
    start_offset: int


@dataclass(frozen=True)
class Finding:
    """An open transaction, and what its coordinator says of its producer."""

    transaction: OpenTransaction
    transactional_id: str | None  # None: no coordinator lists its producer id
    state: str | None

    @property
    def hanging(self) -> bool:
        return is_hanging(self.state)

    def __str__(self) -> str:
        t = self.transaction
        where = f"{t.topic}[{t.partition}] from offset {t.start_offset}"
        who = f"producer id {t.producer_id} (epoch {t.producer_epoch})"
        if self.transactional_id is None:
            said = "which no transaction coordinator lists"
        else:
            said = f"whose transactional id {self.transactional_id!r} is {self.state}"
        if not self.hanging:
            return f"a transaction of {who} is open on {where}, {said}: it ends by itself"
        return (
            f"a hanging transaction of {who} holds {where}, {said}: no marker will end it. "
            "Its coordinator decided its outcome; if that was an abort (its records are "
            "not wanted), end it with kafka-transactions.sh --bootstrap-server ... abort "
            f"--topic {t.topic} --partition {t.partition} --start-offset {t.start_offset}"
            " (docs/operations.md#restore)"
        )


def is_hanging(state: str | None) -> bool:
    """Whether a transaction open on a partition is hanging, given its coordinator's state
    for the producer (None: no coordinator lists the producer id)."""
    return state not in TRACKED_STATES


def holding(
    topic: str, producers: Mapping[int, Sequence[Any]], positions: Mapping[int, int]
) -> list[OpenTransaction]:
    """The transactions that hold each partition at or before its reader's position:
    `producers` are DescribeProducers' active producers of each partition (objects with
    kafka-python's `ProducerState` fields)."""
    found = []
    for partition, position in sorted(positions.items()):
        for p in producers.get(partition, ()):
            start = p.current_transaction_start_offset
            if 0 <= start <= position:
                found.append(
                    OpenTransaction(topic, partition, p.producer_id, p.producer_epoch, start)
                )
    return found


class Admin(Protocol):
    """The part of kafka-python's `KafkaAdminClient` this module uses."""

    def describe_producers(self, partitions: list[TopicPartition]) -> dict[Any, Any]: ...

    def list_transactions(self, *, producer_id_filters: list[int]) -> dict[int, list[Any]]: ...

    def close(self) -> None: ...


class OpenTransactions:
    """Asks the cluster what holds a stalled restore back."""

    def __init__(self, client_kwargs: Mapping[str, Any]) -> None:
        self._client_kwargs = dict(client_kwargs)

    def admin(self) -> Admin:
        """A new admin client (a seam for tests)."""
        admin: Admin = KafkaAdminClient(request_timeout_ms=10_000, **self._client_kwargs)
        return admin

    def find(self, topic: str, positions: Mapping[int, int]) -> list[Finding]:
        """The transactions open on `topic`'s partitions at or before `positions` (a
        reader's positions that do not move), each with its coordinator's state.
        `KafkaError` when the cluster does not answer or refuses."""
        admin = self.admin()
        try:
            described = admin.describe_producers([TopicPartition(topic, p) for p in positions])
            producers = {tp.partition: s.active_producers for tp, s in described.items()}
            return [self._judge(admin, t) for t in holding(topic, producers, positions)]
        finally:
            admin.close()

    def _judge(self, admin: Admin, transaction: OpenTransaction) -> Finding:
        listings = admin.list_transactions(producer_id_filters=[transaction.producer_id])
        rows = [row for rows in listings.values() for row in rows]
        if not rows:
            return Finding(transaction, None, None)
        return Finding(transaction, rows[0].transactional_id, str(rows[0].state.value))


def describe(findings: Sequence[Finding]) -> str:
    """One line for a log or an error: what holds the partitions."""
    if not findings:
        return "no transaction is open on them"
    return "; ".join(map(str, findings))


def find_quietly(found: OpenTransactions, topic: str, positions: Mapping[int, int]) -> str:
    """`find`, for a reader that stalls, as one line; logged. Looking is a help to the
    restore, never a new way for it to fail: whatever the admin client raises is said
    instead (and the stall bound still ends a restore that does not move)."""
    try:
        said = describe(found.find(topic, positions))
    except Exception as exc:  # said in the log and in the stall error
        said = f"asking the cluster which transactions are open there failed ({exc})"
    log.warning("restoring from %s stands still: %s", topic, said)
    return said


def probe(found: OpenTransactions | None) -> Callable[[str, Mapping[int, int]], str] | None:
    """The `StallWatch` probe over `found` (None: a reader that does not ask)."""
    return None if found is None else functools.partial(find_quietly, found)
