"""The Kafka seam: the loop's view of the input and output sides, and the client choice.

`Source` and `Sink` are the two small protocols the serving loop talks to;
`ChangelogReader` is what the changelog restore reads through. A `Transport`
makes all three for one Kafka client library, chosen by `--transport`:

    transport = open_transport(config.kafka)        # ConfigError if the library is missing
    sink = transport.sink(transactional_id=None)
    source = transport.source(topic, on_assigned, on_revoked, on_lost, read_committed=False)

- `kafka-python` (`pipeline.transport_kafka_python`, the default): pure
  Python, always installed;
- `confluent` (`pipeline.transport_confluent`): confluent-kafka over
  librdkafka (`pip install 'hiddenstate[fast]'`). Fetching, parsing and
  building record batches run in C, on librdkafka's own threads: several
  times less CPU per event (docs/benchmarks.md).

Both give the loop the same contract: records in offset order per
partition, rebalance callbacks only while the serving thread waits inside
`poll` or `close` (never during a batch), explicit offset commits, and
Kafka transactions for exactly-once. Nothing else in `pipeline` touches a
client type, so the loop is unit-tested with in-memory doubles. `Topics`
(start-up checks and topic creation) always uses kafka-python's admin client:
it runs once, at start.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from kafka import KafkaAdminClient
from kafka.admin import ConfigResource, ConfigResourceType, NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from pipeline.config import KafkaConfig
from pipeline.errors import ConfigError, KafkaSetupError
from pipeline.records import InputRecord, OutputRecord

log = logging.getLogger(__name__)

Offsets = Mapping[tuple[str, int], int]
"""(topic, partition) -> the next offset to read, i.e. last processed offset + 1."""


# How long the producer keeps retrying one output record (a broker outage)
# before giving it up: then the server stops uncommitted and its restart
# replays. Bounds the worst drain on SIGTERM (deploy/ sizes the grace period).
DELIVERY_TIMEOUT_S = 60.0

# How long a freshly created topic may take to show in the broker's metadata.
TOPIC_VISIBLE_TIMEOUT_S = 10.0

TRANSPORTS = ("kafka-python", "confluent")


class Source(Protocol):
    """The input topic as the loop sees it."""

    def poll(self, timeout_s: float, max_records: int) -> list[InputRecord]:
        """Records in offset order per partition; rebalance callbacks run inside this call.
        Returns as soon as records are there (at most `max_records`), or empty after
        `timeout_s`."""

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

    def send(self, records: Sequence[OutputRecord]) -> None:
        """Queue records, in order; a failure surfaces in the next `flush`. A whole batch
        per call: the per-record work stays in one tight loop inside the sink."""

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

Latest = dict[bytes, tuple[int, bytes | None]]
"""Key -> (partition, newest value); None is a tombstone."""


class ChangelogReader(Protocol):
    """Reads compacted changelog partitions for a restore."""

    def read_latest(
        self, topic: str, partitions: list[int], remaining: Callable[[int], None]
    ) -> tuple[Latest, int]:
        """The newest committed value of every key in `partitions` of `topic`, read from
        the start to the end as it is now, and how many records were read. Calls
        `remaining(n)` with the records still to read as it goes (0 at the end)."""


class Transport(Protocol):
    """One Kafka client library: makes the loop's source and sink, and reads changelogs."""

    name: str

    def source(
        self,
        topic: str,
        on_assigned: RebalanceCallback,
        on_revoked: RebalanceCallback,
        on_lost: RebalanceCallback,
        *,
        read_committed: bool,
    ) -> Source:
        """A consumer of `topic` in the configured group (cooperative rebalancing)."""

    def sink(self, transactional_id: str | None) -> Sink:
        """An idempotent producer; transactional when `transactional_id` is given."""

    def changelog_reader(self) -> ChangelogReader:
        """The reader the changelog restore uses."""


def open_transport(kafka: KafkaConfig) -> Transport:
    """The transport `--transport` names. `ConfigError` when its library is not installed."""
    if kafka.transport == "confluent":
        if importlib.util.find_spec("confluent_kafka") is None:
            raise ConfigError(
                "--transport / HIDDENSTATE_TRANSPORT: confluent needs the confluent-kafka "
                "package, which is not installed; install it with "
                "pip install 'hiddenstate[fast]', or use --transport kafka-python"
            )
        from pipeline.transport_confluent import ConfluentTransport

        return ConfluentTransport(kafka)
    if kafka.transport != "kafka-python":
        raise ConfigError(
            f"--transport / HIDDENSTATE_TRANSPORT: expected one of {', '.join(TRANSPORTS)}, "
            f"got {kafka.transport!r}"
        )
    from pipeline.transport_kafka_python import KafkaPythonTransport

    return KafkaPythonTransport(kafka)


def unreachable(servers: Any, exc: Exception) -> KafkaSetupError:
    """The start-up error for a broker that does not answer, whichever client saw it."""
    return KafkaSetupError(
        f"cannot reach Kafka at {servers} ({exc}); check --bootstrap-servers / "
        "HIDDENSTATE_BOOTSTRAP_SERVERS, the security settings, and that the broker runs"
    )


class Topics:
    """Start-up checks and creation of the topics the server reads and writes."""

    def __init__(self, client_kwargs: Mapping[str, Any]) -> None:
        """`client_kwargs` are kafka-python's (`KafkaConfig.client_kwargs()`)."""
        try:
            self._admin = KafkaAdminClient(**client_kwargs)
        except KafkaError as exc:
            raise unreachable(client_kwargs.get("bootstrap_servers"), exc) from exc

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
        # The controller acknowledges the creation before the broker's metadata
        # cache has it (KRaft propagates it asynchronously): describe until it shows.
        deadline = time.monotonic() + TOPIC_VISIBLE_TIMEOUT_S
        while (count := self.partitions(topic)) is None:
            if time.monotonic() > deadline:
                raise KafkaSetupError(
                    f"topic {topic!r} was created but did not appear in the broker's "
                    f"metadata within {TOPIC_VISIBLE_TIMEOUT_S:.0f} s; check the broker's log "
                    "or create the topic by hand"
                )
            time.sleep(0.1)
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
