"""The Kafka seam: the loop's view of the input and output sides.

`Source` and `Sink` are the two small protocols the serving loop talks to;
`KafkaSource` and `KafkaSink` implement them with kafka-python. Nothing else in
`pipeline` touches a Kafka client type, so the loop can be unit-tested with
in-memory doubles and another client (librdkafka) could plug in here.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType, NewTopic
from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener
from kafka.coordinator.assignors.cooperative_sticky import CooperativeStickyAssignor
from kafka.errors import (
    KafkaError,
    KafkaTimeoutError,
    RebalanceInProgressError,
    TopicAlreadyExistsError,
)
from kafka.structs import OffsetAndMetadata

from pipeline.errors import DeliveryError, FlushTimeoutError, KafkaSetupError
from pipeline.records import InputRecord, OutputRecord

log = logging.getLogger(__name__)

Offsets = Mapping[tuple[str, int], int]
"""(topic, partition) -> the next offset to read, i.e. last processed offset + 1."""


# How long the producer keeps retrying one output record (a broker outage)
# before giving it up: then the server stops uncommitted and its restart
# replays. Bounds the worst drain on SIGTERM (deploy/ sizes the grace period).
DELIVERY_TIMEOUT_S = 60.0


class Source(Protocol):
    """The input topic as the loop sees it."""

    def poll(self, timeout_s: float, max_records: int) -> list[InputRecord]:
        """Records in offset order per partition; rebalance callbacks run inside this call."""

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

    def send(self, record: OutputRecord) -> None:
        """Queue one record; a failure surfaces in the next `flush`."""

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
            raise _unreachable(consumer_kwargs, exc) from exc
        callbacks = {"assigned": on_assigned, "revoked": on_revoked, "lost": on_lost}
        self._consumer.subscribe([topic], listener=_Listener(self._consumer, callbacks))

    def poll(self, timeout_s: float, max_records: int) -> list[InputRecord]:
        batches = self._consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=max_records)
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
            raise _unreachable(client_kwargs, exc) from exc
        self._pending: list[Any] = []
        if transactional_id is not None:
            self._producer.init_transactions()

    def send(self, record: OutputRecord) -> None:
        self._pending.append(
            self._producer.send(
                record.topic,
                key=record.key,
                value=record.value,
                headers=list(record.headers),
                partition=record.partition,
            )
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


def _unreachable(kwargs: Mapping[str, Any], exc: Exception) -> KafkaSetupError:
    servers = kwargs.get("bootstrap_servers")
    return KafkaSetupError(
        f"cannot reach Kafka at {servers} ({exc}); check --bootstrap-servers / "
        "HIDDENSTATE_BOOTSTRAP_SERVERS, the security settings, and that the broker runs"
    )


def _kafka_offsets(offsets: Offsets) -> dict[TopicPartition, OffsetAndMetadata]:
    return {
        TopicPartition(topic, partition): OffsetAndMetadata(offset, "", -1)
        for (topic, partition), offset in offsets.items()
    }


class Topics:
    """Start-up checks and creation of the topics the server reads and writes."""

    def __init__(self, client_kwargs: Mapping[str, Any]) -> None:
        """`client_kwargs` are kafka-python's (`KafkaConfig.client_kwargs()`)."""
        try:
            self._admin = KafkaAdminClient(**client_kwargs)
        except KafkaError as exc:
            raise _unreachable(client_kwargs, exc) from exc

    def partitions(self, topic: str) -> int | None:
        """How many partitions `topic` has, or None if it does not exist."""
        for entry in self._admin.describe_topics([topic]):
            if entry["name"] == topic and entry["error_code"] == 0:
                return len(entry["partitions"])
        return None

    def require(self, topic: str, setting: str) -> int:
        """Partition count of an existing topic; `KafkaSetupError` naming the setting if missing."""
        count = self.partitions(topic)
        if count is None:
            raise KafkaSetupError(
                f"topic {topic!r} ({setting}) does not exist; create it "
                f"(e.g. `hiddenstate produce --topic {topic} ...` creates it) or fix the name"
            )
        return count

    def ensure(self, topic: str, partitions: int, config: Mapping[str, str] | None = None) -> int:
        """Create `topic` if missing; return its partition count."""
        existing = self.partitions(topic)
        if existing is not None:
            return existing
        try:
            self._admin.create_topics(
                [NewTopic(topic, partitions, -1, topic_configs=dict(config or {}))]
            )
            log.info("created topic %s with %d partitions", topic, partitions)
        except TopicAlreadyExistsError:
            pass  # another replica created it between our check and our request
        count = self.partitions(topic)
        if count is None:
            raise KafkaSetupError(f"topic {topic!r} could not be created")
        return count

    def topic_config(self, topic: str) -> dict[str, str]:
        """The topic's effective configuration (cleanup.policy, ...)."""
        result = self._admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic)], config_filter="all"
        )
        entries = result.get("topic", {}).get(topic, {})
        return {name: str(entry["value"]) for name, entry in entries.items()}

    def close(self) -> None:
        self._admin.close()
