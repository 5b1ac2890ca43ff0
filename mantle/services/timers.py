"""One thread that fires every delayed callback of the process (STYLE: timers owned by one
owner beat a thread per sleeping step).

Cancelled timers leave the heap lazily, but never wait there until their due time: when more
than half of the heap is cancelled handles, the heap is rebuilt without them, so a cancelled
24-hour sleep costs nothing for 24 hours (issue 11.9).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

__all__ = ["Timers", "TimerHandle"]

log = logging.getLogger(__name__)

# Below this size a heap is never worth rebuilding.
_COMPACT_MIN = 64
# The longest single wait of the timer thread (a day); a later due time is waited for in turns.
_LONGEST_WAIT = 86400.0


class TimerHandle:
    """A scheduled callback; ``cancel()`` makes it a no-op if it has not fired yet."""

    __slots__ = ("due", "callback", "cancelled", "_owner")

    def __init__(self, due: float, callback: Callable[[], None], owner: Timers):
        self.due = due
        self.callback = callback
        self.cancelled = False
        self._owner = owner

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self.callback = None  # drop what it holds (an actor ref, a message) at once
            self._owner._cancelled_one()


class Timers:
    """A heap of (due time, callback) served by one daemon thread.

    Callbacks run on the timer thread and must be quick: they ``tell`` an actor or set an event.
    """

    def __init__(self, name: str = "mantle-timers") -> None:
        self._heap: list[tuple[float, int, TimerHandle]] = []
        self._seq = itertools.count()
        self._wake = threading.Condition()
        self._cancelled = 0
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def __len__(self) -> int:
        """Timers waiting, cancelled ones included until the next compaction."""
        return len(self._heap)

    def schedule(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        handle = TimerHandle(time.monotonic() + max(0.0, delay), callback, self)
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

    def _cancelled_one(self) -> None:
        with self._wake:
            self._cancelled += 1
            if self._cancelled * 2 > len(self._heap) >= _COMPACT_MIN:
                self._heap = [entry for entry in self._heap if not entry[2].cancelled]
                heapq.heapify(self._heap)
                self._cancelled = 0

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopped and (
                        not self._heap or self._heap[0][0] > time.monotonic()):
                    timeout = self._heap[0][0] - time.monotonic() if self._heap else None
                    # A wait longer than a lock can do raised OverflowError and ended the
                    # thread, and with it every timer of the process; the due time is
                    # looked at again on waking anyway.
                    self._wake.wait(None if timeout is None else min(timeout, _LONGEST_WAIT))
                if self._stopped:
                    return
                _, _, handle = heapq.heappop(self._heap)
                if handle.cancelled:
                    self._cancelled = max(0, self._cancelled - 1)
                    continue
                callback, handle.callback = handle.callback, None
                handle.cancelled = True  # fired: a later cancel() is a no-op
            try:
                callback()
            except Exception:  # a bad callback must not kill every other timer
                log.exception("timer callback failed")
