"""Shared test helpers (servers, fixtures, background calls) used across the test packages."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Any, Callable

__all__ = ["Background", "cancelled_once_accepted", "refusing_port"]


@contextlib.contextmanager
def refusing_port():
    """A local port that refuses connections while the block runs: bound, never listening,
    so no other test's server can take it meanwhile (a port only probed free and closed
    could be taken by any server that binds port 0, as test targets and clusters do)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


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


def cancelled_once_accepted(call: Callable[[int, threading.Event], Any]
                            ) -> tuple[Background, float]:
    """Run ``call(port, cancel)`` against a local server that accepts the connection and
    never says a word (a TLS handshake or a protocol's startup left unanswered); set
    ``cancel`` once the connection is accepted. Returns the ended call and how many seconds
    after the cancel it ended."""
    from tests.helpers.waiting import wait_until

    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(listener.accept()[0]), daemon=True).start()
    cancel = threading.Event()
    try:
        ongoing = Background(lambda: call(listener.getsockname()[1], cancel))
        wait_until(lambda: accepted, timeout=5, message="the server accepted no connection")
        cancelled_at = time.monotonic()
        cancel.set()
        ongoing.join(10)
    finally:
        for sock in accepted + [listener]:
            sock.close()
    return ongoing, ongoing.ended_at - cancelled_at
