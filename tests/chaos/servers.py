"""`hiddenstate serve` replicas as a StatefulSet runs them, and the supervisor that restarts them.

Each replica has a slot: a fixed metrics port and log file. A replica that
exits by itself is restarted by the supervisor after a second, as a
Kubernetes kubelet would (an exit with the reason is how a server that
cannot progress asks for that); each such exit is counted with its code and
the end of its log. A replica whose loop stopped turning without exiting,
or that does not end within its grace period after SIGTERM, is a hang:
counted, then killed.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.ports import free_port

REPO = Path(__file__).resolve().parents[2]
GRACE_S = 150.0  # the server's own stop bound is 90 s (pipeline/watchdog.py)
HANG_S = 120.0  # /healthz failing this long without the process exiting


@dataclass
class Exit:
    slot: int
    code: int
    log_tail: str


@dataclass
class Replica:
    """One slot of the set: a process when it runs, and why it ended when it did."""

    slot: int
    port: int
    log: Path
    process: subprocess.Popen[bytes] | None = None
    killed: bool = False  # by the campaign: its end is not an unexpected exit
    unhealthy_since: float | None = None


@dataclass
class ReplicaSet:
    """Starts, kills, pauses and stops replicas of one configuration."""

    args: list[str]
    logs: Path
    replicas: dict[int, Replica] = field(default_factory=dict)
    exits: list[Exit] = field(default_factory=list)
    hangs: list[str] = field(default_factory=list)
    restarts: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._supervisor = threading.Thread(target=self._supervise, daemon=True)
        self._supervisor.start()

    def scale(self, count: int) -> None:
        """Run slots 0..count-1 (start the missing ones); stop the slots above, gracefully."""
        for slot in range(count):
            self.start(slot)
        for slot in sorted(self.replicas):
            if slot >= count:
                self.stop(slot)

    def start(self, slot: int) -> None:
        with self._lock:
            replica = self.replicas.get(slot)
            if replica is None:
                replica = self.replicas[slot] = Replica(
                    slot, free_port(), self.logs / f"replica-{slot}.log"
                )
            if replica.process is not None and replica.process.poll() is None:
                return
            replica.killed = False
            replica.unhealthy_since = None
            with replica.log.open("ab") as out:
                replica.process = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "pipeline.cli",
                        "serve",
                        "--metrics-host",
                        "127.0.0.1",
                        "--metrics-port",
                        str(replica.port),
                        *self.args,
                    ],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=REPO,
                )

    def running(self) -> list[int]:
        return [
            s
            for s, r in sorted(self.replicas.items())
            if r.process is not None and r.process.poll() is None
        ]

    def kill(self, slot: int) -> None:
        """kill -9, then the supervisor's restart (as a pod's)."""
        replica = self.replicas[slot]
        if replica.process is not None and replica.process.poll() is None:
            replica.killed = True
            replica.process.send_signal(signal.SIGKILL)
            replica.process.wait()

    def pause(self, slot: int) -> None:
        process = self.replicas[slot].process
        if process is not None:
            process.send_signal(signal.SIGSTOP)

    def resume(self, slot: int) -> None:
        process = self.replicas[slot].process
        if process is not None:
            process.send_signal(signal.SIGCONT)

    def stop(self, slot: int) -> None:
        """SIGTERM and wait for the end; one that outlives its grace is a hang."""
        with self._lock:
            replica = self.replicas.pop(slot, None)
        if replica is None or replica.process is None or replica.process.poll() is not None:
            return
        replica.killed = True
        replica.process.send_signal(signal.SIGCONT)  # a paused one must be able to end
        replica.process.send_signal(signal.SIGTERM)
        try:
            code = replica.process.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            self.hangs.append(f"replica {slot} still running {GRACE_S:.0f} s after SIGTERM")
            replica.process.kill()
            replica.process.wait()
            return
        if code != 0:
            self.exits.append(Exit(slot, code, _tail(replica.log)))

    def close(self) -> None:
        for slot in list(self.replicas):
            self.stop(slot)
        self._stop.set()
        self._supervisor.join()

    def healthy(self, slot: int) -> bool:
        replica = self.replicas.get(slot)
        if replica is None:
            return False
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{replica.port}/healthz", timeout=2
            ) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def _supervise(self) -> None:
        while not self._stop.wait(1.0):
            with self._lock:
                replicas = list(self.replicas.values())
            for replica in replicas:
                process = replica.process
                if process is None:
                    continue
                code = process.poll()
                if code is not None:
                    if not replica.killed:
                        self.exits.append(Exit(replica.slot, code, _tail(replica.log)))
                    self.restarts += 1
                    time.sleep(1.0)
                    if replica.slot in self.replicas:
                        self.start(replica.slot)
                    continue
                self._check_hang(replica)

    def _check_hang(self, replica: Replica) -> None:
        if _state(replica) == "T":  # stopped by the campaign on purpose
            replica.unhealthy_since = None
            return
        if self.healthy(replica.slot):
            replica.unhealthy_since = None
            return
        now = time.monotonic()
        if replica.unhealthy_since is None:
            replica.unhealthy_since = now
        elif now - replica.unhealthy_since > HANG_S and replica.process is not None:
            self.hangs.append(
                f"replica {replica.slot}: /healthz failing for {HANG_S:.0f} s without an exit\n"
                + _tail(replica.log)
            )
            replica.killed = True
            replica.process.kill()


def _state(replica: Replica) -> str:
    if replica.process is None:
        return ""
    try:
        stat = Path(f"/proc/{replica.process.pid}/stat").read_text()
    except FileNotFoundError:
        return ""
    return stat.rsplit(")", 1)[1].split()[0]


def _tail(log: Path, lines: int = 25) -> str:
    try:
        text = log.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return ""
    return "\n".join(line[:300] for line in text[-lines:] if not line.startswith("%"))
