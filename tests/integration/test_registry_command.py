"""`hiddenstate registry start|status|stop`: a second local Apicurio Registry in a folder
and on a port of its own (its application linked from the session's registry folder,
when that has one, so nothing is downloaded twice)."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from pathlib import Path

from pipeline.devtools import local_registry
from tests.ports import free_port

_REPO_ROOT = Path(__file__).resolve().parents[2]


def registry_command(action: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "registry", action],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=_REPO_ROOT,
        env={**os.environ, **env},
    )


def test_the_registry_starts_once_answers_on_loopback_and_stops(tmp_path):
    home = tmp_path / "registry"
    home.mkdir()
    shared = local_registry.from_environment().app
    if (shared / ".complete").exists():
        (home / "app").symlink_to(shared)
    port = free_port()
    while local_registry.port_open(port + 1):
        port = free_port()
    env = {"HIDDENSTATE_REGISTRY_HOME": str(home), "HIDDENSTATE_REGISTRY_PORT": str(port)}
    url = f"http://127.0.0.1:{port}/apis/ccompat/v7"
    try:
        first = registry_command("start", env)
        second = registry_command("start", env)
        status = registry_command("status", env)
        with urllib.request.urlopen(f"{url}/subjects", timeout=10) as response:
            subjects = response.read()
        listening = subprocess.run(
            ["ss", "-ltnH", f"( sport = :{port} or sport = :{port + 1} )"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
    finally:
        stopped = registry_command("stop", env)
    after = registry_command("status", env)

    assert (first.returncode, first.stdout.strip()) == (0, url), first.stderr
    assert "Schema Registry started" in first.stderr
    assert "Schema Registry already running" in second.stderr
    assert status.returncode == 0
    assert subjects == b"[]"
    # Both listeners, the API and the management interface, on loopback only (Java
    # shows an IPv4 address bound by an IPv6 socket as [::ffff:127.0.0.1]).
    hosts = sorted(line.split()[3].rsplit(":", 1)[0] for line in listening.splitlines())
    assert len(hosts) == 2
    assert set(hosts) <= {"127.0.0.1", "[::ffff:127.0.0.1]"}
    assert "Schema Registry stopped" in stopped.stderr
    assert after.returncode == 3
