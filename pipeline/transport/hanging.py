"""Hanging transactions: open on a partition although no transaction coordinator has one
open for their producer (KIP-664).

A changelog restore reads to the end of each partition as it was when the restore began,
so it waits for every transaction open there: their snapshots may still be committed. A
transaction normally ends within its timeout, when its producer commits or aborts it or
the coordinator aborts it. A *hanging* one never does: its records reached the partition
without the coordinator knowing (a write that arrived after the abort, a coordinator
that lost its state), so no marker will ever end it, and every `read_committed` reader of
the partition stands still before it. Kafka's answer is an operator's:
`kafka-transactions.sh find-hanging`, then `kafka-transactions.sh abort`. A stalled
restore does the same for the partitions it reads, with kafka-python's admin client
(DescribeProducers, ListTransactions, WriteTxnMarkers), and aborts only transactions that
their coordinator does not track: one it tracks ends by itself, and aborting it on one
partition would break its atomicity.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from kafka import KafkaAdminClient, TopicPartition
from kafka.admin import AbortTransactionSpec

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
    coordinator_epoch: int
    start_offset: int


@dataclass(frozen=True)
class Finding:
    """What the coordinator says of an open transaction, and what was done about it."""

    transaction: OpenTransaction
    transactional_id: str | None  # None: no coordinator lists its producer id
    state: str | None
    aborted: bool

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
        if self.aborted:
            return f"aborted the hanging transaction of {who} on {where}, {said}"
        return (
            f"a hanging transaction of {who} holds {where}, {said}; abort it with "
            f"kafka-transactions.sh --bootstrap-server ... abort --topic {t.topic} "
            f"--partition {t.partition} --start-offset {t.start_offset}"
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
                    OpenTransaction(
                        topic,
                        partition,
                        p.producer_id,
                        p.producer_epoch,
                        p.coordinator_epoch,
                        start,
                    )
                )
    return found


class Admin(Protocol):
    """The part of kafka-python's `KafkaAdminClient` this module uses."""

    def describe_producers(self, partitions: list[TopicPartition]) -> dict[Any, Any]: ...

    def list_transactions(self, *, producer_id_filters: list[int]) -> dict[int, list[Any]]: ...

    def abort_transaction(self, spec: AbortTransactionSpec) -> None: ...

    def close(self) -> None: ...


class HangingTransactions:
    """Finds the transactions that hold a stalled restore back, and aborts the hanging ones."""

    def __init__(self, client_kwargs: Mapping[str, Any]) -> None:
        self._client_kwargs = dict(client_kwargs)

    def admin(self) -> Admin:
        """A new admin client (a seam for tests)."""
        admin: Admin = KafkaAdminClient(request_timeout_ms=10_000, **self._client_kwargs)
        return admin

    def resolve(self, topic: str, positions: Mapping[int, int]) -> list[Finding]:
        """What holds `topic`'s partitions at `positions` (a reader's positions that do not
        move), with each hanging transaction aborted. `KafkaError` when the cluster does not
        answer or refuses (aborting needs the ClusterAction permission)."""
        admin = self.admin()
        try:
            return [self._judge(admin, t) for t in self._open(admin, topic, positions)]
        finally:
            admin.close()

    def _open(
        self, admin: Admin, topic: str, positions: Mapping[int, int]
    ) -> list[OpenTransaction]:
        described = admin.describe_producers([TopicPartition(topic, p) for p in positions])
        producers = {tp.partition: state.active_producers for tp, state in described.items()}
        return holding(topic, producers, positions)

    def _judge(self, admin: Admin, transaction: OpenTransaction) -> Finding:
        listings = admin.list_transactions(producer_id_filters=[transaction.producer_id])
        rows = [row for rows in listings.values() for row in rows]
        if not rows:
            transactional_id, state = None, None
        else:
            transactional_id, state = rows[0].transactional_id, str(rows[0].state.value)
        aborted = False
        # Still open at the same offset after the coordinator's answer: had it been a
        # transaction that ended meanwhile, its marker would have closed it by now.
        if is_hanging(state) and transaction in self._open(
            admin, transaction.topic, {transaction.partition: transaction.start_offset}
        ):
            admin.abort_transaction(
                AbortTransactionSpec(
                    TopicPartition(transaction.topic, transaction.partition),
                    transaction.producer_id,
                    transaction.producer_epoch,
                    transaction.coordinator_epoch,
                )
            )
            aborted = True
        finding = Finding(transaction, transactional_id, state, aborted)
        log.warning("restore stalled: %s", finding)
        return finding


def describe(findings: Sequence[Finding]) -> str:
    """One line for a log or an error: what holds the partitions."""
    if not findings:
        return "no transaction is open on them"
    return "; ".join(map(str, findings))


def resolve_quietly(
    hanging: HangingTransactions, topic: str, positions: Mapping[int, int]
) -> tuple[str, bool]:
    """`resolve`, for a reader that stalls: (what was found, whether anything was aborted),
    with the cluster's refusal or silence said instead of raised. Looking is a help to
    the restore, never a new way for it to fail: whatever the admin client raises is said
    (and the stall bound still ends a restore that does not move)."""
    try:
        findings = hanging.resolve(topic, positions)
    except Exception as exc:  # said in the log and in the stall error
        log.warning("restore stalled; looking for hanging transactions failed: %s", exc)
        return f"looking for hanging transactions failed ({exc})", False
    return describe(findings), any(f.aborted for f in findings)


def probe(
    hanging: HangingTransactions | None,
) -> Callable[[str, Mapping[int, int]], tuple[str, bool]] | None:
    """The `StallWatch` probe over `hanging` (None: a reader that does not look)."""
    return None if hanging is None else functools.partial(resolve_quietly, hanging)
