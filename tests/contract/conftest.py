"""One harness per implementation of the transport seam: the in-memory fake of
`pipeline.testing.kafka`, kafka-python and confluent-kafka against a real broker.

Every test of this folder runs against all three (`harness` is parametrized), so
the fake the loop's unit tests rely on is held to what the real clients do.
The real ones use the integration broker (`KAFKA_BOOTSTRAP_SERVERS`, else the
local one); the outage tests a broker of their own behind a loopback proxy.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from kafka import KafkaAdminClient
from kafka.admin import MemberToRemove

from pipeline.config import KafkaConfig
from pipeline.testing import FakeKafka, ManualClock
from pipeline.transport import Transport, open_transport
from pipeline.transport.base import Source
from tests.integration.conftest import kafka_bootstrap  # noqa: F401 (the session's broker)

SESSION_TIMEOUT_MS = 6000


@dataclass
class Outage:
    """A transport, and how to make its broker stop answering and answer again."""

    transport: Transport
    cut: Callable[[], None]
    restore: Callable[[], None]
    topic: Callable[[], str]
    # Connections reset and new ones refused, as while the broker restarts.
    reset: Callable[[], None]
    # The broker itself, not through the proxy (real harnesses only).
    bootstrap: str = ""


class Harness(Protocol):
    name: str

    def topic(self, partitions: int = 2, **config: str) -> str: ...
    def produce(self, topic: str, pairs: list[tuple[bytes, bytes]]) -> None: ...
    def read(self, topic: str, *, committed: bool) -> list[tuple[int, int, bytes | None]]: ...
    def committed(self, group: str, topic: str, partition: int) -> int | None: ...
    def transport(self, group: str) -> Transport: ...
    def evict(self, group: str, source: Source) -> None: ...
    def wait(self, seconds: float) -> None: ...
    def outage(self) -> Outage: ...


class FakeHarness:
    name = "fake"

    def __init__(self) -> None:
        self.kafka = FakeKafka(ManualClock(), session_timeout_s=SESSION_TIMEOUT_MS / 1000)
        self.down_transport: FakeKafka | None = None

    def topic(self, partitions: int = 2, **config: str) -> str:
        name = self.kafka.create_topic(f"t-{uuid.uuid4().hex[:8]}", partitions)
        if "max.message.bytes" in config:
            self.kafka.refused_topics.add(name)  # the fake refuses all of it
        return name

    def produce(self, topic: str, pairs: list[tuple[bytes, bytes]]) -> None:
        self.kafka.produce(topic, pairs)

    def read(self, topic: str, *, committed: bool) -> list[tuple[int, int, bytes | None]]:
        return [
            (p, r.offset, r.value) for p, r in self.kafka.records(topic, committed_only=committed)
        ]

    def committed(self, group: str, topic: str, partition: int) -> int | None:
        return self.kafka.committed(group, topic, partition)

    def transport(self, group: str) -> Transport:
        return self.kafka.transport(group)

    def evict(self, group: str, source: Source) -> None:
        self.kafka.evict(group, source.member_id)  # type: ignore[attr-defined]

    def wait(self, seconds: float) -> None:
        self.kafka.advance(seconds)

    def outage(self) -> Outage:
        kafka = self.kafka

        def down(value: bool) -> None:
            kafka.down = value

        return Outage(
            kafka.transport("outage"),
            lambda: down(True),
            lambda: down(False),
            lambda: kafka.create_topic(f"outage-{uuid.uuid4().hex[:6]}", 1),
            lambda: down(True),
        )


class RealHarness:
    def __init__(self, name: str, bootstrap: str, outage_broker: Any) -> None:
        self.name = name
        self.bootstrap = bootstrap
        self._outage_broker = outage_broker
        self._admin = AdminClient({"bootstrap.servers": bootstrap})

    def topic(self, partitions: int = 2, **config: str) -> str:
        name = f"contract-{uuid.uuid4().hex[:10]}"
        futures = self._admin.create_topics([NewTopic(name, partitions, 1, config=config)])
        futures[name].result(timeout=30)
        deadline = time.monotonic() + 30
        while len(self._admin.list_topics(name, timeout=10).topics[name].partitions) != partitions:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} has no leaders after 30 s")
            time.sleep(0.1)
        return name

    def produce(self, topic: str, pairs: list[tuple[bytes, bytes]]) -> None:
        producer = Producer({"bootstrap.servers": self.bootstrap, "partitioner": "murmur2_random"})
        for key, value in pairs:
            producer.produce(topic, value, key)
        assert producer.flush(30) == 0

    def read(self, topic: str, *, committed: bool) -> list[tuple[int, int, bytes | None]]:
        consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": "contract-reader",
                "enable.partition.eof": True,
                "isolation.level": "read_committed" if committed else "read_uncommitted",
            }
        )
        try:
            partitions = sorted(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
            consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
            done: set[int] = set()
            records = []
            deadline = time.monotonic() + 30
            while len(done) < len(partitions) and time.monotonic() < deadline:
                for message in consumer.consume(1000, 0.5):
                    error = message.error()
                    if error is not None and error.code() == KafkaError._PARTITION_EOF:
                        done.add(message.partition())
                    elif error is None:
                        records.append((message.partition(), message.offset(), message.value()))
            return sorted(records)
        finally:
            consumer.close()

    def committed(self, group: str, topic: str, partition: int) -> int | None:
        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": group})
        try:
            (tp,) = consumer.committed([TopicPartition(topic, partition)], timeout=10)
            return tp.offset if tp.offset >= 0 else None
        finally:
            consumer.close()

    def transport(self, group: str, bootstrap: str | None = None) -> Transport:
        return open_transport(
            KafkaConfig(
                bootstrap_servers=bootstrap or self.bootstrap,
                transport=self.name,
                group_id=group,
                session_timeout_ms=SESSION_TIMEOUT_MS,
            )
        )

    def evict(self, group: str, source: Source) -> None:
        """An admin's LeaveGroup on the member's behalf: the coordinator drops it at once,
        and the member learns at its next heartbeat, as after an expired session."""
        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap)
        try:
            result = admin.remove_group_members(
                group, [MemberToRemove(member_id=member_id(source))]
            )
            assert all(error.__name__ == "NoError" for error in result.values()), result
        finally:
            admin.close()

    def wait(self, seconds: float) -> None:
        time.sleep(seconds)

    def outage(self) -> Outage:
        """A transport to a broker of its own, reached through a proxy that `cut` blackholes
        (connections open, nothing passes: the harshest of network failures)."""
        broker = self._outage_broker()
        transport = self.transport(f"outage-{uuid.uuid4().hex[:6]}", broker.proxied_bootstrap)
        own = RealHarness(self.name, broker.bootstrap, self._outage_broker)
        return Outage(
            transport,
            broker.proxy.blackhole,
            broker.proxy.restore,
            lambda: own.topic(1),
            broker.proxy.cut,
            broker.bootstrap,
        )


def member_id(source: Source) -> str:
    """The coordinator's name for a real source's member."""
    consumer = source._consumer  # type: ignore[attr-defined]
    if hasattr(consumer, "memberid"):
        return str(consumer.memberid())
    return str(consumer._coordinator._generation.member_id)


@pytest.fixture(scope="session")
def outage_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A broker behind a loopback proxy, started on first use."""
    from tests.chaos.broker import Broker

    started: list[Broker] = []

    def get() -> Broker:
        if not started:
            home = tmp_path_factory.mktemp("outage") / "kafka"
            home.mkdir()
            broker = Broker(home)
            broker.start()
            started.append(broker)
        started[0].proxy.restore()
        return started[0]

    yield get
    for broker in started:
        broker.close()


