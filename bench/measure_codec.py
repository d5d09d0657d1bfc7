"""Time the hot-path codec per event (for docs/runtime.md).

    PYTHONPATH=. python bench/measure_codec.py

Decoding: a 12-feature event as an array and as an object, and a 1-token
event. Encoding: a wave of 256 predictions of 9 class probabilities.
Also `--profile` prints cProfile's top entries for decoding.
"""

from __future__ import annotations

import cProfile
import json
import pstats
import sys
import timeit

import numpy as np

from pipeline.codec import EventDecoder, PredictionEncoder
from pipeline.model_spec import InputSpec, ModelSpec, OutputSpec, StateSpec
from pipeline.records import InputRecord

FEATURES = tuple(f"lpc_{i}" for i in range(1, 13))
SPEC = ModelSpec(
    name="gru-vowels",
    version="1",
    task="classification",
    cell="gru",
    weights_sha256="9f" * 32,
    input=InputSpec(features=FEATURES),
    states=(StateSpec("h", "h_out", (2, 64)),),
    outputs=(OutputSpec("probs", (9,), "class probabilities"),),
)


def record(value: dict[str, object], offset: int = 0) -> InputRecord:
    return InputRecord(
        "events", 3, offset, b"speaker-0042", json.dumps(value).encode(), 1_700_000_000_000
    )


def per_call_us(fn: object, number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def main(argv: list[str]) -> None:
    rng = np.random.default_rng(0)
    values = rng.normal(size=12).tolist()
    decoder = EventDecoder(SPEC.input, 65_536)
    as_array = record({"x": values, "ts": 1_700_000_000_000})
    as_object = record({"x": dict(zip(FEATURES, values, strict=True)), "ts": 1_700_000_000_000})
    tokens = EventDecoder(
        InputSpec(features=("token",), dtype="int64", vocabulary=tuple("abcdefgh")), 65_536
    )
    token_record = record({"x": [5]})
    n = 50_000
    print(
        f"decode, 12 features as array : {per_call_us(lambda: decoder.decode(as_array), n):.2f} us/event"
    )
    print(
        f"decode, 12 features as object: {per_call_us(lambda: decoder.decode(as_object), n):.2f} us/event"
    )
    print(
        f"decode, 1 token id           : {per_call_us(lambda: tokens.decode(token_record), n):.2f} us/event"
    )
    print(
        f"json.loads alone (array form): {per_call_us(lambda: json.loads(as_array.value or b''), n):.2f} us/event"
    )
    encoder = PredictionEncoder(SPEC, "predictions")
    events = [decoder.decode(record({"x": values}, offset=i)) for i in range(256)]
    outputs = {"probs": rng.random((256, 9)).astype(np.float32)}
    steps = np.arange(256)
    wave_us = per_call_us(lambda: encoder.encode_wave(events, outputs, steps, 1e-4, 2e-4), 200)
    print(f"encode, 9 probabilities      : {wave_us / 256:.2f} us/event (wave of 256)")
    if "--profile" in argv:
        profile = cProfile.Profile()
        profile.runcall(lambda: [decoder.decode(as_object) for _ in range(100_000)])
        pstats.Stats(profile).sort_stats("tottime").print_stats(8)


if __name__ == "__main__":
    main(sys.argv[1:])
