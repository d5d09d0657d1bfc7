"""A clean first run (what `make demo` shows): `watch` started before `serve` has created
the output topic logs no client ERROR lines, `produce --count 0` says the topic is ready
rather than "sent 0 events", and serve's own log has no ERROR lines for the topics it
creates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.integration.streams import round_robin_events

_REPO_ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *args]


def test_watch_waits_quietly_for_the_topic_serve_creates_and_then_prints_predictions(
    kafka, serve, gru_model
):
    source = kafka.create_topic("events", partitions=2)
    output = f"{source}.predictions"  # does not exist yet: serve creates it
    watcher = subprocess.Popen(
        cli(
            "watch",
            "--topic",
            output,
            "--bootstrap-servers",
            kafka.bootstrap,
            "--count",
            "6",
            "--from-beginning",
            "--timeout",
            "60",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=_REPO_ROOT,
    )
    served = serve("--model", str(gru_model), "--input-topic", source, "--output-topic", output)
    kafka.produce(source, round_robin_events(streams=3, steps=2))
    out, err = watcher.communicate(timeout=90)
    served.stop()

    assert watcher.returncode == 0, err
    assert f"waiting for topic {output} (serve creates it)" in err
    assert "ERROR" not in err
    assert len(out.strip().splitlines()) == 1 + 6  # the header and six predictions
    assert "ERROR" not in served.log()


def test_produce_of_no_events_says_the_topic_is_ready(kafka):
    topic = f"{kafka.create_topic('probe')}-new"
    result = subprocess.run(
        cli(
            "produce",
            "--topic",
            topic,
            "--source",
            "synthetic",
            "--count",
            "0",
            "--bootstrap-servers",
            kafka.bootstrap,
        ),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=_REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert f"topic {topic} is ready (4 partitions)" in result.stderr
    assert "sent 0 events" not in result.stderr
