"""Fixtures for tests against a real Kafka broker and a real Schema Registry.

The broker is chosen once per session, in this order:
1. $KAFKA_BOOTSTRAP_SERVERS, when set: a broker you run (nothing is started);
2. the local broker of `hiddenstate kafka start` (Java 17+ and Maven; started
   here if it is not running, and stopped at the end if this session started it);
3. where a Docker engine answers, a Kafka container from testcontainers.
No broker at all is a failure, not a skip: these tests exist to run.

The Schema Registry likewise: $SCHEMA_REGISTRY_URL (its Confluent-compatible
API), else the local Apicurio Registry of `hiddenstate registry start` (Java 21+
and Maven), started here if needed and stopped if this session started it.

Events "from elsewhere" are written by kcat (librdkafka's command-line client,
Debian's `kcat`), which `.ci/run` installs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from prometheus_client.parser import text_string_to_metric_families

from pipeline.devtools import local_kafka, local_registry
from pipeline.errors import LocalKafkaError
from pipeline.testing import StepWeights, random_weights, write_onnx_step
from tests.ports import free_port


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


@pytest.fixture(scope="session")
def registry_url() -> Iterator[str]:
    """The Confluent-compatible API of a real Schema Registry for this test session."""
    given = os.environ.get("SCHEMA_REGISTRY_URL")
    if given:
        yield given
        return
    registry = local_registry.from_environment()
    started_here = local_registry.running_pid(registry) is None
    yield local_registry.start(registry)
    if started_here:
        local_registry.stop(registry)


REGISTRY_TIMEOUT_S = 10.0


@pytest.fixture(scope="session")
def registry_client(registry_url: str):
    """confluent-kafka's registry client, every request under a timeout."""
    from confluent_kafka.schema_registry import SchemaRegistryClient

    return SchemaRegistryClient({"url": registry_url, "timeout": REGISTRY_TIMEOUT_S})


def kcat_produce(
    bootstrap: str, topic: str, records: Iterable[tuple[bytes, bytes]], codec: str = "none"
) -> None:
    """Write (key, value) records with kcat (librdkafka), compressed with `codec`, and
    wait until every one is acknowledged (kcat exits non-zero otherwise)."""
    records = list(records)
    assert not any(b"\t" in key or b"\n" in key + value for key, value in records), (
        "kcat reads one record per line, the key before the first tab"
    )
    lines = b"".join(key + b"\t" + value + b"\n" for key, value in records)
    # A long linger puts the records into few batches: librdkafka sends a batch that
    # compression does not shrink (a lone small record) uncompressed, and a test of a
    # codec needs its records compressed.
    command = ["kcat", "-P", "-b", bootstrap, "-t", topic, "-K", "\t", "-z", codec]
    result = subprocess.run(
        [*command, "-X", "acks=all", "-X", "linger.ms=500"],
        input=lines,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")


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


class Served:
    """One `hiddenstate serve` process, driven as an operator would: flags, HTTP, signals."""

    def __init__(
        self,
        args: list[str],
        log_path: Path,
        metrics_port: int,
        env: dict[str, str] | None = None,
    ) -> None:
        self.args = args
        self.log_path = log_path
        self.metrics_url = f"http://127.0.0.1:{metrics_port}"
        with log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pipeline.cli", "serve", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=_REPO_ROOT,
                env=None if env is None else {**os.environ, **env},
            )

    def get(self, path: str) -> tuple[int, str]:
        """HTTP GET on the metrics port: (status, body); (0, error) when nothing answers."""
        try:
            with urllib.request.urlopen(self.metrics_url + path, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()
        except OSError as error:
            return 0, str(error)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until /readyz says 200 (partitions assigned, nothing restoring)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"serve exited with {self.process.returncode}:\n{self.log()}")
            if self.get("/readyz")[0] == 200:
                return
            time.sleep(0.2)
        raise AssertionError(f"serve not ready after {timeout:.0f} s:\n{self.log()}")

    def metric(self, sample_name: str, **labels: str) -> float:
        """The current value of one sample on /metrics (0.0 if absent)."""
        status, body = self.get("/metrics")
        assert status == 200, body
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                if sample.name == sample_name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    return float(sample.value)
        return 0.0

    def wait_metric(
        self, sample_name: str, at_least: float, timeout: float = 60.0, **labels: str
    ) -> None:
        """Until the sample reaches `at_least` (counters only grow)."""
        deadline = time.monotonic() + timeout
        while (value := self.metric(sample_name, **labels)) < at_least:
            if time.monotonic() > deadline:
                raise AssertionError(f"{sample_name}{labels} = {value} < {at_least}:\n{self.log()}")
            time.sleep(0.2)

    def wait_metric_is(
        self, sample_name: str, value: float, timeout: float = 60.0, **labels: str
    ) -> None:
        """Until the gauge is `value`: a gauge can pass through it on its way elsewhere, and
        one already above a lower bound says nothing of a change yet to come."""
        deadline = time.monotonic() + timeout
        while (now := self.metric(sample_name, **labels)) != value:
            if time.monotonic() > deadline:
                raise AssertionError(f"{sample_name}{labels} = {now}, not {value}:\n{self.log()}")
            time.sleep(0.2)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Send `sig` and wait for the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)

    def wait_exit(self, timeout: float = 60.0) -> int:
        return self.process.wait(timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]


_REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def serve_transport(pytestconfig: pytest.Config) -> str:
    """The Kafka client every served process uses (`pytest --transport ...`)."""
    return str(pytestconfig.getoption("--transport"))


@pytest.fixture
def serve(
    kafka_bootstrap: str, tmp_path: Path, serve_transport: str
) -> Iterator[Callable[..., Served]]:
    """Start `hiddenstate serve` processes; all are killed at the end of the test.
    `transport`: the session's by default, another by name, or None for no flag at all
    (the server's default); `env`: extra environment variables; `port`: the metrics port
    (a restart on the same one is the same member: the same transactional id)."""
    started: list[Served] = []
    session_transport = serve_transport

    def start(
        *args: str,
        ready: bool = True,
        transport: str | None = session_transport,
        env: dict[str, str] | None = None,
        port: int | None = None,
    ) -> Served:
        port = port or free_port()
        chosen = ["--transport", transport] if transport else []
        served = Served(
            [
                *chosen,
                "--bootstrap-servers",
                kafka_bootstrap,
                "--metrics-port",
                str(port),
                "--metrics-host",
                "127.0.0.1",
                *args,
            ],
            tmp_path / f"serve-{len(started)}.log",
            port,
            env,
        )
        started.append(served)
        if ready:
            served.wait_ready()
        return served

    yield start
    for served in started:
        if served.process.poll() is None:
            served.process.kill()
            served.process.wait()


@pytest.fixture(scope="session")
def gru_weights() -> StepWeights:
    """A small two-layer GRU regressor; `NumpyStepModel(gru_weights)` is its reference."""
    return random_weights("gru", n_features=3, hidden=8, layers=2, n_outputs=2, name="gru-it")


@pytest.fixture(scope="session")
def gru_model(gru_weights: StepWeights, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ONNX step file of `gru_weights`."""
    return write_onnx_step(gru_weights, tmp_path_factory.mktemp("models") / "gru-it.onnx")
