"""Where the latency `hiddenstate serve` adds goes, at one offered rate.

    python bench/latency_breakdown.py --transport confluent --rate 200
    python bench/latency_breakdown.py --transport kafka-python --rate 15000 -- --max-poll-records 500

A fresh topic, the real CLI in a subprocess (at-least-once, changelog on, the
benchmark's GRU and 10,000 streams), paced load at `--rate` (bench/load.py
`pace`), and two readers side by side in this process: one reads the
**input** topic (the floor: what a plain reader of the events sees) and one
the predictions. Per prediction, from its own fields and its record's
timestamp (when the server handed it to its producer):

    to its batch   event ts -> the server starts processing the batch it came in:
                   the events' producer, the broker, the server's fetch and poll,
                   and waiting behind the server's previous batch (its flush, a
                   checkpoint's share or commit)
    in the batch   latency.queued_seconds + latency.inference_seconds
    after          record timestamp -> fetched by the reader: the server's produce
                   (linger, flush), the broker, the reader's fetch

and, from py-spy sampling the serving thread **with idle samples** (wall time,
not CPU) over the same stage, where the serving thread's time went: waiting in
poll, processing, handing outputs to the client, waiting for their
acknowledgements (the per-batch flush), the checkpoint (snapshots, the
transaction commit), the lag reading. Writes JSON to
`artifacts/bench/breakdown/` and prints both tables. Collector pauses: the
server freezes its startup heap (`gc.freeze()`); `bench/gc_pauses.py`
measures what is left.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.load import Reader, create_topic, delete_topics  # noqa: E402
from bench.model import build  # noqa: E402
from bench.run import PARTITIONS, Running, Subject  # noqa: E402

# The serving thread's stage of a sample: the first of these found anywhere in its
# stack (function names as py-spy prints them), in this order.
_THREAD_STAGES: list[tuple[tuple[str, ...], str]] = [
    (("wait_for_acks",), "flush: waiting for the batch's acks"),
    (("AtLeastOnce._commit", "ExactlyOnce._commit"), "checkpoint: transaction commit"),
    (
        ("AtLeastOnce._begin", "_send_share", "_send_rest", "Changelog.changes"),
        "checkpoint: snapshots",
    ),
    (("Sink.send",), "produce: outputs to the client"),
    (("Processor.process",), "process: decode, step, encode"),
    (("Source.poll",), "poll: waiting for records, fetch"),
    (("lag", "set_lag"), "lag"),
    (("run_once",), "loop (other)"),
]


def thread_stage(stack: list[str]) -> str:
    for marks, stage in _THREAD_STAGES:
        if any(mark in frame.partition(" (")[0] for frame in stack for mark in marks):
            return stage
    return "outside the loop"


def thread_profile(raw: Path) -> dict[str, float]:
    """Percent of the serving thread's wall-clock samples per stage."""
    stages: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack_text, _, count_text = line.rpartition(" ")
        frames = stack_text.split(";")
        if not stack_text or "MainThread" not in frames[0]:
            continue
        stages[thread_stage(frames[1:])] += int(count_text)
    total = sum(stages.values()) or 1
    return {stage: round(100 * n / total, 1) for stage, n in stages.most_common()}


