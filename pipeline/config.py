"""The serving configuration: one frozen `ServeConfig`, built once at start.

Every setting is declared once, as a field of one of the section dataclasses
below; its metadata (`setting(...)`, pipeline/settings.py) is the single table that drives the
command-line flag (`--max-streams`), the environment variable
(`HIDDENSTATE_MAX_STREAMS`), the default, the parsing and the checks.
Precedence: flag > environment > default. Each component gets only its
section (`config.store`, `config.runtime`, ...), never the whole object.

    config = load_config(sys.argv[1:], os.environ)   # raises ConfigError
    log.info("starting with\\n%s", config.describe())  # secrets masked

`docs/configuration.md` lists the table; `settings_table()` renders it.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline import settings
from pipeline.errors import ConfigError
from pipeline.model_spec import ModelSpec
from pipeline.settings import setting as _setting
from pipeline.settings import who as _who

_MASK = "***"
_TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class TopicsConfig:
    """Topic names: what the processor reads and writes."""

    input_topic: str = _setting("", "topic of input events (key = stream id)", required=True)
    output_topic: str = _setting("", "topic the predictions go to", required=True)
    dead_letter_topic: str = _setting(
        "", "topic for events that cannot be served", derived="<input_topic>.dead-letter"
    )
    changelog_topic: str = _setting(
        "",
        "compacted topic of hidden-state snapshots",
        derived="<input_topic>.<model name>.<version>.<weights>.changelog",
    )

    def changelog_for(self, spec: ModelSpec) -> str:
        """The changelog topic: the setting, or `model_changelog(input_topic, spec)`.

        Known only once the model is loaded, which is why it is not resolved here.
        """
        return self.changelog_topic or model_changelog(self.input_topic, spec)


def model_changelog(input_topic: str, spec: ModelSpec) -> str:
    """The derived changelog topic of one model identity:
    `<input_topic>.<name>.<version>.<first 16 hex of the weights>.changelog`.

    One per identity, whichever role the model serves in: what a model wrote as the
    shadow is what it restores once promoted, and two versions (or two trainings) of one
    model name never share a changelog. Characters Kafka refuses become `-`; a name too
    long for Kafka's 249 characters is cut before the weights, which stay."""
    tail = f".{_safe(spec.weights_sha256[:16])}.changelog"
    head = f"{input_topic}.{_safe(spec.name)}.{_safe(spec.version)}"
    return head[: 249 - len(tail)] + tail


def name_only_changelog(input_topic: str, model_name: str) -> str:
    """The changelog topic hiddenstate 0.1 derived from the model name alone
    (`<input_topic>.<model name>.changelog`): start-up looks for it to warn that its
    states are not used any more."""
    return f"{input_topic}.{_safe(model_name)}.changelog"[:249]


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "-", text)


