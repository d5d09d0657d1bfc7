"""The pause watch tells a stand-still of the whole process from a loop that is merely busy."""

from __future__ import annotations

import time

from pipeline.pause import PauseWatch
from pipeline.testing import ManualClock


def test_notes_close_together_are_no_stand_still():
    clock = ManualClock()
    watch = PauseWatch(3.0, clock=clock)
    watch.mark()
    for _ in range(50):
        clock.advance(0.1)  # the thread notes every 0.1 s
        watch.note()
    assert watch.stood_still() == 0.0


def test_a_gap_between_two_notes_past_the_limit_is_a_stand_still():
    clock = ManualClock()
    watch = PauseWatch(3.0, clock=clock)
    watch.mark()
    clock.advance(0.1)
    watch.note()
    clock.advance(4.5)  # SIGSTOP: nothing noted
    watch.note()
    assert watch.stood_still() == 4.5


def test_a_mark_forgets_the_stand_stills_before_it():
    clock = ManualClock()
    watch = PauseWatch(3.0, clock=clock)
    clock.advance(10.0)
    watch.note()
    watch.mark()
    assert watch.stood_still() == 0.0


def test_the_thread_keeps_noting_so_a_busy_loop_never_counts_as_standing_still():
    watch = PauseWatch(0.5, interval_s=0.02).start()
    watch.mark()
    time.sleep(1.0)  # the loop busy for twice the limit, the process running
    assert watch.stood_still() == 0.0
    watch.stop()
