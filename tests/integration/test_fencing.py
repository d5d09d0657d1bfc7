"""A restarted member fences its predecessor, and a stop asked for at any moment is clean.

Issue 10, finding 4: without `--instance-id` the transactional id was the process id, so a
restarted server could not fence its killed predecessor's open transaction, and committed
output stalled until that transaction timed out (60 s). The id is now the host and the
metrics port (or the instance id): the same member after a restart.
"""

from __future__ import annotations

import signal
import time

from tests.integration.streams import round_robin_events
from tests.integration.test_durability import read_all
from tests.ports import free_port


def committed_count(kafka, topic: str) -> int:
    return len(read_all(kafka, topic, read_committed=True, timeout=2.0))


def test_a_restart_on_the_same_host_and_port_fences_the_killed_predecessors_transaction(
    kafka, serve, gru_model
):
    source = kafka.create_topic("events", partitions=2)
    output = kafka.create_topic("predictions", partitions=2)
    args = [
        "--model", str(gru_model), "--input-topic", source, "--output-topic", output,
        "--guarantee", "exactly-once", "--checkpoint-interval-seconds", "30",
    ]  # fmt: skip
    port = free_port()
    first = serve(*args, port=port)
    kafka.produce(source, round_robin_events(10, steps=3))
    first.wait_metric("hiddenstate_events_total", 30)  # in its open transaction
    first.stop(signal.SIGKILL)
    assert committed_count(kafka, output) == 0

    second = serve(*args, "--checkpoint-interval-seconds", "0.2", port=port)
    started = time.monotonic()
    while committed_count(kafka, output) < 30:
        assert time.monotonic() - started < 10.0, (
            "committed output held back by the old transaction"
        )
        time.sleep(0.2)
    second.stop()


def test_a_stop_asked_for_during_start_up_ends_cleanly(kafka, serve, gru_model):
    source = kafka.create_topic("events", partitions=1)
    output = kafka.create_topic("predictions", partitions=1)
    served = serve(
        "--model", str(gru_model), "--input-topic", source, "--output-topic", output,
        ready=False,
    )  # fmt: skip
    time.sleep(1.0)  # importing, loading the model, checking topics
    assert served.stop(signal.SIGTERM) == 0
