"""The confluent-kafka transport (`--transport confluent`, the `fast` extra).

confluent-kafka wraps librdkafka: fetching, decompressing and parsing record
batches, building and sending produced ones, retries and acknowledgements
all run in C on librdkafka's threads. What is left in Python per record is
one method call on each side, which is why this transport serves several
times more events per CPU second than kafka-python (docs/benchmarks.md).

How the loop's contract (`pipeline.transport`) maps onto it:

- Rebalance callbacks (`on_assign`, `on_revoke`, `on_lost`) run inside
  `consume()`/`poll()`/`close()` on the calling thread, i.e. while the serving
  loop waits for records, between two batches: no thread hand-off is needed
  (kafka-python runs them on its IO thread, see kafka_python.py).
  Cooperative rebalancing (`cooperative-sticky`): the callbacks get only the
  partitions that move, and the client completes the incremental
  assignment after `on_assign` returns.
- `consume(n, timeout)` waits until it has `n` messages *or* the timeout
  passed, which would add up to a whole poll timeout of latency at low
  rates. `poll` therefore takes what is already fetched without waiting,
  and only when nothing is there waits for the first message (`poll()`
  returns on the first) and then takes what came with it.
- Offsets are committed explicitly and synchronously; the producer reports
  deliveries only when they fail (`delivery.report.only.error`), so a
  healthy record costs no Python callback; `flush` waits for the in-flight
  queue to drain, then raises the first failure seen.
- Keys are partitioned with `murmur2_random`, Java's (and kafka-python's)
  partitioner, so a stream's predictions land on the same output partition
  whichever transport produced them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from pipeline.config import KafkaConfig
from pipeline.errors import DeliveryError, FlushTimeoutError, UndecodableBatchError
from pipeline.records import InputRecord, OutputRecord
from pipeline.transport.base import (
    DELIVERY_TIMEOUT_S,
    Latest,
    Offsets,
    RebalanceCallback,
)

log = logging.getLogger(__name__)

# Commit errors after which the offsets simply wait for the next checkpoint
# (a rebalance between generations, the coordinator away or moving, a
# timeout); the next owner replaying from the last commit loses nothing either.
_DEFERRABLE_COMMIT_ERRORS = frozenset(
    {
        KafkaError.REBALANCE_IN_PROGRESS,
        KafkaError.ILLEGAL_GENERATION,
        KafkaError.UNKNOWN_MEMBER_ID,
        KafkaError.FENCED_INSTANCE_ID,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
        KafkaError.NOT_COORDINATOR,
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        KafkaError.REQUEST_TIMED_OUT,
        KafkaError._TIMED_OUT,
        KafkaError._TRANSPORT,
        KafkaError._WAIT_COORD,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError._NO_OFFSET,
        KafkaError._STATE,
        KafkaError._ASSIGNMENT_LOST,
    }
)
_ERROR_LOG_INTERVAL_S = 10.0

# A fetched batch librdkafka could not decode: it reports the error at the batch's
# offset and carries on past it. Serving on would skip those records silently.
_UNDECODABLE = frozenset(
    {KafkaError._BAD_MSG, KafkaError._BAD_COMPRESSION, KafkaError._UNSUPPORTED_FEATURE}
)


def undecodable_batch(
    topic: str | None, partition: int | None, offset: int | None, error: KafkaError
) -> UndecodableBatchError:
    """The named error for a batch librdkafka reports as undecodable: where, and what to do."""
    return UndecodableBatchError(
        f"cannot decode the record batch of {topic}[{partition}] at offset {offset}: "
        f"{error.str()} ({error.name()}). librdkafka reads gzip, snappy, lz4 and zstd, so the "
        "batch is corrupt or in a format this client does not know; the server stops rather "
        "than skip it. Check the producer and the broker's log; to skip the batch "
        "deliberately, move the group's offset past it "
        "(kafka-consumer-groups.sh --reset-offsets --to-offset)"
    )


class ConfluentTransport:
    """`Transport` over confluent-kafka (librdkafka)."""

    name = "confluent"

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
    ) -> ConfluentSource:
        config = self._kafka.librdkafka_consumer_config()
        # kafka-python's default, and what at-least-once needs; librdkafka's own
        # default is read_committed.
        config["isolation.level"] = "read_committed" if read_committed else "read_uncommitted"
        return ConfluentSource(config, topic, on_assigned, on_revoked, on_lost)

    def sink(self, transactional_id: str | None) -> ConfluentSink:
        return ConfluentSink(
            self._kafka.librdkafka_producer_config(), transactional_id=transactional_id
        )

    def changelog_reader(self) -> ConfluentChangelogReader:
        return ConfluentChangelogReader(self._kafka.librdkafka_config())


class _ErrorLog:
    """librdkafka reports connection trouble through a callback, often many times a
    second while a broker is away: log each kind once per interval."""

    def __init__(self, who: str) -> None:
        self._who = who
        self._last: dict[int, float] = {}

    def __call__(self, error: KafkaError) -> None:
        now = time.monotonic()
        code = error.code()
        if now - self._last.get(code, float("-inf")) >= _ERROR_LOG_INTERVAL_S:
            self._last[code] = now
            log.warning("%s: %s", self._who, error.str())


def _take(consumer: Consumer, most: int, timeout_s: float) -> list[Message]:
    """Up to `most` messages: those fetched already, without waiting; if there are none,
    wait up to `timeout_s` for the first and take what came with it. (`consume(n, t)`
    alone would wait for all n or the whole timeout.)"""
    messages = consumer.consume(most, 0)
    if messages:
        return messages
    first = consumer.poll(timeout_s)
    if first is None:
        return []
    return [first, *consumer.consume(most - 1, 0)]


class ConfluentSource:
    """`Source` over a confluent-kafka consumer in a consumer group."""

    def __init__(
        self,
        config: dict[str, Any],
        topic: str,
        on_assigned: RebalanceCallback,
        on_revoked: RebalanceCallback,
        on_lost: RebalanceCallback,
    ) -> None:
        """`config`: librdkafka properties (`KafkaConfig.librdkafka_consumer_config()`)."""
        self._consumer = Consumer(
            {
                **config,
                # Cooperative rebalancing moves only the partitions that change
                # owner: the others keep serving, and their states stay in memory.
                "partition.assignment.strategy": "cooperative-sticky",
                # Bound the prefetched backlog (librdkafka's default is 64 MiB): records
                # of a revoked partition are fetched for nothing. When it is full the next
                # fetch waits fetch.queue.backoff.ms, by default a whole second: a stall.
                "queued.max.messages.kbytes": 16384,
                "fetch.queue.backoff.ms": 10,
                "error_cb": _ErrorLog("Kafka consumer"),
            }
        )
        self._callbacks = {"assigned": on_assigned, "revoked": on_revoked, "lost": on_lost}
        self._topic = topic
        self._consumer.subscribe(
            [topic],
            on_assign=self._rebalance("assigned"),
            on_revoke=self._rebalance("revoked"),
            on_lost=self._rebalance("lost"),
        )
        self._errors = _ErrorLog(f"reading {topic}")

    def _rebalance(self, kind: str) -> Callable[[Consumer, list[TopicPartition]], None]:
        callback = self._callbacks[kind]

        def run(consumer: Consumer, partitions: list[TopicPartition]) -> None:
            numbers = sorted(tp.partition for tp in partitions)
            if numbers:
                callback(numbers)

        return run

    def poll(self, timeout_s: float, max_records: int) -> list[InputRecord]:
        messages = _take(self._consumer, max_records, timeout_s)
        records: list[InputRecord] = []
        append = records.append
        # Any: the stubs allow None for every field, which a fetched record never has.
        for message in cast(list[Any], messages):
            if message.error() is not None:
                self._error(message)
                continue
            headers = message.headers()
            append(
                InputRecord(
                    message.topic(),
                    message.partition(),
                    message.offset(),
                    message.key(),
                    message.value(),
                    message.timestamp()[1],
                    tuple(headers) if headers else (),
                )
            )
        return records

    def _error(self, message: Any) -> None:
        error = message.error()
        if error.fatal():
            raise KafkaException(error)
        if error.code() in _UNDECODABLE:
            raise undecodable_batch(message.topic(), message.partition(), message.offset(), error)
        self._errors(error)

    def commit(self, offsets: Offsets) -> bool:
        if not offsets:
            return True
        try:
            committed = self._consumer.commit(
                offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                asynchronous=False,
            )
        except KafkaException as exc:
            error = exc.args[0]
            if error.code() in _DEFERRABLE_COMMIT_ERRORS:
                log.info("commit deferred: %s", error.str())
                return False
            raise
        failed = [tp for tp in committed or () if tp.error is not None]
        if failed:
            log.warning("commit deferred: %s", ", ".join(f"{tp}: {tp.error}" for tp in failed))
            return False
        return True

    def lag(self) -> dict[int, int]:
        consumer = self._consumer
        lags = {}
        for tp in consumer.position(consumer.assignment()):
            if tp.offset < 0:
                continue  # nothing consumed yet: the position is not known
            _, high = consumer.get_watermark_offsets(tp, cached=True)
            if high >= 0:
                lags[tp.partition] = max(0, high - tp.offset)
        return lags

    def group_metadata(self) -> Any:
        return self._consumer.consumer_group_metadata()

    def close(self) -> None:
        # Runs the revocation callback of the last assignment before leaving.
        self._consumer.close()


class ConfluentSink:
    """`Sink` over one idempotent confluent-kafka producer (transactional when configured)."""

    def __init__(
        self,
        config: dict[str, Any],
        transactional_id: str | None = None,
        linger_ms: int = 5,
    ) -> None:
        """`config`: librdkafka properties (`KafkaConfig.librdkafka_config()`)."""
        settings = {
            **config,
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": linger_ms,
            "message.timeout.ms": int(DELIVERY_TIMEOUT_S * 1000),
            "partitioner": "murmur2_random",
            "delivery.report.only.error": True,
            "on_delivery": self._delivered,
            "error_cb": _ErrorLog("Kafka producer"),
            # The whole output of a large poll (and a checkpoint's snapshots) must fit
            # in the local queue; librdkafka's default of 100,000 records may not.
            "queue.buffering.max.messages": 1_000_000,
        }
        if transactional_id is not None:
            settings["transactional.id"] = transactional_id
        self._producer = Producer(settings)
        self._failures: list[str] = []
        if transactional_id is not None:
            self._producer.init_transactions(DELIVERY_TIMEOUT_S)

    def _delivered(self, error: KafkaError | None, message: Message) -> None:
        if error is not None:
            # librdkafka retried for DELIVERY_TIMEOUT_S: this one is lost unless its
            # input is replayed, so its offset must never be committed.
            self._failures.append(f"{message.topic()}[{message.partition()}]: {error.str()}")

    def send(self, records: Sequence[OutputRecord]) -> None:
        produce = self._producer.produce
        for topic, key, value, headers, partition in records:
            try:
                # Positional arguments where possible: keywords cost a third more per call.
                if headers:
                    produce(topic, value, key, _by_key(partition), headers=list(headers))
                elif partition is None:
                    produce(topic, value, key)
                else:
                    produce(topic, value, key, partition)
            except BufferError:
                self._send_when_queue_has_room(OutputRecord(topic, key, value, headers, partition))

    def _send_when_queue_has_room(self, record: OutputRecord) -> None:
        """The local queue is full (the broker is slow or away): let librdkafka send
        and retry. This is the backpressure: the loop waits here."""
        headers: list[tuple[str, str | bytes | None]] | None = (
            list(record.headers) if record.headers else None
        )
        while True:
            self._producer.poll(0.05)
            try:
                self._producer.produce(
                    record.topic,
                    record.value,
                    record.key,
                    _by_key(record.partition),
                    headers=headers,
                )
                return
            except BufferError:
                continue

    def flush(self, timeout_s: float) -> None:
        queued = self._producer.flush(timeout_s)
        if queued:
            raise FlushTimeoutError(f"{queued} output records not acknowledged yet")
        if self._failures:
            failures, self._failures = self._failures, []
            raise DeliveryError(
                f"Kafka refused {len(failures)} output records, the first: {failures[0]}"
            )

    def begin(self) -> None:
        """Open a transaction (exactly-once mode)."""
        self._producer.begin_transaction()

    def commit_transaction(self, offsets: Offsets, group_metadata: Any) -> None:
        """Add the input offsets to the open transaction and commit it atomically."""
        self._producer.send_offsets_to_transaction(
            [TopicPartition(t, p, o) for (t, p), o in offsets.items()],
            group_metadata,
            DELIVERY_TIMEOUT_S,
        )
        self._producer.commit_transaction(DELIVERY_TIMEOUT_S)
        if self._failures:
            failures, self._failures = self._failures, []
            raise DeliveryError(f"a committed transaction reported failures: {failures[0]}")

    def close(self) -> None:
        self._producer.flush(30)


def _records_in(consumer: Consumer, partition: TopicPartition, patience_s: float = 10.0) -> int:
    """Records in a partition (high - low watermark), for the restore's progress gauge.

    A changelog created moments ago may have no leader yet (NOT_LEADER_FOR_PARTITION):
    ask again for a while. The read itself does not depend on this (it stops at the
    end-of-partition events), so when the broker does not say, the gauge shows 0."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            low, high = consumer.get_watermark_offsets(partition, timeout=patience_s)
            return max(0, high - low)
        except KafkaException as exc:
            if time.monotonic() > deadline:
                log.warning("size of %s unknown: %s", partition, exc.args[0].str())
                return 0
            time.sleep(0.2)


