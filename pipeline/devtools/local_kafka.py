"""A real single-node Apache Kafka broker for development and tests.

`hiddenstate kafka start|stop|status` runs Apache Kafka 4.x in KRaft mode on
127.0.0.1 from the jars Maven copies out of Maven Central (pipeline/devtools/kafka/pom.xml).
Everything lives in one folder ($HIDDENSTATE_KAFKA_HOME; else `.kafka/` in a
checkout; else the user's data folder, `~/.local/share/hiddenstate/kafka` on
Linux: `pipeline.devtools.home`): `libs/` (jars), `data/` (formatted log dirs),
`server.properties`, `broker.log`, `broker.pid`.

Starting is idempotent: a second start finds the first broker and reuses it.
"""

from __future__ import annotations

import argparse
import base64
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from pipeline.devtools.home import alive as _alive
from pipeline.devtools.home import default_home, log_tail
from pipeline.devtools.home import port_open as _port_open
from pipeline.errors import LocalKafkaError

# The broker's Maven pom and log configuration ship inside the package (package data).
_KAFKA_FILES = Path(__file__).resolve().parent / "kafka"
_MIN_JAVA = 17


@dataclass(frozen=True)
class LocalKafka:
    """Where the local broker lives and listens."""

    home: Path
    port: int = 9092
    controller_port: int = 9093
    heap: str = "512m"
    # A second listener for clients that must reach the broker through something in
    # between (the fault campaign's loopback proxy, tests/chaos): it listens on the
    # first port and tells clients to connect to the second, where the proxy is.
    proxied: tuple[int, int] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def libs(self) -> Path:
        return self.home / "libs"

    @property
    def data(self) -> Path:
        return self.home / "data"

    @property
    def log_file(self) -> Path:
        return self.home / "broker.log"

    @property
    def pid_file(self) -> Path:
        return self.home / "broker.pid"

    @property
    def properties(self) -> Path:
        return self.home / "server.properties"


def from_environment() -> LocalKafka:
    """The local broker as $HIDDENSTATE_KAFKA_HOME / $HIDDENSTATE_KAFKA_PORT describe it."""
    home = default_home("kafka", "HIDDENSTATE_KAFKA_HOME")
    port_text = os.environ.get("HIDDENSTATE_KAFKA_PORT", "9092")
    if not port_text.isdigit() or not 0 < int(port_text) < 65535:
        raise LocalKafkaError(
            f"HIDDENSTATE_KAFKA_PORT={port_text!r} is not a TCP port; use e.g. 9092"
        )
    port = int(port_text)
    return LocalKafka(home=home.resolve(), port=port, controller_port=port + 1)


