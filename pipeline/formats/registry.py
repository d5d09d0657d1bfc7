"""Avro, Protobuf and JSON Schema events and predictions through a Schema Registry.

The wire format (magic byte 0, a 4-byte big-endian schema id, the payload;
Protobuf adds its message indexes) and the payload codecs are confluent-kafka's
`schema_registry` serializers (`pip install 'hiddenstate[registry]'`): nothing
of it is written here. This module adds what a server needs around them:

- at start, the input subject's (`<input_topic>-value`) latest schema is read
  and mapped to the model's features (`pipeline.formats.features`): a schema
  that cannot feed the model stops the start with the field named;
- at start, the prediction schema (`pipeline.formats.schemas`) is registered
  under `<output_topic>-value`;
- per record, a value that is not in the wire format (`wrong_magic_byte`),
  whose schema id the registry does not know (`unknown_schema_id`) or whose
  payload its writer schema does not decode (`undecodable`) is bad input:
  a dead letter with the reason, like every bad JSON event. A registry that
  cannot be reached is not bad input: `SchemaRegistryError` stops the server
  uncommitted, and its restart replays.

Every registry request has a timeout (`REGISTRY_TIMEOUT_S`); the client caches
schemas by id, so a request is made once per schema, not per record.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.schema_registry.error import SchemaRegistryError as ClientRegistryError
from confluent_kafka.schema_registry.json_schema import JSONDeserializer, JSONSerializer
from confluent_kafka.schema_registry.protobuf import ProtobufDeserializer, ProtobufSerializer
from confluent_kafka.serialization import MessageField, SerializationContext
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError
from numpy.typing import NDArray

from pipeline.codec import Event, check_envelope, checked_features
from pipeline.config import FormatsConfig
from pipeline.errors import BadEventError, ConfigError, SchemaRegistryError
from pipeline.formats import schemas
from pipeline.formats.features import FeatureMapping, map_features
from pipeline.model_spec import InputSpec, ModelSpec
from pipeline.records import InputRecord, OutputRecord

log = logging.getLogger(__name__)
# The registry client's HTTP library logs every request at INFO (one per new schema id,
# and a 404 per `associations` lookup that Apicurio does not implement): warnings only.
logging.getLogger("httpx2").setLevel(logging.WARNING)

REGISTRY_TIMEOUT_S = 10.0
_SCHEMA_TYPES = {"avro": "AVRO", "protobuf": "PROTOBUF", "json-schema": "JSON"}
_NOT_FOUND = 404
_UNKNOWN_IDS_KEPT = 1000  # remembered unknown schema ids: one request each, not one per record


def client(formats: FormatsConfig) -> SchemaRegistryClient:
    """A registry client from `--schema-registry-url` and its auth and TLS settings."""
    conf: dict[str, Any] = {
        "url": formats.schema_registry_url,
        "timeout": REGISTRY_TIMEOUT_S,
        "max.retries": 2,
    }
    if formats.schema_registry_username:
        conf["basic.auth.user.info"] = (
            f"{formats.schema_registry_username}:{formats.schema_registry_password}"
        )
    if formats.schema_registry_ca_file:
        conf["ssl.ca.location"] = formats.schema_registry_ca_file
    return SchemaRegistryClient(conf)


def _unreachable(url: str, what: str, exc: Exception) -> SchemaRegistryError:
    return SchemaRegistryError(
        f"the Schema Registry at {url} did not answer {what}: {exc}; check "
        "--schema-registry-url / HIDDENSTATE_SCHEMA_REGISTRY_URL, its credentials "
        "(--schema-registry-username/-password) and that the registry runs"
    )


def _descriptor(text: str) -> descriptor_pb2.FileDescriptorProto | None:
    """A Protobuf schema's text as a serialized descriptor (base64), or None if it is not
    one (a .proto text)."""
    try:
        return descriptor_pb2.FileDescriptorProto.FromString(base64.b64decode(text, validate=True))
    except (binascii.Error, DecodeError, ValueError):
        return None


def protobuf_schema(
    registry: SchemaRegistryClient, subject: str, version: int | Literal["latest"]
) -> Schema:
    """A registered Protobuf schema as a serialized descriptor. Registries store what was
    registered: confluent-kafka's serializer registers a base64 descriptor, which they
    return as it is; a .proto text (a Java producer's) is asked for again with
    `format=serialized`, which makes the registry convert it."""
    if version == "latest":
        schema = registry.get_latest_version(subject).schema
    else:
        schema = registry.get_version(subject, version).schema
    if _descriptor(schema.schema_str or "") is not None:
        return schema
    return registry.get_version(subject, version, fmt="serialized").schema


def message_class(registry: SchemaRegistryClient, schema: Schema, subject: str) -> Any:
    """The first message of a registered Protobuf schema (`protobuf_schema`), as a class
    to decode into; the files it references are added first."""
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(schema: Schema, name: str) -> descriptor_pb2.FileDescriptorProto:
        for reference in schema.references or []:
            ref = protobuf_schema(registry, str(reference.subject), int(reference.version or 0))
            add(ref, str(reference.name))
        fdp = _descriptor(schema.schema_str or "")
        if fdp is None:
            raise ConfigError(
                f"the Protobuf schema of subject {subject!r} ({name}) is .proto text even with "
                "format=serialized; hiddenstate reads Protobuf schemas as serialized descriptors "
                "(what confluent-kafka's serializer registers, and what Confluent Schema "
                "Registry returns for format=serialized)"
            )
        for dependency in fdp.dependency:
            if dependency not in added:
                # Well-known types (google/protobuf/*.proto) come with the protobuf package.
                known = descriptor_pb2.FileDescriptorProto()
                descriptor_pool.Default().FindFileByName(dependency).CopyToProto(known)
                pool.Add(known)
                added.add(dependency)
        if fdp.name not in added:
            pool.Add(fdp)
            added.add(fdp.name)
        return fdp

    fdp = add(schema, subject)
    if not fdp.message_type:
        raise ConfigError(f"the Protobuf schema of subject {subject!r} defines no message")
    name = f"{fdp.package}.{fdp.message_type[0].name}" if fdp.package else fdp.message_type[0].name
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(name))


class RegistryEventDecoder:
    """Input records in a Schema Registry format -> `Event`s, or `BadEventError`."""

    def __init__(
        self,
        registry: SchemaRegistryClient,
        url: str,
        deserialize: Callable[[bytes, SerializationContext | None], Any],
        mapping: FeatureMapping,
        spec: InputSpec,
        topic: str,
        max_event_bytes: int,
        *,
        attributes: bool,
        context: bool,
    ) -> None:
        """`deserialize`: confluent-kafka's deserializer; `attributes`: the decoded value is a
        Protobuf message (fields as attributes), else a dict; `context`: the deserializer
        needs a serialization context."""
        self._registry = registry
        self._url = url
        self._deserialize = deserialize
        self._mapping = mapping
        self._features = spec.features
        self._tokens = len(spec.vocabulary) if spec.dtype == "int64" and spec.vocabulary else None
        # Avro and Protobuf decode without a context: the deserializer then reads the
        # writer schema of the record's schema id and nothing else. With one, Avro's also
        # looks for data-contract rules of the subject and recomputes the schema's inline
        # tags for every record: a third of its time (22 instead of 34 us per event), for
        # rules this server has no executors for (docs/events.md). JSON Schema's needs it.
        self._context = SerializationContext(topic, MessageField.VALUE) if context else None
        self._max_bytes = max_event_bytes
        self._attributes = attributes
        self._known: set[int] = set()
        self._unknown: set[int] = set()

    def decode(self, record: InputRecord) -> Event:
        """Decode and validate one record; raises `BadEventError` naming the reason."""
        value = check_envelope(record, self._max_bytes)
        if len(value) < 5 or value[0] != 0:
            raise BadEventError(
                "wrong_magic_byte",
                f"the value does not start with the Schema Registry wire format's magic byte 0 "
                f"and a 4-byte schema id (first bytes {value[:5]!r}); is the producer writing "
                "plain JSON or another format? (--input-format / HIDDENSTATE_INPUT_FORMAT)",
            )
        schema_id = int.from_bytes(value[1:5], "big")
        if schema_id not in self._known:
            self._look_up(schema_id)
        try:
            body = self._deserialize(value, self._context)
        except ClientRegistryError as exc:  # the registry failed, not the record
            raise _unreachable(self._url, f"decoding with schema id {schema_id}", exc) from exc
        except Exception as exc:  # the codecs raise many types; each is a bad payload here
            raise BadEventError(
                "undecodable",
                f"the payload does not decode with its writer schema (id {schema_id}): "
                f"{type(exc).__name__}: {exc}",
            ) from exc
        get: Callable[[str], Any]
        if self._attributes:

            def get(name: str) -> Any:
                return getattr(body, name, None)
        else:
            if not isinstance(body, dict):
                raise BadEventError(
                    "schema", f"the value must be a record, got {type(body).__name__}"
                )
            get = body.get
        mapping = self._mapping
        if mapping.by_name is not None:
            if not self._attributes:  # a Protobuf message has every field; a dict may not
                missing = [name for name in mapping.by_name if name not in body]
                if missing:
                    raise BadEventError(
                        "feature_names",
                        f"the record (schema id {schema_id}) has no field {missing}; "
                        f"the model takes {list(self._features)}",
                    )
            x = [get(name) for name in mapping.by_name]
        else:
            array = get(mapping.array or "")
            if array is None:
                raise BadEventError(
                    "schema", f"the record (schema id {schema_id}) has no {mapping.array!r}"
                )
            x = list(array)
            if len(x) != len(self._features):
                raise BadEventError(
                    "feature_count",
                    f"{mapping.array!r} has {len(x)} values, the model takes "
                    f"{len(self._features)}: {list(self._features)}",
                )
        x = checked_features(x, self._tokens)
        return Event(record.key or b"", x, self._event_time(get, record), self._reset(get), record)

    def _look_up(self, schema_id: int) -> None:
        """Ask the registry for a schema id not seen yet: unknown is bad input, no answer
        stops the server (the client caches a known schema for every later record)."""
        if schema_id in self._unknown:
            raise BadEventError(
                "unknown_schema_id", f"schema id {schema_id} is not in the registry at {self._url}"
            )
        try:
            self._registry.get_schema(schema_id)
        except ClientRegistryError as exc:
            if exc.http_status_code != _NOT_FOUND:
                raise _unreachable(self._url, f"for schema id {schema_id}", exc) from exc
            if len(self._unknown) < _UNKNOWN_IDS_KEPT:
                self._unknown.add(schema_id)
            raise BadEventError(
                "unknown_schema_id", f"schema id {schema_id} is not in the registry at {self._url}"
            ) from exc
        except Exception as exc:  # the HTTP client's connection and timeout errors
            raise _unreachable(self._url, f"for schema id {schema_id}", exc) from exc
        self._known.add(schema_id)

    def _event_time(self, get: Callable[[str], Any], record: InputRecord) -> int:
        name = self._mapping.ts
        ts = get(name) if name else None
        # Protobuf 3 has no "unset" for an integer: 0 means the record's timestamp.
        if ts is None or (self._attributes and ts == 0):
            return record.timestamp_ms
        if type(ts) is int and 0 <= ts < 10**16:
            return ts
        raise BadEventError("schema", f"'ts' must be milliseconds since the epoch, got {ts!r}")

    def _reset(self, get: Callable[[str], Any]) -> bool:
        name = self._mapping.reset
        return bool(get(name)) if name else False


class RegistryPredictionEncoder:
    """Prediction records in a Schema Registry format (`pipeline.formats.schemas`)."""

    def __init__(
        self,
        spec: ModelSpec,
        topic: str,
        serialize: Callable[[Any, SerializationContext], bytes | None],
        *,
        make: Callable[[dict[str, Any]], Any] | None = None,
        flatten: bool = False,
        nulls: bool = False,
    ) -> None:
        """`serialize`: confluent-kafka's serializer; `make` builds its input from the
        prediction dict (Protobuf: the message); `flatten`: multi-axis outputs as one
        row-major list; `nulls`: non-finite numbers as None (JSON has no NaN)."""
        self._topic = topic
        self._model = {"name": spec.name, "version": spec.version}
        self._outputs = [(o.name, len(o.shape)) for o in spec.outputs]
        self._serialize = serialize
        self._make = make
        self._flatten = flatten
        self._nulls = nulls
        self._context = SerializationContext(topic, MessageField.VALUE)

    def encode_wave(
        self,
        events: Sequence[Event],
        outputs: dict[str, NDArray[np.float32]],
        steps: NDArray[np.int64],
        queued_seconds: float,
        inference_seconds: float,
    ) -> list[OutputRecord]:
        """One record per event of the wave; row `i` of `outputs` and `steps` is event `i`'s."""
        batch = len(events)
        if not batch:
            return []
        rows = {name: self._rows(outputs[name], rank, batch) for name, rank in self._outputs}
        latency = {"queued_seconds": queued_seconds, "inference_seconds": inference_seconds}
        serialize, context, make = self._serialize, self._context, self._make
        records = []
        for i, (event, step) in enumerate(zip(events, steps.tolist(), strict=True)):
            r = event.record
            value: Any = {
                "model": self._model,
                "source": {"topic": r.topic, "partition": r.partition, "offset": r.offset},
                "event_time_ms": event.event_time_ms,
                "step": step,
                "latency": latency,
                "outputs": {name: column[i] for name, column in rows.items()},
            }
            if make is not None:
                value = make(value)
            records.append(OutputRecord(self._topic, event.key, serialize(value, context)))
        return records

    def _rows(self, output: NDArray[np.float32], rank: int, batch: int) -> list[Any]:
        if self._flatten and rank > 1:
            output = output.reshape(batch, -1)
        if self._nulls and not np.isfinite(output).all():
            cleaned = np.where(np.isfinite(output), output, np.nan).astype(object)
            cleaned[~np.isfinite(output)] = None
            return list(cleaned.tolist())
        return list(output.tolist())


def _latest(registry: SchemaRegistryClient, url: str, subject: str, protobuf: bool) -> Schema:
    try:
        if protobuf:
            return protobuf_schema(registry, subject, "latest")
        return registry.get_latest_version(subject).schema
    except ClientRegistryError as exc:
        if exc.http_status_code == _NOT_FOUND:
            raise ConfigError(
                f"no schema is registered under subject {subject!r} at {url}: the input "
                "topic's producers register it (TopicNameStrategy, <topic>-value); "
                "`hiddenstate produce --format ...` does, for a test"
            ) from exc
        raise _unreachable(url, f"for subject {subject!r}", exc) from exc
    except Exception as exc:
        raise _unreachable(url, f"for subject {subject!r}", exc) from exc


def input_decoder(
    formats: FormatsConfig,
    registry: SchemaRegistryClient,
    spec: InputSpec,
    topic: str,
    max_event_bytes: int,
) -> RegistryEventDecoder:
    """The decoder of `--input-format`, its schema mapping checked against the latest
    schema of `<topic>-value`."""
    url, fmt = formats.schema_registry_url, formats.input_format
    subject = f"{topic}-value"
    attributes = False
    deserialize: Callable[[bytes, SerializationContext | None], Any]
    if fmt == "avro":
        schema = _latest(registry, url, subject, protobuf=False)
        fields = schemas.avro_fields(schema.schema_str or "")
        deserialize = AvroDeserializer(registry)
    elif fmt == "json-schema":
        schema = _latest(registry, url, subject, protobuf=False)
        fields = schemas.json_schema_fields(schema.schema_str or "")
        deserialize = JSONDeserializer(None, schema_registry_client=registry)
    else:
        schema = _latest(registry, url, subject, protobuf=True)
        message = message_class(registry, schema, subject)
        fields = schemas.protobuf_fields(message.DESCRIPTOR)
        # No registry client: it would only fetch the writer schema again, as
        # format=serialized, which Apicurio 3.3 cannot do for a schema stored as a
        # serialized descriptor (HTTP 500); the message class decodes by field number.
        deserialize = ProtobufDeserializer(message)
        attributes = True
    if schema.schema_type not in (None, _SCHEMA_TYPES[fmt]):
        raise ConfigError(
            f"subject {subject!r} holds a {schema.schema_type} schema, but "
            f"--input-format / HIDDENSTATE_INPUT_FORMAT is {fmt}"
        )
    mapping = map_features(fields, spec, subject)
    log.info(
        "input %s: subject %s maps to the model's features %s",
        fmt,
        subject,
        f"by name {list(mapping.by_name)}" if mapping.by_name else f"from array {mapping.array!r}",
    )
    return RegistryEventDecoder(
        registry,
        url,
        deserialize,
        mapping,
        spec,
        topic,
        max_event_bytes,
        attributes=attributes,
        context=fmt == "json-schema",
    )


def output_encoder(
    formats: FormatsConfig, registry: SchemaRegistryClient, spec: ModelSpec, topic: str
) -> RegistryPredictionEncoder:
    """The encoder of `--output-format`, its schema registered under `<topic>-value`."""
    url, fmt = formats.schema_registry_url, formats.output_format
    subject = f"{topic}-value"
    make: Callable[[dict[str, Any]], Any] | None = None
    serialize: Callable[[Any, SerializationContext], bytes | None]
    if fmt == "avro":
        text = schemas.avro_prediction_schema(spec)
        schema = Schema(text, "AVRO")
        serialize = AvroSerializer(registry, text)
    elif fmt == "json-schema":
        text = schemas.json_prediction_schema(spec)
        schema = Schema(text, "JSON")
        serialize = JSONSerializer(text, registry)
    else:
        fdp = schemas.protobuf_prediction_file(spec)
        pool = descriptor_pool.DescriptorPool()
        pool.Add(fdp)
        message = message_factory.GetMessageClass(
            pool.FindMessageTypeByName("hiddenstate.Prediction")
        )
        schema = Schema(base64.standard_b64encode(fdp.SerializeToString()).decode(), "PROTOBUF")
        serialize = ProtobufSerializer(message, registry)

        def make(value: dict[str, Any]) -> Any:
            return message(**value)

    try:
        schema_id = registry.register_schema(subject, schema)
    except ClientRegistryError as exc:
        if exc.http_status_code == 409:
            raise ConfigError(
                f"the registry refuses the prediction schema under subject {subject!r}: {exc}. "
                "The subject holds an incompatible schema (another model or output format on "
                "this topic?): serve to another --output-topic, or change the subject's "
                "compatibility setting"
            ) from exc
        raise _unreachable(url, f"registering subject {subject!r}", exc) from exc
    except Exception as exc:
        raise _unreachable(url, f"registering subject {subject!r}", exc) from exc
    log.info("output %s: prediction schema registered under %s (id %d)", fmt, subject, schema_id)
    return RegistryPredictionEncoder(
        spec,
        topic,
        serialize,
        make=make,
        flatten=fmt == "protobuf",
        nulls=fmt == "json-schema",
    )


def event_serializer(
    fmt: str, registry: SchemaRegistryClient, url: str, topic: str, sample: dict[str, Any]
) -> Callable[[dict[str, Any]], bytes]:
    """Producer side (`hiddenstate produce`, the benchmark): JSON events shaped like
    `sample` as `fmt` records, their schema registered under `<topic>-value` here (so an
    unreachable registry or an incompatible subject fails before the first event)."""
    names, _ = schemas.event_fields(sample)
    context = SerializationContext(topic, MessageField.VALUE)
    serialize: Callable[[Any, SerializationContext], bytes | None]
    build: Callable[..., Any] = dict
    if fmt == "avro":
        text = schemas.avro_event_schema(sample)
        schema = Schema(text, "AVRO")
        serialize = AvroSerializer(registry, text)
    elif fmt == "json-schema":
        text = schemas.json_event_schema(sample)
        schema = Schema(text, "JSON")
        serialize = JSONSerializer(text, registry)
    elif fmt == "protobuf":
        fdp = schemas.protobuf_event_file(sample)
        pool = descriptor_pool.DescriptorPool()
        pool.Add(fdp)
        message = message_factory.GetMessageClass(pool.FindMessageTypeByName("hiddenstate.Event"))
        schema = Schema(base64.standard_b64encode(fdp.SerializeToString()).decode(), "PROTOBUF")
        serialize = ProtobufSerializer(message, registry)
        build = message
    else:
        raise ConfigError(f"--format: expected avro, protobuf or json-schema, got {fmt!r}")
    subject = f"{topic}-value"
    try:
        schema_id = registry.register_schema(subject, schema)
    except ClientRegistryError as exc:
        if exc.http_status_code == 409:
            raise ConfigError(
                f"the registry refuses the event schema under subject {subject!r}: {exc}; the "
                "subject holds an incompatible schema: send to another topic"
            ) from exc
        raise _unreachable(url, f"registering subject {subject!r}", exc) from exc
    except Exception as exc:
        raise _unreachable(url, f"registering subject {subject!r}", exc) from exc
    log.info("event schema registered under %s (id %d)", subject, schema_id)

    def encode(value: dict[str, Any]) -> bytes:
        try:
            data = serialize(build(**schemas.event_record(value, names)), context)
        except Exception as exc:  # the codecs raise many types; each means a misfit event
            raise ConfigError(
                f"event {str(value)[:200]} does not fit the {fmt} schema made from the first "
                f"event: {type(exc).__name__}: {exc}"
            ) from exc
        return data or b""

    return encode
