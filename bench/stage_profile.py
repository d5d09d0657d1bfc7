"""Where each event's time goes in `hiddenstate serve`: a sampling profile, summarised.

Fills a backlog, serves it with the real CLI in a subprocess, and samples
the server's Python threads with py-spy (`--nonblocking`, 250 Hz) while it
drains; then sorts the samples into the stages of one event:

    consume/parse   the Kafka client fetching and parsing records, InputRecords
    decode          JSON parse and validation (EventDecoder)
    replay guard    StateStore.already_applied
    waves           plan_waves and the per-wave lists
    state store     acquire, gather, scatter, steps
    onnxruntime     OrtStepModel.step
    encode          PredictionEncoder
    produce         handing predictions to the Kafka client
    changelog       snapshots encoded and handed to the client at checkpoints
    flush/commit    waiting for acknowledgements, committing offsets
    metrics, lag    histograms and counters; consumer lag
    client threads  kafka-python's own IO and sender threads (Python code in
                    other threads, holding the GIL)

    python bench/stage_profile.py --transport kafka-python --seconds 15
    python bench/stage_profile.py --baseline            # bench/baseline.py instead

A sample counts for its innermost frame in `pipeline/` (what the client,
numpy or json do on behalf of a pipeline call counts for that call), except
that snapshots encoded or sent at checkpoints count as changelog. Idle
samples (threads blocked in select or a condition wait) are left out; the
percentages are of busy samples. py-spy sees Python threads only: librdkafka's
own threads (confluent transport) and onnxruntime's are native, so the process
CPU per event from /proc is printed beside the table. Writes JSON and the raw
collapsed stacks under artifacts/bench/profile/.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.load import Reader, create_topic, delete_topics, fill
from bench.model import build
from bench.run import cpu_seconds

# The stage of a sample is decided by its innermost frame in `pipeline/`: the
# client's own functions count for the pipeline call that led into them (a
# record parsed inside KafkaSource.poll is consume/parse, one built inside
# KafkaSink.send is produce), and numpy or json count for their caller.
# (file, function mark, stage), first match wins.
_RULES: list[tuple[str, str, str]] = [
    ("pipeline/runtime.py", "", "onnxruntime"),
    ("pipeline/codec.py", "Encoder", "encode"),
    ("pipeline/codec.py", "_with_nulls", "encode"),
    ("pipeline/codec.py", "", "decode"),
    ("pipeline/state_store.py", "already_applied", "replay guard"),
    ("pipeline/state_store.py", "", "state store"),
    ("pipeline/waves.py", "", "waves"),
    ("pipeline/processor.py", "_without_replays", "replay guard"),
    ("pipeline/processor.py", "_step_wave", "waves"),
    ("pipeline/processor.py", "", "processor (other)"),
    ("pipeline/records.py", "", "consume/parse"),
    ("pipeline/metrics.py", "", "metrics"),
    ("pipeline/changelog.py", "", "changelog"),
    ("pipeline/transport", ".send", "produce"),
    ("pipeline/transport", ".flush", "flush/commit"),
    ("pipeline/transport", "commit", "flush/commit"),
    ("pipeline/transport", ".poll", "consume/parse"),
    ("pipeline/transport", ".lag", "lag"),
    ("pipeline/transport", "", "client (other)"),
    ("pipeline/loop.py", "_flush", "flush/commit"),
    ("pipeline/loop.py", "_checkpoint", "flush/commit"),
    ("pipeline/loop.py", "", "loop (other)"),
]


# The baseline (bench/baseline.py) has no pipeline frames: its stages are the
# libraries its innermost frames belong to.
_BASELINE_RULES: list[tuple[str, str]] = [
    ("torch/", "torch forward"),
    ("export/", "torch forward"),
    ("json/", "json"),
    ("kafka/producer", "produce"),
    ("kafka/record", "consume/parse"),
    ("kafka/consumer", "consume/parse"),
    ("kafka/", "client (other)"),
]


def classify_baseline(stack: list[str], thread: str) -> str:
    if "MainThread" not in thread:
        return "client threads"
    for frame in reversed(stack):
        where = frame.partition(" (")[2]
        for path, stage in _BASELINE_RULES:
            if where.startswith(path):
                return stage
    return "loop (other)"


# Frames that encode or send snapshots at a checkpoint (spread over batches or not).
_CHECKPOINT_FRAMES = (
    "Changelog.changes",
    "ServeLoop._begin_spread",
    "ServeLoop._send_checkpoint_share",
    "ServeLoop._finish_spread",
)


def classify(stack: list[str], thread: str) -> str:
    """The stage of one sample: its thread for the client's threads, else its frames."""
    if "MainThread" not in thread and "kafka" in thread.lower():
        return "client threads"
    if any(mark in frame for frame in stack for mark in _CHECKPOINT_FRAMES):
        return "changelog"
    for frame in reversed(stack):
        function, _, where = frame.partition(" (")
        if not where.startswith("pipeline/"):
            continue
        for path, mark, stage in _RULES:
            if where.startswith(path) and mark in function:
                return stage
        return "other"
    return "other" if "MainThread" in thread else "client threads"


