"""A real Schema Registry for development and tests: Apicurio Registry on 127.0.0.1.

`hiddenstate registry start|stop|status` runs Apicurio Registry 3.3 (a Quarkus
application from Maven Central, pipeline/devtools/registry/pom.xml) with its
in-memory storage. It speaks the Confluent Schema Registry API at
`http://127.0.0.1:<port>/apis/ccompat/v7`, so confluent-kafka's serializers
(and `hiddenstate serve --schema-registry-url`) use it unchanged. Both of its
listeners, the API and the management interface (health, metrics; port + 1),
are bound to 127.0.0.1: left alone, 3.3 opens the management port on 0.0.0.0.

Folder ($HIDDENSTATE_REGISTRY_HOME; else `.registry/` in a checkout; else the
user's data folder: `pipeline.devtools.home`): `app/` (the unpacked
application), `registry.log`, `registry.pid`. Port: $HIDDENSTATE_REGISTRY_PORT
(default 8081). Java: Apicurio 3.3 needs 21 or newer; the first of
$HIDDENSTATE_REGISTRY_JAVA, $JAVA_HOME/bin/java, `java` on PATH and the JDKs
under /usr/lib/jvm that is new enough is used (Kafka's Java 17 may stay the
default `java`). Starting is idempotent, like the broker's.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from pipeline.devtools.home import alive, default_home, log_tail, port_open

__all__ = [
    "LocalRegistry",
    "answers",
    "find_java",
    "from_environment",
    "main",
    "port_open",
    "running_pid",
    "start",
    "stop",
]
from pipeline.errors import LocalRegistryError

_POM = Path(__file__).resolve().parent / "registry" / "pom.xml"
_MIN_JAVA = 21
_JVM_DIR = Path("/usr/lib/jvm")
_API = "/apis/ccompat/v7"


@dataclass(frozen=True)
class LocalRegistry:
    """Where the local registry lives and listens."""

    home: Path
    port: int = 8081
    heap: str = "384m"

    @property
    def management_port(self) -> int:
        return self.port + 1

    @property
    def url(self) -> str:
        """The Confluent-compatible API: what `--schema-registry-url` takes."""
        return f"http://127.0.0.1:{self.port}{_API}"

    @property
    def app(self) -> Path:
        return self.home / "app"

    @property
    def log_file(self) -> Path:
        return self.home / "registry.log"

    @property
    def pid_file(self) -> Path:
        return self.home / "registry.pid"


def from_environment() -> LocalRegistry:
    """The local registry as $HIDDENSTATE_REGISTRY_HOME / $HIDDENSTATE_REGISTRY_PORT say."""
    port_text = os.environ.get("HIDDENSTATE_REGISTRY_PORT", "8081")
    if not port_text.isdigit() or not 0 < int(port_text) < 65535:
        raise LocalRegistryError(
            f"HIDDENSTATE_REGISTRY_PORT={port_text!r} is not a TCP port; use e.g. 8081"
        )
    home = default_home("registry", "HIDDENSTATE_REGISTRY_HOME")
    return LocalRegistry(home=home, port=int(port_text))


def running_pid(registry: LocalRegistry) -> int | None:
    """The registry's pid if our pid file names a live registry process, else None."""
    try:
        pid = int(registry.pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return None
    # A recycled pid belongs to some other program: only our java counts.
    ours = b"quarkus-run.jar" in cmdline and str(registry.home).encode() in cmdline
    return pid if ours else None


def java_version(java: str) -> int | None:
    """The major version `java -version` reports, or None if it does not run."""
    try:
        result = subprocess.run(
            [java, "-version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r'version "(\d+)', result.stderr)
    return int(match.group(1)) if match else None


def find_java(minimum: int = _MIN_JAVA) -> str:
    """A java of version `minimum` or newer (see the module docstring for the order)."""
    candidates = [os.environ.get("HIDDENSTATE_REGISTRY_JAVA", "")]
    if os.environ.get("JAVA_HOME"):
        candidates.append(str(Path(os.environ["JAVA_HOME"]) / "bin" / "java"))
    candidates.append(shutil.which("java") or "")
    if _JVM_DIR.is_dir():
        candidates += [str(p / "bin" / "java") for p in sorted(_JVM_DIR.iterdir(), reverse=True)]
    seen = []
    for java in candidates:
        if not java or java in seen or not Path(java).is_file():
            continue
        seen.append(java)
        version = java_version(java)
        if version is not None and version >= minimum:
            return java
    raise LocalRegistryError(
        f"Apicurio Registry 3.3 needs Java {minimum} or newer, and none was found (looked at "
        f"{', '.join(seen) or 'no java at all'}); install one (Debian 13: apt-get install "
        "openjdk-21-jre-headless; or a Temurin JDK under /usr/lib/jvm) or name it with "
        "HIDDENSTATE_REGISTRY_JAVA=/path/to/bin/java"
    )


def start(registry: LocalRegistry, timeout: float = 120.0) -> str:
    """Start the registry (or find it running) and return its Confluent-API URL."""
    pid = running_pid(registry)
    if pid is not None:
        _wait_until_ready(registry, pid, timeout)
        return registry.url
    java = find_java()
    if port_open(registry.port) or port_open(registry.management_port):
        raise LocalRegistryError(
            f"port {registry.port} or {registry.management_port} on 127.0.0.1 is taken by "
            "another program; stop it, or choose other ports with HIDDENSTATE_REGISTRY_PORT=28081"
        )
    registry.home.mkdir(parents=True, exist_ok=True)
    _fetch_app(registry)
    with registry.log_file.open("ab") as log:
        process = subprocess.Popen(
            [
                java,
                f"-Xmx{registry.heap}",
                "-XX:+UseSerialGC",
                "-Djava.awt.headless=true",
                "-Dquarkus.http.host=127.0.0.1",
                f"-Dquarkus.http.port={registry.port}",
                "-Dquarkus.management.host=127.0.0.1",
                f"-Dquarkus.management.port={registry.management_port}",
                # The home's path on the command line lets running_pid recognise the process.
                f"-Dhiddenstate.registry.home={registry.home}",
                "-jar",
                str(registry.app / "quarkus-run.jar"),
            ],
            cwd=registry.app,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            # Its own session: the registry outlives this command and the terminal.
            start_new_session=True,
        )
    registry.pid_file.write_text(f"{process.pid}\n")
    _wait_until_ready(registry, process.pid, timeout)
    return registry.url


def stop(registry: LocalRegistry, timeout: float = 30.0) -> bool:
    """Stop the registry; True if one was running. SIGTERM first, SIGKILL after `timeout`."""
    pid = running_pid(registry)
    if pid is None:
        registry.pid_file.unlink(missing_ok=True)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive(pid):
        time.sleep(0.2)
    if alive(pid):
        os.kill(pid, signal.SIGKILL)
        while alive(pid):
            time.sleep(0.1)
    registry.pid_file.unlink(missing_ok=True)
    return True


def _fetch_app(registry: LocalRegistry) -> None:
    """Copy the application from Maven Central and unpack it, once per pom version."""
    marker = registry.app / ".complete"
    if marker.exists() and marker.read_text() == _POM.read_text():
        return
    mvn = shutil.which("mvn")
    if mvn is None:
        raise LocalRegistryError(
            "mvn (Apache Maven) is not on PATH; it fetches Apicurio Registry from Maven Central "
            "(Debian/Ubuntu: apt-get install maven)"
        )
    download = registry.home / "download"
    shutil.rmtree(download, ignore_errors=True)
    shutil.rmtree(registry.app, ignore_errors=True)
    print(f"fetching Apicurio Registry from Maven Central into {registry.app} ...", file=sys.stderr)
    try:
        result = subprocess.run(
            [
                mvn,
                "-q",
                "-B",
                "-f",
                str(_POM),
                "dependency:copy",
                f"-DoutputDirectory={download}",
            ],
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise LocalRegistryError("Maven did not fetch Apicurio Registry within 15 min") from exc
    if result.returncode != 0:
        raise LocalRegistryError(
            f"Maven could not fetch Apicurio Registry (exit {result.returncode}):\n"
            f"{(result.stdout + result.stderr)[-2000:]}"
        )
    registry.app.mkdir(parents=True)
    with tarfile.open(download / "apicurio-registry-app.tar.gz") as archive:
        archive.extractall(registry.app, filter="data")
    shutil.rmtree(download, ignore_errors=True)
    if not (registry.app / "quarkus-run.jar").is_file():
        raise LocalRegistryError(
            f"the Apicurio archive has no quarkus-run.jar at its top ({registry.app})"
        )
    marker.write_text(_POM.read_text())


def answers(url: str) -> bool:
    """True once the Confluent-compatible API lists subjects."""
    try:
        with urllib.request.urlopen(f"{url}/subjects", timeout=3) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _wait_until_ready(registry: LocalRegistry, pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            registry.pid_file.unlink(missing_ok=True)
            raise LocalRegistryError(
                f"the registry exited during start; the end of {registry.log_file}:\n"
                f"{log_tail(registry.log_file)}"
            )
        if port_open(registry.port) and answers(registry.url):
            return
        time.sleep(0.5)
    raise LocalRegistryError(
        f"the registry (pid {pid}) did not answer on {registry.url} within {timeout:.0f} s; "
        f"the end of {registry.log_file}:\n{log_tail(registry.log_file)}"
    )


def main(argv: list[str]) -> int:
    """`hiddenstate registry start|stop|status`: the local development Schema Registry."""
    parser = argparse.ArgumentParser(
        prog="hiddenstate registry",
        description="Run Apicurio Registry (Confluent-compatible API, in-memory storage) on "
        "127.0.0.1 for development and tests. Folder: $HIDDENSTATE_REGISTRY_HOME (default "
        ".registry/ in a checkout, else the user's data folder); port: "
        "$HIDDENSTATE_REGISTRY_PORT (default 8081, management on port+1); Java 21+: "
        "$HIDDENSTATE_REGISTRY_JAVA, else found. `start` prints the --schema-registry-url.",
    )
    sub = parser.add_subparsers(dest="action", required=True)
    start_parser = sub.add_parser("start", help="start the registry, or find it running")
    start_parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait")
    sub.add_parser("stop", help="stop the registry (SIGTERM, then SIGKILL after 30 s)")
    sub.add_parser("status", help="exit 0 if the registry runs, 3 if not")
    args = parser.parse_args(argv)

    registry = from_environment()
    if args.action == "start":
        already = running_pid(registry) is not None
        url = start(registry, timeout=args.timeout)
        state = "already running" if already else "started"
        print(f"Schema Registry {state}: {url} (log {registry.log_file})", file=sys.stderr)
        print(url)
        return 0
    if args.action == "stop":
        stopped = stop(registry)
        print(
            "Schema Registry stopped" if stopped else "Schema Registry was not running",
            file=sys.stderr,
        )
        return 0
    pid = running_pid(registry)
    if pid is None:
        print(f"Schema Registry not running (folder {registry.home})")
        return 3
    print(f"Schema Registry running: pid {pid}, {registry.url}, log {registry.log_file}")
    return 0
