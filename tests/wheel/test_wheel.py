"""The wheel works anywhere: built from this checkout, installed with the lock into a
fresh virtual environment in a temporary folder, and run from a folder that is not a
checkout: `hiddenstate kafka start` (its pom is package data, its folder the user's data
folder), a short `hiddenstate serve`, and `hiddenstate kafka stop`.

Needs what the local broker needs (Java 17+, Maven) and the package index (or pip's
cache) for the dependencies; about a minute once pip's cache is warm.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

from kafka import KafkaConsumer

from pipeline.testing import random_weights, write_onnx_step

REPO = Path(__file__).resolve().parents[2]


def run(args: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, f"{args}: exit {result.returncode}\n{result.stderr[-3000:]}"
    return result


def free_port_pair() -> int:
    """A port p with p and p + 1 free (the broker and its controller)."""
    for _ in range(50):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port + 1)) != 0 and port < 65000:
                return port
    raise AssertionError("no two adjacent free ports")


def ready(url: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.5)
    return False


def consume_count(bootstrap: str, topic: str, count: int, timeout: float) -> int:
    consumer = KafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None
    )
    seen = 0
    deadline = time.monotonic() + timeout
    try:
        while seen < count and time.monotonic() < deadline:
            seen += sum(len(batch) for batch in consumer.poll(timeout_ms=500).values())
    finally:
        consumer.close()
    return seen


def test_the_wheel_installed_outside_the_checkout_runs_a_broker_serves_and_stops_it(tmp_path):
    dist = tmp_path / "dist"
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-q",
            "-w",
            str(dist),
            str(REPO),
        ],
        timeout=300,
    )
    (wheel,) = dist.glob("hiddenstate-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        packaged = set(archive.namelist())
    assert {
        "pipeline/devtools/kafka/pom.xml",
        "pipeline/devtools/kafka/log4j2.properties",
        "pipeline/devtools/registry/pom.xml",
        "pipeline/schemas/event.schema.json",
        "pipeline/formats/registry.py",
    } <= packaged
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], timeout=120)
    run(
        [
            str(venv / "bin" / "pip"),
            "install",
            "-q",
            "--disable-pip-version-check",
            "-c",
            str(REPO / "constraints.txt"),
            str(wheel),
        ],
        timeout=600,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    port = free_port_pair()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HIDDENSTATE_", "PYTHON", "VIRTUAL_ENV", "KAFKA_"))
    }
    env.update(
        PATH=f"{venv / 'bin'}:{env.get('PATH', '')}",
        XDG_DATA_HOME=str(tmp_path / "data"),
        HIDDENSTATE_KAFKA_PORT=str(port),
    )
    hiddenstate = str(venv / "bin" / "hiddenstate")
    model = write_onnx_step(
        random_weights("gru", n_features=3, hidden=8, layers=1, n_outputs=2, name="wheel"),
        tmp_path / "wheel.onnx",
    )
    home = tmp_path / "data" / "hiddenstate" / "kafka"

    def hs(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return run([hiddenstate, *args], timeout=timeout, cwd=elsewhere, env=env)

    started = hs("kafka", "start", timeout=600)
    try:
        bootstrap = started.stdout.strip()
        assert bootstrap == f"127.0.0.1:{port}"
        assert (home / "broker.log").is_file()
        hs(
            "produce",
            "--topic",
            "events",
            "--source",
            "synthetic",
            "--features",
            "3",
            "--streams",
            "5",
            "--count",
            "50",
            "--bootstrap-servers",
            bootstrap,
        )
        metrics_port = free_port_pair()
        log_path = tmp_path / "serve.log"
        with log_path.open("wb") as log:
            served = subprocess.Popen(
                [
                    hiddenstate,
                    "serve",
                    "--model",
                    str(model),
                    "--input-topic",
                    "events",
                    "--output-topic",
                    "predictions",
                    "--bootstrap-servers",
                    bootstrap,
                    "--metrics-host",
                    "127.0.0.1",
                    "--metrics-port",
                    str(metrics_port),
                ],
                cwd=elsewhere,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            assert ready(f"http://127.0.0.1:{metrics_port}/readyz", 90), log_path.read_text()
            assert consume_count(bootstrap, "predictions", 50, 60) == 50
        finally:
            served.send_signal(signal.SIGTERM)
            code = served.wait(timeout=60)
        serve_log = log_path.read_text()
        assert code == 0, serve_log
        assert "Kafka client kafka-python (--transport auto: confluent-kafka is not installed" in (
            serve_log
        )
    finally:
        stopped = hs("kafka", "stop")
    assert "Kafka stopped" in stopped.stderr
    site = next((venv / "lib").glob("python3*/site-packages"))
    assert not any(site.rglob(".kafka"))
    assert not (elsewhere / ".kafka").exists()
