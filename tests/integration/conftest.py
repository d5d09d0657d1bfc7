"""Fixtures for tests against a real Kafka broker.

The broker is chosen once per session, in this order:
1. $KAFKA_BOOTSTRAP_SERVERS, when set: a broker you run (nothing is started);
2. the local broker of `hiddenstate kafka start` (Java 17+ and Maven; started
   here if it is not running, and stopped at the end if this session started it);
3. where a Docker engine answers, a Kafka container from testcontainers.
No broker at all is a failure, not a skip: these tests exist to run.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic

from pipeline import local_kafka
from pipeline.errors import LocalKafkaError


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return True
    except Exception:  # any failure means "no usable engine here"
        return False


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """The bootstrap address of a real broker for this test session."""
    given = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if given:
        yield given
        return
    kafka = local_kafka.from_environment()
    try:
        started_here = local_kafka.running_pid(kafka) is None
        yield local_kafka.start(kafka)
        if started_here:
            local_kafka.stop(kafka)
        return
    except LocalKafkaError as local_error:
        if not _docker_answers():
            pytest.fail(
                "no Kafka broker for the integration tests: KAFKA_BOOTSTRAP_SERVERS is unset, "
                f"the local broker cannot start ({local_error}), and no Docker engine answers"
            )
    try:
        from testcontainers.community.kafka import KafkaContainer
    except ImportError:  # testcontainers before the community split
        from testcontainers.kafka import KafkaContainer
    with KafkaContainer("confluentinc/cp-kafka:7.6.0").with_kraft() as container:
        yield container.get_bootstrap_server()


@dataclass
class Record:
    """One consumed record, reduced to what tests compare."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    timestamp_ms: int


class KafkaKit:
    """Topic creation, producing and consuming for tests: plain calls, no magic."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.admin = KafkaAdminClient(bootstrap_servers=bootstrap)

    def close(self) -> None:
        self.admin.close()

    def create_topic(self, prefix: str, partitions: int = 1, **config: str) -> str:
        """Create a topic with a name no other test uses, and wait until it has leaders."""
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self.admin.create_topics([NewTopic(name, partitions, 1, topic_configs=config)])
        consumer = KafkaConsumer(bootstrap_servers=self.bootstrap)
        try:
            deadline = time.monotonic() + 30
            while consumer.partitions_for_topic(name) != set(range(partitions)):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"topic {name} has no leaders after 30 s")
                time.sleep(0.1)
        finally:
            consumer.close()
        return name

    def produce(
        self,
        topic: str,
        records: Iterable[tuple[bytes | None, bytes | None]],
        partition: int | None = None,
    ) -> int:
        """Send (key, value) pairs, wait for every acknowledgement; returns the count."""
        producer = KafkaProducer(bootstrap_servers=self.bootstrap, linger_ms=5)
        try:
            futures = [
                producer.send(topic, key=k, value=v, partition=partition) for k, v in records
            ]
            producer.flush()
            for future in futures:
                future.get(timeout=30)
            return len(futures)
        finally:
            producer.close()

    def consume(
        self,
        topic: str,
        count: int,
        timeout: float = 60.0,
        read_committed: bool = False,
    ) -> list[Record]:
        """Read `count` records from the start of every partition, or fail after `timeout`."""
        consumer = KafkaConsumer(
            bootstrap_servers=self.bootstrap,
            enable_auto_commit=False,
            isolation_level="read_committed" if read_committed else "read_uncommitted",
        )
        try:
            partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
            consumer.assign(partitions)
            consumer.seek_to_beginning(*partitions)
            records: list[Record] = []
            deadline = time.monotonic() + timeout
            while len(records) < count:
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"{topic}: {len(records)} of {count} records after {timeout:.0f} s"
                    )
                for batch in consumer.poll(timeout_ms=500).values():
                    records += [
                        Record(
                            r.topic,
                            r.partition,
                            r.offset,
                            r.key,
                            r.value,
                            list(r.headers or []),
                            r.timestamp,
                        )
                        for r in batch
                    ]
            return records
        finally:
            consumer.close()

    def end_offsets(self, topic: str) -> dict[int, int]:
        """The next offset of every partition (how many records each holds, uncompacted)."""
        consumer = KafkaConsumer(bootstrap_servers=self.bootstrap)
        try:
            partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
            return {tp.partition: off for tp, off in consumer.end_offsets(partitions).items()}
        finally:
            consumer.close()


@pytest.fixture(scope="session")
def kafka(kafka_bootstrap: str) -> Iterator[KafkaKit]:
    """Helpers bound to the session's broker."""
    kit = KafkaKit(kafka_bootstrap)
    yield kit
    kit.close()
