"""Avro beside JSON: the capacity of `hiddenstate serve` with events and predictions in
the Schema Registry's Avro format against the default JSON, on a real broker and registry.

    python bench/formats.py --schema-registry-url http://127.0.0.1:8081/apis/ccompat/v7
    python bench/formats.py --runs 3 --backlog 1500000 --capacity-seconds 8   # reduced

Per format (`json`; `avro`: `--input-format avro --output-format avro`) a backlog of
`--backlog` events over `--streams` streams is written once by librdkafka (Avro values
by confluent-kafka's AvroSerializer, the schema registered by it under
`<topic>-value`: what a producer of an Avro shop writes). Each run serves the backlog
from its start with a fresh consumer group, output topic and changelog, exactly as
bench/run.py's capacity step (its `Running`, the same model and flags): after
`--warmup` seconds, the predictions read back during `--capacity-seconds` give the
sustained throughput, and the server's CPU seconds over the same window the CPU per
event. Runs are interleaved (json, avro, json, ...) so drift on the shared machine hits
both alike; medians are reported, and everything is written to `--out` as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from confluent_kafka.schema_registry import SchemaRegistryClient

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.load import (  # noqa: E402
    _POOL,
    Reader,
    _feature_pool,
    _producer,
    create_topic,
    delete_topics,
    fill,
    stream_key,
)
from bench.model import build  # noqa: E402
from bench.run import PARTITIONS, Running, Subject, cpu_seconds, environment, wait_for  # noqa: E402
from pipeline.formats.registry import event_serializer  # noqa: E402

FORMATS = ("json", "avro")


def fill_avro(
    bootstrap: str, registry: SchemaRegistryClient, url: str, topic: str, streams: int, count: int
) -> float:
    """`load.fill` in Avro: the same feature pool, each value serialized once by
    confluent-kafka's AvroSerializer (schema registered under `<topic>-value`)."""
    rows = [json.loads(row) for row in _feature_pool()]
    ts = int(time.time() * 1000)
    encode = event_serializer("avro", registry, url, topic, {"x": rows[0]})
    pool = [encode({"x": row, "ts": ts}) for row in rows]
    producer = _producer(bootstrap, 20)
    started = time.perf_counter()
    for i in range(count):
        while True:
            try:
                producer.produce(topic, pool[i % _POOL], stream_key(i % streams))
                break
            except BufferError:
                producer.poll(0.01)
        if i % 10_000 == 0:
            producer.poll(0)
    producer.flush(120)
    return time.perf_counter() - started


def capacity(
    fmt: str, backlog: str, args: argparse.Namespace, logs: Path, used: list[str]
) -> dict[str, float]:
    output = f"{backlog}.out-{uuid.uuid4().hex[:6]}"
    create_topic(args.bootstrap_servers, output, PARTITIONS)
    reader = Reader(args.bootstrap_servers, output, PARTITIONS, marker=None).start()
    flags = (
        []
        if fmt == "json"
        else [
            "--input-format",
            fmt,
            "--output-format",
            fmt,
            "--schema-registry-url",
            args.schema_registry_url,
        ]
    )
    subject = Subject(fmt, args.transport, REPO, tuple(flags))
    running = Running(subject, args, backlog, output, logs / f"{fmt}-{output}.log")
    try:
        wait_for(reader, 1, running, timeout=90)
        time.sleep(args.warmup)
        count0, cpu0, t0 = reader.count, cpu_seconds(running.pid), time.monotonic()
        time.sleep(args.capacity_seconds)
        count1, cpu1, t1 = reader.count, cpu_seconds(running.pid), time.monotonic()
        if count1 >= args.backlog:
            raise RuntimeError(f"{fmt} drained the backlog: raise --backlog")
    finally:
        running.stop()
        reader.stop()
        used += [output, running.changelog]
    events = count1 - count0
    return {
        "events_per_second": events / (t1 - t0),
        "cpu_us_per_event": (cpu1 - cpu0) / events * 1e6,
        "events_in_window": events,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap-servers", default="127.0.0.1:9092")
    parser.add_argument("--schema-registry-url", default="http://127.0.0.1:8081/apis/ccompat/v7")
    parser.add_argument("--transport", choices=("confluent", "kafka-python"), default="confluent")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--streams", type=int, default=10_000)
    parser.add_argument("--backlog", type=int, default=2_500_000)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--capacity-seconds", type=float, default=12.0)
    parser.add_argument("--max-streams", type=int, default=100_000)
    parser.add_argument("--model-dir", type=Path, default=REPO / "artifacts/bench/model")
    parser.add_argument("--out", type=Path, default=REPO / "artifacts/bench/formats.json")
    args = parser.parse_args()
    args.serve_args = []
    build(args.model_dir)
    logs = args.out.parent / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    registry = SchemaRegistryClient({"url": args.schema_registry_url, "timeout": 10})
    used: list[str] = []
    tag = uuid.uuid4().hex[:6]
    backlogs = {fmt: f"bench-{fmt}-{tag}" for fmt in FORMATS}
    runs: dict[str, list[dict[str, float]]] = {fmt: [] for fmt in FORMATS}
    try:
        for fmt, topic in backlogs.items():
            create_topic(args.bootstrap_servers, topic, PARTITIONS)
            used.append(topic)
            if fmt == "json":
                seconds = fill(args.bootstrap_servers, topic, args.streams, args.backlog)
            else:
                seconds = fill_avro(
                    args.bootstrap_servers,
                    registry,
                    args.schema_registry_url,
                    topic,
                    args.streams,
                    args.backlog,
                )
            print(f"{fmt}: backlog of {args.backlog:,} events written in {seconds:.1f} s")
        for run in range(args.runs):
            for fmt in FORMATS:
                row = capacity(fmt, backlogs[fmt], args, logs, used)
                runs[fmt].append(row)
                print(
                    f"run {run + 1} {fmt:<5} {row['events_per_second']:>9,.0f} events/s "
                    f"{row['cpu_us_per_event']:>6.1f} us CPU/event",
                    flush=True,
                )
    finally:
        delete_topics(args.bootstrap_servers, used)
    summary = {
        fmt: {
            "events_per_second_median": statistics.median(r["events_per_second"] for r in rows),
            "cpu_us_per_event_median": statistics.median(r["cpu_us_per_event"] for r in rows),
        }
        for fmt, rows in runs.items()
    }
    results = {
        "benchmark": "hiddenstate serve capacity, Avro (Schema Registry) beside JSON",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "transport": args.transport,
        "model": "GRU, 1 layer, 64 hidden, 8 features -> 8 forecasts (bench/model.py)",
        "environment": environment(args),
        "streams": args.streams,
        "partitions": PARTITIONS,
        "backlog": args.backlog,
        "warmup_seconds": args.warmup,
        "capacity_seconds": args.capacity_seconds,
        "runs": runs,
        "summary": summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n| format | events/s (median of {args.runs}) | CPU us / event |")
    print("| --- | --- | --- |")
    for fmt, row in summary.items():
        print(
            f"| {fmt} | {row['events_per_second_median']:,.0f} | "
            f"{row['cpu_us_per_event_median']:.1f} |"
        )
    print(f"\n-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
