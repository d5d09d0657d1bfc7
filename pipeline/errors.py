"""Every error hiddenstate raises on purpose.

    HiddenstateError                 root: catch this to catch ours only
    ├── ConfigError                  a setting is missing, malformed or contradictory
    ├── ModelContractError           an ONNX file does not follow the step contract
    ├── ExportError                  a PyTorch model cannot be exported as a causal step
    ├── ParityError                  the exported graph disagrees with PyTorch
    ├── BadEventError                one input record cannot be served (goes to the dead-letter topic)
    ├── KafkaSetupError              broker, topic or group not usable at start
    ├── DeliveryError                Kafka refused an output record for good (stop uncommitted)
    ├── FlushTimeoutError            outputs not acknowledged yet (the broker is away): wait on
    ├── UndecodableBatchError        the Kafka client cannot decode a fetched record batch (stop)
    ├── SchemaRegistryError          the Schema Registry cannot be reached or refuses a request
    ├── LocalKafkaError              the local development broker cannot start or stop
    └── LocalRegistryError           the local development Schema Registry cannot start or stop

Messages say what was wrong, with which input, and what to do about it.
"""

from __future__ import annotations


class HiddenstateError(Exception):
    """Root of every error raised on purpose by hiddenstate."""


class ConfigError(HiddenstateError):
    """A setting is missing, malformed or contradicts another; the message names it."""


class ModelContractError(HiddenstateError):
    """An ONNX file does not follow the step contract (docs/step-contract.md)."""


class ExportError(HiddenstateError):
    """A PyTorch model cannot be exported as a causal single-step graph."""


class ParityError(HiddenstateError):
    """Stepping the exported graph does not reproduce PyTorch within tolerance."""


class BadEventError(HiddenstateError):
    """One input record cannot be served; `reason` is the dead-letter reason label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class KafkaSetupError(HiddenstateError):
    """The broker, a topic or the consumer group cannot be used at start."""


class DeliveryError(HiddenstateError):
    """Kafka refused an output record for good; nothing of its batch may be committed."""


class FlushTimeoutError(HiddenstateError):
    """Output records are not acknowledged yet (the broker may be away); they stay queued."""


class UndecodableBatchError(HiddenstateError):
    """The Kafka client cannot decode a fetched record batch (a codec library missing, a
    corrupt batch): the server stops uncommitted rather than skip the records silently.
    The message names the partition, the offset and what to install or change."""


class SchemaRegistryError(HiddenstateError):
    """The Schema Registry cannot be reached, or refuses a request it should answer (not
    bad input: a record with an unknown schema id is a dead letter, not this)."""


class LocalKafkaError(HiddenstateError):
    """The local development broker (`hiddenstate kafka`) cannot start, stop or be found."""


class LocalRegistryError(HiddenstateError):
    """The local development Schema Registry (`hiddenstate registry`) cannot start or stop."""
