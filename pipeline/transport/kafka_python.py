"""The kafka-python transport (`--transport kafka-python`; `auto` without confluent-kafka).

Pure Python: every fetched record is parsed, and every produced one built,
by the interpreter that also serves the model: most of the CPU per event that
docs/benchmarks.md measures for it next to the `confluent` transport (`bench/run.py`).
`pipeline.transport.base` has the contract.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener
from kafka.coordinator.assignors.cooperative_sticky import CooperativeStickyAssignor
from kafka.errors import (
    CorruptRecordError,
    KafkaError,
    KafkaTimeoutError,
    ProducerFencedError,
    RetriableError,
    TransactionalIdAuthorizationFailedError,
    UnsupportedCodecError,
)
from kafka.structs import OffsetAndMetadata

from pipeline.config import KafkaConfig
from pipeline.errors import (
    DeliveryError,
    FencedError,
    FlushTimeoutError,
    HiddenstateError,
    KafkaSetupError,
    KafkaUnavailableError,
    RestoreStalledError,
    TransactionAbortedError,
    TransactionTimeoutError,
    UndecodableBatchError,
)
from pipeline.records import InputRecord, OutputRecord
from pipeline.transport.base import (
    DELIVERY_TIMEOUT_S,
    TRANSACTION_CALL_TIMEOUT_S,
    FenceCount,
    Latest,
    Offsets,
    RebalanceCallback,
    StallWatch,
    fenced,
    not_a_member,
    reads_from_there,
    unauthorized,
    unreachable,
)
from pipeline.transport.hanging import OpenTransactions, probe

log = logging.getLogger(__name__)


class KafkaPythonTransport:
    """`Transport` over kafka-python."""

    name = "kafka-python"

    def __init__(self, kafka: KafkaConfig) -> None:
        self._kafka = kafka

    def source(
        self,
        topic: str,
        on_assigned: RebalanceCallback,
        on_revoked: RebalanceCallback,
        on_lost: RebalanceCallback,
        *,
        read_committed: bool,
    ) -> KafkaSource:
        kwargs = self._kafka.consumer_kwargs()
        if read_committed:
            kwargs["isolation_level"] = "read_committed"
        return KafkaSource(kwargs, topic, on_assigned, on_revoked, on_lost)

    def sink(self) -> KafkaSink:
        return KafkaSink(self._kafka.producer_kwargs())

    def transactional_sink(
        self, transactional_id: str, transaction_timeout_s: float
    ) -> KafkaTransactionalSink:
        return KafkaTransactionalSink(
            self._kafka.producer_kwargs(), transactional_id, transaction_timeout_s
        )

    def changelog_reader(self, stall_timeout_s: float) -> KafkaChangelogReader:
        return KafkaChangelogReader(
            self._kafka.client_kwargs(),
            stall_timeout_s,
            OpenTransactions(self._kafka.client_kwargs()),
        )


class _Listener(AsyncConsumerRebalanceListener):  # type: ignore[misc]
    """Runs the loop's rebalance callbacks off kafka-python's IO thread.

    kafka-python 3 calls rebalance listeners on its IO event loop, while the
    serving thread waits inside `poll()` (or `close()`): no batch is being
    processed then. The callbacks block (they flush, commit and read the
    changelog), and blocking calls cannot run on the IO thread, which must
    also keep heartbeating. So each callback runs in a short-lived worker
    thread, and the listener yields to the event loop until it is done.
    """

    def __init__(self, consumer: KafkaConsumer, callbacks: Mapping[str, RebalanceCallback]):
        self._consumer = consumer
        self._callbacks = callbacks

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        await self._run("revoked", revoked)

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        await self._run("assigned", assigned)

    async def on_partitions_lost(self, lost: Sequence[TopicPartition]) -> None:
        await self._run("lost", lost)

    async def _run(self, kind: str, partitions: Sequence[TopicPartition]) -> None:
        if not partitions:
            return
        numbers = sorted(tp.partition for tp in partitions)
        failure: list[BaseException] = []

        def work() -> None:
            try:
                self._callbacks[kind](numbers)
            except BaseException as exc:  # re-raised on the IO loop below
                failure.append(exc)

        worker = threading.Thread(target=work, name=f"hiddenstate-{kind}", daemon=True)
        worker.start()
        while worker.is_alive():
            # kafka-python 3's event-loop sleep: heartbeats and the worker's own
            # requests (a commit) run meanwhile.
            await self._consumer._net.sleep(_WORKER_POLL_S)
        if failure:
            raise failure[0]


_WORKER_POLL_S = 0.005


class KafkaSource:
    """`Source` over a kafka-python consumer in a consumer group.

    The rebalance callbacks given here run while the serving thread waits in
    `poll` or `close`: never concurrently with the processing of a batch.
    """

    def __init__(
        self,
        consumer_kwargs: Mapping[str, Any],
        topic: str,
        on_assigned: RebalanceCallback,
        on_revoked: RebalanceCallback,
        on_lost: RebalanceCallback,
    ) -> None:
        """`consumer_kwargs` are kafka-python's (`KafkaConfig.consumer_kwargs()`)."""
        try:
            self._consumer = KafkaConsumer(
                # Cooperative rebalancing moves only the partitions that change
                # owner: the others keep serving, and their states stay in memory.
                partition_assignment_strategy=(CooperativeStickyAssignor,),
                **consumer_kwargs,
            )
        except KafkaError as exc:
            raise unreachable(consumer_kwargs.get("bootstrap_servers"), exc) from exc
        self._topic = topic
        self._reset_to = consumer_kwargs.get("auto_offset_reset", "latest")
        # Learn the topic's partitions before joining the group: a leader whose
        # metadata does not list them yet assigns nothing, and kafka-python may not
        # rejoin until the next metadata refresh (dpkp/kafka-python#2377).
        self._consumer.partitions_for_topic(topic)
        callbacks = {"assigned": on_assigned, "revoked": on_revoked, "lost": on_lost}
        self._consumer.subscribe([topic], listener=_Listener(self._consumer, callbacks))

    def poll(self, timeout_s: float, max_records: int) -> list[InputRecord]:
        try:
            batches = self._consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=max_records)
        except (UnsupportedCodecError, CorruptRecordError) as exc:
            raise undecodable_batch(self._consumer, exc) from exc
        except RetriableError as exc:
            # kafka-python 3 lets a reset connection or a coordinator it cannot find out
            # of poll (the fault campaign: broker restarts, network cuts). The client
            # reconnects by itself: this poll found nothing, and the next one tries again.
            log.info("poll: %s; polling on while the client reconnects", exc)
            time.sleep(timeout_s)
            return []
        except KafkaError as exc:
            if isinstance(exc.__cause__, HiddenstateError):
                raise exc.__cause__ from None  # a callback of ours failed, and says why
            raise
        return [InputRecord.from_kafka(r) for records in batches.values() for r in records]

    def seek_to_committed(
        self, partitions: Sequence[int], reading_from: Mapping[int, int] | None = None
    ) -> dict[int, int | None]:
        consumer = self._consumer
        held = {tp.partition for tp in consumer.assignment()}
        committed: dict[int, int | None] = {}
        for partition in partitions:
            if partition not in held:
                continue
            tp = TopicPartition(self._topic, partition)
            try:
                offset = consumer.committed(tp, timeout_ms=int(TRANSACTION_CALL_TIMEOUT_S * 1000))
            except RetriableError as exc:
                # A timeout, or kafka-python 3's own connection error: its search for the
                # group coordinator lets a failed metadata refresh out (the fault campaign:
                # a network cut while a member took partitions over). The loop tries again.
                raise KafkaUnavailableError(
                    f"the committed offset of {self._topic}[{partition}] was not fetched "
                    f"(bound {TRANSACTION_CALL_TIMEOUT_S:.0f} s; is the broker away?): {exc!r}"
                ) from exc
            committed[partition] = offset
            if reads_from_there(partition, offset, reading_from):
                continue
            if offset is not None:
                consumer.seek(tp, offset)
            elif self._reset_to == "earliest":
                consumer.seek_to_beginning(tp)
            else:
                consumer.seek_to_end(tp)
        return committed

    def lag(self) -> dict[int, int]:
        lags = {}
        for tp in self._consumer.assignment():
            end = self._consumer.highwater(tp)
            position = self._consumer._subscription.assignment[tp].position
            if end is not None and position is not None:
                lags[tp.partition] = max(0, end - position.offset)
        return lags

    def group_metadata(self) -> Any:
        metadata = self._consumer.group_metadata()
        if metadata.generation_id < 0 or not metadata.member_id:
            # The heartbeat thread heard the member is gone and reset it; the broker
            # would take a transactional commit of generation -1 (KIP-447 leaves that
            # open for producers of before it): it must not be made.
            raise TransactionAbortedError(not_a_member(self._consumer.config["group_id"]))
        return metadata

    def close(self) -> None:
        self._consumer.close(autocommit=False, timeout_ms=int(TRANSACTION_CALL_TIMEOUT_S * 1000))


