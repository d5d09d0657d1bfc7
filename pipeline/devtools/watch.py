"""`hiddenstate watch`: print predictions from an output topic as they arrive.

A reader's view of what `serve` publishes: one line per prediction with the
stream, its step, the prediction in words (the class or token with its
probability, or the forecast) and the latencies the server recorded. With
`--model`, class and token labels come from the model's metadata.

`--summarize N` keeps reading until N predictions arrived (printing `--count`
of them) and ends with the percentiles of two latencies (`latency_summary`):

- **added by the server**: the prediction's own `latency.queued_seconds` +
  `latency.inference_seconds`, plus the produce: from the prediction record's
  timestamp (when the server handed it to its producer) to when this reader
  fetched it. Neither the producer of the events (its pacing, its linger) nor
  a backlog waiting before the server's poll counts;
- **event time to prediction**: when this reader fetched it minus the
  prediction's `event_time_ms` (the event's `ts`, stamped by its producer):
  what a user of the predictions sees, the producer's own delay included.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from kafka import KafkaConsumer

from pipeline.errors import ConfigError
from pipeline.model_spec import ModelSpec, OutputSpec
from pipeline.transport.topics import Topics


def describe(outputs: dict[str, Any], specs: dict[str, OutputSpec]) -> str:
    """A prediction in words: top label and probability, or the first forecast values."""
    parts = []
    for name, value in outputs.items():
        spec = specs.get(name)
        flat = (
            value if isinstance(value, list) and value and not isinstance(value[0], list) else None
        )
        if flat is not None and name == "probs":
            best = max(range(len(flat)), key=lambda i: flat[i] if flat[i] is not None else -1.0)
            label = spec.labels[best] if spec is not None and spec.labels else str(best)
            parts.append(f"{name}: {label!r} p={flat[best]:.3f}")
        elif flat is not None:
            shown = ", ".join(f"{v:.4g}" if v is not None else "null" for v in flat[:4])
            parts.append(f"{name}: [{shown}{', ...' if len(flat) > 4 else ''}]")
        else:
            parts.append(f"{name}: {json.dumps(value)[:60]}")
    return "; ".join(parts)


@dataclass(frozen=True)
class Timing:
    """One prediction's times, as a reader sees them (milliseconds and seconds as named)."""

    event_time_ms: float  # the prediction's event_time_ms: the event's ts
    queued_s: float  # latency.queued_seconds
    inference_s: float  # latency.inference_seconds
    produced_ms: float  # the prediction record's timestamp: handed to the server's producer
    read_ms: float  # when the reader fetched the prediction

    @property
    def added_ms(self) -> float:
        """What the server added: queue + inference + produce (record to reader)."""
        produce_ms = max(0.0, self.read_ms - self.produced_ms)
        return (self.queued_s + self.inference_s) * 1000 + produce_ms

    @property
    def end_to_end_ms(self) -> float:
        """Event time to prediction fetched by the reader."""
        return self.read_ms - self.event_time_ms


@dataclass(frozen=True)
class LatencySummary:
    """p50 and p99 (ms) of what the server added and of event time to prediction."""

    predictions: int
    added_p50_ms: float
    added_p99_ms: float
    end_to_end_p50_ms: float
    end_to_end_p99_ms: float

    def lines(self) -> list[str]:
        return [
            f"predictions read        {self.predictions:>10}",
            f"added by the server     p50 {self.added_p50_ms:>7.1f} ms   "
            f"p99 {self.added_p99_ms:>7.1f} ms   (queue + inference + produce)",
            f"event time->prediction  p50 {self.end_to_end_p50_ms:>7.1f} ms   "
            f"p99 {self.end_to_end_p99_ms:>7.1f} ms   (the events' producer included)",
        ]


def latency_summary(timings: Iterable[Timing]) -> LatencySummary:
    """The percentiles of `timings` (linear interpolation between ranks, numpy's default)."""
    rows = list(timings)
    if not rows:
        nan = float("nan")
        return LatencySummary(0, nan, nan, nan, nan)
    added = np.percentile([t.added_ms for t in rows], [50, 99])
    end_to_end = np.percentile([t.end_to_end_ms for t in rows], [50, 99])
    return LatencySummary(
        len(rows), float(added[0]), float(added[1]), float(end_to_end[0]), float(end_to_end[1])
    )


def timing(value: dict[str, Any], produced_ms: float, read_ms: float) -> Timing | None:
    """A prediction's `Timing`, or None for a record that is not a prediction."""
    latency = value.get("latency")
    event_time = value.get("event_time_ms")
    if not isinstance(latency, dict) or not isinstance(event_time, int | float):
        return None
    return Timing(
        float(event_time),
        float(latency.get("queued_seconds", 0.0)),
        float(latency.get("inference_seconds", 0.0)),
        float(produced_ms),
        read_ms,
    )


