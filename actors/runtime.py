"""A pykka actor type that shares a small pool of threads instead of owning one.

``pykka.ThreadingActor`` gives every actor an OS thread. An orchestrator with thousands of
executions then spends its time creating threads (about 1 ms each once the GIL is contended,
serialised in the Supervisor) and holds thousands of stacks while executions merely wait.
Actors whose handlers never block — Execution actors, and steps that only wait on a timer —
run here instead: each message is handled on one of a few dispatcher threads, still one
message at a time per actor and in order, with pykka's own ``ActorRef``, ``tell``/``ask``,
futures, ``stop`` and failure handling.

Handlers of a ``PooledActor`` must not block (no sleeping, no network, no waiting on another
actor): a blocked handler holds a dispatcher thread that other actors need.
"""

from __future__ import annotations

import collections
import logging
import queue
import sys
import threading
from typing import Any

import pykka

__all__ = ["PooledActor", "DISPATCHER_THREADS"]

log = logging.getLogger(__name__)

DISPATCHER_THREADS = 8
# Messages one actor may handle before yielding its dispatcher thread to the others.
_FAIRNESS = 64

class _Dispatcher:
    """Worker threads taking runnable actors from one queue.

    Not a ThreadPoolExecutor: that builds a Future (and its Condition) per submission, which
    profiling showed as a tenth of the daemon's CPU under load.
    """

    def __init__(self, threads: int):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        for index in range(threads):
            threading.Thread(target=self._work, name=f"mantle-actor-{index}",
                             daemon=True).start()

    def submit(self, function) -> None:
        self._queue.put(function)

    def _work(self) -> None:
        while True:
            function = self._queue.get()
            try:
                function()
            except Exception:  # PooledActor handles its own errors; this is the backstop
                log.exception("dispatcher task failed")


_pool: _Dispatcher | None = None
_pool_lock = threading.Lock()


def _dispatcher() -> _Dispatcher:
    global _pool
    if _pool is None:
        with _pool_lock:
            if _pool is None:
                _pool = _Dispatcher(DISPATCHER_THREADS)
    return _pool


class _Inbox:
    """A FIFO that schedules its actor on the dispatcher when a message arrives."""

    __slots__ = ("_items", "_lock", "_scheduled", "_actor")

    def __init__(self) -> None:
        self._items: collections.deque[Any] = collections.deque()
        self._lock = threading.Lock()
        self._scheduled = False
        self._actor: PooledActor | None = None

    def put(self, envelope: Any, /) -> None:
        with self._lock:
            self._items.append(envelope)
            if self._scheduled or self._actor is None:
                return
            self._scheduled = True
        _dispatcher().submit(self._actor._drain)

    def get(self) -> Any:
        with self._lock:
            return self._items.popleft()

    def empty(self) -> bool:
        with self._lock:
            return not self._items

    def attach(self, actor: PooledActor) -> None:
        with self._lock:
            self._actor = actor
            self._scheduled = True
        _dispatcher().submit(actor._run_start)

    def take_or_release(self) -> Any | None:
        """The next message, or None after marking the actor idle (atomically)."""
        with self._lock:
            if self._items:
                return self._items.popleft()
            self._scheduled = False
            return None

    def reschedule(self) -> None:
        _dispatcher().submit(self._actor._drain)


class PooledActor(pykka.Actor):
    """An actor without a thread of its own; see the module docstring."""

    @staticmethod
    def _create_actor_inbox() -> _Inbox:
        return _Inbox()

    @staticmethod
    def _create_future() -> pykka.Future[Any]:
        return pykka.ThreadingFuture()

    def _start_actor_loop(self) -> None:
        self.actor_inbox.attach(self)

    def _run_start(self) -> None:
        try:
            self._actor_loop_setup()
        except Exception:
            log.exception("actor start failed", extra={"actor": str(self)})
        self._drain()

    def _drain(self) -> None:
        """Handle queued messages on the current dispatcher thread, then go idle."""
        try:
            self._drain_some()
        except Exception:  # the executor would swallow it: make it visible
            log.exception("actor dispatch failed", extra={"actor": str(self)})

    def _drain_some(self) -> None:
        for _ in range(_FAIRNESS):
            if self.actor_stopped.is_set():
                self._actor_loop_teardown()
                return
            envelope = self.actor_inbox.take_or_release()
            if envelope is None:
                return
            self._handle_envelope(envelope)
        self.actor_inbox.reschedule()

    def _handle_envelope(self, envelope: Any) -> None:
        # The body of pykka's ThreadingActor loop, for one message.
        try:
            response = self._handle_receive(envelope.message)
            if envelope.reply_to is not None:
                envelope.reply_to.set(response)
        except Exception:
            if envelope.reply_to is not None:
                envelope.reply_to.set_exception()
            else:
                self._handle_failure(*sys.exc_info())
                try:
                    self.on_failure(*sys.exc_info())
                except Exception:
                    self._handle_failure(*sys.exc_info())
        except BaseException:  # as in pykka: stop everything on KeyboardInterrupt etc.
            self._stop()
            pykka.ActorRegistry.stop_all()
        if self.actor_stopped.is_set():
            self._actor_loop_teardown()