def running_pid(kafka: LocalKafka) -> int | None:
    """The broker's pid if our pid file names a live broker process, else None."""
    try:
        pid = int(kafka.pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return None
    # A recycled pid belongs to some other program: only our java counts.
    return pid if b"kafka.Kafka" in cmdline and str(kafka.home).encode() in cmdline else None


def start(kafka: LocalKafka, timeout: float = 90.0, fresh: bool = False) -> str:
    """Start the broker (or find it running) and return its bootstrap address."""
    pid = running_pid(kafka)
    if pid is not None and not fresh:
        _wait_until_ready(kafka, pid, timeout)
        return kafka.bootstrap
    if pid is not None:
        stop(kafka)
    java = _check_java()
    if _port_open(kafka.port) or _port_open(kafka.controller_port):
        raise LocalKafkaError(
            f"port {kafka.port} or {kafka.controller_port} on 127.0.0.1 is taken by another "
            "program; stop it, or choose other ports with HIDDENSTATE_KAFKA_PORT=19092"
        )
    kafka.home.mkdir(parents=True, exist_ok=True)
    _fetch_jars(kafka)
    if fresh and kafka.data.exists():
        shutil.rmtree(kafka.data)
    _write_properties(kafka)
    if not (kafka.data / "meta.properties").exists():
        _format_storage(kafka, java)
    with kafka.log_file.open("ab") as log:
        process = subprocess.Popen(
            [
                java,
                f"-Xmx{kafka.heap}",
                "-Xms128m",
                "-XX:+UseG1GC",
                "-Djava.awt.headless=true",
                f"-Dlog4j2.configurationFile={_KAFKA_FILES / 'log4j2.properties'}",
                "-cp",
                f"{kafka.libs}/*",
                "kafka.Kafka",
                str(kafka.properties),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            # Its own session: the broker outlives this command and the terminal.
            start_new_session=True,
        )
    kafka.pid_file.write_text(f"{process.pid}\n")
    _wait_until_ready(kafka, process.pid, timeout)
    return kafka.bootstrap


def stop(kafka: LocalKafka, timeout: float = 30.0) -> bool:
    """Stop the broker; True if one was running. SIGTERM first, SIGKILL after `timeout`."""
    pid = running_pid(kafka)
    if pid is None:
        kafka.pid_file.unlink(missing_ok=True)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.2)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
        while _alive(pid):
            time.sleep(0.1)
    kafka.pid_file.unlink(missing_ok=True)
    return True


def _check_java() -> str:
    java = shutil.which("java")
    if java is None:
        raise LocalKafkaError(
            "java is not on PATH; Kafka 4 needs Java 17 or newer "
            "(Debian/Ubuntu: apt-get install openjdk-17-jre-headless)"
        )
    version = subprocess.run([java, "-version"], capture_output=True, text=True).stderr
    match = re.search(r'version "(\d+)', version)
    if match is None or int(match.group(1)) < _MIN_JAVA:
        found = version.splitlines()[0] if version else "unknown"
        raise LocalKafkaError(f"Kafka 4 needs Java {_MIN_JAVA} or newer; {java} is {found}")
    return java


def _fetch_jars(kafka: LocalKafka) -> None:
    marker = kafka.libs / ".complete"
    pom = _KAFKA_FILES / "pom.xml"
    if marker.exists() and marker.read_text() == pom.read_text():
        return
    mvn = shutil.which("mvn")
    if mvn is None:
        raise LocalKafkaError(
            "mvn (Apache Maven) is not on PATH; it fetches the broker's jars from Maven Central "
            "(Debian/Ubuntu: apt-get install maven), or point tests at a broker you run with "
            "KAFKA_BOOTSTRAP_SERVERS=host:port"
        )
    if kafka.libs.exists():
        shutil.rmtree(kafka.libs)
    print(f"fetching Kafka jars from Maven Central into {kafka.libs} ...", file=sys.stderr)
    result = subprocess.run(
        [
            mvn,
            "-q",
            "-B",
            "-f",
            str(pom),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={kafka.libs}",
            "-DincludeScope=runtime",
        ],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise LocalKafkaError(
            f"Maven could not fetch the Kafka jars (exit {result.returncode}):\n"
            f"{(result.stdout + result.stderr)[-2000:]}"
        )
    marker.write_text(pom.read_text())


def _write_properties(kafka: LocalKafka) -> None:
    listeners = [f"PLAINTEXT://127.0.0.1:{kafka.port}"]
    advertised = [f"PLAINTEXT://127.0.0.1:{kafka.port}"]
    protocols = ["PLAINTEXT:PLAINTEXT", "CONTROLLER:PLAINTEXT"]
    if kafka.proxied is not None:
        listen, through = kafka.proxied
        listeners.append(f"PROXIED://127.0.0.1:{listen}")
        advertised.append(f"PROXIED://127.0.0.1:{through}")
        protocols.append("PROXIED:PLAINTEXT")
    listeners.append(f"CONTROLLER://127.0.0.1:{kafka.controller_port}")
    kafka.properties.write_text(
        "\n".join(
            [
                "# Written by `hiddenstate kafka start`; edits are overwritten.",
                "process.roles=broker,controller",
                "node.id=1",
                f"controller.quorum.bootstrap.servers=127.0.0.1:{kafka.controller_port}",
                f"listeners={','.join(listeners)}",
                f"advertised.listeners={','.join(advertised)}",
                "controller.listener.names=CONTROLLER",
                "inter.broker.listener.name=PLAINTEXT",
                f"listener.security.protocol.map={','.join(protocols)}",
                f"log.dirs={kafka.data}",
                "num.partitions=1",
                # One node: internal topics cannot have more replicas than brokers,
                # or consumer groups and transactions wait forever.
                "offsets.topic.replication.factor=1",
                "offsets.topic.num.partitions=8",
                "transaction.state.log.replication.factor=1",
                "transaction.state.log.min.isr=1",
                "share.coordinator.state.topic.replication.factor=1",
                "share.coordinator.state.topic.min.isr=1",
                # Tests create many short-lived groups: do not wait 3 s for more members.
                "group.initial.rebalance.delay.ms=0",
                # Compaction of changelog topics should be visible within a test's time.
                "log.cleaner.backoff.ms=1000",
                "auto.create.topics.enable=false",
                "",
            ]
        )
    )


def _format_storage(kafka: LocalKafka, java: str) -> None:
    # Kafka cluster ids are 16 random bytes in URL-safe base64 without padding.
    cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    result = subprocess.run(
        [
            java,
            "-cp",
            f"{kafka.libs}/*",
            f"-Dlog4j2.configurationFile={_KAFKA_FILES / 'log4j2.properties'}",
            "kafka.tools.StorageTool",
            "format",
            "--standalone",
            # One argument: an id can begin with "-", which would read as an option.
            f"--cluster-id={cluster_id}",
            "-c",
            str(kafka.properties),
        ],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise LocalKafkaError(
            f"formatting Kafka storage in {kafka.data} failed (exit {result.returncode}):\n"
            f"{(result.stdout + result.stderr)[-2000:]}\n"
            "`hiddenstate kafka start --fresh` wipes the data folder and formats it anew"
        )


def _wait_until_ready(kafka: LocalKafka, pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            kafka.pid_file.unlink(missing_ok=True)
            raise LocalKafkaError(
                f"the Kafka broker exited during start; the end of {kafka.log_file}:\n"
                f"{_log_tail(kafka)}"
            )
        if _broker_answers(kafka.bootstrap):
            return
        time.sleep(0.5)
    raise LocalKafkaError(
        f"the Kafka broker (pid {pid}) did not answer on {kafka.bootstrap} within {timeout:.0f} s;"
        f" the end of {kafka.log_file}:\n{_log_tail(kafka)}"
    )


def _broker_answers(bootstrap: str) -> bool:
    """True once the broker serves metadata, not merely once its port is open."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    # The client retries with growing back-off once it has seen a refusal: ask
    # only once the port is open, so readiness is noticed within half a second.
    if not _port_open(int(bootstrap.rsplit(":", 1)[1])):
        return False
    # Refusals while the broker boots are expected: keep them out of the log.
    kafka_log = logging.getLogger("kafka")
    level = kafka_log.level
    kafka_log.setLevel(logging.CRITICAL)
    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000)
        try:
            admin.list_topics()
        finally:
            admin.close()
        return True
    except (KafkaError, OSError, ValueError):
        return False
    finally:
        kafka_log.setLevel(level)


def _log_tail(kafka: LocalKafka) -> str:
    return log_tail(kafka.log_file)


def main(argv: list[str]) -> int:
    """`hiddenstate kafka start|stop|status`: the local development broker."""
    parser = argparse.ArgumentParser(
        prog="hiddenstate kafka",
        description="Run a single-node Apache Kafka 4 (KRaft) broker on 127.0.0.1 for "
        "development and tests. Folder: $HIDDENSTATE_KAFKA_HOME (default .kafka/ in a "
        "checkout, else the user's data folder); port: $HIDDENSTATE_KAFKA_PORT (default 9092, controller on port+1).",
    )
    sub = parser.add_subparsers(dest="action", required=True)
    start_parser = sub.add_parser("start", help="start the broker, or find it running")
    start_parser.add_argument("--fresh", action="store_true", help="wipe its data first")
    start_parser.add_argument("--timeout", type=float, default=90.0, help="seconds to wait")
    sub.add_parser("stop", help="stop the broker (SIGTERM, then SIGKILL after 30 s)")
    sub.add_parser("status", help="exit 0 if the broker runs, 3 if not")
    args = parser.parse_args(argv)

    kafka = from_environment()
    if args.action == "start":
        already = running_pid(kafka) is not None and not args.fresh
        bootstrap = start(kafka, timeout=args.timeout, fresh=args.fresh)
        state = "already running" if already else "started"
        print(f"Kafka {state}: bootstrap {bootstrap} (log {kafka.log_file})", file=sys.stderr)
        print(bootstrap)
        return 0
    if args.action == "stop":
        stopped = stop(kafka)
        print("Kafka stopped" if stopped else "Kafka was not running", file=sys.stderr)
        return 0
    pid = running_pid(kafka)
    if pid is None:
        print(f"Kafka not running (folder {kafka.home})")
        return 3
    print(f"Kafka running: pid {pid}, bootstrap {kafka.bootstrap}, log {kafka.log_file}")
    return 0
