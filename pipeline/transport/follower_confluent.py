"""`Follower` over a confluent-kafka consumer that joins no group
(`pipeline.transport.follower`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, cast

from confluent_kafka import OFFSET_END, Consumer, KafkaException, TopicPartition

from pipeline.records import InputRecord
from pipeline.transport.confluent import _UNDECODABLE, _ErrorLog, undecodable_batch

log = logging.getLogger(__name__)

_WATERMARK_TIMEOUT_S = 10.0


class ConfluentFollower:
    """Reads the partitions it is given of `topic`, from their end at assignment."""

    def __init__(self, config: dict[str, Any], topic: str) -> None:
        """`config`: librdkafka properties (`KafkaConfig.librdkafka_config()`)."""
        self.topic = topic
        self._consumer = Consumer(
            {
                **config,
                "group.id": "hiddenstate-follower",  # required by the client; never joined
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                # Labels of an aborted transaction never happened.
                "isolation.level": "read_committed",
                # A small prefetch: label records wait in memory until their input is served.
                "queued.max.messages.kbytes": 4096,
                "fetch.queue.backoff.ms": 10,
                "error_cb": _ErrorLog(f"reading {topic}"),
            }
        )
        self._held: set[int] = set()
        self._errors = _ErrorLog(f"reading {topic}")

    def assign(self, partitions: Sequence[int]) -> None:
        new = [p for p in partitions if p not in self._held]
        if not new:
            return
        starts = []
        for partition in new:
            try:
                _, high = self._consumer.get_watermark_offsets(
                    TopicPartition(self.topic, partition), timeout=_WATERMARK_TIMEOUT_S
                )
            except KafkaException as exc:
                # Not worth stopping the server for: the end as of the first fetch instead.
                log.warning(
                    "the end of %s[%d] was not fetched (%s): reading from the first fetch",
                    self.topic,
                    partition,
                    exc.args[0].str(),
                )
                high = OFFSET_END
            starts.append(TopicPartition(self.topic, partition, high))
        self._consumer.incremental_assign(starts)
        self._held |= set(new)

    def unassign(self, partitions: Sequence[int]) -> None:
        gone = sorted(self._held & set(partitions))
        if not gone:
            return
        self._consumer.incremental_unassign([TopicPartition(self.topic, p) for p in gone])
        self._held -= set(gone)

    def poll(self, max_records: int) -> list[InputRecord]:
        if not self._held:
            return []
        records: list[InputRecord] = []
        # Any: the stubs allow None for every field, which a fetched record never has.
        for message in cast(list[Any], self._consumer.consume(max_records, 0)):
            error = message.error()
            if error is not None:
                if error.fatal():
                    raise KafkaException(error)
                if error.code() in _UNDECODABLE:
                    raise undecodable_batch(
                        message.topic(), message.partition(), message.offset(), error
                    )
                self._errors(error)
                continue
            if message.partition() not in self._held:
                continue  # fetched before it was unassigned
            headers = message.headers()
            records.append(
                InputRecord(
                    message.topic(),
                    message.partition(),
                    message.offset(),
                    message.key(),
                    message.value(),
                    message.timestamp()[1],
                    tuple(headers) if headers else (),
                )
            )
        return records

    def pause(self, partitions: Sequence[int]) -> None:
        held = [TopicPartition(self.topic, p) for p in partitions if p in self._held]
        if held:
            self._consumer.pause(held)

    def resume(self, partitions: Sequence[int]) -> None:
        held = [TopicPartition(self.topic, p) for p in partitions if p in self._held]
        if held:
            self._consumer.resume(held)

    def close(self) -> None:
        self._consumer.close()