@dataclass(frozen=True)
class KafkaConfig:
    """What the Kafka clients need: brokers, group, security, polling."""

    bootstrap_servers: str = _setting("127.0.0.1:9092", "comma-separated host:port of brokers")
    transport: str = _setting(
        "auto",
        "Kafka client library: confluent (librdkafka, from the `fast` extra: about 3x less CPU "
        "per event, docs/benchmarks.md), kafka-python (pure Python, always installed), or auto: "
        "confluent when it is installed, else kafka-python (the start log says which and why)",
        choices=("auto", "kafka-python", "confluent"),
    )
    group_id: str = _setting("", "consumer group id", derived="hiddenstate-<input_topic>")
    client_id: str = _setting("hiddenstate", "client id shown in broker logs and quotas")
    instance_id: str = _setting(
        "", "static group membership id (group.instance.id); empty: dynamic membership"
    )
    auto_offset_reset: str = _setting(
        "earliest", "where a group without committed offsets starts", choices=("earliest", "latest")
    )
    security_protocol: str = _setting(
        "PLAINTEXT",
        "broker security protocol",
        choices=("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"),
    )
    sasl_mechanism: str = _setting(
        "",
        "SASL mechanism (with SASL_PLAINTEXT or SASL_SSL)",
        choices=("", "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"),
    )
    sasl_plain_username: str = _setting("", "SASL user name")
    sasl_plain_password: str = _setting("", "SASL password", secret=True)
    ssl_cafile: str = _setting("", "CA bundle (PEM) to verify the brokers")
    ssl_certfile: str = _setting("", "client certificate (PEM) for mutual TLS")
    ssl_keyfile: str = _setting("", "client private key (PEM) for mutual TLS")
    compression_type: str = _setting(
        "",
        "compression of the records the server produces (predictions, dead letters, "
        "snapshots); empty: the client's default, none. Input in any codec is read either way",
        choices=("", "none", "gzip", "snappy", "lz4", "zstd"),
    )
    max_poll_records: int = _setting(
        2000,
        "most records one poll returns (one batch: larger amortises the per-batch flush "
        "when behind, docs/benchmarks.md)",
        minimum=1,
    )
    poll_timeout_ms: int = _setting(100, "how long one poll waits for records", minimum=0)
    bootstrap_timeout_ms: int = _setting(
        15_000, "how long to wait for the brokers at start before failing", minimum=100
    )
    session_timeout_ms: int = _setting(
        45_000,
        "consumer group session timeout: a member silent this long (crashed, paused, cut off) "
        "loses its partitions; a static member (--instance-id) restarted within it keeps them. "
        "The broker bounds it (group.min/max.session.timeout.ms, by default 6 s to 30 min)",
        minimum=1000,
    )

    @property
    def heartbeat_interval_ms(self) -> int:
        """Both clients' default of 3 s, or a third of a shorter session timeout: a member
        must beat several times per session or one late beat evicts it."""
        return min(3000, self.session_timeout_ms // 3)

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments shared by kafka-python's consumer, producer and admin client."""
        kwargs: dict[str, Any] = {
            "bootstrap_servers": [s.strip() for s in self.bootstrap_servers.split(",")],
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
            "bootstrap_timeout_ms": self.bootstrap_timeout_ms,
        }
        optional = {
            "sasl_mechanism": self.sasl_mechanism,
            "sasl_plain_username": self.sasl_plain_username,
            "sasl_plain_password": self.sasl_plain_password,
            "ssl_cafile": self.ssl_cafile,
            "ssl_certfile": self.ssl_certfile,
            "ssl_keyfile": self.ssl_keyfile,
        }
        # Empty means "not set": leave kafka-python's own default (None) in place.
        kwargs.update({k: v for k, v in optional.items() if v})
        return kwargs

    def producer_kwargs(self) -> dict[str, Any]:
        """`client_kwargs()` plus the producer's compression (`--compression-type`)."""
        kwargs = self.client_kwargs()
        if self.compression_type and self.compression_type != "none":
            kwargs["compression_type"] = self.compression_type
        return kwargs

    def consumer_kwargs(self) -> dict[str, Any]:
        """`client_kwargs()` plus the consumer's group settings.

        Auto-commit is off: offsets are committed only after the outputs of a
        batch are acknowledged (at-least-once), or inside the transaction.
        """
        kwargs = self.client_kwargs()
        kwargs.update(
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset=self.auto_offset_reset,
            max_poll_records=self.max_poll_records,
            session_timeout_ms=self.session_timeout_ms,
            heartbeat_interval_ms=self.heartbeat_interval_ms,
        )
        if self.instance_id:
            kwargs["group_instance_id"] = self.instance_id
        return kwargs

    def librdkafka_config(self) -> dict[str, Any]:
        """The same connection settings as `client_kwargs()`, as librdkafka properties
        (confluent-kafka's consumer, producer and admin client)."""
        config: dict[str, Any] = {
            "bootstrap.servers": ",".join(s.strip() for s in self.bootstrap_servers.split(",")),
            "client.id": self.client_id,
            "security.protocol": self.security_protocol,
        }
        optional = {
            "sasl.mechanisms": self.sasl_mechanism,
            "sasl.username": self.sasl_plain_username,
            "sasl.password": self.sasl_plain_password,
            "ssl.ca.location": self.ssl_cafile,
            "ssl.certificate.location": self.ssl_certfile,
            "ssl.key.location": self.ssl_keyfile,
        }
        config.update({k: v for k, v in optional.items() if v})
        return config

    def librdkafka_producer_config(self) -> dict[str, Any]:
        """`librdkafka_config()` plus the producer's compression (`--compression-type`)."""
        config = self.librdkafka_config()
        if self.compression_type:
            config["compression.type"] = self.compression_type
        return config

    def librdkafka_consumer_config(self) -> dict[str, Any]:
        """`librdkafka_config()` plus the group settings of `consumer_kwargs()`: offsets
        are committed by hand, explicitly, after the outputs are acknowledged."""
        config = self.librdkafka_config()
        config.update(
            {
                "group.id": self.group_id,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": self.auto_offset_reset,
                "session.timeout.ms": self.session_timeout_ms,
                "heartbeat.interval.ms": self.heartbeat_interval_ms,
            }
        )
        if self.instance_id:
            config["group.instance.id"] = self.instance_id
        return config


@dataclass(frozen=True)
class RuntimeConfig:
    """The model runtime: which file, which device, how many threads."""

    model: str = _setting("", "path of the exported ONNX step file", required=True)
    device: str = _setting(
        "cpu",
        "execution device; auto = CUDA when available, else CPU",
        choices=("cpu", "cuda", "auto"),
    )
    intra_op_threads: int = _setting(
        1, "onnxruntime threads inside one operator (0 = one per core)", minimum=0
    )
    inter_op_threads: int = _setting(
        1, "onnxruntime threads across operators (0 = one per core)", minimum=0
    )
    spinning: bool = _setting(
        False, "let onnxruntime worker threads spin between runs (burns CPU, see docs/runtime.md)"
    )


@dataclass(frozen=True)
class StoreConfig:
    """The in-memory state store: how many streams, how long an idle one lives."""

    max_streams: int = _setting(
        100_000,
        "most streams held in memory; beyond it the least recently used is evicted",
        minimum=1,
    )
    idle_ttl_seconds: float = _setting(0.0, "evict a stream idle this long (0 = never)", minimum=0)


@dataclass(frozen=True)
class ProcessingConfig:
    """The pure core's limits: how events are batched and how large one may be."""

    max_wave_size: int = _setting(1024, "most streams stepped in one onnxruntime call", minimum=1)
    max_event_bytes: int = _setting(
        65_536, "larger event values go to the dead-letter topic", minimum=1
    )


FORMATS = ("json", "avro", "protobuf", "json-schema")
"""Event and prediction formats; all but json go through a Schema Registry."""


@dataclass(frozen=True)
class FormatsConfig:
    """Wire formats of events and predictions, and the Schema Registry the non-JSON ones use."""

    input_format: str = _setting(
        "json",
        "format of input events: json (pipeline/schemas/event.schema.json), or avro, protobuf or "
        "json-schema in the Schema Registry wire format (docs/events.md)",
        choices=FORMATS,
    )
    output_format: str = _setting(
        "json",
        "format of predictions; avro, protobuf and json-schema register their schema under "
        "<output_topic>-value",
        choices=FORMATS,
    )
    schema_registry_url: str = _setting(
        "",
        "Schema Registry base URL (Confluent API, e.g. http://127.0.0.1:8081 or Apicurio's "
        ".../apis/ccompat/v7); required by the avro, protobuf and json-schema formats",
    )
    schema_registry_username: str = _setting("", "Schema Registry basic-auth user name")
    schema_registry_password: str = _setting("", "Schema Registry basic-auth password", secret=True)
    schema_registry_ca_file: str = _setting(
        "", "CA bundle (PEM) to verify an https Schema Registry"
    )

    @property
    def uses_registry(self) -> bool:
        """True when events or predictions go through the Schema Registry."""
        return self.input_format != "json" or self.output_format != "json"


@dataclass(frozen=True)
class DeliveryConfig:
    """Delivery guarantee and checkpointing of hidden states to the changelog."""

    guarantee: str = _setting(
        "at-least-once", "delivery guarantee", choices=("at-least-once", "exactly-once")
    )
    checkpoint_interval_seconds: float = _setting(
        5.0, "checkpoint (snapshots, then offsets) at least this often", minimum=0.001
    )
    checkpoint_interval_events: int = _setting(
        100_000,
        "also checkpoint after this many events (0 = time only); bounds the replay after a crash",
        minimum=0,
    )


@dataclass(frozen=True)
class RolloutConfig:
    """A second model stepped in shadow beside the served one, and the check at promotion
    (docs/durability.md, "Rolling out a new model version")."""

    shadow_model: str = _setting(
        "",
        "path of a second exported ONNX step file, stepped beside --model on every event with "
        "states and a changelog of its own; its predictions go to --shadow-output-topic and "
        "are compared live (hiddenstate_shadow_*). It must take the same features. Empty: none",
    )
    shadow_output_topic: str = _setting(
        "",
        "topic the shadow model's predictions go to (the prediction format, with its identity), "
        "co-partitioned with the input: the prediction of an event of input partition p goes "
        "to partition p",
        derived="<output_topic>.shadow",
    )
    shadow_changelog_topic: str = _setting(
        "",
        "compacted topic of the shadow model's snapshots; to promote it, pass this topic as "
        "--changelog-topic",
        derived="<input_topic>.<shadow name>.<version>.<weights>.changelog",
    )
    shadow_warmup_events: int = _setting(
        0,
        "when partitions are assigned, replay up to this many recent events of each stream the "
        "shadow holds cold (joined mid-stream) from the input topic, within its retention; a "
        "stream whose events since its start or last reset are all replayed becomes warm "
        "(0 = no replay)",
        minimum=0,
    )
    promotion_max_cold_fraction: float = _setting(
        0.01,
        "refuse to serve (exit 1) when more than this fraction of the streams restored for "
        "--model are cold: their states, written while the model was a shadow, missed the "
        "first events of their stream (1 = never refuse)",
        minimum=0,
        maximum=1,
    )
    force_promotion: bool = _setting(
        False,
        "serve even when more restored streams are cold than --promotion-max-cold-fraction "
        "allows; they continue from their cold states",
    )

    def shadow_changelog_for(self, input_topic: str, spec: ModelSpec) -> str:
        """The shadow's changelog: the setting, or `model_changelog(input_topic, spec)` (what
        the same model uses as `--model`, so that a promotion restores what it wrote)."""
        return self.shadow_changelog_topic or model_changelog(input_topic, spec)


@dataclass(frozen=True)
class ObservabilityConfig:
    """Metrics/health HTTP endpoint and logging."""

    metrics_host: str = _setting("0.0.0.0", "address of /metrics, /healthz and /readyz")
    metrics_port: int = _setting(
        9108, "port of /metrics, /healthz and /readyz", minimum=0, maximum=65535
    )
    liveness_timeout_seconds: float = _setting(
        60.0, "/healthz fails when the loop has not beaten for this long", minimum=1
    )
    log_level: str = _setting("INFO", "log level", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    log_format: str = _setting(
        "text",
        "log lines: text for people, or json (one object per line, the start-up "
        "configuration as one record) for log collectors",
        choices=("text", "json"),
    )


@dataclass(frozen=True)
class OnlineConfig:
    """What the served models do live: accuracy from delayed labels, streams over HTTP."""

    labels_topic: str = _setting(
        "",
        "topic of label events, the truth for earlier predictions (co-partitioned with the "
        "input: same partition count, same key; docs/events.md); empty: no online accuracy",
    )
    labels_dead_letter_topic: str = _setting(
        "", "topic for label events that cannot be read", derived="<labels_topic>.dead-letter"
    )
    label_horizon_steps: int = _setting(
        64,
        "how many of each stream's last predictions a label can still judge (memory: "
        "docs/state-store.md); an older one is counted late",
        minimum=1,
        maximum=100_000,
    )
    streams_api: bool = _setting(
        False,
        "serve GET /streams/{key} (a stream's step, last prediction and, with ?state=1, its "
        "hidden state) and GET /streams: predictions can be sensitive, keep it internal "
        "(docs/operations.md)",
    )
    streams_api_host: str = _setting(
        "", "address of the streams API on its own port", derived="<metrics_host>"
    )
    streams_api_port: int = _setting(
        0,
        "port of the streams API apart from /metrics; 0: on the metrics port",
        minimum=0,
        maximum=65535,
    )


_SECTIONS: dict[str, type] = {
    "topics": TopicsConfig,
    "kafka": KafkaConfig,
    "runtime": RuntimeConfig,
    "store": StoreConfig,
    "processing": ProcessingConfig,
    "formats": FormatsConfig,
    "delivery": DeliveryConfig,
    "rollout": RolloutConfig,
    "observability": ObservabilityConfig,
    "online": OnlineConfig,
}


@dataclass(frozen=True)
class ServeConfig:
    """Everything `hiddenstate serve` is configured with; hand each component its section."""

    topics: TopicsConfig
    kafka: KafkaConfig
    runtime: RuntimeConfig
    store: StoreConfig
    processing: ProcessingConfig
    formats: FormatsConfig
    delivery: DeliveryConfig
    rollout: RolloutConfig
    observability: ObservabilityConfig
    online: OnlineConfig
    # Where each value came from ("flag", "env", "default", "derived"): for the start log.
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

    def redacted(self) -> dict[str, Any]:
        """Every effective setting by name, secrets masked: safe to log."""
        values: dict[str, Any] = {}
        for entry in settings.entries(_SECTIONS):
            value = getattr(getattr(self, entry.section), entry.name)
            values[entry.name] = _MASK if entry.setting.secret and value else value
        return values

    def describe(self) -> str:
        """One `name = value  (source)` line per setting, secrets masked."""
        lines = []
        for name, value in self.redacted().items():
            source = self.sources.get(name, "default")
            shown = value if value != "" else f"(none{_derived_note(name)})"
            lines.append(f"{name} = {shown}  ({source})")
        return "\n".join(lines)


def _derived_note(name: str) -> str:
    for entry in settings.entries(_SECTIONS):
        if entry.name == name and entry.setting.derived:
            return f": {entry.setting.derived}"
    return ""


# --------------------------------------------------------------------------- building it


def settings_table() -> list[dict[str, str]]:
    """The settings as rows of flag, env, default and help."""
    return settings.rows(_SECTIONS)


def settings_markdown() -> str:
    """The settings table as Markdown (docs/configuration.md embeds it; a test keeps it in sync)."""
    return settings.markdown(_SECTIONS)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per setting to `parser` (e.g. the `serve` subcommand's parser).

    Flags default to None so that `from_sources` can tell "not given" from a value.
    """
    settings.add_flags(parser, _SECTIONS)


def load_config(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> ServeConfig:
    """Parse `argv` (flags only) and `environ` into a validated `ServeConfig`."""
    parser = argparse.ArgumentParser(prog="hiddenstate serve")
    add_arguments(parser)
    namespace = parser.parse_args(list(argv or []))
    return from_sources(vars(namespace), os.environ if environ is None else environ)


# The settings a client of the cluster other than `serve` shares with it (`hiddenstate
# produce`): where the brokers are, how to authenticate, how to compress, the registry.
CLIENT_SETTINGS = (
    "bootstrap_servers",
    "client_id",
    "security_protocol",
    "sasl_mechanism",
    "sasl_plain_username",
    "sasl_plain_password",
    "ssl_cafile",
    "ssl_certfile",
    "ssl_keyfile",
    "compression_type",
    "bootstrap_timeout_ms",
    "schema_registry_url",
    "schema_registry_username",
    "schema_registry_password",
    "schema_registry_ca_file",
)


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `CLIENT_SETTINGS`, parsed and documented exactly as `serve`'s."""
    settings.add_flags(parser, _SECTIONS, only=CLIENT_SETTINGS)


def client_from_sources(
    flags: Mapping[str, Any], environ: Mapping[str, str], *, registry_needed: bool
) -> tuple[KafkaConfig, FormatsConfig]:
    """The connection and registry settings of `CLIENT_SETTINGS` (flag > environment >
    default) with serve's checks; `ConfigError` lists every problem at once."""
    values: dict[str, dict[str, Any]] = {"kafka": {}, "formats": {}}
    problems: list[str] = []
    for entry in settings.entries(_SECTIONS):
        if entry.name not in CLIENT_SETTINGS:
            continue
        raw: Any = flags.get(entry.name)
        source = "flag"
        if raw is None and settings.env_name(entry.name) in environ:
            raw, source = environ[settings.env_name(entry.name)], "env"
        if raw is None:
            values[entry.section][entry.name] = entry.default
            continue
        try:
            values[entry.section][entry.name] = settings.parse_value(raw, entry.kind, entry.setting)
        except ValueError as exc:
            problems.append(f"{_who(entry.name)}: {exc}, got {raw!r} (from {source})")
    if not problems:
        kafka = {f: getattr(KafkaConfig(), f) for f in KafkaConfig.__dataclass_fields__}
        kafka.update(values["kafka"])
        problems += _security_checks(kafka)
        registry = values["formats"]
        if registry_needed and not registry["schema_registry_url"]:
            problems.append(f"{_who('schema_registry_url')}: required with a registry format")
        if not registry_needed and registry["schema_registry_url"]:
            problems.append(f"{_who('schema_registry_url')}: has no effect with the json format")
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    return KafkaConfig(**values["kafka"]), FormatsConfig(**values["formats"])


def from_sources(flags: Mapping[str, Any], environ: Mapping[str, str]) -> ServeConfig:
    """Build and validate a config from parsed flags (None = not given) and the environment.

    Raises one `ConfigError` listing every problem found, each naming the flag
    and the environment variable and saying what is allowed.
    """
    values: dict[str, dict[str, Any]] = {s: {} for s in _SECTIONS}
    sources: dict[str, str] = {}
    problems: list[str] = []
    for entry in settings.entries(_SECTIONS):
        name = entry.name
        raw: Any = flags.get(name)
        source = "flag"
        if raw is None and settings.env_name(name) in environ:
            raw, source = environ[settings.env_name(name)], "env"
        if raw is None:
            values[entry.section][name] = entry.default
            sources[name] = "default"
            continue
        try:
            value = settings.parse_value(raw, entry.kind, entry.setting)
        except ValueError as exc:
            problems.append(f"{_who(name)}: {exc}, got {raw!r} (from {source})")
            continue
        values[entry.section][name] = value
        sources[name] = source
    _derive(values, sources)
    if not problems:
        problems = _cross_checks(values) + _rollout_checks(values, sources)
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    sections = {s: _SECTIONS[s](**v) for s, v in values.items()}
    return ServeConfig(**sections, sources=sources)


def _derive(values: dict[str, dict[str, Any]], sources: dict[str, str]) -> None:
    """Fill the defaults that depend on other settings (the input topic)."""
    topics, kafka = values["topics"], values["kafka"]
    if topics["input_topic"]:
        if not topics["dead_letter_topic"]:
            topics["dead_letter_topic"] = f"{topics['input_topic']}.dead-letter"[:249]
            sources["dead_letter_topic"] = "derived"
        if not kafka["group_id"]:
            kafka["group_id"] = f"hiddenstate-{topics['input_topic']}"
            sources["group_id"] = "derived"
    online = values["online"]
    if online["labels_topic"] and not online["labels_dead_letter_topic"]:
        online["labels_dead_letter_topic"] = f"{online['labels_topic']}.dead-letter"[:249]
        sources["labels_dead_letter_topic"] = "derived"
    rollout = values["rollout"]
    if rollout["shadow_model"] and topics["output_topic"] and not rollout["shadow_output_topic"]:
        rollout["shadow_output_topic"] = f"{topics['output_topic']}.shadow"[:249]
        sources["shadow_output_topic"] = "derived"
    # A wave must fit in the store; the default wave size shrinks for a small store.
    processing, store = values["processing"], values["store"]
    max_streams = store.get("max_streams")  # absent when it did not parse
    if (
        sources.get("max_wave_size") == "default"
        and isinstance(max_streams, int)
        and processing["max_wave_size"] > max_streams
    ):
        processing["max_wave_size"] = max_streams
        sources["max_wave_size"] = "derived"


def _cross_checks(values: dict[str, dict[str, Any]]) -> list[str]:
    """Checks that involve more than one setting, or the file system."""
    problems = []
    for entry in settings.entries(_SECTIONS):
        if entry.setting.required and values[entry.section][entry.name] == "":
            problems.append(f"{_who(entry.name)}: required, not set")
    topics, kafka = values["topics"], values["kafka"]
    for name in ("input_topic", "output_topic", "dead_letter_topic", "changelog_topic"):
        topic = topics[name]
        if topic and not _TOPIC_NAME.match(topic):
            problems.append(
                f"{_who(name)}: {topic!r} is not a valid Kafka topic name "
                "(1-249 of A-Z a-z 0-9 . _ -)"
            )
    online = values["online"]
    for name in ("labels_topic", "labels_dead_letter_topic"):
        topic = online[name]
        if topic and not _TOPIC_NAME.match(topic):
            problems.append(
                f"{_who(name)}: {topic!r} is not a valid Kafka topic name "
                "(1-249 of A-Z a-z 0-9 . _ -)"
            )
    named = [(n, topics[n]) for n in ("input_topic", "output_topic", "dead_letter_topic")]
    named += [("changelog_topic", topics["changelog_topic"])]
    named += [(n, online[n]) for n in ("labels_topic", "labels_dead_letter_topic")]
    for i, (a, ta) in enumerate(named):
        for b, tb in named[i + 1 :]:
            if ta and ta == tb:
                problems.append(f"{_who(a)} and {_who(b)}: both are {ta!r}; they must differ")
    if not kafka["bootstrap_servers"].strip() or any(
        not s.strip() for s in kafka["bootstrap_servers"].split(",")
    ):
        problems.append(f"{_who('bootstrap_servers')}: expected host:port[,host:port...]")
    problems += _security_checks(kafka)
    problems += _registry_checks(values["formats"])
    problems += _online_checks(online, values["observability"])
    if values["processing"]["max_wave_size"] > values["store"]["max_streams"]:
        problems.append(
            f"{_who('max_wave_size')}: {values['processing']['max_wave_size']} is more than "
            f"{_who('max_streams')} ({values['store']['max_streams']}); one wave must fit in the store"
        )
    return problems


def _online_checks(online: dict[str, Any], observability: dict[str, Any]) -> list[str]:
    problems = []
    if online["labels_dead_letter_topic"] and not online["labels_topic"]:
        problems.append(
            f"{_who('labels_dead_letter_topic')}: has no effect without {_who('labels_topic')}"
        )
    separate = online["streams_api_host"] or online["streams_api_port"]
    if separate and not online["streams_api"]:
        problems.append(
            f"{_who('streams_api_host')} and {_who('streams_api_port')}: have no effect "
            f"unless {_who('streams_api')} turns the streams API on"
        )
    if online["streams_api_host"] and not online["streams_api_port"]:
        problems.append(
            f"{_who('streams_api_host')}: give {_who('streams_api_port')} too (without a port "
            "of its own the streams API is served on the metrics port and host)"
        )
    port = online["streams_api_port"]
    if port and port == observability["metrics_port"]:
        problems.append(
            f"{_who('streams_api_port')}: {port} is the metrics port; leave it 0 to serve the "
            "streams API on the metrics port, or choose another"
        )
    return problems


def _rollout_checks(values: dict[str, dict[str, Any]], sources: Mapping[str, str]) -> list[str]:
    """The shadow's settings: only with a shadow model, topics of its own."""
    rollout, topics = values["rollout"], values["topics"]
    problems = []
    if not rollout["shadow_model"]:
        for name in ("shadow_output_topic", "shadow_changelog_topic", "shadow_warmup_events"):
            if sources.get(name) in ("flag", "env"):
                problems.append(
                    f"{_who(name)}: has no effect without {_who('shadow_model')}; set both, "
                    "or neither"
                )
        return problems
    if rollout["shadow_model"] == values["runtime"]["model"]:
        problems.append(
            f"{_who('shadow_model')}: {rollout['shadow_model']!r} is the --model file itself; "
            "a shadow is another version of the model"
        )
    for name in ("shadow_output_topic", "shadow_changelog_topic"):
        topic = rollout[name]
        if topic and not _TOPIC_NAME.match(topic):
            problems.append(
                f"{_who(name)}: {topic!r} is not a valid Kafka topic name "
                "(1-249 of A-Z a-z 0-9 . _ -)"
            )
    ours = [(n, rollout[n]) for n in ("shadow_output_topic", "shadow_changelog_topic")]
    theirs = [
        (n, topics[n])
        for n in ("input_topic", "output_topic", "dead_letter_topic", "changelog_topic")
    ] + [(n, values["online"][n]) for n in ("labels_topic", "labels_dead_letter_topic")]
    pairs = [(a, b) for a in ours for b in theirs] + [(ours[0], ours[1])]
    for (a, ta), (b, tb) in pairs:
        if ta and ta == tb:
            problems.append(f"{_who(a)} and {_who(b)}: both are {ta!r}; they must differ")
    return problems


def _registry_checks(formats: dict[str, Any]) -> list[str]:
    problems = []
    chosen = [
        f"{_who(name)} {formats[name]}"
        for name in ("input_format", "output_format")
        if formats[name] != "json"
    ]
    url = formats["schema_registry_url"]
    if chosen and not url:
        problems.append(
            f"{_who('schema_registry_url')}: required with {' and '.join(chosen)} "
            "(the Schema Registry that holds the schemas)"
        )
    if url and not chosen:
        problems.append(
            f"{_who('schema_registry_url')}: has no effect with the json formats; set "
            f"{_who('input_format')} or {_who('output_format')} to avro, protobuf or json-schema"
        )
    if url and not re.match(r"^https?://[^/\s]+", url):
        problems.append(f"{_who('schema_registry_url')}: expected http(s)://host[:port][/path]")
    if bool(formats["schema_registry_username"]) != bool(formats["schema_registry_password"]):
        problems.append(
            f"{_who('schema_registry_username')} and {_who('schema_registry_password')}: "
            "give both or neither"
        )
    path = formats["schema_registry_ca_file"]
    if path and not os.access(path, os.R_OK):
        problems.append(
            f"{_who('schema_registry_ca_file')}: {path!r} does not exist or is not readable"
        )
    return problems


def _security_checks(kafka: dict[str, Any]) -> list[str]:
    problems = []
    protocol, mechanism = kafka["security_protocol"], kafka["sasl_mechanism"]
    uses_sasl = protocol.startswith("SASL_")
    uses_ssl = protocol.endswith("SSL")
    if uses_sasl and not mechanism:
        problems.append(f"{_who('sasl_mechanism')}: required with security protocol {protocol}")
    if mechanism and not uses_sasl:
        problems.append(
            f"{_who('sasl_mechanism')}: {mechanism} has no effect with security protocol "
            f"{protocol}; use SASL_PLAINTEXT or SASL_SSL"
        )
    if uses_sasl and mechanism:
        for name in ("sasl_plain_username", "sasl_plain_password"):
            if not kafka[name]:
                problems.append(f"{_who(name)}: required with SASL mechanism {mechanism}")
    for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
        path = kafka[name]
        if not path:
            continue
        if not uses_ssl:
            problems.append(
                f"{_who(name)}: has no effect with security protocol {protocol}; "
                "use SSL or SASL_SSL"
            )
        elif not os.access(path, os.R_OK):
            problems.append(f"{_who(name)}: {path!r} does not exist or is not readable")
    if kafka["ssl_keyfile"] and not kafka["ssl_certfile"]:
        problems.append(f"{_who('ssl_keyfile')}: given without {_who('ssl_certfile')}")
    return problems
