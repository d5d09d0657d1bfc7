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
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kafka import KafkaProducer
from kafka.errors import KafkaError

from pipeline.devtools.synthetic import SyntheticStreams
from pipeline.errors import ConfigError, KafkaSetupError
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


def send(
    producer: KafkaProducer,
    topic: str,
    events: Iterator[Event],
    count: int | None,
    rate: float,
    progress_every_s: float = 2.0,
) -> int:
    """Send up to `count` events at `rate` per second (0: unpaced); returns how many."""
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
        producer.send(topic, key=key.encode(), value=json.dumps(value).encode())
        sent += 1
        now = time.monotonic()
        if now - last_report >= progress_every_s:
            print(f"sent {sent} events ({sent / (now - started):.0f}/s)", file=sys.stderr)
            last_report = now
    producer.flush()
    return sent


def main(argv: list[str]) -> int:
    """`hiddenstate produce`: see the module docstring."""
    parser = argparse.ArgumentParser(
        prog="hiddenstate produce",
        description="Send events (key = stream id, value = JSON features) to a Kafka topic.",
    )
    parser.add_argument("--topic", required=True, help="topic to send to (created if missing)")
    parser.add_argument(
        "--source",
        required=True,
        help='\'synthetic\', or a JSON-lines file of {"key": ..., "value": {...}} objects',
    )
    parser.add_argument(
        "--bootstrap-servers",
        default=os.environ.get("HIDDENSTATE_BOOTSTRAP_SERVERS", "127.0.0.1:9092"),
        help="Kafka bootstrap servers (env HIDDENSTATE_BOOTSTRAP_SERVERS; default %(default)s)",
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
    args = parser.parse_args(argv)

    if args.partitions < 1 or args.streams < 1 or args.features < 1 or args.rate < 0:
        raise ConfigError("--partitions, --streams and --features must be >= 1, --rate >= 0")
    if args.source == "synthetic":
        events = synthetic_events(args.streams, args.features, args.seed)
        count = args.count if args.count is not None else 10_000
    else:
        events = file_events(Path(args.source), repeat=args.repeat)
        count = args.count

    topics = Topics({"bootstrap_servers": args.bootstrap_servers})
    try:
        partitions = topics.ensure(args.topic, args.partitions)
    finally:
        topics.close()
    try:
        producer = KafkaProducer(bootstrap_servers=args.bootstrap_servers, linger_ms=10)
    except KafkaError as exc:
        raise KafkaSetupError(f"cannot reach Kafka at {args.bootstrap_servers} ({exc})") from exc
    try:
        sent = send(producer, args.topic, events, count, args.rate)
    finally:
        producer.close()
    print(f"sent {sent} events to {args.topic} ({partitions} partitions)", file=sys.stderr)
    return 0
