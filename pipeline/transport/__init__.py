"""The Kafka clients behind one seam, chosen by `--transport` (default `auto`).

    transport = open_transport(config.kafka)        # ConfigError if the library is missing
    sink = transport.sink(transactional_id=None)
    source = transport.source(topic, on_assigned, on_revoked, on_lost, read_committed=False)

- `kafka-python` (`pipeline.transport.kafka_python`): pure Python, always
  installed;
- `confluent` (`pipeline.transport.confluent`): confluent-kafka over
  librdkafka (`pip install 'hiddenstate[fast]'`). Fetching, parsing and
  building record batches run in C, on librdkafka's own threads: several
  times less CPU per event (docs/benchmarks.md);
- `auto`: confluent where confluent-kafka is installed, else kafka-python.

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
    "Choice",
    "Latest",
    "Offsets",
    "RebalanceCallback",
    "Sink",
    "Source",
    "Transport",
    "choose_transport",
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


@dataclass(frozen=True)
class Choice:
    """Which transport serves, and why (for the start log)."""

    name: str
    reason: str


def choose_transport(requested: str) -> Choice:
    """Resolve `--transport`: a named one as it is, `auto` to confluent when confluent-kafka
    is installed (several times less CPU per event), else kafka-python."""
    if requested != "auto":
        return Choice(requested, "--transport " + requested)
    if importlib.util.find_spec(_IMPLEMENTATIONS["confluent"].library) is not None:
        return Choice("confluent", "--transport auto: confluent-kafka (librdkafka) is installed")
    return Choice(
        "kafka-python",
        "--transport auto: confluent-kafka is not installed; "
        f"{_IMPLEMENTATIONS['confluent'].install} serves with about 3x less CPU per event",
    )


def open_transport(kafka: KafkaConfig) -> Transport:
    """The transport `--transport` names (`auto`: see `choose_transport`). `ConfigError`
    when its library is not installed."""
    name = choose_transport(kafka.transport).name
    implementation = _IMPLEMENTATIONS.get(name)
    if implementation is None:
        raise ConfigError(
            f"--transport / HIDDENSTATE_TRANSPORT: expected auto or one of "
            f"{', '.join(TRANSPORTS)}, got {kafka.transport!r}"
        )
    if importlib.util.find_spec(implementation.library) is None:
        raise ConfigError(
            f"--transport / HIDDENSTATE_TRANSPORT: {name} needs the "
            f"{implementation.library} package, which is not installed; install it with "
            f"{implementation.install}, or choose another of auto, {', '.join(TRANSPORTS)}"
        )
    module = importlib.import_module(implementation.module)
    transport: Transport = getattr(module, implementation.factory)(kafka)
    return transport
