"""The last bound: a server whose loop stops turning exits, with the reason.

Every wait of the loop has a timeout of its own, and long waits that make
progress (a restore, a broker outage) beat the liveness heartbeat as they
go. What is left is a call that does not return although it should: a
client library waiting past its own timeout (librdkafka issue #3013 is one
such report), a deadlock. Kubernetes' liveness probe would restart such a
pod; this watchdog does the same everywhere: when the loop has not beaten
for `timeout_s`, it logs every thread's stack (where it is stuck) and ends
the process with exit code 70 (EX_SOFTWARE), so a supervisor restarts it.
A restart replays from the last commit: nothing is lost.

After a stop was asked for (SIGTERM), the loop gets `stop_timeout_s` to
finish its batch, checkpoint and leave; then the watchdog ends it too.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
import threading
import time
from collections.abc import Callable

from pipeline.health import LoopState

log = logging.getLogger(__name__)

EXIT_STUCK = 70


class Watchdog:
    """Ends the process when the loop stops beating, or outlives a requested stop."""

    def __init__(
        self,
        health: LoopState,
        timeout_s: float,
        stop_timeout_s: float,
        exit: Callable[[int], None] = os._exit,
        interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._health = health
        self._timeout_s = timeout_s
        self._stop_timeout_s = stop_timeout_s
        self._exit = exit
        self._interval_s = interval_s
        self._clock = clock
        self._stop_asked: float | None = None
        self._done = threading.Event()

    def start(self) -> Watchdog:
        """Watch from a daemon thread."""
        threading.Thread(target=self._watch, name="hiddenstate-watchdog", daemon=True).start()
        return self

    def stopping(self) -> None:
        """A stop was asked for: from now on the loop has `stop_timeout_s` to end."""
        if self._stop_asked is None:
            self._stop_asked = self._clock()

    def close(self) -> None:
        """The loop ended: stop watching."""
        self._done.set()

    def check(self) -> str:
        """Why the process must end now, or "" (the thread calls this every interval)."""
        _, why = self._health.live()
        still = why["last_beat_seconds_ago"]
        if still > self._timeout_s:
            return (
                f"the serving loop has not turned for {still:.0f} s "
                f"(bound {self._timeout_s:.0f} s): a call that should have returned did not"
            )
        if self._stop_asked is not None:
            waited = self._clock() - self._stop_asked
            if waited > self._stop_timeout_s:
                return f"the stop asked for {waited:.0f} s ago did not finish"
        return ""

    def _watch(self) -> None:
        while not self._done.wait(self._interval_s):
            reason = self.check()
            if reason:
                log.critical("%s; the threads are at:", reason)
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                log.critical("exiting with code %d so that the server is restarted", EXIT_STUCK)
                self._exit(EXIT_STUCK)
                return
