"""Split a batch of events into waves: the unit of one onnxruntime call.

A stream's events must be stepped one after another, in offset order; events
of different streams are independent. So wave k holds the k-th event of every
stream that has one, and each wave is one batched step. A wave larger than
`max_wave_size` streams is cut into several; all pieces of wave k still come
before any piece of wave k+1, so every stream keeps its order.

    >>> plan_waves([b"a", b"b", b"a", b"c", b"a"], max_wave_size=2)
    [[0, 1], [3], [2], [4]]
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence


def plan_waves(keys: Sequence[Hashable], max_wave_size: int) -> list[list[int]]:
    """Indexes into `keys`, grouped into waves: each key at most once per wave,
    each key's indexes in increasing order across waves, at most `max_wave_size`
    indexes per wave. O(len(keys))."""
    if max_wave_size < 1:
        raise ValueError(f"max_wave_size must be >= 1, got {max_wave_size}")
    seen: dict[Hashable, int] = {}
    levels: list[list[int]] = []
    for index, key in enumerate(keys):
        level = seen.get(key, 0)
        seen[key] = level + 1
        if level == len(levels):
            levels.append([])
        levels[level].append(index)
    waves: list[list[int]] = []
    for level_indexes in levels:
        for start in range(0, len(level_indexes), max_wave_size):
            waves.append(level_indexes[start : start + max_wave_size])
    return waves