def percentiles(values: np.ndarray) -> dict[str, float]:
    if not len(values):
        return {}
    q = np.percentile(values, [50, 99, 99.9])
    return {"p50": float(q[0]), "p99": float(q[1]), "p99.9": float(q[2])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap-servers", default="127.0.0.1:9092")
    parser.add_argument("--transport", default="confluent", choices=["confluent", "kafka-python"])
    parser.add_argument("--rate", type=int, required=True, help="offered events/s")
    parser.add_argument("--seconds", type=float, default=12.0, help="the measured stage")
    parser.add_argument("--streams", type=int, default=10_000)
    parser.add_argument("--tree", type=Path, default=REPO, help="serve from this source tree")
    parser.add_argument("--model-dir", type=Path, default=REPO / "artifacts/bench/model")
    parser.add_argument("--out", type=Path, default=REPO / "artifacts/bench/breakdown")
    parser.add_argument("--no-profile", action="store_true", help="no py-spy")
    parser.add_argument("serve_args", nargs="*", help="extra `hiddenstate serve` flags, after --")
    args = parser.parse_args()
    build(args.model_dir)
    bootstrap = args.bootstrap_servers
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    run_args = argparse.Namespace(
        model_dir=args.model_dir,
        max_streams=100_000,
        serve_args=[],
        bootstrap_servers=bootstrap,
    )
    subject = Subject(args.transport, args.transport, args.tree.resolve(), tuple(args.serve_args))
    topic = f"bench-breakdown-{uuid.uuid4().hex[:8]}"
    output = f"{topic}.out"
    create_topic(bootstrap, topic, PARTITIONS)
    create_topic(bootstrap, output, PARTITIONS)
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"{args.transport}-{args.rate}-{time.strftime('%Y%m%d-%H%M%S')}"
    raw = args.out / f"{name}.txt"
    floor = Reader(bootstrap, topic, PARTITIONS, marker=b'"ts":').start()
    served = Reader(bootstrap, output, PARTITIONS, keep_values=True).start()
    running = Running(subject, run_args, topic, output, args.out / f"{name}.serve.log")
    warmup = 3.0
    try:
        running.wait_in_group(bootstrap)
        running.wait_ready()
        load = subprocess.Popen(
            [
                sys.executable,
                str(REPO / "bench" / "load.py"),
                "pace",
                "--bootstrap-servers",
                bootstrap,
                "--topic",
                topic,
                "--streams",
                str(args.streams),
                "--schedule",
                json.dumps([[args.rate, warmup], [args.rate, args.seconds]]),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        time.sleep(warmup + 0.5)
        if not args.no_profile:
            subprocess.run(
                [
                    py_spy,
                    "record",
                    "--pid",
                    str(running.pid),
                    "--duration",
                    str(int(args.seconds - 1)),
                    "--rate",
                    "200",
                    "--idle",
                    "--nonblocking",
                    "--threads",
                    "--format",
                    "raw",
                    "--output",
                    str(raw),
                ],
                check=True,
                capture_output=True,
            )
        out, _ = load.communicate(timeout=args.seconds + 60)
        report = json.loads(out.strip().splitlines()[-1])
        deadline = time.monotonic() + 60
        while served.count < report["sent"] or floor.count < report["sent"]:
            running.check()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{served.count} of {report['sent']} predictions read")
            time.sleep(0.05)
    finally:
        running.stop()
        served.stop()
        floor.stop()
        delete_topics(bootstrap, [topic, output, running.changelog, f"{topic}.dead-letter"])

    begin = report["started_ms"] + (warmup + 1) * 1000  # the stage's first second left out
    end = report["started_ms"] + (warmup + args.seconds) * 1000
    ts = np.asarray(served.event_times, dtype=np.float64)
    mask = (ts >= begin) & (ts < end)
    arrivals = np.asarray(served.arrivals)[mask]
    produced = np.asarray(served.produced, dtype=np.float64)[mask]
    in_batch = np.asarray(
        [
            (lambda lat: (lat["queued_seconds"] + lat["inference_seconds"]) * 1000)(
                json.loads(value)["latency"]
            )
            for value, keep in zip(served.values, mask, strict=True)
            if keep
        ]
    )
    ts = ts[mask]
    floor_ts = np.asarray(floor.event_times, dtype=np.float64)
    floor_mask = (floor_ts >= begin) & (floor_ts < end)
    floor_latency = np.asarray(floor.arrivals)[floor_mask] - floor_ts[floor_mask]
    parts = {
        "event time -> prediction (reader)": arrivals - ts,
        "floor: event time -> event (reader of the input)": floor_latency,
        "to its batch (ts -> processing starts)": produced - ts - in_batch,
        "in the batch (queued + inference)": in_batch,
        "after (handed to producer -> reader)": arrivals - produced,
    }
    result: dict[str, Any] = {
        "transport": args.transport,
        "tree": str(args.tree),
        "serve_args": args.serve_args,
        "offered_events_per_second": args.rate,
        "predictions": int(mask.sum()),
        "latency_ms": {label: percentiles(values) for label, values in parts.items()},
        "serving_thread_wall_percent": {} if args.no_profile else thread_profile(raw),
    }
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"{args.transport} at {args.rate:,} events/s ({result['predictions']:,} predictions)"
        f"{' ' + ' '.join(args.serve_args) if args.serve_args else ''}"
    )
    print(f"{'ms':<52}{'p50':>8}{'p99':>8}{'p99.9':>8}")
    for label, q in result["latency_ms"].items():
        print(f"{label:<52}" + "".join(f"{q.get(k, float('nan')):>8.1f}" for k in q))
    if result["serving_thread_wall_percent"]:
        print("\nthe serving thread's wall time (py-spy, idle included):")
        for stage, percent in result["serving_thread_wall_percent"].items():
            print(f"{percent:>6.1f}%  {stage}")
    print(f"\n-> {args.out / name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
