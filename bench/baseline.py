"""The baseline: the per-event consumer a user would write by hand.

kafka-python, a dict of PyTorch hidden states, one forward call per event,
one JSON prediction produced per event, and a commit after each polled batch
once its predictions are acknowledged (at-least-once, like `hiddenstate serve`
with its default guarantee). Same model weights (bench/model.py), same events,
same topics as the server it is compared with. No durability of the states
(no changelog): the baseline does less work than the server, not more.

    python bench/baseline.py --model-dir artifacts/bench/model \
        --input-topic T --output-topic T.out [--bootstrap-servers 127.0.0.1:9092]

It is written the obvious way on purpose, with the one choice a user would
find quickly: `torch.inference_mode()`. Torch keeps its own thread setting
(two threads on the 2-core machine); `--torch-threads 1` was 7% slower there
(artifacts/bench/baseline-threads.json, docs/benchmarks.md). SIGTERM stops
it after the batch in hand.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

import torch
from kafka import KafkaConsumer, KafkaProducer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.model import load_torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--input-topic", required=True)
    parser.add_argument("--output-topic", required=True)
    parser.add_argument("--bootstrap-servers", default="127.0.0.1:9092")
    parser.add_argument("--group-id", default="baseline")
    parser.add_argument(
        "--torch-threads", type=int, default=0, help="torch.set_num_threads (0: torch's own)"
    )
    args = parser.parse_args()

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    net = load_torch(args.model_dir)
    consumer = KafkaConsumer(
        args.input_topic,
        bootstrap_servers=args.bootstrap_servers,
        group_id=args.group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    producer = KafkaProducer(bootstrap_servers=args.bootstrap_servers, linger_ms=5)
    states: dict[bytes, tuple[torch.Tensor, ...]] = {}
    steps: dict[bytes, int] = {}
    running = True

    def stop(signum: int, frame: object) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    with torch.inference_mode():
        while running:
            polled = consumer.poll(timeout_ms=100)
            for records in polled.values():
                for record in records:
                    event = json.loads(record.value)
                    x = torch.tensor([event["x"]], dtype=torch.float32)
                    state = states.get(record.key)
                    if state is None:
                        state = net.initial_state(1)
                    y, state = net.step(x, state)
                    states[record.key] = state
                    steps[record.key] = steps.get(record.key, 0) + 1
                    prediction = {
                        "source": {
                            "topic": record.topic,
                            "partition": record.partition,
                            "offset": record.offset,
                        },
                        "event_time_ms": event.get("ts", record.timestamp),
                        "step": steps[record.key],
                        "outputs": {"y": y[0].tolist()},
                    }
                    producer.send(
                        args.output_topic, key=record.key, value=json.dumps(prediction).encode()
                    )
            if polled:
                producer.flush()  # every prediction acknowledged ...
                consumer.commit()  # ... before the offsets that produced them
    producer.close()
    consumer.close(autocommit=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
