"""The Kafka clients behind one seam, chosen by `--transport`.

    transport = open_transport(config.kafka)        # ConfigError if the library is missing
    sink = transport.sink(transactional_id=None)
    source = transport.source(topic, on_assigned, on_revoked, on_lost, read_committed=False)

- `kafka-python` (`pipeline.transport.kafka_python`): pure Python, always
  installed;
- `confluent` (`pipeline.transport.confluent`): confluent-kafka over
  librdkafka (`pip install 'hiddenstate[fast]'`). Fetching, parsing and
  building record batches run in C, on librdkafka's own threads: several
  times less CPU per event (docs/benchmarks.md).

The protocols both implement are in `pipeline.transport.base`; this module
imports neither implementation until one is asked for by name, so a missing
optional library fails only when it is chosen. `pipeline.transport.topics`
has the start-up topic checks.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass

from pipeline.config import KafkaConfig
from pipeline.errors import ConfigError
from pipeline.transport.base import (
    DELIVERY_TIMEOUT_S,
    ChangelogReader,
    Latest,
    Offsets,
    RebalanceCallback,
    Sink,
    Source,
    Transport,
)

__all__ = [
    "DELIVERY_TIMEOUT_S",
    "TRANSPORTS",
    "ChangelogReader",
    "Latest",
    "Offsets",
    "RebalanceCallback",
    "Sink",
    "Source",
    "Transport",
    "open_transport",
]


@dataclass(frozen=True)
class _Implementation:
    module: str
    factory: str
    library: str  # the import name of the client library it needs
    install: str  # how to get that library


_IMPLEMENTATIONS = {
    "kafka-python": _Implementation(
        "pipeline.transport.kafka_python",
        "KafkaPythonTransport",
        "kafka",
        "pip install kafka-python",
    ),
    "confluent": _Implementation(
        "pipeline.transport.confluent",
        "ConfluentTransport",
        "confluent_kafka",
        "pip install 'hiddenstate[fast]'",
    ),
}

TRANSPORTS = tuple(_IMPLEMENTATIONS)


def open_transport(kafka: KafkaConfig) -> Transport:
    """The transport `--transport` names. `ConfigError` when its library is not installed."""
    implementation = _IMPLEMENTATIONS.get(kafka.transport)
    if implementation is None:
        raise ConfigError(
            f"--transport / HIDDENSTATE_TRANSPORT: expected one of {', '.join(TRANSPORTS)}, "
            f"got {kafka.transport!r}"
        )
    if importlib.util.find_spec(implementation.library) is None:
        raise ConfigError(
            f"--transport / HIDDENSTATE_TRANSPORT: {kafka.transport} needs the "
            f"{implementation.library} package, which is not installed; install it with "
            f"{implementation.install}, or choose another of {', '.join(TRANSPORTS)}"
        )
    module = importlib.import_module(implementation.module)
    transport: Transport = getattr(module, implementation.factory)(kafka)
    return transport