def undecodable_batch(consumer: KafkaConsumer, exc: KafkaError) -> UndecodableBatchError:
    """A named error for a fetched batch kafka-python cannot decode: which partition and
    offset, and what to install or change.

    kafka-python raises it from inside `poll` without saying where; the fetcher still
    holds the failing partition's fetch, at the offset it could not read past
    (`_next_partition_records`, kafka-python 3.0's fetcher: a private attribute, read
    defensively). Without it, every assigned partition's position is listed."""
    fetch = getattr(getattr(consumer, "_fetcher", None), "_next_partition_records", None)
    tp = getattr(fetch, "topic_partition", None)
    if fetch is not None and tp is not None:
        where = f"{tp.topic}[{tp.partition}] at offset {fetch.next_fetch_offset}"
    else:
        positions = ", ".join(
            f"{p.topic}[{p.partition}]@{consumer.position(p)}"
            for p in sorted(consumer.assignment())
        )
        where = f"one of {positions or 'the assigned partitions'}"
    if isinstance(exc, UnsupportedCodecError):
        return UndecodableBatchError(
            f"cannot decode the record batch of {where}: {exc}. kafka-python reads snappy, lz4 "
            "and zstd batches with the python-snappy, lz4 and zstandard packages, which "
            "`pip install hiddenstate` installs: install the missing one (pip install "
            "python-snappy lz4 zstandard), or serve with --transport confluent (librdkafka "
            "reads every codec)"
        )
    return UndecodableBatchError(
        f"the record batch of {where} is corrupt ({exc}): it fails its checksum or does not "
        "parse, so the server stops rather than skip it. Check the broker's log for damaged "
        "segments; to skip the batch deliberately, move the group's offset past it "
        "(kafka-consumer-groups.sh --reset-offsets --to-offset)"
    )


