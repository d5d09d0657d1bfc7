"""The broker the suite runs against behaves like Kafka: keyed order, no loss."""

from __future__ import annotations

from collections import defaultdict


def test_ten_thousand_keyed_events_come_back_complete_and_in_per_key_order(kafka):
    topic = kafka.create_topic("broker-order", partitions=4)
    keys = [f"stream-{i}".encode() for i in range(50)]
    sent = [(keys[i % len(keys)], f"{i}".encode()) for i in range(10_000)]

    kafka.produce(topic, sent)
    received = kafka.consume(topic, count=10_000)

    assert len(received) == 10_000
    by_key: dict[bytes, list[int]] = defaultdict(list)
    partition_of: dict[bytes, set[int]] = defaultdict(set)
    for record in sorted(received, key=lambda r: (r.partition, r.offset)):
        by_key[record.key].append(int(record.value))
        partition_of[record.key].add(record.partition)
    expected: dict[bytes, list[int]] = defaultdict(list)
    for key, value in sent:
        expected[key].append(int(value))
    assert by_key == expected
    assert all(len(parts) == 1 for parts in partition_of.values())
    assert {p for parts in partition_of.values() for p in parts} == {0, 1, 2, 3}
