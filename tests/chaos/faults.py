"""The scenarios: faults at random moments (from a seeded generator) while events flow.

Each scenario returns the faults it caused, with the second of the run at
which each came. Loops are bounded by a count; every wait is bounded too.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from tests.chaos.broker import Broker
from tests.chaos.servers import ReplicaSet

SESSION_TIMEOUT_S = 6.0


@dataclass(frozen=True)
class Fault:
    kind: str
    at_s: float
    detail: str = ""


class Clock:
    def __init__(self) -> None:
        self.started = time.monotonic()

    def now(self) -> float:
        return round(time.monotonic() - self.started, 1)


Scenario = Callable[[Broker, ReplicaSet, random.Random, int], list[Fault]]


def kill_loop(broker: Broker, replicas: ReplicaSet, rng: random.Random, count: int) -> list[Fault]:
    """Two replicas; `count` times, kill -9 one of them at a random moment (the supervisor
    restarts it a second later, as a kubelet would)."""
    clock, faults = Clock(), []
    replicas.scale(2)
    time.sleep(4.0)
    for _ in range(count):
        time.sleep(rng.uniform(1.0, 4.0))
        running = replicas.running()
        if not running:
            continue
        slot = rng.choice(running)
        replicas.kill(slot)
        faults.append(Fault("kill -9", clock.now(), f"replica {slot}"))
    return faults


def pause(broker: Broker, replicas: ReplicaSet, rng: random.Random, count: int) -> list[Fault]:
    """Two replicas; `count` times, SIGSTOP one past the session timeout, then SIGCONT."""
    clock, faults = Clock(), []
    replicas.scale(2)
    time.sleep(5.0)
    for _ in range(count):
        time.sleep(rng.uniform(1.0, 4.0))
        slot = rng.choice(replicas.running() or [0])
        stood = SESSION_TIMEOUT_S + rng.uniform(2.0, 5.0)
        replicas.pause(slot)
        time.sleep(stood)
        replicas.resume(slot)
        faults.append(
            Fault("SIGSTOP past the session", clock.now(), f"replica {slot}, {stood:.1f} s")
        )
        time.sleep(rng.uniform(3.0, 6.0))
    return faults


def scale(broker: Broker, replicas: ReplicaSet, rng: random.Random, count: int) -> list[Fault]:
    """`count` cycles of 1 -> 3 -> 1 replicas, with a kill -9 of one replica in between."""
    clock, faults = Clock(), []
    replicas.scale(1)
    time.sleep(4.0)
    for _ in range(count):
        replicas.scale(3)
        faults.append(Fault("scale 1 -> 3", clock.now()))
        time.sleep(rng.uniform(3.0, 7.0))
        slot = rng.choice(replicas.running())
        replicas.kill(slot)
        faults.append(Fault("kill -9", clock.now(), f"replica {slot} of 3"))
        time.sleep(rng.uniform(2.0, 5.0))
        replicas.scale(1)
        faults.append(Fault("scale 3 -> 1", clock.now()))
        time.sleep(rng.uniform(2.0, 4.0))
    return faults


def broker_restart(
    broker: Broker, replicas: ReplicaSet, rng: random.Random, count: int
) -> list[Fault]:
    """Two replicas; `count` times, kill the broker (-9), and start it again a few seconds
    later (`Broker.crash` says why not a graceful stop)."""
    clock, faults = Clock(), []
    replicas.scale(2)
    time.sleep(5.0)
    for _ in range(count):
        time.sleep(rng.uniform(2.0, 5.0))
        broker.crash()
        away = rng.uniform(2.0, 8.0)
        time.sleep(away)
        broker.start()
        faults.append(Fault("broker kill/start", clock.now(), f"away {away:.1f} s + its start"))
        time.sleep(rng.uniform(4.0, 8.0))
    return faults


def network_cut(
    broker: Broker, replicas: ReplicaSet, rng: random.Random, count: int
) -> list[Fault]:
    """Two replicas; `count` times, cut the link between them and the broker (resets, or a
    blackhole that drops everything), and restore it."""
    clock, faults = Clock(), []
    replicas.scale(2)
    time.sleep(5.0)
    for i in range(count):
        time.sleep(rng.uniform(2.0, 5.0))
        how = "reset" if i % 2 == 0 else "blackhole"
        (broker.proxy.cut if how == "reset" else broker.proxy.blackhole)()
        away = rng.uniform(3.0, 12.0)
        time.sleep(away)
        broker.proxy.restore()
        faults.append(Fault(f"network cut ({how})", clock.now(), f"{away:.1f} s"))
        time.sleep(rng.uniform(4.0, 8.0))
    return faults


SCENARIOS: dict[str, Scenario] = {
    "kill-9": kill_loop,
    "pause": pause,
    "scale": scale,
    "broker-restart": broker_restart,
    "network-cut": network_cut,
}
