"""The latency cost of exactly-once: when do predictions become visible to readers?

At-least-once publishes each batch's predictions as soon as the broker has
them; exactly-once publishes them when the checkpoint's transaction commits,
so a `read_committed` reader sees them up to one checkpoint interval later.
This script serves the same paced synthetic load in both modes and measures,
at a reader, the time from each event's `ts` to the moment its prediction is
readable (read_committed in exactly-once mode).

    .venv/bin/python bench/guarantee_latency.py --rate 1000 --seconds 15 --runs 3

Needs a broker (default: the local one). Prints a table and writes JSON
(default artifacts/bench/guarantee_latency.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from kafka import KafkaConsumer, KafkaProducer

from pipeline.testing import random_weights, write_onnx_step
from pipeline.transport.topics import Topics

STREAMS = 200
FEATURES = 8


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def produce(bootstrap: str, topic: str, rate: float, seconds: float) -> None:
    """Paced events for STREAMS streams, `ts` stamped at send time."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=1)
    rng = np.random.default_rng(0)
    started = time.monotonic()
    total = int(rate * seconds)
    for i in range(total):
        ahead = started + i / rate - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
        value = {"x": rng.normal(size=FEATURES).round(4).tolist(), "ts": int(time.time() * 1000)}
        producer.send(topic, key=f"s{i % STREAMS}".encode(), value=json.dumps(value).encode())
    producer.flush()
    producer.close()


def read_latencies(bootstrap: str, topic: str, count: int, committed: bool) -> list[float]:
    """Seconds from each event's time to its prediction being readable here."""
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        isolation_level="read_committed" if committed else "read_uncommitted",
        fetch_max_wait_ms=10,
    )
    latencies: list[float] = []
    deadline = time.monotonic() + 120
    while len(latencies) < count and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=100).values():
            now_ms = time.time() * 1000
            latencies += [(now_ms - json.loads(r.value)["event_time_ms"]) / 1000 for r in records]
    consumer.close()
    return latencies


def run(
    bootstrap: str, model: Path, mode: str, rate: float, seconds: float, interval: float
) -> dict:
    """One serve process in `mode` under the paced load; latency percentiles at the reader."""
    topic = f"bench-latency-{uuid.uuid4().hex[:8]}"
    topics = Topics({"bootstrap_servers": bootstrap})
    topics.ensure(topic, 4)
    topics.close()
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pipeline.cli",
                "serve",
                "--model",
                str(model),
                "--bootstrap-servers",
                bootstrap,
                "--input-topic",
                topic,
                "--output-topic",
                f"{topic}.out",
                "--guarantee",
                mode,
                "--checkpoint-interval-seconds",
                str(interval),
                "--checkpoint-interval-events",
                "0",
                "--metrics-port",
                str(free_port()),
                "--instance-id",
                "bench",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        time.sleep(4)  # model load and group join
        count = int(rate * seconds)
        reader_result: list[float] = []
        reader = threading.Thread(
            target=lambda: reader_result.extend(
                read_latencies(bootstrap, f"{topic}.out", count, mode == "exactly-once")
            )
        )
        reader.start()
        produce(bootstrap, topic, rate, seconds)
        reader.join()
        server.terminate()
        server.wait(timeout=60)
    if len(reader_result) < count:
        raise RuntimeError(f"{mode}: {len(reader_result)} of {count} predictions arrived")
    q = np.percentile(np.asarray(reader_result[count // 5 :]), [50, 95, 99])  # skip warm-up
    return {"p50_ms": q[0] * 1000, "p95_ms": q[1] * 1000, "p99_ms": q[2] * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap-servers", default="127.0.0.1:9092")
    parser.add_argument("--rate", type=float, default=1000.0, help="events per second")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--checkpoint-interval", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("artifacts/bench/guarantee_latency.json"))
    args = parser.parse_args()

    model = write_onnx_step(
        random_weights(
            "gru", n_features=FEATURES, hidden=64, layers=1, n_outputs=FEATURES, name="bench-gru"
        ),
        Path(tempfile.mkdtemp()) / "bench-gru.onnx",
    )
    results: dict[str, list[dict]] = {"at-least-once": [], "exactly-once": []}
    for _ in range(args.runs):
        for mode in results:
            results[mode].append(
                run(
                    args.bootstrap_servers,
                    model,
                    mode,
                    args.rate,
                    args.seconds,
                    args.checkpoint_interval,
                )
            )
    summary = {
        mode: {k: round(statistics.median(r[k] for r in runs), 1) for k in runs[0]}
        for mode, runs in results.items()
    }
    document = {
        "benchmark": "end-to-end latency at a reader, by delivery guarantee",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "rate_events_per_second": args.rate,
        "seconds": args.seconds,
        "checkpoint_interval_seconds": args.checkpoint_interval,
        "model": "GRU, 1 layer, 64 hidden, 8 features",
        "runs": results,
        "median": summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    print(
        f"{'guarantee':<15}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}   "
        f"(median of {args.runs} runs, {args.rate:.0f} events/s, "
        f"checkpoint every {args.checkpoint_interval} s)"
    )
    for mode, row in summary.items():
        print(f"{mode:<15}{row['p50_ms']:>9.1f}{row['p95_ms']:>9.1f}{row['p99_ms']:>9.1f}")


if __name__ == "__main__":
    main()
