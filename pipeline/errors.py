"""Every error hiddenstate raises on purpose.

    HiddenstateError                 root: catch this to catch ours only
    ├── ConfigError                  a setting is missing, malformed or contradictory
    ├── ModelContractError           an ONNX file does not follow the step contract
    ├── ExportError                  a PyTorch model cannot be exported as a causal step
    ├── ParityError                  the exported graph disagrees with PyTorch
    ├── BadEventError                one input record cannot be served (goes to the dead-letter topic)
    ├── KafkaSetupError              broker, topic or group not usable at start
    ├── DeliveryError                Kafka refused an output record for good (stop uncommitted)
    ├── KafkaUnavailableError        the broker did not answer a call within its bound
    │   ├── FlushTimeoutError        outputs not acknowledged yet (the broker is away): wait on
    │   ├── TransactionTimeoutError  a transaction call did not finish: its fate is unknown
    │   └── RestoreStalledError      a changelog restore read nothing for too long
    ├── TransactionAbortedError      the broker refused a transaction: nothing of it is visible
    ├── FencedError                  another producer took this transactional id: stop
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


class KafkaUnavailableError(HiddenstateError):
    """The broker did not answer a call within its bound (it is away, or cut off)."""


class FlushTimeoutError(KafkaUnavailableError):
    """Output records are not acknowledged yet (the broker may be away); they stay queued."""


class TransactionTimeoutError(KafkaUnavailableError):
    """A transaction call did not finish in time: whether the transaction committed is
    unknown until the producer aborts it or a new one with its transactional id starts."""


class RestoreStalledError(KafkaUnavailableError):
    """A changelog restore read no record for longer than its bound while some were left."""


class TransactionAbortedError(HiddenstateError):
    """The broker refused to commit a transaction (this member is no longer in the group
    generation it served for): nothing of it became visible."""


class FencedError(HiddenstateError):
    """A producer with the same transactional id started elsewhere: this process is a
    zombie and must stop (two servers with one --instance-id, or a restart raced it)."""


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