class KafkaSink:
    """`Sink` over one idempotent kafka-python producer."""

    def __init__(self, client_kwargs: Mapping[str, Any], linger_ms: int = 5) -> None:
        """`client_kwargs` are kafka-python's (`KafkaConfig.client_kwargs()`)."""
        self._producer = _make_producer(client_kwargs, linger_ms=linger_ms)
        self._pending: list[Any] = []

    def send(self, records: Sequence[OutputRecord]) -> None:
        send, pending = self._producer.send, self._pending
        for topic, key, value, headers, partition in records:
            pending.append(
                send(topic, key=key, value=value, headers=list(headers), partition=partition)
            )

    def flush(self, timeout_s: float) -> None:
        try:
            self._producer.flush(timeout=timeout_s)
        except KafkaTimeoutError as exc:
            raise FlushTimeoutError(
                f"{len(self._pending)} output records not acknowledged yet"
            ) from exc
        pending, self._pending = self._pending, []
        for future in pending:
            if future.failed():
                # The producer retried for DELIVERY_TIMEOUT_S: this one is lost unless its
                # input is replayed, so its offset must never be committed.
                raise DeliveryError(f"Kafka refused an output record: {future.exception}")

    def close(self) -> None:
        _close(self._producer, TRANSACTION_CALL_TIMEOUT_S)


