"""The serving core's CPU per event, without Kafka: for A/B tests of hot-path changes.

    PYTHONPATH=. python bench/measure_core.py [--tree DIR] [--repeat 5]

Feeds `Processor.process` polls of `--poll` events spread round-robin over
`--streams` streams (the benchmark's shape: a 64-unit GRU, 8 features, JSON
events like bench/load.py's), then drains the dirty states through the
changelog's snapshot encoding every `--checkpoint-every` events, as a
checkpoint does. Prints the median over `--repeat` passes of microseconds
per event for `process`, for the snapshot encoding, and their sum, measured
with `time.process_time` (CPU of this process). `--tree` runs the same against
another source tree (a `git archive` of an older commit), in a subprocess,
for a before/after in one go. `--shadow` measures the same with a second model
of the same size stepped beside it (`--shadow-model`: its store, its predictions,
the comparison, its snapshots in each checkpoint), and prints both.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def drain(codec: Any, store: Any) -> int:
    """What a checkpoint encodes: every changed stream's snapshot (older trees: one by one)."""
    if hasattr(codec, "encode_many"):
        return len(codec.encode_many(store.drain_dirty_rows()))
    return len([codec.encode(s) for s in store.drain_dirty()])


def measure(
    streams: int,
    poll: int,
    polls: int,
    checkpoint_every: int,
    repeat: int,
    wave: int,
    shadowed: bool = False,
) -> dict:
    from pipeline.changelog import SnapshotCodec
    from pipeline.config import ProcessingConfig, TopicsConfig
    from pipeline.processor import Processor
    from pipeline.records import InputRecord
    from pipeline.runtime import OrtStepModel
    from pipeline.state_store import StateStore
    from pipeline.testing import random_weights, write_onnx_step

    weights = random_weights("gru", n_features=8, hidden=64, layers=1, n_outputs=8, name="core")
    # The next version of the same size: other weights, the same features.
    second = random_weights(
        "gru", n_features=8, hidden=64, layers=1, n_outputs=8, name="core", version="2", seed=1
    )
    with tempfile.TemporaryDirectory() as tmp:
        model = OrtStepModel(write_onnx_step(weights, Path(tmp) / "core.onnx"))
        shadow_model = OrtStepModel(write_onnx_step(second, Path(tmp) / "shadow.onnx"))

    def fresh() -> Any:
        capacity = max(streams, 1024)
        shadow = None
        if shadowed:
            from prometheus_client import CollectorRegistry

            from pipeline.codec import PredictionEncoder
            from pipeline.metrics import Metrics
            from pipeline.shadow import Comparison, Shadow

            metrics = Metrics(CollectorRegistry()).rollout
            comparison = Comparison.of(model.spec, shadow_model.spec)
            shadow = Shadow(
                shadow_model,
                StateStore(shadow_model.spec.states, max_streams=capacity),
                PredictionEncoder(shadow_model.spec, "predictions.shadow"),
                metrics,
                comparison,
                max_wave_size=wave,
            )
        store = StateStore(
            model.spec.states,
            max_streams=capacity,
            on_forget=None if shadow is None else shadow.forget,
        )
        return Processor(
            model,
            store,
            topics=TopicsConfig(input_topic="events", output_topic="predictions"),
            processing=ProcessingConfig(max_wave_size=wave),
            **({"shadow": shadow} if shadowed else {}),
        )

    codec = SnapshotCodec(model.spec)
    shadow_codec = SnapshotCodec(shadow_model.spec)

    def checkpoint(processor: Any) -> int:
        drained = drain(codec, processor.store)
        if shadowed:
            drained += drain(shadow_codec, processor.shadow.store)
        return drained

    rng = np.random.default_rng(0)
    rows = [
        json.dumps(r, separators=(",", ":")) for r in rng.normal(size=(4096, 8)).round(4).tolist()
    ]
    batches = []
    for b in range(polls):
        batch = []
        for i in range(b * poll, (b + 1) * poll):
            value = f'{{"x":{rows[i % 4096]},"ts":{1_764_000_000_000 + i}}}'.encode()
            batch.append(
                InputRecord("events", i % 4, i // 4, b"device-%07d" % (i % streams), value, 0)
            )
        batches.append(batch)
    process_us, checkpoint_us = [], []
    events = poll * (polls - 2)
    for _ in range(repeat):
        # A fresh store each pass: the replay guard would skip events already stepped.
        processor = fresh()
        for batch in batches[:2]:  # warm-up: code paths are hot
            processor.process(batch)
        checkpoint(processor)
        spent_process = spent_checkpoint = 0.0
        since = 0
        for batch in batches[2:]:
            start = time.process_time()
            processor.process(batch)
            spent_process += time.process_time() - start
            since += len(batch)
            if since >= checkpoint_every:
                since = 0
                start = time.process_time()
                checkpoint(processor)
                spent_checkpoint += time.process_time() - start
        process_us.append(spent_process / events * 1e6)
        checkpoint_us.append(spent_checkpoint / events * 1e6)
    return {
        "process_us_per_event": round(statistics.median(process_us), 2),
        "snapshot_encoding_us_per_event": round(statistics.median(checkpoint_us), 2),
        "total_us_per_event": round(
            statistics.median(p + c for p, c in zip(process_us, checkpoint_us, strict=True)), 2
        ),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=10_000)
    parser.add_argument("--poll", type=int, default=500)
    parser.add_argument("--polls", type=int, default=82)
    parser.add_argument("--checkpoint-every", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--wave", type=int, default=256, help="--max-wave-size")
    parser.add_argument("--tree", action="append", default=[], help="also measure this tree")
    parser.add_argument(
        "--shadow", action="store_true", help="also measure with a same-size --shadow-model"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON line (internal)")
    parser.add_argument("--shadowed", action="store_true", help=argparse.SUPPRESS)  # internal
    args = parser.parse_args()
    if args.json:
        result = measure(
            args.streams,
            args.poll,
            args.polls,
            args.checkpoint_every,
            args.repeat,
            args.wave,
            args.shadowed,
        )
        print(json.dumps(result))
        return 0
    here = Path(__file__).resolve().parents[1]
    for tree in [str(here), *args.tree]:
        for shadowed in (False, True) if args.shadow else (False,):
            command = [sys.executable, str(Path(__file__).resolve()), "--json"]
            command += [
                f"--{k.replace('_', '-')}={v}"
                for k, v in vars(args).items()
                if k in ("streams", "poll", "polls", "checkpoint_every", "repeat", "wave")
            ]
            command += ["--shadowed"] if shadowed else []
            output = subprocess.run(
                command,
                env=dict(os.environ, PYTHONPATH=tree),
                capture_output=True,
                text=True,
                check=True,
                cwd=tree,
            ).stdout
            label = f"{tree} with a shadow" if shadowed else tree
            print(f"{label}: {output.strip().splitlines()[-1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
