"""Step actor: runs one attempt of one step and reports how it ended."""

from __future__ import annotations

import json
import logging
import time

import pykka

from actors.messages import AttemptFinished, RunAttempt
from mantle.connectors import ConnectorError, ConnectorInterrupted, run_action
from mantle.db.fields import utcnow
from mantle.metrics import Metrics

__all__ = ["StepActor", "MAX_OUTPUT_BYTES"]

log = logging.getLogger(__name__)

MAX_OUTPUT_BYTES = 1024 * 1024


class StepActor(pykka.ThreadingActor):
    """Lives for one attempt. Runs on its own thread, so a blocking connector never stalls
    the Execution actor, which interrupts it through the invocation's ``cancel`` event."""

    use_daemon_thread = True

    def __init__(self, parent: pykka.ActorRef, metrics: Metrics):
        super().__init__()
        self._parent = parent
        self._metrics = metrics

    def on_receive(self, message):
        if isinstance(message, RunAttempt):
            try:
                self._parent.tell(self._run(message))
            finally:
                self.stop()

    def _run(self, message: RunAttempt) -> AttemptFinished:
        inv = message.invocation
        started_at, clock = utcnow(), time.monotonic()
        ok, output, error, retryable, interrupted = False, None, None, True, False
        try:
            output = run_action(inv)
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
        self._metrics.connector_duration.labels(inv.action).observe(time.monotonic() - clock)
        return AttemptFinished(step=inv.step, attempt=message.attempt, hook=message.hook,
                               ok=ok, output=output, error=error, retryable=retryable,
                               interrupted=interrupted, started_at=started_at,
                               finished_at=utcnow())
