"""What every actor of one engine shares: the journal, timers, metrics and settings."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Mapping

import pykka

from mantle.metrics import Metrics
from mantle.services.channel import CancelChannel
from mantle.services.journal import Journal
from mantle.services.nodes import NodeLease
from mantle.services.pools import ThreadPool
from mantle.services.timers import Timers

__all__ = ["EngineContext", "Reply", "tell", "internal_error"]


def internal_error(reason: str) -> str:
    """The ``error`` of an execution ended by an engine or storage failure (13.1.12):
    ``internal error: <reason>``, the reason on one line and at most 200 characters."""
    return f"internal error: {' '.join(reason.split())[:200] or 'unknown'}"


def tell(ref: pykka.ActorRef, message) -> None:
    """``ref.tell`` for callbacks that may outlive the actor (journal, timers): a message to
    an actor that already stopped is dropped, not an error."""
    try:
        ref.tell(message)
    except pykka.ActorDeadError:
        pass


class Reply:
    """A one-shot answer from an engine thread to a caller waiting outside the actors.

    Used instead of ``pykka.ThreadingFuture`` for ``Engine.run`` and ``Engine.cancel``: that
    future is a ``queue.Queue`` (three Conditions) per answer, and waking its waiter showed
    as a tenth of the daemon's time under REST load. A held lock released once is the
    cheapest wake-up there is. ``get`` raises ``pykka.Timeout`` like the future did.
    """

    __slots__ = ("_lock", "_value", "_error", "_turn")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()
        self._value = self._error = None
        # Taken once, by the first answer or by a caller that gives up (``abandon``):
        # ``list.pop`` is atomic, so exactly one of them gets it.
        self._turn = [True]

    def set(self, value=None) -> bool:
        """Answer; False when the answer is not taken: the caller gave up, or an earlier
        answer counts."""
        return self._answer(value, None)

    def set_exception(self, exc_info) -> bool:
        return self._answer(None, exc_info[1])

    def _answer(self, value, error: BaseException | None) -> bool:
        try:
            self._turn.pop()
        except IndexError:
            return False
        self._value, self._error = value, error
        self._lock.release()
        return True

    def abandon(self) -> bool:
        """Stop waiting for good: True when no answer came first (none will be taken
        now); False when one did, which ``get`` then returns at once."""
        try:
            self._turn.pop()
        except IndexError:
            return False
        return True

    def get(self, timeout: float | None = None):
        if not self._lock.acquire(timeout=-1 if timeout is None else timeout):
            raise pykka.Timeout(f"no answer within {timeout} seconds")
        self._lock.release()  # answered: later calls return at once
        if self._error is not None:
            raise self._error
        return self._value


@dataclasses.dataclass(frozen=True, slots=True)
class EngineContext:
    """The services of one engine, shared by its actors (all thread-safe)."""

    journal: Journal
    timers: Timers
    metrics: Metrics
    node: NodeLease          # this process's node id, lease and database clock
    plugins_dir: str
    env: Mapping[str, str]
    secrets: Mapping[str, str]  # where MANTLE_SECRET_* are read (os.environ in production)
    channel: CancelChannel   # cancels to other nodes of this host
    steps: ThreadPool        # blocking attempts (http/request, plugins, ...)
    evaluation: ThreadPool   # ``if``, templates and credentials, off the dispatcher threads
    max_depth: int = 10      # engine.max_workflow_depth (sub-workflows, SPEC 13.3)

    @property
    def node_id(self) -> str:
        return self.node.id
