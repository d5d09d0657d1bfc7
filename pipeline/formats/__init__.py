"""Wire formats of input events and predictions (`--input-format`, `--output-format`).

    decoder, encoder = open_formats(config, model.spec)   # ConfigError, SchemaRegistryError
    processor = make_processor(model, config, metrics, decoder=decoder, encoder=encoder)

- `json` (the default): `pipeline.codec`, the hot path, no other library;
- `avro`, `protobuf`, `json-schema`: the Schema Registry wire format through
  confluent-kafka's serializers (`pipeline.formats.registry`, the `registry`
  extra), imported only when chosen.

`features` maps a registered schema to the model's features; `schemas` has the
schema conversions and the prediction schemas. docs/events.md describes them.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from pipeline.codec import Event, EventDecoder, PredictionEncoder
from pipeline.config import ServeConfig
from pipeline.errors import ConfigError
from pipeline.model_spec import ModelSpec
from pipeline.records import InputRecord, OutputRecord

REGISTRY_INSTALL = "pip install 'hiddenstate[registry]'"
# What the registry formats import: confluent-kafka's serializers and their codecs.
_REGISTRY_LIBRARIES = ("confluent_kafka", "fastavro", "httpx2", "google.protobuf", "jsonschema")


class Decoder(Protocol):
    """Input records -> events (`pipeline.codec.EventDecoder` is one)."""

    def decode(self, record: InputRecord) -> Event:
        """Decode and validate one record; raises `BadEventError` naming the reason."""
        ...


class Encoder(Protocol):
    """A wave's predictions -> output records (`pipeline.codec.PredictionEncoder` is one)."""

    def encode_wave(
        self,
        events: Sequence[Event],
        outputs: dict[str, NDArray[np.float32]],
        steps: NDArray[np.int64],
        queued_seconds: float,
        inference_seconds: float,
    ) -> list[OutputRecord]:
        """One record per event of the wave; row `i` of `outputs` and `steps` is event `i`'s."""
        ...


def registry_installed() -> bool:
    """True when the libraries of the Schema Registry formats are importable."""
    try:
        return all(importlib.util.find_spec(name) is not None for name in _REGISTRY_LIBRARIES)
    except ModuleNotFoundError:  # a parent package (google) is missing
        return False


def open_formats(config: ServeConfig, spec: ModelSpec) -> tuple[Decoder, Encoder]:
    """The decoder and encoder of the configured formats. A registry format checks its
    input schema against the model and registers the prediction schema, here, at start."""
    formats, topics = config.formats, config.topics
    max_bytes = config.processing.max_event_bytes
    decoder: Decoder = EventDecoder(spec.input, max_bytes)
    encoder: Encoder = PredictionEncoder(spec, topics.output_topic)
    if not formats.uses_registry:
        return decoder, encoder
    if not registry_installed():
        raise ConfigError(
            f"--input-format {formats.input_format} / --output-format {formats.output_format}: "
            "the Schema Registry formats need confluent-kafka's serializers, which are not "
            f"installed; install them with {REGISTRY_INSTALL}"
        )
    from pipeline.formats import registry

    client = registry.client(formats)
    if formats.input_format != "json":
        decoder = registry.input_decoder(formats, client, spec.input, topics.input_topic, max_bytes)
    if formats.output_format != "json":
        encoder = registry.output_encoder(formats, client, spec, topics.output_topic)
    return decoder, encoder
