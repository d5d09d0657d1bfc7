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
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from pipeline.config import KafkaConfig
from pipeline.errors import (
    DeliveryError,
    FencedError,
    FlushTimeoutError,
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
)
from pipeline.transport.hanging import OpenTransactions, probe

log = logging.getLogger(__name__)

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

    def sink(self) -> ConfluentSink:
        return ConfluentSink(self._kafka.librdkafka_producer_config())

    def transactional_sink(
        self, transactional_id: str, transaction_timeout_s: float
    ) -> ConfluentTransactionalSink:
        return ConfluentTransactionalSink(
            self._kafka.librdkafka_producer_config(), transactional_id, transaction_timeout_s
        )

    def changelog_reader(self, stall_timeout_s: float) -> ConfluentChangelogReader:
        return ConfluentChangelogReader(
            self._kafka.librdkafka_config(),
            stall_timeout_s,
            OpenTransactions(self._kafka.client_kwargs()),
        )


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
        self._group_id = str(config.get("group.id", ""))
        self._topic = topic
        self._reset_to = (
            OFFSET_BEGINNING if config.get("auto.offset.reset") == "earliest" else OFFSET_END
        )
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

    def seek_to_committed(
        self, partitions: Sequence[int], reading_from: Mapping[int, int] | None = None
    ) -> dict[int, int | None]:
        consumer = self._consumer
        held = {tp.partition for tp in consumer.assignment()}
        wanted = [TopicPartition(self._topic, p) for p in partitions if p in held]
        if not wanted:
            return {}
        try:
            committed = consumer.committed(wanted, timeout=TRANSACTION_CALL_TIMEOUT_S)
        except KafkaException as exc:
            raise KafkaUnavailableError(
                f"the committed offsets of {self._topic} {sorted(held)} were not fetched: "
                f"{exc.args[0].str()}"
            ) from exc
        offsets: dict[int, int | None] = {}
        for tp in committed:
            known = tp.offset >= 0
            offsets[tp.partition] = tp.offset if known else None
            if reads_from_there(tp.partition, offsets[tp.partition], reading_from):
                continue
            consumer.seek(
                TopicPartition(self._topic, tp.partition, tp.offset if known else self._reset_to)
            )
        return offsets

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
        metadata = self._consumer.consumer_group_metadata()
        if _generation(metadata) < 0:
            # librdkafka reset the member (its heartbeat heard it is gone); the broker
            # would take a transactional commit of generation -1 (KIP-447 leaves that
            # open for producers of before it): it must not be made.
            raise TransactionAbortedError(not_a_member(self._group_id))
        return metadata

    def close(self) -> None:
        # Runs the revocation callback of the last assignment before leaving.
        self._consumer.close()


class ConfluentSink:
    """`Sink` over one idempotent confluent-kafka producer."""

    def __init__(
        self,
        config: dict[str, Any],
        linger_ms: int = 5,
        delivery_timeout_s: float = DELIVERY_TIMEOUT_S,
    ) -> None:
        """`config`: librdkafka properties (`KafkaConfig.librdkafka_config()`)."""
        self._settings = {
            **config,
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": linger_ms,
            "message.timeout.ms": int(delivery_timeout_s * 1000),
            "partitioner": "murmur2_random",
            "delivery.report.only.error": True,
            "error_cb": _ErrorLog("Kafka producer"),
            # The whole output of a large poll (and a checkpoint's snapshots) must fit
            # in the local queue; librdkafka's default of 100,000 records may not.
            "queue.buffering.max.messages": 1_000_000,
        }
        self._producer, self._failures = self._new_producer()

    def _new_producer(self) -> tuple[Producer, list[str]]:
        """A producer and the list its delivery failures go to. One list per producer: a
        replaced producer's late reports (of records of an aborted transaction) must not
        count against the records of the next."""
        failures: list[str] = []

        def delivered(error: KafkaError | None, message: Message) -> None:
            if error is not None:
                # librdkafka retried for the delivery timeout: this one is lost unless
                # its input is replayed, so its offset must never be committed.
                failures.append(f"{message.topic()}[{message.partition()}]: {error.str()}")

        return Producer({**self._settings, "on_delivery": delivered}), failures

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
        self._raise_failures()

    def _raise_failures(self) -> None:
        if self._failures:
            failures = list(self._failures)
            self._failures.clear()  # in place: the producer's callback holds this list
            raise DeliveryError(
                f"Kafka refused {len(failures)} output records, the first: {failures[0]}"
            )

    def close(self) -> None:
        self._producer.flush(TRANSACTION_CALL_TIMEOUT_S)


