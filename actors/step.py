"""Step actors: each runs one attempt of one step and reports how it ended.

Two kinds, picked by ``start_step`` from the action:
- ``StepActor`` (its own thread) for connectors that block: ``http/request``, plugins;
- ``SleepStepActor`` (pooled) for ``core/sleep``: it waits on a timer, not on a thread.

Both are interrupted the same way: the Execution actor sets the invocation's ``cancel`` event
and tells the step ``Interrupt``. Actions that finish at once and cannot block (``core/log``,
``core/fail``) need no actor: ``run_instant`` runs them on the Execution actor's turn.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

import pykka

from actors import messages as m
from actors.context import tell
from actors.runtime import PooledActor
from actors.timers import Timers
from mantle.connectors import ConnectorError, ConnectorInterrupted, Invocation, run_action
from mantle.connectors.core import sleep_output, sleep_seconds
from mantle.db.fields import utcnow
from mantle.metrics import Metrics

__all__ = ["StepActor", "SleepStepActor", "start_step", "is_instant", "run_instant",
           "MAX_OUTPUT_BYTES"]

log = logging.getLogger(__name__)

MAX_OUTPUT_BYTES = 1024 * 1024
_INSTANT = frozenset({"core/log", "core/fail"})


def _attempt(message: m.RunAttempt, action: Callable[[Invocation], dict], metrics: Metrics,
             since: tuple | None = None) -> m.AttemptFinished:
    """Run ``action`` for the attempt and describe the outcome (output size checked).

    ``since`` is (started_at, monotonic clock) when the attempt began before this call.
    """
    inv = message.invocation
    started_at, clock = since or (utcnow(), time.monotonic())
    ok, output, error, retryable, interrupted = False, None, None, True, False
    try:
        output = action(inv)
        ok = True
        size = len(json.dumps(output, separators=(",", ":"), ensure_ascii=False)
                   .encode("utf-8"))
        if size > MAX_OUTPUT_BYTES:
            ok, output = False, None
            error = f"step output exceeds {MAX_OUTPUT_BYTES} byte limit ({size} bytes)"
    except ConnectorInterrupted:
        interrupted = True
    except ConnectorError as exc:
        error, output, retryable = exc.message, exc.output, exc.retryable
        interrupted = inv.cancel.is_set()
    except Exception as exc:  # a connector bug must fail the step, not the engine
        log.exception("connector crashed", extra=inv.log_context())
        error = f"{inv.action}: internal error: {exc}"
    metrics.connector_duration.labels(inv.action).observe(time.monotonic() - clock)
    return m.AttemptFinished(step=inv.step, attempt=message.attempt, hook=message.hook, ok=ok,
                             output=output, error=error, retryable=retryable,
                             interrupted=interrupted, started_at=started_at,
                             finished_at=utcnow())


class StepActor(pykka.ThreadingActor):
    """Lives for one attempt of a blocking connector, on its own thread, so the Execution
    actor never waits on I/O; it interrupts the connector through ``cancel``."""

    use_daemon_thread = True

    def __init__(self, parent: pykka.ActorRef, metrics: Metrics):
        super().__init__()
        self._parent = parent
        self._metrics = metrics

    def on_receive(self, message):
        if isinstance(message, m.RunAttempt):
            try:
                tell(self._parent, _attempt(message, run_action, self._metrics))
            finally:
                self.stop()


def is_instant(action: str) -> bool:
    """Actions that return at once and cannot block: run inline, without a Step actor."""
    return action in _INSTANT


def run_instant(message: m.RunAttempt, metrics: Metrics) -> m.AttemptFinished:
    """One attempt of an instant action, on the caller's thread."""
    return _attempt(message, run_action, metrics)


class SleepStepActor(PooledActor):
    """A ``core/sleep`` attempt: a timer instead of a sleeping thread.

    Runs on the dispatcher threads; the timer and ``Interrupt`` arrive as messages.
    """

    def __init__(self, parent: pykka.ActorRef, metrics: Metrics, timers: Timers):
        super().__init__()
        self._parent = parent
        self._metrics = metrics
        self._timers = timers
        self._run: m.RunAttempt | None = None
        self._seconds = 0.0
        self._timer = None
        self._since: tuple | None = None

    def on_receive(self, message):
        if isinstance(message, m.RunAttempt):
            self._start(message)
        elif isinstance(message, m.SleepElapsed) and self._run is not None:
            self._finish(lambda inv: sleep_output(self._seconds))
        elif isinstance(message, m.Interrupt) and self._run is not None:
            if self._timer is not None:
                self._timer.cancel()
            self._finish(_interrupted)

    def _start(self, message: m.RunAttempt) -> None:
        self._run = message
        self._since = (utcnow(), time.monotonic())
        try:
            self._seconds = sleep_seconds(message.invocation)
        except ConnectorError as exc:
            self._finish(_raise(exc))
            return
        if message.invocation.cancel.is_set():
            self._finish(_interrupted)
            return
        ref = self.actor_ref
        self._timer = self._timers.schedule(self._seconds,
                                             lambda: tell(ref, m.SleepElapsed()))

    def _finish(self, action: Callable[[Invocation], dict]) -> None:
        run, self._run = self._run, None
        tell(self._parent, _attempt(run, action, self._metrics, self._since))
        self.stop()


def _interrupted(_inv: Invocation) -> dict:
    raise ConnectorInterrupted()


def _raise(exc: Exception) -> Callable[[Invocation], dict]:
    def action(_inv: Invocation) -> dict:
        raise exc
    return action


def start_step(parent: pykka.ActorRef, invocation: Invocation, metrics: Metrics,
               timers: Timers) -> pykka.ActorRef:
    """Start the right kind of Step actor for ``invocation.action``."""
    if invocation.action == "core/sleep":
        return SleepStepActor.start(parent, metrics, timers)
    return StepActor.start(parent, metrics)
