"""Bounded thread pools: blocking step attempts, and expression evaluation off the actors.

A thread is started only when a task arrives and every thread is busy, up to ``size``; a
thread idle for ``idle_seconds`` ends. So a quiet daemon holds no pool threads, a busy one at
most ``size``, and tasks beyond that wait in order (issue 11.9: no thread per in-flight HTTP
request). Not a ThreadPoolExecutor: that builds a Future per task and never lets threads go.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable

__all__ = ["ThreadPool"]

log = logging.getLogger(__name__)


class ThreadPool:
    def __init__(self, name: str, size: int, idle_seconds: float = 60.0,
                 after_task: Callable[[], None] | None = None):
        self.name = name
        self._after_task = after_task
        self.size = size
        self._idle_seconds = idle_seconds
        self._tasks: collections.deque[Callable[[], None]] = collections.deque()
        self._cond = threading.Condition()
        self._threads = 0
        self._idle = 0
        self._peak = 0
        self._count = 0

    @property
    def threads(self) -> int:
        return self._threads

    @property
    def peak(self) -> int:
        """The most threads this pool has had at once."""
        return self._peak

    @property
    def backlog(self) -> int:
        """Tasks waiting for a thread."""
        return len(self._tasks)

    def submit(self, task: Callable[[], None]) -> None:
        """Run ``task`` on a pool thread; it must handle its own errors (they are logged)."""
        with self._cond:
            self._tasks.append(task)
            if len(self._tasks) <= self._idle:  # an idle thread will take it
                self._cond.notify()
                return
            if self._threads >= self.size:
                return
            self._threads += 1
            self._peak = max(self._peak, self._threads)
            self._count += 1
            name = f"{self.name}-{self._count}"
        threading.Thread(target=self._work, name=name, daemon=True).start()

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._tasks:
                    self._idle += 1
                    woke = self._cond.wait(self._idle_seconds)
                    self._idle -= 1
                    if not woke and not self._tasks:
                        self._threads -= 1
                        return
                task = self._tasks.popleft()
            try:
                task()
            except Exception:  # the task reports its own outcome; this is the backstop
                log.exception("pool task failed", extra={"pool": self.name})
            if self._after_task is not None:
                try:
                    self._after_task()
                except Exception:
                    log.exception("pool cleanup failed", extra={"pool": self.name})
