"""Notice that the whole process stood still: the early half of fencing.

A consumer paused past its session timeout (SIGSTOP, a frozen VM, a node
starved of CPU) has been evicted from the group before it runs again, but it
learns that only at its next heartbeat or poll, and whatever it sends first
still reaches the broker. Transactions make such late writes harmless (see
`pipeline.delivery`); this watch keeps most of them from being made at all.

A daemon thread notes the time every `interval_s`. When the process is
stopped, the thread is stopped with it, so the gap between two of its notes
is how long everything stood still. The loop `mark`s the start of each
iteration and, before sending what it served, asks whether a gap since then
reached `limit_s` (half the session timeout): then it sends nothing, and
rewinds to the last commit instead.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class PauseWatch:
    """Measures the longest stand-still of the process since the last `mark`."""

    def __init__(
        self,
        limit_s: float,
        interval_s: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit_s = limit_s
        self._interval_s = interval_s
        self._clock = clock
        self._last = clock()
        self._longest = 0.0
        self._lock = threading.Lock()  # noted by the thread and the loop
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> PauseWatch:
        """Start the watching thread (a daemon: it never holds the process up)."""
        self._thread = threading.Thread(target=self._watch, name="hiddenstate-pause", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """End the watching thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)

    def mark(self) -> None:
        """Forget stand-stills before now."""
        with self._lock:
            self._note()
            self._longest = 0.0

    def note(self) -> None:
        """Note the time (the thread does this every `interval_s`; tests call it)."""
        with self._lock:
            self._note()

    def _note(self) -> None:
        now = self._clock()
        self._longest = max(self._longest, now - self._last)
        self._last = now

    def stood_still(self) -> float:
        """The longest stand-still since the last `mark`, in seconds, if it reached the
        limit (the member may have been evicted meanwhile); else 0."""
        with self._lock:
            self._note()
            return self._longest if self._longest >= self.limit_s else 0.0

    def _watch(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.note()
