"""Test events for many streams, and what stepping each stream alone gives for them.

The reference is the offline truth every served prediction is compared with:
`pipeline.testing.NumpyStepModel` (the ONNX operators' equations in numpy)
stepping each stream by itself, in the order its events were sent.
"""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np

from pipeline.testing import NumpyStepModel, StepWeights

Sent = list[tuple[bytes, bytes]]


def round_robin_events(streams: int, steps: int, seed: int = 0) -> Sent:
    """`streams` streams (`s0`, `s1`, ...) of `steps` events of 3 features, interleaved."""
    x = np.random.default_rng(seed).normal(size=(streams, steps, 3)).round(4)
    return [
        (f"s{i}".encode(), json.dumps({"x": x[i, k].tolist()}).encode())
        for k in range(steps)
        for i in range(streams)
    ]


def reference(
    weights: StepWeights, sent: Sent, output: str = "y"
) -> dict[bytes, list[list[float]]]:
    """Stream -> the `output` of each of its events, stepping the stream alone from zeros."""
    model = NumpyStepModel(weights)
    states: dict[bytes, list[np.ndarray]] = {}
    outputs: dict[bytes, list[list[float]]] = defaultdict(list)
    for key, value in sent:
        x = np.asarray([json.loads(value)["x"]], dtype=np.float32)
        state = states.get(key) or [
            np.zeros((1, *s.shape), np.float32) for s in weights.spec.states
        ]
        y, states[key] = model.step(x, state)
        outputs[key].append(y[output][0].tolist())
    return outputs
