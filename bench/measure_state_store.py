"""Measure the state store's memory per stream (for docs/state-store.md).

    PYTHONPATH=. python bench/measure_state_store.py [--streams 100000]

Traces every allocation (tracemalloc) while a store takes N streams of a
1-layer (the benchmark GRU, 256 bytes) and 2-layer (512 bytes) 64-unit GRU
state and a 16-unit one, the way the processor fills it
(waves of 256), and reports bytes per stream: total, the state itself, the
fixed overhead, and the stream-id keys (bytes objects the store keeps alive).
"""

from __future__ import annotations

import argparse
import sys
import tracemalloc

import numpy as np

from pipeline.model_spec import StateSpec
from pipeline.state_store import StateStore


def measure(
    streams: int, shape: tuple[int, ...], max_streams: int, wave: int = 256
) -> dict[str, float]:
    spec = StateSpec(name="h", output="h_out", shape=shape)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    # Keys are made inside the trace, as a consumer would decode them from records.
    keys = [b"device-%08d" % i for i in range(streams)]
    after_keys = tracemalloc.get_traced_memory()[0]
    store = StateStore([spec], max_streams=max_streams, initial_capacity=1024)
    zeros = np.zeros(wave, dtype=np.int64)
    for start in range(0, streams, wave):
        chunk = keys[start : start + wave]
        store.acquire(chunk, zeros[: len(chunk)], zeros[: len(chunk)], 0.0)
    total, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    store_bytes = (total - after_keys) / streams
    return {
        "streams": streams,
        "capacity": store.capacity,
        "state_bytes": spec.nbytes,
        "store_bytes_per_stream": store_bytes,
        "overhead_bytes_per_stream": store_bytes - spec.nbytes,
        "key_bytes_per_stream": (after_keys - base) / streams,
        "peak_bytes_per_stream": (peak - after_keys) / streams,
    }


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=100_000)
    args = parser.parse_args(argv)
    n = args.streams
    print(f"{n} streams, 15-byte stream ids, filled in waves of 256")
    print(
        "| state shape | state B | max_streams | slab rows | store B/stream | overhead B/stream | peak B/stream (growth) | key B/stream |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for shape in ((1, 64), (2, 64), (1, 16)):
        for max_streams in (n, 10 * n):
            r = measure(n, shape, max_streams)
            print(
                f"| {list(shape)} | {r['state_bytes']} | {max_streams} | {r['capacity']} "
                f"| {r['store_bytes_per_stream']:.0f} | {r['overhead_bytes_per_stream']:.0f} "
                f"| {r['peak_bytes_per_stream']:.0f} | {r['key_bytes_per_stream']:.0f} |"
            )


if __name__ == "__main__":
    main(sys.argv[1:])