class KafkaTransactionalSink(KafkaSink):
    """`TransactionalSink` over a transactional kafka-python producer.

    kafka-python's own `send_offsets_to_transaction`, `commit_transaction` and
    `abort_transaction` wait for their result without a bound
    (`TransactionalRequestResult.wait()`), and after a broker restart one such
    wait was seen never to return. So the calls go to the producer's transaction
    manager directly and wait at most `TRANSACTION_CALL_TIMEOUT_S`, as the
    public methods would without the hang.
    """

    def __init__(
        self,
        client_kwargs: Mapping[str, Any],
        transactional_id: str,
        transaction_timeout_s: float,
        linger_ms: int = 5,
    ) -> None:
        self._kwargs = dict(client_kwargs)
        self._id = transactional_id
        self._transaction_timeout_ms = int(transaction_timeout_s * 1000)
        self._linger_ms = linger_ms
        self._fences = FenceCount(transactional_id)
        self._pending: list[Any] = []
        self._open = False
        self._ready = False
        self._uncertain = False
        self._producer = self._start()

    def _start(self) -> KafkaProducer:
        """A producer with this transactional id, initialised: the broker completes or
        aborts whatever a previous producer with the id left open, and fences it."""
        try:
            producer = _make_producer(
                self._kwargs,
                linger_ms=self._linger_ms,
                transactional_id=self._id,
                transaction_timeout_ms=self._transaction_timeout_ms,
                max_block_ms=int(TRANSACTION_CALL_TIMEOUT_S * 1000),
            )
        except KafkaSetupError as exc:
            if not hasattr(self, "_producer"):
                raise  # at start-up: a broker that does not answer is a setup error
            # Later, after an abort during an outage: the caller rewinds and tries again.
            raise TransactionTimeoutError(
                f"no new producer for transactional id {self._id!r}: {exc}"
            ) from exc
        try:
            producer.init_transactions()
        except KafkaTimeoutError as exc:
            _close(producer, 0)
            raise TransactionTimeoutError(
                f"transactional id {self._id!r} was not initialised within "
                f"{TRANSACTION_CALL_TIMEOUT_S:.0f} s: {exc}"
            ) from exc
        except TransactionalIdAuthorizationFailedError as exc:
            _close(producer, 0)
            raise KafkaSetupError(unauthorized(self._id)) from exc
        self._ready = True
        return producer

    def begin(self) -> None:
        if not self._ready:
            self._producer = self._start()
        self._producer.begin_transaction()
        self._open = True

    def commit(self, offsets: Offsets, group_metadata: Any) -> None:
        manager = self._producer._transaction_manager
        try:
            if offsets:
                self._wait(
                    manager.send_offsets_to_transaction(_kafka_offsets(offsets), group_metadata),
                    "sending the offsets of",
                )
            self._wait(manager.begin_commit(), "committing")
        except ProducerFencedError as exc:
            self._fences.count()
            raise FencedError(fenced(self._id)) from exc
        except TransactionTimeoutError:
            self._uncertain = True  # no abort can be trusted to end it: a new producer will
            raise
        except KafkaError as exc:
            raise TransactionAbortedError(f"the broker refused the commit: {exc!r}") from exc
        self._open = False
        self._pending.clear()

    def abort(self) -> None:
        if not self._open and self._ready:
            return
        self._open = False
        self._pending.clear()
        if self._ready:
            manager = self._producer._transaction_manager
            try:
                if not (manager.has_fatal_error() or manager.is_completing() or self._uncertain):
                    self._wait(manager.begin_abort(), "aborting")
            except (KafkaError, TransactionTimeoutError) as exc:
                self._discard()  # the next call starts a new producer first
                raise TransactionTimeoutError(f"aborting transaction {self._id!r}: {exc}") from exc
            self._discard()
        # A new producer with the same id in any case: its start resolves the old
        # transaction if the abort did not (commits one that was being committed, aborts
        # the rest), and a fresh epoch leaves no sequence numbers of before an outage.
        self._fences.check()
        self._producer = self._start()

    def _discard(self) -> None:
        self._ready = False
        self._uncertain = False
        _close(self._producer, 0)

    def _wait(self, result: Any, doing: str) -> None:
        self._producer._sender.wakeup()
        if not result.wait(timeout_ms=int(TRANSACTION_CALL_TIMEOUT_S * 1000)):
            raise TransactionTimeoutError(
                f"{doing} transaction {self._id!r} did not finish within "
                f"{TRANSACTION_CALL_TIMEOUT_S:.0f} s (is the broker away?)"
            )


def _close(producer: KafkaProducer, timeout_s: float) -> None:
    """Close within `timeout_s`, whatever is still unsent. Since dpkp/kafka-python#2537,
    `close` flushes first, and that flush raises `KafkaTimeoutError` when records wait
    for a broker that is away, before the close itself ran: the sender thread is then
    stopped by force (its records fail) and the close finished."""
    try:
        producer.close(timeout=timeout_s)
    except KafkaTimeoutError:
        if producer._sender is not None:
            producer._sender.force_close()
        with contextlib.suppress(KafkaError):
            producer.close(timeout=0)