def wait_for_topic(bootstrap_servers: str, topic: str, timeout: float) -> bool:
    """Wait until `topic` exists (`serve` creates its output topic at start). Subscribing
    before would have kafka-python log an ERROR for every metadata refresh until then."""
    topics = Topics({"bootstrap_servers": [s.strip() for s in bootstrap_servers.split(",")]})
    try:
        deadline = time.monotonic() + timeout
        announced = False
        while topics.partitions(topic) is None:
            if time.monotonic() > deadline:
                return False
            if not announced:
                print(f"waiting for topic {topic} (serve creates it)", file=sys.stderr)
                announced = True
            time.sleep(0.2)
        return True
    finally:
        topics.close()


def _output_specs(model_path: str | None) -> dict[str, OutputSpec]:
    if model_path is None:
        return {}
    import onnxruntime as ort

    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    spec = ModelSpec.from_metadata(session.get_modelmeta().custom_metadata_map, model_path)
    return {o.name: o for o in spec.outputs}


def main(argv: list[str]) -> int:
    """`hiddenstate watch --topic PREDICTIONS`: see the module docstring."""
    parser = argparse.ArgumentParser(
        prog="hiddenstate watch", description="Print predictions from an output topic."
    )
    parser.add_argument("--topic", required=True, help="the output topic of `serve`")
    parser.add_argument(
        "--bootstrap-servers",
        default=os.environ.get("HIDDENSTATE_BOOTSTRAP_SERVERS", "127.0.0.1:9092"),
        help="Kafka bootstrap servers (env HIDDENSTATE_BOOTSTRAP_SERVERS; default %(default)s)",
    )
    parser.add_argument("--model", help="the served .onnx file, for class and token labels")
    parser.add_argument("--count", type=int, default=20, help="stop after this many (default 20)")
    parser.add_argument(
        "--sample", type=int, default=1, help="print one prediction in this many (default 1: all)"
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="give up after seconds idle")
    parser.add_argument(
        "--from-beginning", action="store_true", help="start at the oldest prediction"
    )
    parser.add_argument(
        "--summarize",
        type=int,
        default=0,
        metavar="N",
        help="read on until N predictions arrived, then print p50 and p99 of the latency the "
        "server added and of event time to prediction (default 0: no summary)",
    )
    args = parser.parse_args(argv)

    specs = _output_specs(args.model)
    if not wait_for_topic(args.bootstrap_servers, args.topic, args.timeout):
        print(f"topic {args.topic} did not appear within {args.timeout:.0f} s", file=sys.stderr)
        return 1
    consumer = KafkaConsumer(
        args.topic,
        bootstrap_servers=args.bootstrap_servers,
        auto_offset_reset="earliest" if args.from_beginning else "latest",
        enable_auto_commit=False,
        group_id=None,
    )
    if args.count < 1 or args.sample < 1:
        raise ConfigError("--count and --sample must be >= 1")
    seen = 0
    arrived = 0
    timings: list[Timing] = []
    last_record = time.monotonic()
    print(f"{'stream':<18} {'step':>5}  {'prediction':<44} {'queued':>9} {'inference':>9}")
    try:
        while (seen < args.count or arrived < args.summarize) and (
            time.monotonic() - last_record < args.timeout
        ):
            for records in consumer.poll(timeout_ms=500).values():
                read_ms = time.time() * 1000
                for record in records:
                    arrived += 1
                    last_record = time.monotonic()
                    summarized = args.summarize and arrived <= args.summarize
                    if not summarized and (seen >= args.count or arrived % args.sample):
                        continue
                    value = json.loads(record.value)
                    if summarized:
                        row = timing(value, record.timestamp, read_ms)
                        if row is not None:
                            timings.append(row)
                    if seen >= args.count or arrived % args.sample:
                        continue
                    latency = value.get("latency", {})
                    print(
                        f"{(record.key or b'').decode(errors='replace'):<18} "
                        f"{value.get('step', '?'):>5}  "
                        f"{describe(value.get('outputs', {}), specs):<44} "
                        f"{latency.get('queued_seconds', 0) * 1000:>7.2f}ms "
                        f"{latency.get('inference_seconds', 0) * 1000:>7.2f}ms"
                    )
                    seen += 1
    finally:
        consumer.close()
    if args.summarize:
        print()
        print("\n".join(latency_summary(timings).lines()))
        if arrived < args.summarize:
            print(f"only {arrived} of {args.summarize} predictions arrived", file=sys.stderr)
            return 1
    if seen < args.count:
        print(f"only {seen} predictions within {args.timeout:.0f} s of quiet", file=sys.stderr)
        return 1
    return 0
