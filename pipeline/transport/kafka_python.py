"""The kafka-python transport (`--transport kafka-python`; `auto` without confluent-kafka).

Pure Python: every fetched record is parsed, and every produced one built,
by the interpreter that also serves the model (FIELD-NOTES: about 3 us to
parse and 11 us to build a record). `pipeline.transport.base` has the contract;
docs/benchmarks.md what it costs next to the `confluent` transport.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener
from kafka.coordinator.assignors.cooperative_sticky import CooperativeStickyAssignor
from kafka.errors import (
    CorruptRecordError,
    KafkaError,
    KafkaTimeoutError,
    RebalanceInProgressError,
    UnsupportedCodecError,
)
from kafka.structs import OffsetAndMetadata

from pipeline.config import KafkaConfig
from pipeline.errors import DeliveryError, FlushTimeoutError, UndecodableBatchError
from pipeline.records import InputRecord, OutputRecord
from pipeline.transport.base import (
    DELIVERY_TIMEOUT_S,
    Latest,
    Offsets,
    RebalanceCallback,
    unreachable,
)

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

    def sink(self, transactional_id: str | None) -> KafkaSink:
        return KafkaSink(self._kafka.producer_kwargs(), transactional_id=transactional_id)

    def changelog_reader(self) -> KafkaChangelogReader:
        return KafkaChangelogReader(self._kafka.client_kwargs())


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
        return [InputRecord.from_kafka(r) for records in batches.values() for r in records]

    def commit(self, offsets: Offsets) -> bool:
        if not offsets:
            return True
        try:
            self._consumer.commit(_kafka_offsets(offsets))
            return True
        except RebalanceInProgressError:
            # The group is between generations; the offsets stay pending and go
            # with the next checkpoint (or the revocation's).
            log.info("commit deferred: the consumer group is rebalancing")
            return False
        except KafkaError as exc:
            # The coordinator is away or this member was evicted: committing later
            # (or the next owner replaying from the last commit) loses nothing.
            log.warning("commit deferred: %s", exc)
            return False

    def lag(self) -> dict[int, int]:
        lags = {}
        for tp in self._consumer.assignment():
            end = self._consumer.highwater(tp)
            position = self._consumer._subscription.assignment[tp].position
            if end is not None and position is not None:
                lags[tp.partition] = max(0, end - position.offset)
        return lags

    def group_metadata(self) -> Any:
        return self._consumer.group_metadata()

    def close(self) -> None:
        self._consumer.close(autocommit=False)


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
    """`Sink` over one idempotent kafka-python producer (transactional when configured)."""

    def __init__(
        self,
        client_kwargs: Mapping[str, Any],
        transactional_id: str | None = None,
        linger_ms: int = 5,
    ) -> None:
        """`client_kwargs` are kafka-python's (`KafkaConfig.client_kwargs()`)."""
        try:
            self._producer = KafkaProducer(
                acks="all",
                enable_idempotence=True,
                linger_ms=linger_ms,
                delivery_timeout_ms=int(DELIVERY_TIMEOUT_S * 1000),
                batch_size=256 * 1024,
                transactional_id=transactional_id,
                **client_kwargs,
            )
        except KafkaError as exc:
            raise unreachable(client_kwargs.get("bootstrap_servers"), exc) from exc
        self._pending: list[Any] = []
        if transactional_id is not None:
            self._producer.init_transactions()

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
                # The producer retried for DELIVERY_TIMEOUT_S: this one is lost unless
                # its input is replayed, so its offset must never be committed.
                raise DeliveryError(f"Kafka refused an output record: {future.exception}")

    def begin(self) -> None:
        """Open a transaction (exactly-once mode)."""
        self._producer.begin_transaction()

    def commit_transaction(self, offsets: Offsets, group_metadata: Any) -> None:
        """Add the input offsets to the open transaction and commit it atomically."""
        self._producer.send_offsets_to_transaction(_kafka_offsets(offsets), group_metadata)
        self._producer.commit_transaction()
        self._pending.clear()

    def close(self) -> None:
        self._producer.close(timeout=30)


class KafkaChangelogReader:
    """`ChangelogReader` over a kafka-python consumer without a group."""

    def __init__(self, client_kwargs: Mapping[str, Any]) -> None:
        self._client_kwargs = dict(client_kwargs)

    def read_latest(
        self, topic: str, partitions: list[int], remaining: Callable[[int], None]
    ) -> tuple[Latest, int]:
        consumer = KafkaConsumer(
            group_id=None,
            enable_auto_commit=False,
            # Snapshots of an aborted exactly-once transaction never happened.
            isolation_level="read_committed",
            max_poll_records=10_000,
            fetch_max_bytes=64 * 1024 * 1024,
            max_partition_fetch_bytes=16 * 1024 * 1024,
            **self._client_kwargs,
        )
        try:
            assigned = [TopicPartition(topic, p) for p in partitions]
            consumer.assign(assigned)
            consumer.seek_to_beginning(*assigned)
            ends = consumer.end_offsets(assigned)
            left = {tp: end for tp, end in ends.items() if end > 0}
            total = sum(left.values())
            remaining(total)
            latest: Latest = {}
            read = 0
            while left:
                for tp, records in consumer.poll(timeout_ms=500).items():
                    for record in records:
                        latest[record.key] = (tp.partition, record.value)
                    read += len(records)
                for tp in list(left):
                    # The position passes the end even when the last records are
                    # transaction markers, which are never returned.
                    if consumer.position(tp) >= left[tp]:
                        del left[tp]
                remaining(max(0, total - read) if left else 0)
            return latest, read
        finally:
            consumer.close()


def _kafka_offsets(offsets: Offsets) -> dict[TopicPartition, OffsetAndMetadata]:
    return {
        TopicPartition(topic, partition): OffsetAndMetadata(offset, "", -1)
        for (topic, partition), offset in offsets.items()
    }
