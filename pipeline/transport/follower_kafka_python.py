"""`Follower` over a kafka-python consumer without a group (`pipeline.transport.follower`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import CorruptRecordError, KafkaError, UnsupportedCodecError

from pipeline.records import InputRecord
from pipeline.transport.base import TRANSACTION_CALL_TIMEOUT_S, unreachable
from pipeline.transport.kafka_python import undecodable_batch

log = logging.getLogger(__name__)


class KafkaPythonFollower:
    """Reads the partitions it is given of `topic`, from their end at assignment."""

    def __init__(self, client_kwargs: Mapping[str, Any], topic: str) -> None:
        """`client_kwargs` are kafka-python's (`KafkaConfig.client_kwargs()`)."""
        self.topic = topic
        try:
            self._consumer = KafkaConsumer(
                group_id=None,
                enable_auto_commit=False,
                # Labels of an aborted transaction never happened.
                isolation_level="read_committed",
                request_timeout_ms=int(TRANSACTION_CALL_TIMEOUT_S * 1000),
                **client_kwargs,
            )
        except KafkaError as exc:
            raise unreachable(client_kwargs.get("bootstrap_servers"), exc) from exc
        self._held: set[int] = set()

    def _tps(self, partitions: Sequence[int]) -> list[TopicPartition]:
        return [TopicPartition(self.topic, p) for p in partitions]

    def assign(self, partitions: Sequence[int]) -> None:
        new = self._tps([p for p in partitions if p not in self._held])
        if not new:
            return
        consumer = self._consumer
        try:
            ends = consumer.end_offsets(new)
        except KafkaError as exc:
            # Not worth stopping the server for: the end as of the first fetch instead.
            log.warning(
                "the ends of %s were not fetched (%s): reading from the first fetch", new, exc
            )
            ends = {}
        self._held |= {tp.partition for tp in new}
        # assign() replaces the assignment and keeps the positions of partitions kept.
        consumer.assign(self._tps(sorted(self._held)))
        for tp in new:
            if tp in ends:
                consumer.seek(tp, ends[tp])
            else:
                consumer.seek_to_end(tp)

    def unassign(self, partitions: Sequence[int]) -> None:
        gone = self._held & set(partitions)
        if not gone:
            return
        self._held -= gone
        if self._held:
            self._consumer.assign(self._tps(sorted(self._held)))
        else:
            self._consumer.unsubscribe()

    def poll(self, max_records: int) -> list[InputRecord]:
        if not self._held:
            return []
        try:
            batches = self._consumer.poll(timeout_ms=0, max_records=max_records)
        except (UnsupportedCodecError, CorruptRecordError) as exc:
            raise undecodable_batch(self._consumer, exc) from exc
        return [
            InputRecord.from_kafka(r)
            for tp, records in batches.items()
            if tp.partition in self._held
            for r in records
        ]

    def pause(self, partitions: Sequence[int]) -> None:
        held = [p for p in partitions if p in self._held]
        if held:
            self._consumer.pause(*self._tps(held))

    def resume(self, partitions: Sequence[int]) -> None:
        held = [p for p in partitions if p in self._held]
        if held:
            self._consumer.resume(*self._tps(held))

    def close(self) -> None:
        self._consumer.close(autocommit=False)
