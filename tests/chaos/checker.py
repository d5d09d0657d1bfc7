"""The report of one run: what was sent against what came out, read with a consumer of its own.

Per run: events delivered, predictions read, events lost (no prediction),
duplicates (predictions beyond an event's first; read `read_committed`
under exactly-once, where there must be none), per-stream order, values
against the reference (every copy, not only the last), dead letters, and
the changelog: snapshots older than an earlier one of the same stream, and
snapshots whose state matches no state of an uninterrupted run. The
snapshot format is read from its documentation (pipeline/changelog.py's
docstring), not with the server's decoder.
"""

from __future__ import annotations

import json
import struct
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from tests.chaos.producer import Delivered
from tests.chaos.reference import Truth

TOLERANCE = 1e-5


@dataclass
class Report:
    events: int = 0
    bad_events: int = 0
    predictions: int = 0
    lost: int = 0
    duplicates: int = 0
    order_violations: int = 0
    wrong_values: int = 0
    wrong_steps: int = 0
    dead_letters_missing: int = 0
    stale_snapshots: int = 0
    snapshots_matching_no_state: int = 0
    snapshots: int = 0
    streams_wrong_after_final_restart: int = 0
    examples: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        if len(self.examples) < 12:
            self.examples.append(text)

    @property
    def ok(self) -> bool:
        return not (
            self.lost
            or self.order_violations
            or self.wrong_values
            or self.wrong_steps
            or self.dead_letters_missing
            or self.stale_snapshots
            or self.snapshots_matching_no_state
            or self.streams_wrong_after_final_restart
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_topic(
    bootstrap: str, topic: str, *, committed: bool, timeout_s: float = 120.0
) -> list[Any]:
    """Every record of `topic` up to its end, partition by partition in offset order. With
    `committed`, only committed ones, and only once no transaction is open any more."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "chaos-checker",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "isolation.level": "read_committed" if committed else "read_uncommitted",
        }
    )
    try:
        metadata = consumer.list_topics(topic, timeout=30).topics[topic]
        partitions = sorted(metadata.partitions)
        ends = {}
        for p in partitions:
            ends[p] = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30)[1]
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        records: list[Any] = []
        reached = {p: 0 for p in partitions}
        deadline = time.monotonic() + timeout_s
        while any(reached[p] < ends[p] for p in partitions):
            if time.monotonic() > deadline:
                left = {p: (reached[p], ends[p]) for p in partitions if reached[p] < ends[p]}
                raise TimeoutError(f"{topic}: not read to its end in {timeout_s:.0f} s: {left}")
            for message in consumer.consume(10_000, 0.5):
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        p = message.partition()
                        reached[p] = max(reached[p], message.offset())
                    continue
                records.append(message)
                p = message.partition()
                reached[p] = max(reached[p], message.offset() + 1)
        return records
    finally:
        consumer.close()


def check(
    bootstrap: str,
    topics: Any,
    changelogs: list[str],
    delivered: list[Delivered],
    truths: dict[tuple[int, int], Truth],
    *,
    exactly_once: bool,
    final_round: set[tuple[int, int]],
) -> Report:
    """Read what the servers wrote and judge it."""
    outputs = read_topic(bootstrap, topics.output, committed=exactly_once)
    dead = read_topic(bootstrap, topics.dead_letter, committed=exactly_once)
    snapshots = {}
    for topic in changelogs:
        try:
            snapshots[topic] = read_topic(bootstrap, topic, committed=True)
        except KeyError:
            snapshots[topic] = []  # no such changelog: the run never checkpointed
    return judge(
        outputs,
        dead,
        snapshots,
        delivered,
        truths,
        exactly_once=exactly_once,
        final_round=final_round,
    )


def judge(
    outputs: list[Any],
    dead: list[Any],
    changelogs: dict[str, list[Any]],
    delivered: list[Delivered],
    truths: dict[tuple[int, int], Truth],
    *,
    exactly_once: bool,
    final_round: set[tuple[int, int]],
) -> Report:
    """Compare the records read (confluent-kafka `Message`s, or anything with its methods)
    with the delivered events and the reference."""
    report = Report()
    valid = [e for e in delivered if e.index >= 0]
    bad = {(e.partition, e.offset) for e in delivered if e.index < 0}
    report.events, report.bad_events = len(valid), len(bad)

    report.predictions = len(outputs)
    seen: dict[tuple[int, int], int] = defaultdict(int)
    by_key: dict[bytes, list[tuple[int, int]]] = defaultdict(list)
    for message in sorted(outputs, key=lambda m: (m.partition(), m.offset())):
        value = json.loads(message.value())
        source = (value["source"]["partition"], value["source"]["offset"])
        truth = truths.get(source)
        if truth is None:
            report.wrong_values += 1
            report.note(f"a prediction for {source}, which is no valid delivered event")
            continue
        seen[source] += 1
        by_key[message.key()].append(source)
        if message.key() != truth.key or value["step"] != truth.step:
            report.wrong_steps += 1
            report.note(
                f"{truth.key!r}@{source}: key {message.key()!r} step {value['step']}, "
                f"expected step {truth.step}"
            )
            if source in final_round:
                report.streams_wrong_after_final_restart += 1
            continue
        for name, expected in truth.outputs.items():
            got = np.asarray(value["outputs"][name], dtype=np.float64)
            if not np.allclose(got, expected, atol=TOLERANCE, rtol=0):
                report.wrong_values += 1
                report.note(f"{truth.key!r}@{source} step {truth.step}: {name} {got} != {expected}")
                if source in final_round:
                    report.streams_wrong_after_final_restart += 1
                break
    for source in truths:
        if seen[source] == 0:
            report.lost += 1
            report.note(f"no prediction for {truths[source].key!r}@{source}")
    report.duplicates = sum(n - 1 for n in seen.values() if n > 1)
    for sources in by_key.values():
        report.order_violations += _order_violations(sources, strict=exactly_once)

    dead_sources = set()
    for message in dead:
        headers = dict(message.headers() or [])
        dead_sources.add(
            (
                int(headers["hiddenstate.source.partition"]),
                int(headers["hiddenstate.source.offset"]),
            )
        )
    missing = bad - dead_sources
    report.dead_letters_missing = len(missing)
    for source in sorted(missing)[:3]:
        report.note(f"bad event {source} not in the dead-letter topic")

    states_by_key = _states_by_key(truths)
    for topic, records in changelogs.items():
        _check_changelog(topic, records, states_by_key, report)
    return report


def _order_violations(sources: list[tuple[int, int]], strict: bool) -> int:
    """Per stream, in the order written: exactly-once, every prediction's source offset
    above the one before; at-least-once, every first prediction of an event above the
    first predictions before it (a replay may repeat, never skip back to new ones)."""
    violations = 0
    highest = -1
    firsts: set[tuple[int, int]] = set()
    for source in sources:
        offset = source[1]
        if strict:
            if offset <= highest:
                violations += 1
            highest = max(highest, offset)
            continue
        if source in firsts:
            continue
        firsts.add(source)
        if offset <= highest:
            violations += 1
        highest = max(highest, offset)
    return violations


def _states_by_key(truths: dict[tuple[int, int], Truth]) -> dict[bytes, dict[int, Truth]]:
    """Stream -> source offset -> truth after that event."""
    states: dict[bytes, dict[int, Truth]] = defaultdict(dict)
    for (_, offset), truth in truths.items():
        states[truth.key][offset] = truth
    return states


def _check_changelog(
    topic: str, records: list[Any], states: dict[bytes, dict[int, Truth]], report: Report
) -> None:
    newest: dict[bytes, int] = {}
    for message in sorted(records, key=lambda m: (m.partition(), m.offset())):
        value, key = message.value(), message.key()
        if value is None:
            newest.pop(key, None)  # a tombstone: the stream was forgotten
            continue
        step, offset, flat = _decode(value)
        report.snapshots += 1
        if offset < newest.get(key, -1):
            report.stale_snapshots += 1
            report.note(f"{topic} {key!r}: snapshot of offset {offset} after one of {newest[key]}")
        newest[key] = max(offset, newest.get(key, -1))
        truth = states.get(key, {}).get(offset)
        expected = (
            None if truth is None else np.concatenate([np.ravel(s) for s in truth.states.values()])
        )
        if truth is None or truth.step != step or not np.allclose(flat, expected, atol=TOLERANCE):
            report.snapshots_matching_no_state += 1
            report.note(
                f"{topic} {key!r}: snapshot (step {step}, offset {offset}) is no true state"
            )


def _decode(value: bytes) -> tuple[int, int, np.ndarray]:
    """`b"HSS1" | u16 n | identity+spec (n bytes) | i64 step | i64 offset | float32 states`."""
    if value[:4] != b"HSS1":
        raise ValueError(f"not a snapshot: {value[:8]!r}")
    (n,) = struct.unpack_from("<H", value, 4)
    step, offset = struct.unpack_from("<qq", value, 6 + n)
    flat = np.frombuffer(value, dtype="<f4", offset=6 + n + 16)
    return int(step), int(offset), flat
