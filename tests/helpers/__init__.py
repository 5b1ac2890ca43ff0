"""Shared test helpers (servers, fixtures, background calls) used across the test packages."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

__all__ = ["Background"]


class Background:
    """Run ``func()`` on a daemon thread; keep its result or exception and when it ended.

    For tests that interrupt a blocking call from outside and measure how fast it gives up.
    """

    def __init__(self, func: Callable[[], Any]):
        self.result: Any = None
        self.error: BaseException | None = None
        self.ended_at: float | None = None
        self._func = func
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.result = self._func()
        except BaseException as exc:  # handed to the test thread
            self.error = exc
        finally:
            self.ended_at = time.monotonic()

    def join(self, timeout: float = 5.0) -> "Background":
        """Wait for the call to end; AssertionError if it is still running at the deadline."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"call still running after {timeout}s")
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive()