def summarise(raw: Path, top: int, baseline: bool = False) -> dict:
    stages: collections.Counter[str] = collections.Counter()
    functions: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack_text, _, count_text = line.rpartition(" ")
        if not stack_text:
            continue
        count = int(count_text)
        frames = stack_text.split(";")
        thread, stack = frames[0], frames[1:]
        if not stack or any(
            idle in stack[-1] for idle in ("select (", "wait (", "sleep (", "_poll_once (")
        ):
            continue  # a blocked thread, not work
        stages[(classify_baseline if baseline else classify)(stack, thread)] += count
        functions[stack[-1]] += count
        total += count
    return {
        "busy_samples": total,
        "stages_percent": {stage: round(100 * n / total, 1) for stage, n in stages.most_common()},
        "top_functions_percent": {
            name: round(100 * n / total, 1) for name, n in functions.most_common(top)
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap-servers", default="127.0.0.1:9092")
    parser.add_argument("--transport", help="serve's --transport (default: serve's default)")
    parser.add_argument(
        "--baseline", action="store_true", help="profile bench/baseline.py instead of serve"
    )
    parser.add_argument("--streams", type=int, default=10_000)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--model-dir", type=Path, default=Path("artifacts/bench/model"))
    parser.add_argument("--out", type=Path, default=Path("artifacts/bench/profile"))
    parser.add_argument("serve_args", nargs="*", help="extra `hiddenstate serve` flags, after --")
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")

    model = build(args.model_dir)
    bootstrap = args.bootstrap_servers
    topic = f"bench-profile-{uuid.uuid4().hex[:8]}"
    create_topic(bootstrap, topic, 4)
    create_topic(bootstrap, f"{topic}.out", 4)
    fill(bootstrap, topic, args.streams, args.events)
    args.out.mkdir(parents=True, exist_ok=True)
    label = "baseline" if args.baseline else args.transport or "default"
    name = f"{label}-{time.strftime('%Y%m%d-%H%M%S')}"
    raw = args.out / f"{name}.txt"
    reader = Reader(bootstrap, f"{topic}.out", 4).start()
    with (args.out / f"{name}.serve.log").open("w") as log:
        if args.baseline:
            command = [sys.executable, "bench/baseline.py", "--model-dir", str(args.model_dir)]
        else:
            command = [
                sys.executable,
                "-m",
                "pipeline.cli",
                "serve",
                "--model",
                str(model),
                "--metrics-port",
                "0",
                *(["--transport", args.transport] if args.transport else []),
                *args.serve_args,
            ]
        command += ["--bootstrap-servers", bootstrap, "--input-topic", topic]
        server = subprocess.Popen(
            [*command, "--output-topic", f"{topic}.out"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            while reader.count == 0:
                if server.poll() is not None:
                    raise RuntimeError(f"serve exited with {server.returncode}")
                time.sleep(0.05)
            time.sleep(2)  # past start-up
            first = reader.count
            cpu_before = cpu_seconds(server.pid)
            subprocess.run(
                [
                    py_spy,
                    "record",
                    "--pid",
                    str(server.pid),
                    "--duration",
                    str(int(args.seconds)),
                    "--rate",
                    "250",
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
            served = reader.count - first
            cpu = cpu_seconds(server.pid) - cpu_before
        finally:
            server.terminate()
            server.wait(timeout=60)
            reader.stop()
            delete_topics(bootstrap, [topic, f"{topic}.out"])
    summary = {
        "subject": label,
        "serve_args": args.serve_args,
        "events_per_second_while_sampled": round(served / args.seconds),
        "cpu_us_per_event_while_sampled": round(cpu / max(served, 1) * 1e6, 1),
        **summarise(raw, args.top, baseline=args.baseline),
    }
    (args.out / f"{name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"{label}: {summary['events_per_second_while_sampled']} events/s and "
        f"{summary['cpu_us_per_event_while_sampled']} us CPU/event while sampled (py-spy "
        f"costs a little); {summary['busy_samples']} busy samples of Python threads"
    )
    print(f"{'stage':<20}{'% of busy samples':>18}")
    for stage, percent in summary["stages_percent"].items():
        print(f"{stage:<20}{percent:>18.1f}")
    print("\nhottest functions (innermost frame):")
    for function, percent in summary["top_functions_percent"].items():
        print(f"{percent:>6.1f}  {function}")
    print(f"\n-> {args.out / name}.json, raw stacks {raw}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
