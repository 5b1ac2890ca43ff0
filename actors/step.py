"""How one attempt of a step runs, by the kind of its action.

- ``core/log`` and ``core/fail`` finish at once and cannot block: ``run_inline`` runs them on
  the Execution actor's turn;
- ``core/sleep`` is a timer owned by the Execution actor (``sleep_seconds``): no thread;
- every other action blocks (``http/request``, plugins, AI steps, ``postgres/query``):
  ``run_on_pool`` runs it on the engine's bounded step pool, and the attempt reports back
  with an ``AttemptFinished`` message.

All are interrupted the same way: the Execution actor sets the attempt's ``CancelToken``
(which also closes an HTTP step's connection at once).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import pykka

from actors import messages as m
from actors.context import EngineContext, tell
from mantle.connectors import ConnectorError, ConnectorInterrupted, Invocation, run_action
from mantle.connectors.base import MAX_OUTPUT_BYTES, json_size, output_too_large
from mantle.connectors.core import sleep_output, sleep_seconds
from mantle.db.fields import utcnow
from mantle.metrics import Metrics

__all__ = ["is_instant", "is_sleep", "run_inline", "run_on_pool", "sleep_seconds",
           "sleep_output", "finished", "MAX_OUTPUT_BYTES"]

log = logging.getLogger(__name__)

_INSTANT = frozenset({"core/log", "core/fail"})


def is_instant(action: str) -> bool:
    """Actions that return at once and cannot block: run inline, without a thread."""
    return action in _INSTANT


def is_sleep(action: str) -> bool:
    return action == "core/sleep"


def finished(inv: Invocation, hook: bool, action: Callable[[Invocation], dict],
             metrics: Metrics, since: tuple | None = None) -> m.AttemptFinished:
    """Run ``action`` for the attempt and describe the outcome (output size checked: over
    the limit, a success fails with SPEC 4.5's error, a failure keeps its error and drops its
    partial output).

    ``since`` is (started_at, monotonic clock) when the attempt began before this call.
    """
    started_at, clock = since or (utcnow(), time.monotonic())
    ok, output, error, retryable, interrupted = False, None, None, True, False
    try:
        output = action(inv)
        ok = True
        size = json_size(output)
        if size > MAX_OUTPUT_BYTES:
            ok, output = False, None
            error = output_too_large(size)
    except ConnectorInterrupted:
        interrupted = True
    except ConnectorError as exc:
        error, output, retryable = exc.message, exc.output, exc.retryable
        interrupted = inv.cancel.is_set()
        if output is not None and json_size(output) > MAX_OUTPUT_BYTES:
            output = None  # a partial output is held to the limit too; the error stands
    except Exception as exc:  # a connector bug must fail the step, not the engine
        log.exception("connector crashed", extra=inv.log_context())
        error = f"{inv.action}: internal error: {exc}"
    metrics.connector_duration.labels(inv.action).observe(time.monotonic() - clock)
    return m.AttemptFinished(step=inv.step, attempt=inv.attempt, hook=hook, ok=ok,
                             output=output, error=error, retryable=retryable,
                             interrupted=interrupted, started_at=started_at,
                             finished_at=utcnow())


def run_inline(inv: Invocation, hook: bool, metrics: Metrics) -> m.AttemptFinished:
    """One attempt of an instant action, on the caller's thread."""
    return finished(inv, hook, run_action, metrics)


def run_on_pool(ctx: EngineContext, parent: pykka.ActorRef, inv: Invocation,
                hook: bool) -> None:
    """Run a blocking attempt on the step pool; its AttemptFinished goes to ``parent``."""
    ctx.steps.submit(lambda: tell(parent, finished(inv, hook, run_action, ctx.metrics)))
