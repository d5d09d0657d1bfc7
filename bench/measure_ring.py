"""Measure the prediction ring's memory per stream (docs/state-store.md#the-prediction-ring).

    PYTHONPATH=. python bench/measure_ring.py [--streams 100000]

Traces every allocation (tracemalloc) while a `PredictionRing` records one prediction
for each of N streams, in waves of 256 as the processor's encoder hands them over, for
the models that matter: the demo classifier (9 class probabilities), the benchmark GRU
(8 forecasts) and a 97-token next-character model, each at the default horizon (64)
and at 1 (what `--streams-api` alone keeps). The keys are made before the trace starts:
the ring keeps the key objects the events carry, which the store already holds. Reports
bytes per stream: all of it, the slabs and columns alone (`PredictionRing.nbytes`), and
what the formula `PredictionRing.bytes_per_stream` says. Then the CPU time of recording:
waves of 256 events over 10,000 streams, each stream a step further per pass, in
microseconds per event (`time.process_time`, the median of 5 passes).
"""

from __future__ import annotations

import argparse
import statistics
import time
import tracemalloc

import numpy as np

from pipeline.codec import Event
from pipeline.ring import PredictionRing
from pipeline.testing import event_record, random_weights

MODELS = {
    "demo classifier (9 classes)": {"n_outputs": 9, "task": "classification"},
    "benchmark GRU (8 forecasts)": {"n_outputs": 8, "task": "regression"},
    "next character (97 tokens)": {"n_outputs": 97, "task": "classification"},
}


def measure(streams: int, outputs: int, task: str, horizon: int, wave: int = 256) -> dict:
    spec = random_weights("gru", n_features=2, hidden=4, n_outputs=outputs, task=task).spec
    record = event_record("k", {"x": [0.0, 0.0]})
    events = [Event(b"device-%08d" % i, [0.0, 0.0], 0, False, record) for i in range(streams)]
    values = {spec.outputs[0].name: np.zeros((wave, outputs), np.float32)}
    steps = np.ones(wave, dtype=np.int64)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    ring = PredictionRing(spec, horizon, max_streams=streams, initial_capacity=1024)
    for start in range(0, streams, wave):
        chunk = events[start : start + wave]
        ring.record(
            chunk, {k: v[: len(chunk)] for k, v in values.items()}, steps[: len(chunk)], 0.0
        )
    total, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "outputs": outputs,
        "horizon": horizon,
        "bytes_per_stream": (total - base) / streams,
        "slab_bytes_per_stream": ring.nbytes / streams,
        "formula_bytes_per_stream": PredictionRing.bytes_per_stream(spec, horizon),
        "peak_bytes_per_stream": (peak - base) / streams,
    }


def record_cost(outputs: int, task: str, horizon: int, streams: int = 10_000) -> float:
    """Microseconds of CPU per event that `PredictionRing.record` takes."""
    spec = random_weights("gru", n_features=2, hidden=4, n_outputs=outputs, task=task).spec
    wave = 256
    records = [event_record("k", {"x": [0.0]}, offset=i, partition=i % 4) for i in range(streams)]
    events = [Event(b"device-%08d" % i, [0.0, 0.0], 0, False, records[i]) for i in range(streams)]
    waves = [events[start : start + wave] for start in range(0, streams, wave)]
    values = {spec.outputs[0].name: np.zeros((wave, outputs), np.float32)}
    ring = PredictionRing(spec, horizon, max_streams=streams)
    passes = []
    for step in range(1, 7):
        started = time.process_time()
        for chunk in waves:
            count = len(chunk)
            ring.record(chunk, {k: v[:count] for k, v in values.items()}, np.full(count, step), 0.0)
        if step > 1:  # the first pass takes the rows
            passes.append((time.process_time() - started) / streams * 1e6)
    return statistics.median(passes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=100_000)
    args = parser.parse_args()
    print(f"{args.streams:,} streams, one prediction each (Python and numpy of this machine)\n")
    print("| model | horizon | B/stream (all) | slabs and columns | formula | peak (growth) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, model in MODELS.items():
        for horizon in (64, 1):
            row = measure(args.streams, model["n_outputs"], model["task"], horizon)
            print(
                f"| {name} | {horizon} | {row['bytes_per_stream']:,.0f} | "
                f"{row['slab_bytes_per_stream']:,.0f} | {row['formula_bytes_per_stream']:,} | "
                f"{row['peak_bytes_per_stream']:,.0f} |"
            )
    print("\n| model | horizon | record: us CPU per event |")
    print("| --- | --- | --- |")
    for name, model in MODELS.items():
        for horizon in (64, 1):
            cost = record_cost(model["n_outputs"], model["task"], horizon)
            print(f"| {name} | {horizon} | {cost:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