class ConfluentTransactionalSink(ConfluentSink):
    """`TransactionalSink` over a transactional confluent-kafka producer."""

    def __init__(
        self,
        config: dict[str, Any],
        transactional_id: str,
        transaction_timeout_s: float,
        linger_ms: int = 5,
    ) -> None:
        self._id = transactional_id
        self._fences = FenceCount(transactional_id)
        super().__init__(
            {
                **config,
                "transactional.id": transactional_id,
                "transaction.timeout.ms": int(transaction_timeout_s * 1000),
            },
            linger_ms=linger_ms,
            # librdkafka refuses a record timeout longer than the transaction's.
            delivery_timeout_s=min(DELIVERY_TIMEOUT_S, transaction_timeout_s),
        )
        self._open = False
        self._ready = False
        self._uncertain = False
        self._init()

    def _init(self) -> None:
        """Initialise the producer: the broker completes or aborts whatever a previous
        producer with this transactional id left open, and fences it."""
        try:
            self._producer.init_transactions(TRANSACTION_CALL_TIMEOUT_S)
        except KafkaException as exc:
            error = exc.args[0]
            if error.code() == KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED:
                raise KafkaSetupError(unauthorized(self._id)) from exc
            if error.fatal():  # the instance is unusable: the next try needs a new one
                self._producer, self._failures = self._new_producer()
            raise TransactionTimeoutError(
                f"transactional id {self._id!r} was not initialised: {error.str()}"
            ) from exc
        self._ready = True

    def begin(self) -> None:
        if not self._ready:
            self._init()
        self._producer.begin_transaction()
        self._open = True

    def commit(self, offsets: Offsets, group_metadata: Any) -> None:
        try:
            if offsets:
                self._producer.send_offsets_to_transaction(
                    [TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                    group_metadata,
                    TRANSACTION_CALL_TIMEOUT_S,
                )
            self._producer.commit_transaction(TRANSACTION_CALL_TIMEOUT_S)
        except KafkaException as exc:
            error = exc.args[0]
            if error.code() in _FENCED:
                self._fences.count()
                raise FencedError(fenced(self._id)) from exc
            if error.txn_requires_abort():
                raise TransactionAbortedError(
                    f"the broker refused the commit: {error.str()}"
                ) from exc
            self._uncertain = True  # no abort can be trusted to end it: a new producer will
            raise TransactionTimeoutError(
                f"committing transaction {self._id!r} did not finish: {error.str()}"
            ) from exc
        self._open = False
        self._raise_failures()

    def abort(self) -> None:
        if not self._open and self._ready:
            return
        self._open = False
        if self._ready and not self._uncertain:
            try:
                self._producer.abort_transaction(TRANSACTION_CALL_TIMEOUT_S)
            except KafkaException as exc:
                self._ready = False  # the next call starts a new producer first
                raise TransactionTimeoutError(
                    f"aborting transaction {self._id!r}: {exc.args[0].str()}"
                ) from exc
        self._ready = False
        self._uncertain = False
        # A new producer with the same id in any case: its start resolves the old
        # transaction if the abort did not (commits one that was being committed, aborts
        # the rest), and a fresh epoch leaves no sequence numbers of before an outage
        # behind (librdkafka#3575: reusing one after OUT_OF_ORDER_SEQUENCE lost records,
        # and here the next send_offsets_to_transaction then outlived its timeout).
        self._fences.check()
        self._producer.purge()
        self._producer, self._failures = self._new_producer()
        self._init()


# The producer was fenced: another one with its transactional id took over, or the
# broker aborted a transaction that outlived its timeout and bumped the epoch.
_FENCED = frozenset(
    {KafkaError._FENCED, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH}
)


def _generation(metadata: bytes) -> int:
    """The generation in librdkafka's serialized group metadata: `b"CGMDv2:"`, then the
    generation as a little-endian int32, then group id, member id and instance id, each
    NUL-terminated (rd_kafka_consumer_group_metadata_write). Another layout: 0 (unknown,
    left to the broker to judge)."""
    if not metadata.startswith(_METADATA_MAGIC) or len(metadata) < len(_METADATA_MAGIC) + 4:
        return 0
    return int(struct.unpack_from("<i", metadata, len(_METADATA_MAGIC))[0])


_METADATA_MAGIC = b"CGMDv2:"


def _watermarks(
    consumer: Consumer, partition: TopicPartition, patience_s: float = 10.0
) -> tuple[int, int]:
    """The low and high watermark of a partition. A changelog created moments ago may
    have no leader yet (NOT_LEADER_FOR_PARTITION), and a broker that restarts answers
    nothing for a while: ask again, for `patience_s` in all."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            low, high = consumer.get_watermark_offsets(partition, timeout=min(10.0, patience_s))
            return max(0, low), max(0, high)
        except KafkaException as exc:
            if time.monotonic() > deadline:
                raise RestoreStalledError(
                    f"the size of {partition.topic}[{partition.partition}] is unknown after "
                    f"{patience_s:.0f} s: {exc.args[0].str()}"
                ) from exc
            time.sleep(0.2)


def _by_key(partition: int | None) -> int:
    """librdkafka's partition argument: -1 lets the partitioner choose by key."""
    return -1 if partition is None else partition


class ConfluentChangelogReader:
    """`ChangelogReader` over a confluent-kafka consumer that joins no group."""

    def __init__(
        self,
        config: dict[str, Any],
        stall_timeout_s: float,
        open_transactions: OpenTransactions | None = None,
    ) -> None:
        self._config = config
        self._stall_timeout_s = stall_timeout_s
        self._open_transactions = open_transactions

    def read_latest(
        self, topic: str, partitions: list[int], remaining: Callable[[int], None]
    ) -> tuple[Latest, int]:
        bounds = self._watermarks(topic, partitions)
        ends = {p: high for p, (low, high) in bounds.items()}
        total = sum(high - low for low, high in bounds.values())
        remaining(total)
        consumer = Consumer(
            {
                **self._config,
                "group.id": "hiddenstate-restore",  # required by the client; never joined
                "enable.auto.commit": False,
                # Snapshots of an aborted transaction never happened.
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
            consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
            # How far each partition was read: done at its end as it was at the start. A
            # read_committed consumer reports its end at the last stable offset, which an
            # open transaction holds back: then it waits for that to finish.
            reached = {p: 0 for p in partitions}
            left = {p for p in partitions if ends[p] > 0}
            latest: Latest = {}
            read = 0
            stall = StallWatch(topic, self._stall_timeout_s, probe(self._open_transactions))
            while left:
                messages = _take(consumer, 10_000, 0.5)
                errors = list(map(Message.error, messages))
                if any(errors):
                    for message, error in zip(messages, errors, strict=True):
                        if error is None:
                            continue
                        if error.code() == KafkaError._PARTITION_EOF:
                            partition = cast(int, message.partition())
                            reached[partition] = max(
                                reached[partition], cast(int, message.offset())
                            )
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
                for message in batch:
                    partition = message.partition()
                    reached[partition] = max(reached[partition], message.offset() + 1)
                read += len(messages)
                left = {p for p in left if reached[p] < ends[p]}
                remaining(max(0, total - read) if left else 0)
                stall.check({p: reached[p] for p in left}, ends)
            return latest, read
        finally:
            consumer.close()

    def _watermarks(self, topic: str, partitions: list[int]) -> dict[int, tuple[int, int]]:
        """(low, high) watermark of each partition, asked by a read_uncommitted consumer:
        the high one then includes records of transactions still open."""
        consumer = Consumer(
            {
                **self._config,
                "group.id": "hiddenstate-restore",
                "isolation.level": "read_uncommitted",
                "error_cb": _ErrorLog(f"restoring from {topic}"),
            }
        )
        try:
            return {
                p: _watermarks(consumer, TopicPartition(topic, p), self._stall_timeout_s)
                for p in partitions
            }
        finally:
            consumer.close()
