"""One thread that fires every delayed callback of the process (STYLE: timers owned by one
owner beat a thread per sleeping step)."""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

__all__ = ["Timers", "TimerHandle"]

log = logging.getLogger(__name__)


class TimerHandle:
    """A scheduled callback; ``cancel()`` makes it a no-op if it has not fired yet."""

    __slots__ = ("due", "callback", "cancelled")

    def __init__(self, due: float, callback: Callable[[], None]):
        self.due = due
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Timers:
    """A heap of (due time, callback) served by one daemon thread.

    Callbacks run on the timer thread and must be quick: they ``tell`` an actor or set an event.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, TimerHandle]] = []
        self._seq = itertools.count()
        self._wake = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="mantle-timers", daemon=True)
        self._thread.start()

    def schedule(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        handle = TimerHandle(time.monotonic() + max(0.0, delay), callback)
        with self._wake:
            heapq.heappush(self._heap, (handle.due, next(self._seq), handle))
            if self._heap[0][2] is handle:
                self._wake.notify()
        return handle

    def stop(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopped and (
                        not self._heap or self._heap[0][0] > time.monotonic()):
                    timeout = self._heap[0][0] - time.monotonic() if self._heap else None
                    self._wake.wait(timeout)
                if self._stopped:
                    return
                _, _, handle = heapq.heappop(self._heap)
            if handle.cancelled:
                continue
            try:
                handle.callback()
            except Exception:  # a bad callback must not kill every other timer
                log.exception("timer callback failed")
