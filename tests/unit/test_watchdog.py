"""The watchdog ends a loop that stopped turning, or a stop that does not finish."""

from __future__ import annotations

import time

from pipeline.health import LoopState
from pipeline.testing import ManualClock
from pipeline.watchdog import EXIT_STUCK, Watchdog


def watchdog(clock: ManualClock, exits: list[int]) -> tuple[Watchdog, LoopState]:
    health = LoopState(liveness_timeout_seconds=60.0, clock=clock)
    return Watchdog(
        health, timeout_s=90.0, stop_timeout_s=120.0, exit=exits.append, clock=clock
    ), health


def test_a_loop_that_beats_is_left_alone():
    clock, exits = ManualClock(), []
    dog, health = watchdog(clock, exits)
    for _ in range(10):
        clock.advance(30.0)
        health.beat()
        assert dog.check() == ""


def test_a_loop_silent_past_its_own_bound_is_a_reason_to_exit():
    clock, _ = ManualClock(), []
    dog, _ = watchdog(clock, [])
    clock.advance(75.0)  # past liveness (60 s) but within the watchdog's 90 s
    assert dog.check() == ""
    clock.advance(20.0)
    assert "has not turned for 95 s (bound 90 s)" in dog.check()


def test_a_stop_that_does_not_finish_in_time_is_a_reason_to_exit():
    clock = ManualClock()
    dog, health = watchdog(clock, [])
    dog.stopping()
    clock.advance(60.0)
    health.beat()
    assert dog.check() == ""
    clock.advance(61.0)
    health.beat()
    assert "the stop asked for 121 s ago did not finish" in dog.check()


def test_the_watching_thread_exits_with_the_stuck_code():
    clock, exits = ManualClock(), []
    health = LoopState(liveness_timeout_seconds=60.0, clock=clock)
    dog = Watchdog(health, 1.0, 10.0, exit=exits.append, interval_s=0.01, clock=clock).start()
    clock.advance(5.0)
    for _ in range(200):
        if exits:
            break
        time.sleep(0.01)
    dog.close()
    assert exits == [EXIT_STUCK]