def _make_producer(client_kwargs: Mapping[str, Any], **settings: Any) -> KafkaProducer:
    try:
        return KafkaProducer(
            acks="all",
            enable_idempotence=True,
            delivery_timeout_ms=int(DELIVERY_TIMEOUT_S * 1000),
            batch_size=256 * 1024,
            **settings,
            **client_kwargs,
        )
    except KafkaError as exc:
        raise unreachable(client_kwargs.get("bootstrap_servers"), exc) from exc


class KafkaChangelogReader:
    """`ChangelogReader` over a kafka-python consumer without a group."""

    def __init__(
        self,
        client_kwargs: Mapping[str, Any],
        stall_timeout_s: float,
        open_transactions: OpenTransactions | None = None,
    ) -> None:
        self._client_kwargs = dict(client_kwargs)
        self._stall_timeout_s = stall_timeout_s
        self._open_transactions = open_transactions

    def read_latest(
        self, topic: str, partitions: list[int], remaining: Callable[[int], None]
    ) -> tuple[Latest, int]:
        assigned = [TopicPartition(topic, p) for p in partitions]
        ends = self._high_watermarks(assigned)
        try:
            consumer = KafkaConsumer(
                group_id=None,
                enable_auto_commit=False,
                # Snapshots of an aborted transaction never happened.
                isolation_level="read_committed",
                max_poll_records=10_000,
                fetch_max_bytes=64 * 1024 * 1024,
                max_partition_fetch_bytes=16 * 1024 * 1024,
                **self._client_kwargs,
            )
        except KafkaError as exc:
            raise RestoreStalledError(
                f"restoring from {topic}: no reader connects ({exc})"
            ) from exc
        try:
            consumer.assign(assigned)
            consumer.seek_to_beginning(*assigned)
            left = {tp: end for tp, end in ends.items() if end > 0}
            total = sum(left.values())
            remaining(total)
            latest: Latest = {}
            read = 0
            positions = {tp: 0 for tp in left}
            stall = StallWatch(topic, self._stall_timeout_s, probe(self._open_transactions))
            while left:
                try:
                    for tp, records in consumer.poll(timeout_ms=500).items():
                        for record in records:
                            latest[record.key] = (tp.partition, record.value)
                        read += len(records)
                    for tp in left:
                        position = consumer.position(tp, timeout_ms=5_000)
                        if position is not None:
                            positions[tp] = position
                except KafkaError as exc:
                    # The broker restarts or the link drops (a reset connection): the
                    # client reconnects on its own; until then nothing moves, and the
                    # stall watch below bounds how long that may last.
                    log.info(
                        "restoring from %s: %s; reading on when the broker answers", topic, exc
                    )
                    time.sleep(0.5)
                # The position passes the end even when the last records are
                # transaction markers, which are never returned.
                left = {tp: end for tp, end in left.items() if positions[tp] < end}
                remaining(max(0, total - read) if left else 0)
                stall.check(
                    {tp.partition: positions[tp] for tp in left},
                    {tp.partition: end for tp, end in left.items()},
                )
            return latest, read
        finally:
            consumer.close()

    def _high_watermarks(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        """The end of each partition including records of open transactions: a
        `read_committed` consumer would say the last stable offset instead, and a read up
        to it could stop before committed records that follow an open transaction. Asked
        again while the broker does not answer, for the stall bound at most."""
        deadline = time.monotonic() + self._stall_timeout_s
        while True:
            try:
                consumer = KafkaConsumer(
                    group_id=None, enable_auto_commit=False, **self._client_kwargs
                )
                try:
                    return dict(consumer.end_offsets(partitions, timeout_ms=10_000))
                finally:
                    consumer.close()
            except KafkaError as exc:  # a timeout, or the connection reset under the call
                if time.monotonic() >= deadline:
                    names = [f"{tp.topic}[{tp.partition}]" for tp in partitions]
                    raise RestoreStalledError(
                        f"the ends of {names} were not fetched within "
                        f"{self._stall_timeout_s:.0f} s: {exc}"
                    ) from exc
                log.info("the ends of the changelog: %s; asking again", exc)
                time.sleep(1.0)


def _kafka_offsets(offsets: Offsets) -> dict[TopicPartition, OffsetAndMetadata]:
    return {
        TopicPartition(topic, partition): OffsetAndMetadata(offset, "", -1)
        for (topic, partition), offset in offsets.items()
    }
