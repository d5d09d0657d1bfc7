"""`hiddenstate produce`: put events on a topic, from a file or the synthetic generator.

Events are what `hiddenstate serve` reads: key = stream id, value = JSON
`{"x": [...], "ts": <ms>}` (pipeline/schemas/event.schema.json). Two sources:

- a JSON-lines file of `{"key": "...", "value": {...}}` objects, e.g. the
  `holdout-events.jsonl` that `hiddenstate train` writes from held-out real data;
- `synthetic`: many devices with trend, seasonality, noise, regime shifts and
  anomalies (pipeline/devtools/synthetic.py), for demos and load.

`--rate` paces the sending (events per second, 0 = as fast as the client goes);
`ts` is stamped at send time unless the event carries one, so the server's
end-to-end latency is measured from here.

`--format avro|protobuf|json-schema` writes the Schema Registry wire format
instead of JSON (`pipeline.formats.registry.event_serializer`: a schema made
from the first event, registered under `<topic>-value`). The connection
settings are `serve`'s own flags and `HIDDENSTATE_*` variables (security,
compression, the registry: `pipeline.config.CLIENT_SETTINGS`). Every send is
acknowledged or reported: the exit code is 0 only when every event was
acknowledged by the broker, 1 otherwise, with how many and the first error.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kafka import KafkaProducer
from kafka.errors import KafkaError

from pipeline.config import FORMATS, KafkaConfig, add_client_arguments, client_from_sources
from pipeline.devtools.synthetic import SyntheticStreams
from pipeline.errors import ConfigError, KafkaSetupError
from pipeline.transport.base import DELIVERY_TIMEOUT_S
from pipeline.transport.topics import Topics

log = logging.getLogger(__name__)

Event = tuple[str, dict[str, Any]]


def file_events(path: Path, repeat: bool = False) -> Iterator[Event]:
    """Events of a JSON-lines file, in file order; forever if `repeat`."""
    if not path.is_file():
        raise ConfigError(f"--source {path}: no such file (a JSON-lines file or 'synthetic')")
    for round_ in itertools.count():
        with path.open() as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                    key, value = str(item["key"]), dict(item["value"])
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                    raise ConfigError(
                        f'{path}:{number}: expected {{"key": ..., "value": {{...}}}} ({exc})'
                    ) from exc
                # A repeated stream must not reset or reuse event times by accident.
                yield (key if round_ == 0 else f"{key}~{round_}"), value
        if not repeat:
            return


def synthetic_events(streams: int, features: int, seed: int) -> Iterator[Event]:
    """Round-robin over `streams` synthetic devices, one step of each per round, forever."""
    source = SyntheticStreams(streams=streams, features=features, seed=seed)
    for batch in source:
        for name, row in zip(source.stream_ids, batch.values.tolist(), strict=True):
            yield name, {"x": row}


Encode = Callable[[dict[str, Any]], bytes]


def json_value(value: dict[str, Any]) -> bytes:
    """An event as the JSON `serve` reads by default."""
    return json.dumps(value).encode()


class Deliveries:
    """Counts what the broker acknowledged and what it refused, from the send futures'
    callbacks (they run on the producer's IO thread)."""

    def __init__(self) -> None:
        self.acknowledged = 0
        self.failed = 0
        self.first_error: str | None = None

    def ok(self, _metadata: Any) -> None:
        self.acknowledged += 1

    def error(self, exc: BaseException) -> None:
        self.failed += 1
        if self.first_error is None:
            self.first_error = f"{type(exc).__name__}: {exc}"

    def refused_at_send(self, exc: BaseException) -> None:
        """The client refused the record itself (too large, no metadata in time)."""
        self.error(exc)

    @property
    def answered(self) -> int:
        """Events whose fate is known."""
        return self.acknowledged + self.failed


def send(
    producer: Any,
    topic: str,
    events: Iterator[Event],
    count: int | None,
    rate: float,
    encode: Encode = json_value,
    progress_every_s: float = 2.0,
    flush_timeout_s: float = DELIVERY_TIMEOUT_S,
) -> tuple[int, Deliveries]:
    """Send up to `count` events at `rate` per second (0: unpaced) and wait for their
    acknowledgements (at most `flush_timeout_s`); returns how many were sent and what
    became of them."""
    deliveries = Deliveries()
    started = time.monotonic()
    last_report = started
    sent = 0
    for key, value in itertools.islice(events, count):
        if rate > 0:
            # Keep to the schedule (not to a fixed sleep) so slow sends do not lower the rate.
            ahead = started + sent / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
        value.setdefault("ts", int(time.time() * 1000))
        sent += 1
        try:
            future = producer.send(topic, key=key.encode(), value=encode(value))
        except KafkaError as exc:
            deliveries.refused_at_send(exc)
            continue
        future.add_callback(deliveries.ok)
        future.add_errback(deliveries.error)
        now = time.monotonic()
        if now - last_report >= progress_every_s:
            print(f"sent {sent} events ({sent / (now - started):.0f}/s)", file=sys.stderr)
            last_report = now
    deadline = time.monotonic() + flush_timeout_s
    try:
        producer.flush(timeout=flush_timeout_s)
    except KafkaError as exc:
        # A timeout, or kafka-python 3.0 giving up on a batch it split and retries
        # (UnknownError 'Future not done'): the answers still come, to the callbacks.
        log.debug("flush: %s", exc)
    while deliveries.answered < sent and time.monotonic() < deadline:
        time.sleep(0.05)
    return sent, deliveries


def _encoder(args: argparse.Namespace, formats: Any, topic: str, first: Event) -> Encode:
    if args.format == "json":
        return json_value
    from pipeline.formats import REGISTRY_INSTALL, registry_installed

    if not registry_installed():
        raise ConfigError(
            f"--format {args.format} needs confluent-kafka's serializers: {REGISTRY_INSTALL}"
        )
    from pipeline.formats import registry

    return registry.event_serializer(
        args.format,
        registry.client(formats),
        formats.schema_registry_url,
        topic,
        first[1],
    )


def _producer(kafka: KafkaConfig) -> KafkaProducer:
    try:
        return KafkaProducer(
            acks="all",
            linger_ms=10,
            delivery_timeout_ms=int(DELIVERY_TIMEOUT_S * 1000),
            **kafka.producer_kwargs(),
        )
    except KafkaError as exc:
        raise KafkaSetupError(f"cannot reach Kafka at {kafka.bootstrap_servers} ({exc})") from exc


def main(argv: list[str]) -> int:
    """`hiddenstate produce`: see the module docstring."""
    parser = argparse.ArgumentParser(
        prog="hiddenstate produce",
        description="Send events (key = stream id, value = JSON features, or a Schema "
        "Registry format) to a Kafka topic. Exit 0 only when every event was acknowledged.",
    )
    parser.add_argument("--topic", required=True, help="topic to send to (created if missing)")
    parser.add_argument(
        "--source",
        required=True,
        help='\'synthetic\', or a JSON-lines file of {"key": ..., "value": {...}} objects',
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="json",
        help="value format: json, or avro, protobuf or json-schema through the Schema Registry "
        "(schema made from the first event, registered under <topic>-value) (default json)",
    )
    parser.add_argument(
        "--partitions", type=int, default=4, help="partitions when creating the topic (4)"
    )
    parser.add_argument(
        "--count",
        type=int,
        help="events to send (default: the whole file; synthetic: 10000); 0 only creates the topic",
    )
    parser.add_argument("--rate", type=float, default=0.0, help="events per second; 0 = unpaced")
    parser.add_argument("--streams", type=int, default=100, help="synthetic: number of devices")
    parser.add_argument("--features", type=int, default=8, help="synthetic: features per event")
    parser.add_argument("--seed", type=int, default=0, help="synthetic: random seed")
    parser.add_argument("--repeat", action="store_true", help="file: start over at its end")
    add_client_arguments(parser)
    args = parser.parse_args(argv)

    if args.partitions < 1 or args.streams < 1 or args.features < 1 or args.rate < 0:
        raise ConfigError("--partitions, --streams and --features must be >= 1, --rate >= 0")
    kafka, formats = client_from_sources(
        vars(args), os.environ, registry_needed=args.format != "json"
    )
    if args.source == "synthetic":
        events = synthetic_events(args.streams, args.features, args.seed)
        count = args.count if args.count is not None else 10_000
    else:
        events = file_events(Path(args.source), repeat=args.repeat)
        count = args.count

    topics = Topics(kafka.client_kwargs())
    try:
        partitions = topics.ensure(args.topic, args.partitions)
    finally:
        topics.close()
    if count == 0:
        print(f"topic {args.topic} is ready ({partitions} partitions)", file=sys.stderr)
        return 0
    first = next(events, None)
    if first is None:
        print(f"{args.source} has no events; nothing sent", file=sys.stderr)
        return 0
    encode = _encoder(args, formats, args.topic, first)
    producer = _producer(kafka)
    try:
        sent, deliveries = send(
            producer, args.topic, itertools.chain([first], events), count, args.rate, encode
        )
    finally:
        try:
            producer.close(timeout=10)
        except KafkaError as exc:  # what is unanswered by now is reported below
            log.debug("close: %s", exc)
    if deliveries.acknowledged == sent:
        print(
            f"sent {sent} events to {args.topic} ({partitions} partitions), all acknowledged",
            file=sys.stderr,
        )
        return 0
    unanswered = sent - deliveries.acknowledged - deliveries.failed
    print(
        f"hiddenstate produce: error: {sent - deliveries.acknowledged} of {sent} events to "
        f"{args.topic} were not delivered ({deliveries.failed} refused, {unanswered} not "
        f"acknowledged within {DELIVERY_TIMEOUT_S:.0f} s); first error: "
        f"{deliveries.first_error or 'none reported'}",
        file=sys.stderr,
    )
    return 1
