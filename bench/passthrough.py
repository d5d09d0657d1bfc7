"""The passthrough subject: consume, produce the same bytes, commit. No decoding, no model.

    python bench/passthrough.py --bootstrap-servers HOST:PORT --group-id G \
        --input-topic IN --output-topic OUT

The least a consume -> produce server can do with librdkafka (confluent-kafka)
on this machine: every polled batch (up to 10,000 records: a ceiling should not
be held back by the per-batch round trip) is produced unchanged (same key and
value, the output partition chosen by key like `hiddenstate serve`'s), the
batch is flushed (acknowledged, as at-least-once needs) and then its offsets
are committed (asynchronously). Its throughput is the ceiling of the machine for the benchmark
(`bench/run.py` reports every subject as a share of it); its latency against
the `floor` (a reader of the input itself) is what one more Kafka hop costs.

The poll is the server's own (`pipeline.transport.confluent._take`: take what
is fetched, else wait for the first record); the producer lingers 5 ms like
the server's.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

from confluent_kafka import Consumer, Producer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap-servers", required=True)
    parser.add_argument("--group-id", required=True)
    parser.add_argument("--input-topic", required=True)
    parser.add_argument("--output-topic", required=True)
    parser.add_argument("--max-poll-records", type=int, default=10_000)
    parser.add_argument("--poll-timeout-ms", type=int, default=100)
    args = parser.parse_args()

    consumer = Consumer(
        {
            "bootstrap.servers": args.bootstrap_servers,
            "group.id": args.group_id,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "queued.max.messages.kbytes": 16384,
            "fetch.queue.backoff.ms": 10,
        }
    )
    producer = Producer(
        {
            "bootstrap.servers": args.bootstrap_servers,
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": 5,
            "partitioner": "murmur2_random",
            "queue.buffering.max.messages": 1_000_000,
        }
    )
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    consumer.subscribe([args.input_topic])
    produce, out = producer.produce, args.output_topic
    timeout = args.poll_timeout_ms / 1000
    most = args.max_poll_records
    try:
        while not stopping:
            messages: list[Any] = consumer.consume(most, 0)
            if not messages:
                first = consumer.poll(timeout)
                if first is None:
                    continue
                messages = [first, *consumer.consume(most - 1, 0)]
            for message in messages:
                if message.error() is not None:
                    continue
                while True:
                    try:
                        produce(out, message.value(), message.key())
                        break
                    except BufferError:
                        producer.poll(0.01)
            producer.flush(30)
            consumer.commit(asynchronous=True)
    finally:
        producer.flush(30)
        consumer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
