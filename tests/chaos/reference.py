"""The independent reference: the exported ONNX file stepped with onnxruntime directly.

Nothing of `pipeline` is used: the step contract (docs/step-contract.md) is
all it relies on — input `x`, one input per state, and each state's new
value as an output of the same name with `_out` appended. Every stream
starts from zeros and is stepped over its delivered events in offset order;
all streams step together, one call per step index.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from tests.chaos.producer import Delivered


@dataclass(frozen=True)
class Truth:
    """What an uninterrupted run gives for one event: its stream's outputs and states
    after stepping it, and its step (1 for a stream's first event)."""

    key: bytes
    step: int
    outputs: dict[str, np.ndarray]
    states: dict[str, np.ndarray]


def streams_of(delivered: Iterable[Delivered]) -> dict[bytes, list[Delivered]]:
    """The valid delivered events of each stream, in offset order."""
    streams: dict[bytes, list[Delivered]] = defaultdict(list)
    for event in delivered:
        if event.index >= 0:
            streams[event.key].append(event)
    for events in streams.values():
        events.sort(key=lambda e: e.offset)
    return dict(streams)


def reference(model: Path, delivered: Iterable[Delivered]) -> dict[tuple[int, int], Truth]:
    """(partition, offset) of every valid delivered event -> its truth."""
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in session.get_inputs()}
    state_names = [name for name in inputs if name != "x"]
    output_names = [o.name for o in session.get_outputs()]
    state_outputs = [f"{name}_out" for name in state_names]
    missing = [name for name in state_outputs if name not in output_names]
    if missing:
        raise ValueError(f"{model}: no outputs {missing} for the states {state_names}")
    predictions = [name for name in output_names if name not in state_outputs]

    streams = streams_of(delivered)
    keys = sorted(streams)
    states = {
        name: np.zeros((len(keys), *inputs[name].shape[1:]), dtype=np.float32)
        for name in state_names
    }
    truths: dict[tuple[int, int], Truth] = {}
    longest = max((len(streams[k]) for k in keys), default=0)
    for step in range(longest):
        rows = [i for i, k in enumerate(keys) if step < len(streams[k])]
        x = np.asarray([streams[keys[i]][step].x for i in rows], dtype=np.float32)
        feed = {"x": x, **{name: states[name][rows] for name in state_names}}
        results = dict(zip(output_names, session.run(output_names, feed), strict=True))
        for name in state_names:
            states[name][rows] = results[f"{name}_out"]
        for j, i in enumerate(rows):
            event = streams[keys[i]][step]
            truths[(event.partition, event.offset)] = Truth(
                key=event.key,
                step=step + 1,
                outputs={name: results[name][j] for name in predictions},
                states={name: results[f"{name}_out"][j] for name in state_names},
            )
    return truths
