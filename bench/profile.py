"""Where each event's time goes in `hiddenstate serve`: a sampling profile, summarised.

Fills a backlog, serves it with the real CLI in a subprocess, and samples
every thread of the server with py-spy (`--nonblocking`, 250 Hz) while it
drains; then sorts the samples into the stages of one event:

    consume/parse   the Kafka client reading and parsing fetched records
    records         turning client records into InputRecord
    decode          JSON parse and validation (EventDecoder)
    replay guard    StateStore.already_applied
    waves           plan_waves and the per-wave lists
    state store     acquire, gather, scatter, steps
    onnxruntime     OrtStepModel.step
    encode          PredictionEncoder
    produce         handing predictions to the Kafka client, its futures
    flush/commit    waiting for acknowledgements, committing offsets
    changelog       snapshots written at checkpoints
    metrics         histograms and counters
    client threads  kafka-python's own IO and sender threads (Python work
                    in other threads, competing for the GIL)

    python bench/profile.py --transport kafka-python --seconds 15

A sample counts for the innermost frame that matches a stage, so numpy
called by the encoder counts as encode. Idle samples (threads blocked in
select or a condition wait) are left out; the percentages are of busy samples.
Prints the table (and `--top N` hottest functions) and writes JSON and the
raw collapsed stacks under artifacts/bench/.
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
    ("pipeline/records.py", "", "records"),
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


def classify(stack: list[str], thread: str) -> str:
    """The stage of one sample: its thread for the client's threads, else its frames."""
    if "MainThread" not in thread and "kafka" in thread.lower():
        return "client threads"
    for frame in reversed(stack):
        function, _, where = frame.partition(" (")
        if not where.startswith("pipeline/"):
            continue
        for path, mark, stage in _RULES:
            if where.startswith(path) and mark in function:
                return stage
        return "other"
    return "other" if "MainThread" in thread else "client threads"


def summarise(raw: Path, top: int) -> dict:
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
        stages[classify(stack, thread)] += count
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
    name = f"{args.transport or 'default'}-{time.strftime('%Y%m%d-%H%M%S')}"
    raw = args.out / f"{name}.txt"
    reader = Reader(bootstrap, f"{topic}.out", 4).start()
    with (args.out / f"{name}.serve.log").open("w") as log:
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
                "--metrics-port",
                "0",
                *(["--transport", args.transport] if args.transport else []),
                *args.serve_args,
            ],
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
        finally:
            server.terminate()
            server.wait(timeout=60)
            reader.stop()
            delete_topics(bootstrap, [topic, f"{topic}.out"])
    summary = {
        "transport": args.transport,
        "serve_args": args.serve_args,
        "events_per_second_while_sampled": round(served / args.seconds),
        **summarise(raw, args.top),
    }
    (args.out / f"{name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"{args.transport}: {summary['events_per_second_while_sampled']} events/s while sampled "
        f"(py-spy costs a little); {summary['busy_samples']} busy samples"
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
