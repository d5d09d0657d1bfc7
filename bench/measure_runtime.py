"""Measure onnxruntime step time and the core's throughput (for docs/runtime.md).

    PYTHONPATH=. python bench/measure_runtime.py

1. `OrtStepModel.step` of a 64-unit GRU (12 features, 9 classes; 1 and 2
   layers) at batch 1 and 256, for intra-op threads 1 and 2 and spinning off
   and on: median wall time per call, per stream, and the CPU the process used
   per wall second (spinning shows up there).
2. `Processor.process` end to end (decode, waves, step, encode) for polls of
   500 events over 256 streams: microseconds per event.
The models are built by pipeline.testing (random weights; timing does not
depend on the values).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.config import ProcessingConfig, TopicsConfig
from pipeline.processor import Processor
from pipeline.records import InputRecord
from pipeline.runtime import OrtStepModel
from pipeline.state_store import StateStore
from pipeline.testing import random_weights, write_onnx_step


def time_step(model: OrtStepModel, batch: int, seconds: float = 1.5) -> tuple[float, float]:
    """Median wall seconds per call, and process CPU seconds per wall second."""
    spec = model.spec
    x = np.random.default_rng(0).normal(size=(batch, len(spec.input.features))).astype(np.float32)
    states = [np.zeros((batch, *s.shape), np.float32) for s in spec.states]
    for _ in range(50):
        model.step(x, states)
    samples = []
    wall0, cpu0 = time.perf_counter(), time.process_time()
    while time.perf_counter() - wall0 < seconds:
        start = time.perf_counter()
        for _ in range(20):
            model.step(x, states)
        samples.append((time.perf_counter() - start) / 20)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return statistics.median(samples), cpu / wall


def time_processor(path: Path, events: int = 500, streams: int = 256, polls: int = 40) -> float:
    """Microseconds per event through Processor.process (no Kafka)."""
    model = OrtStepModel(path)
    store = StateStore(model.spec.states, max_streams=100_000)
    processor = Processor(
        model,
        store,
        topics=TopicsConfig(input_topic="events", output_topic="predictions"),
        processing=ProcessingConfig(max_wave_size=256),
    )
    rng = np.random.default_rng(1)
    batches = []
    offset = 0
    for _ in range(polls):
        batch = []
        for _ in range(events):
            key = b"stream-%d" % rng.integers(streams)
            value = json.dumps({"x": rng.normal(size=12).round(4).tolist()}).encode()
            batch.append(InputRecord("events", 0, offset, key, value, 1_700_000_000_000))
            offset += 1
        batches.append(batch)
    processor.process(batches[0])
    start = time.perf_counter()
    for batch in batches[1:]:
        processor.process(batch)
    return (time.perf_counter() - start) / ((polls - 1) * events) * 1e6


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        print("| layers | batch | intra-op threads | spinning | us/call | us/stream | CPU/wall |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        paths = {}
        for layers in (1, 2):
            weights = random_weights(
                "gru", n_features=12, hidden=64, layers=layers, n_outputs=9, task="classification"
            )
            paths[layers] = write_onnx_step(weights, Path(tmp) / f"gru{layers}.onnx")
            for threads in (1, 2):
                for spinning in (False, True):
                    model = OrtStepModel(paths[layers], intra_op_threads=threads, spinning=spinning)
                    for batch in (1, 256):
                        per_call, cpu = time_step(model, batch)
                        print(
                            f"| {layers} | {batch} | {threads} | {'on' if spinning else 'off'} "
                            f"| {per_call * 1e6:.1f} | {per_call * 1e6 / batch:.2f} | {cpu:.2f} |"
                        )
                    del model
        for layers, path in paths.items():
            per_event = time_processor(path)
            print(
                f"Processor.process, {layers}-layer GRU, polls of 500 events over 256 streams: "
                f"{per_event:.1f} us/event"
            )


if __name__ == "__main__":
    main()
    sys.stdout.flush()