def _by_key(partition: int | None) -> int:
    """librdkafka's partition argument: -1 lets the partitioner choose by key."""
    return -1 if partition is None else partition


class ConfluentChangelogReader:
    """`ChangelogReader` over a confluent-kafka consumer that joins no group."""

    def __init__(self, config: dict[str, Any]) -> None:
        self._config = config

    def read_latest(
        self, topic: str, partitions: list[int], remaining: Callable[[int], None]
    ) -> tuple[Latest, int]:
        consumer = Consumer(
            {
                **self._config,
                "group.id": "hiddenstate-restore",  # required by the client; never joined
                "enable.auto.commit": False,
                # Snapshots of an aborted exactly-once transaction never happened.
                "isolation.level": "read_committed",
                # Reaching the end of each partition is reported: that is where to stop.
                "enable.partition.eof": True,
                "fetch.max.bytes": 64 * 1024 * 1024,
                "max.partition.fetch.bytes": 16 * 1024 * 1024,
                # Fetch ahead without the default 1 s pause when the local queue is full.
                "queued.max.messages.kbytes": 256 * 1024,
                "fetch.queue.backoff.ms": 1,
                "error_cb": _ErrorLog(f"restoring from {topic}"),
            }
        )
        try:
            total = sum(_records_in(consumer, TopicPartition(topic, p)) for p in partitions)
            remaining(total)
            consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
            left = set(partitions)
            latest: Latest = {}
            read = 0
            while left:
                messages = _take(consumer, 10_000, 0.5)
                errors = list(map(Message.error, messages))
                if any(errors):
                    for message, error in zip(messages, errors, strict=True):
                        if error is None:
                            continue
                        if error.code() == KafkaError._PARTITION_EOF:
                            left.discard(cast(int, message.partition()))
                        elif error.fatal():
                            raise KafkaException(error)
                        else:
                            log.warning("restoring from %s: %s", topic, error.str())
                    messages = [m for m, e in zip(messages, errors, strict=True) if e is None]
                # The newest value of each key wins; map() keeps the per-record work in C.
                batch = cast(list[Any], messages)
                partitions_values = zip(
                    map(Message.partition, batch), map(Message.value, batch), strict=True
                )
                pairs: Any = zip(map(Message.key, batch), partitions_values, strict=True)
                latest.update(pairs)
                read += len(messages)
                remaining(max(0, total - read) if left else 0)
            return latest, read
        finally:
            consumer.close()
