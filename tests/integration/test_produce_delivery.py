"""`hiddenstate produce` against the real broker: its exit code says whether every event
was delivered, and it connects with serve's security settings."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parents[2]


def produce(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "produce", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=_REPO_ROOT,
    )


def events_file(path: Path, pads: list[int]) -> Path:
    with path.open("w") as lines:
        for i, pad in enumerate(pads):
            value = {"x": [0.1, 0.2, 0.3], "pad": "p" * pad}
            lines.write(json.dumps({"key": f"s{i}", "value": value}) + "\n")
    return path


def test_every_event_acknowledged_exits_zero_and_says_so(kafka, tmp_path):
    topic = kafka.create_topic("produced", partitions=2)
    result = produce(
        "--topic",
        topic,
        "--source",
        str(events_file(tmp_path / "e.jsonl", [0] * 5)),
        "--bootstrap-servers",
        kafka.bootstrap,
    )
    assert result.returncode == 0, result.stderr
    assert f"sent 5 events to {topic} (2 partitions), all acknowledged" in result.stderr
    assert sum(kafka.end_offsets(topic).values()) == 5


def test_events_the_broker_refuses_make_a_nonzero_exit_that_says_how_many_and_why(kafka, tmp_path):
    topic = kafka.create_topic("small", partitions=1, **{"max.message.bytes": "400"})
    result = produce(
        "--topic",
        topic,
        "--source",
        str(events_file(tmp_path / "e.jsonl", [0, 2000, 0])),
        "--bootstrap-servers",
        kafka.bootstrap,
        "--rate",
        "20",
    )
    assert result.returncode == 1, result.stderr
    # The broker refuses the large one; kafka-python's idempotent producer then aborts
    # what was queued behind it in the same partition. The count says how many, exactly.
    failed = re.search(
        rf"(\d) of 3 events to {topic} were not delivered \((\d) refused", result.stderr
    )
    assert failed is not None, result.stderr
    assert failed.group(1) == failed.group(2)
    assert "first error: MessageSizeTooLargeError" in result.stderr
    assert "Traceback" not in result.stderr
    assert kafka.end_offsets(topic) == {0: 3 - int(failed.group(1))}


def test_the_security_settings_of_serve_apply_to_produce(kafka, tmp_path):
    topic = kafka.create_topic("secured", partitions=1)
    result = produce(
        "--topic",
        topic,
        "--source",
        str(events_file(tmp_path / "e.jsonl", [0])),
        "--bootstrap-servers",
        kafka.bootstrap,
        "--bootstrap-timeout-ms",
        "3000",
        "--security-protocol",
        "SASL_PLAINTEXT",
        "--sasl-mechanism",
        "PLAIN",
        "--sasl-plain-username",
        "user",
        "--sasl-plain-password",
        "secret",
    )
    assert result.returncode == 1
    assert f"cannot reach Kafka at ['{kafka.bootstrap}']" in result.stderr
    assert "Traceback" not in result.stderr
    assert kafka.end_offsets(topic) == {0: 0}