class Tracked:
    """A transport that remembers what it made, so a failed test leaves no client behind
    (their threads would keep reconnecting to a broker that is gone)."""

    def __init__(self, transport: Transport, made: list[Any]) -> None:
        self._transport = transport
        self._made = made
        self.name = transport.name

    def source(self, *args: Any, **kwargs: Any) -> Any:
        made = self._transport.source(*args, **kwargs)
        self._made.append(made)
        return made

    def sink(self) -> Any:
        made = self._transport.sink()
        self._made.append(made)
        return made

    def transactional_sink(self, *args: Any) -> Any:
        made = self._transport.transactional_sink(*args)
        self._made.append(made)
        return made

    def changelog_reader(self, stall_timeout_s: float) -> Any:
        return self._transport.changelog_reader(stall_timeout_s)


@pytest.fixture(params=["fake", "kafka-python", "confluent"])
def harness(request: pytest.FixtureRequest, outage_broker: Any) -> Iterator[Harness]:
    made: list[Any] = []
    chosen: Any = (
        FakeHarness()
        if request.param == "fake"
        else RealHarness(request.param, request.getfixturevalue("kafka_bootstrap"), outage_broker)
    )
    plain = chosen.transport
    chosen.transport = lambda *args, **kwargs: Tracked(plain(*args, **kwargs), made)
    yield chosen
    for client in reversed(made):
        # The test may have closed it already, or broken it on purpose.
        with contextlib.suppress(Exception):
            client.close()
