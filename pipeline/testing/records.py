"""Input records from Python values, predictions back as Python values, a manual clock."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

from pipeline.records import BatchResult, Headers, InputRecord


def event_record(
    key: str | bytes | None,
    value: Mapping[str, Any] | bytes | str | None,
    *,
    offset: int = 0,
    partition: int = 0,
    topic: str = "events",
    timestamp_ms: int = 1_700_000_000_000,
    headers: Headers = (),
) -> InputRecord:
    """An `InputRecord`; a mapping value is JSON-encoded, a str key or value UTF-8 encoded."""
    raw_key = key.encode() if isinstance(key, str) else key
    if isinstance(value, Mapping):
        raw_value: bytes | None = json.dumps(value).encode()
    elif isinstance(value, str):
        raw_value = value.encode()
    else:
        raw_value = value
    return InputRecord(topic, partition, offset, raw_key, raw_value, timestamp_ms, headers)


def event_records(
    events: Iterable[tuple[str | bytes | None, Mapping[str, Any] | bytes | str | None]],
    *,
    topic: str = "events",
    partitions: int = 1,
    first_offset: int = 0,
) -> list[InputRecord]:
    """Records for `(key, value)` pairs in order; the partition is a stable hash of the key,
    and offsets increase per partition, as a broker would assign them."""
    next_offset: dict[int, int] = {}
    records = []
    for key, value in events:
        raw = key.encode() if isinstance(key, str) else (key or b"")
        partition = int(hashlib.md5(raw).hexdigest(), 16) % partitions
        offset = next_offset.get(partition, first_offset)
        next_offset[partition] = offset + 1
        records.append(event_record(key, value, offset=offset, partition=partition, topic=topic))
    return records


def prediction_values(result: BatchResult) -> list[dict[str, Any]]:
    """The decoded JSON of every prediction in a batch result, in order."""
    return [json.loads(r.value or b"null") for r in result.predictions]


class ManualClock:
    """A clock that only moves when told: `clock()` reads it, `advance(s)` moves it."""

    def __init__(self, start: float = 1_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock forward."""
        self.now += seconds
