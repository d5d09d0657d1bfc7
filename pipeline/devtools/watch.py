"""`hiddenstate watch`: print predictions from an output topic as they arrive.

A reader's view of what `serve` publishes: one line per prediction with the
stream, its step, the prediction in words (the class or token with its
probability, or the forecast) and the latencies the server recorded. With
`--model`, class and token labels come from the model's metadata.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

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
    last_record = time.monotonic()
    print(f"{'stream':<18} {'step':>5}  {'prediction':<44} {'queued':>9} {'inference':>9}")
    try:
        while seen < args.count and time.monotonic() - last_record < args.timeout:
            for records in consumer.poll(timeout_ms=500).values():
                for record in records:
                    arrived += 1
                    last_record = time.monotonic()
                    if seen >= args.count or arrived % args.sample:
                        continue
                    value = json.loads(record.value)
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
    if seen < args.count:
        print(f"only {seen} predictions within {args.timeout:.0f} s of quiet", file=sys.stderr)
        return 1
    return 0
