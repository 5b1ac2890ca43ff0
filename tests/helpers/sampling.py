"""Watch a workflow's ``running`` executions through the REST API while a test goes on.

``RunningSampler`` asks ``GET /api/v1/executions?workflow=W&status=running`` every 50 ms on a
thread of its own and keeps every answer, so a test can check afterwards that a limit
(``max_parallel_executions``) was never exceeded and in which order executions ran. The base
URL comes from a callable, so the sampler follows a daemon that is killed and restarted; a
sample that finds no daemon listening is skipped.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from tests.web.support import call

__all__ = ["RunningSampler"]


class RunningSampler:
    def __init__(self, base_url: Callable[[], str | None], workflow: str,
                 every: float = 0.05, headers: dict[str, str] | None = None):
        self._base_url = base_url
        self._path = f"/api/v1/executions?workflow={workflow}&status=running&limit=100"
        self._every = every
        self._headers = headers or {}
        self.samples: list[tuple[float, tuple[str, ...]]] = []  # (monotonic, running ids)
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="running-sampler", daemon=True)

    def __enter__(self) -> RunningSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    @property
    def most_running(self) -> int:
        """The most executions any one sample saw running."""
        return max((len(ids) for _, ids in self.samples), default=0)

    def over(self, limit: int) -> list[tuple[float, tuple[str, ...]]]:
        """The samples that saw more than ``limit`` executions running."""
        return [sample for sample in self.samples if len(sample[1]) > limit]

    def running_order(self) -> list[str]:
        """Execution ids in the order they were first seen running."""
        order: list[str] = []
        for _, ids in self.samples:
            order.extend(i for i in sorted(ids) if i not in order)
        return order

    def _loop(self) -> None:
        """Runs on the sampler thread until ``stop``."""
        while not self._stop.is_set():
            started = time.monotonic()
            base = self._base_url()
            if base is not None:
                try:
                    reply = call(base, "GET", self._path, headers=self._headers, timeout=5)
                except OSError:  # the daemon is down (killed, restarting)
                    reply = None
                if reply is not None and reply.status == 200:
                    ids = tuple(e["id"] for e in reply.json["executions"])
                    self.samples.append((started, ids))
                elif reply is not None:
                    self.errors += 1
            self._stop.wait(max(0.0, self._every - (time.monotonic() - started)))
