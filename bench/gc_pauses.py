"""Garbage-collector pauses while serving, with and without `gc.freeze()`.

    PYTHONPATH=. python bench/gc_pauses.py

Serves 300 polls of 2,000 events over 10,000 streams through
`Processor.process` (the benchmark's shape, a checkpoint's snapshot encoding
every 10,000 events) in a process that has imported what `hiddenstate serve`
imports (both Kafka clients, onnxruntime, prometheus-client), timing every
collection with `gc.callbacks`: once as is, once after `gc.freeze()` (what
`pipeline/serve.py` does before serving). Prints, per generation, how many
collections ran and their longest pause. Each variant runs in a subprocess of
its own, so that the first does not change what the second finds.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path


def measure(freeze: bool, polls: int = 300, poll: int = 2000, streams: int = 10_000) -> dict:
    import gc
    import tempfile

    import confluent_kafka  # noqa: F401  (imported by serve with --transport confluent)
    import kafka  # noqa: F401
    import numpy as np

    import pipeline.serve  # noqa: F401  (everything serve imports)
    from pipeline.changelog import SnapshotCodec
    from pipeline.config import ProcessingConfig, TopicsConfig
    from pipeline.processor import Processor
    from pipeline.records import InputRecord
    from pipeline.runtime import OrtStepModel
    from pipeline.state_store import StateStore
    from pipeline.testing import random_weights, write_onnx_step

    weights = random_weights("gru", n_features=8, hidden=64, layers=1, n_outputs=8, name="gc")
    with tempfile.TemporaryDirectory() as tmp:
        model = OrtStepModel(write_onnx_step(weights, Path(tmp) / "gc.onnx"))
    processor = Processor(
        model,
        StateStore(model.spec.states, max_streams=streams),
        topics=TopicsConfig(input_topic="events", output_topic="predictions"),
        processing=ProcessingConfig(max_wave_size=1024),
    )
    codec = SnapshotCodec(model.spec)
    rows = [
        json.dumps(r, separators=(",", ":"))
        for r in np.random.default_rng(0).normal(size=(4096, 8)).round(4).tolist()
    ]
    pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
    started: list[float] = []

    def timer(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started.append(time.perf_counter())
        else:
            pauses[info["generation"]].append(time.perf_counter() - started.pop())

    if freeze:
        gc.freeze()  # what pipeline/serve.py does before its loop
    gc.callbacks.append(timer)
    for b in range(polls):  # each poll built on the fly, as a client returns it
        batch = [
            InputRecord(
                "events",
                i % 4,
                i // 4,
                b"device-%07d" % (i % streams),
                f'{{"x":{rows[i % 4096]},"ts":{1_764_000_000_000 + i}}}'.encode(),
                0,
            )
            for i in range(b * poll, (b + 1) * poll)
        ]
        processor.process(batch)
        if b % 5 == 4:  # a checkpoint every 10,000 events
            codec.encode_many(processor.store.drain_dirty_rows())
    gc.callbacks.remove(timer)
    return {
        f"gen{g}": {"collections": len(p), "longest_ms": round(max(p, default=0.0) * 1000, 2)}
        for g, p in pauses.items()
    }


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] in ("frozen", "unfrozen"):
        print(json.dumps(measure(sys.argv[1] == "frozen")))
        return 0
    root = Path(__file__).resolve().parents[1]
    for variant in ("unfrozen", "frozen"):
        output = subprocess.run(
            [sys.executable, __file__, variant],
            capture_output=True,
            text=True,
            check=True,
            cwd=root,
        ).stdout
        print(f"{variant:<9} {output.strip().splitlines()[-1]}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
