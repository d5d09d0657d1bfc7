"""How fast a replica gets its hidden states back from the changelog.

Writes N snapshots of a 64-unit GRU (512 B of state each) to a fresh
changelog topic, then times `Changelog.restore` of all its partitions into an
empty state store, several times, and reports the median states per second.

    .venv/bin/python bench/restore.py --streams 200000 --runs 3

Needs a broker (default: the local one, `hiddenstate kafka start`). Prints a
table and writes the result as JSON (default artifacts/bench/restore.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from kafka import KafkaProducer
from prometheus_client import CollectorRegistry

from pipeline.changelog import Changelog, SnapshotCodec, ensure_topic
from pipeline.config import KafkaConfig
from pipeline.metrics import Metrics
from pipeline.model_spec import InputSpec, ModelSpec, OutputSpec, StateSpec
from pipeline.state_store import Snapshot, StateStore
from pipeline.transport import TRANSPORTS, open_transport
from pipeline.transport.topics import Topics


def gru_spec(hidden: int, layers: int) -> ModelSpec:
    """The spec of the benchmark model: 8 features, GRU states of `layers x hidden`."""
    return ModelSpec(
        name="bench-gru",
        version="1",
        task="regression",
        cell="gru",
        weights_sha256="0" * 64,
        input=InputSpec(features=tuple(f"f{i}" for i in range(8))),
        states=(StateSpec("h", "h_out", (layers, hidden)),),
        outputs=(OutputSpec("y", (8,), "next values"),),
    )


def write_snapshots(
    bootstrap: str, topic: str, spec: ModelSpec, streams: int, partitions: int
) -> float:
    """Write one snapshot per stream; returns the seconds it took."""
    codec = SnapshotCodec(spec)
    rng = np.random.default_rng(0)
    state = rng.normal(size=spec.states[0].shape).astype(np.float32)
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, batch_size=512 * 1024)
    started = time.perf_counter()
    for i in range(streams):
        key = f"device-{i:08d}".encode()
        snapshot = Snapshot(key, i % partitions, i, 1, (state,))
        producer.send(topic, key=key, value=codec.encode(snapshot), partition=i % partitions)
    producer.flush()
    producer.close()
    return time.perf_counter() - started


def restore_once(
    bootstrap: str, transport: str, topic: str, spec: ModelSpec, streams: int, partitions: int
) -> float:
    """Restore every partition into an empty store; returns the seconds it took."""
    store = StateStore(spec.states, max_streams=max(streams, 1))
    metrics = Metrics(CollectorRegistry())
    reader = open_transport(
        KafkaConfig(bootstrap_servers=bootstrap, transport=transport)
    ).changelog_reader()
    changelog = Changelog(topic, spec, store, metrics, reader)
    started = time.perf_counter()
    changelog.restore(list(range(partitions)))
    seconds = time.perf_counter() - started
    if len(store) != streams:
        raise RuntimeError(f"restored {len(store)} streams, wrote {streams}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap-servers", default="127.0.0.1:9092")
    parser.add_argument("--streams", type=int, default=200_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--transport", action="append", choices=TRANSPORTS, help="repeatable (default: both)"
    )
    parser.add_argument("--out", type=Path, default=Path("artifacts/bench/restore.json"))
    args = parser.parse_args()

    spec = gru_spec(args.hidden, args.layers)
    topic = f"bench-restore-{uuid.uuid4().hex[:8]}"
    topics = Topics({"bootstrap_servers": args.bootstrap_servers})
    ensure_topic(topics, topic, args.partitions)
    topics.close()
    write_s = write_snapshots(args.bootstrap_servers, topic, spec, args.streams, args.partitions)
    transports = args.transport or list(TRANSPORTS)
    # Interleaved, so that drift on the shared machine hits both transports alike.
    runs: dict[str, list[float]] = {t: [] for t in transports}
    for _ in range(args.runs):
        for transport in transports:
            runs[transport].append(
                restore_once(
                    args.bootstrap_servers, transport, topic, spec, args.streams, args.partitions
                )
            )
    medians = {t: statistics.median(r) for t, r in runs.items()}
    result = {
        "benchmark": "changelog restore",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, "
        f"{__import__('os').cpu_count()} cores",
        "streams": args.streams,
        "state_bytes_per_stream": spec.state_bytes,
        "partitions": args.partitions,
        "write_seconds": round(write_s, 3),
        "restore_seconds_runs": {t: [round(s, 3) for s in r] for t, r in runs.items()},
        "restore_seconds_median": {t: round(m, 3) for t, m in medians.items()},
        "restored_states_per_second_median": {
            t: round(args.streams / m) for t, m in medians.items()
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.streams} snapshots ({spec.state_bytes} B of state each) in {write_s:.1f} s")
    for transport, seconds in runs.items():
        median = medians[transport]
        print(
            f"{transport:<13} restore runs (s): {', '.join(f'{r:.2f}' for r in seconds)}; "
            f"median {median:.2f} s = {args.streams / median:,.0f} states/s"
        )
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
