"""Timers, hooks, the end, cancel and shutdown of an Execution actor (SPEC 4.6-4.8).

A mixin of ``actors.execution.ExecutionActor``, split out to keep each module readable; it
uses that actor's state and runs, like it, on a dispatcher thread one message at a time.
"""

from __future__ import annotations

import logging
import threading
import time

import pykka

from actors import messages as m
from actors.context import tell
from mantle import store
from mantle.states import StepStatus as S
from mantle.workflow import Step

__all__ = ["ExecutionLifecycle"]

log = logging.getLogger("mantle.engine")


class _Run:
    """The live state of one step (main or hook) in this execution."""

    __slots__ = ("spec", "block", "status", "attempt", "resume_attempt", "output", "error",
                 "started_at", "completed_at", "params", "credential", "cancel", "reason",
                 "busy", "timer", "actor", "progress")

    def __init__(self, spec: Step, block: str | None = None):
        self.spec = spec
        self.block = block
        self.status = S.PENDING
        self.attempt = 0
        self.resume_attempt = None
        self.output = self.error = self.started_at = self.completed_at = None
        self.params = self.credential = None
        self.cancel: threading.Event | None = None
        self.reason: str | None = None
        self.busy: str | None = None  # writing | running | backoff | slot
        self.timer = None
        self.actor: pykka.ActorRef | None = None
        self.progress = None  # the running attempt's last checkpoint (resume)

    @property
    def resolved(self) -> bool:
        return self.status in (S.COMPLETED, S.SKIPPED) or (
            self.status == S.FAILED and self.spec.continue_on_error)

    @property
    def blocks_dependents(self) -> bool:
        return self.status == S.CANCELLED or (
            self.status == S.FAILED and not self.spec.continue_on_error)

    def cel_entry(self) -> dict:
        output = {} if self.status == S.SKIPPED else self.output
        return {"output": output, "error": self.error, "status": str(self.status)}


class ExecutionLifecycle:
    # --- timers ---

    def _on_TimerFired(self, message: m.TimerFired) -> None:
        getattr(self, "_timer_" + message.kind)(message)

    def _timer_step_timeout(self, message: m.TimerFired) -> None:
        run = self._run_of(message.step, self._phase == "hooks")
        if run and run.attempt == message.attempt and run.busy == "running":
            self._interrupt(run, "timeout")

    def _timer_retry(self, message: m.TimerFired) -> None:
        run = self._run_of(message.step, self._phase == "hooks")
        if run and run.attempt == message.attempt and run.busy == "backoff":
            self._launch(run)

    def _timer_workflow_timeout(self, _message) -> None:
        if self._phase != "main":
            return
        self._timed_out = True
        error = f"workflow timed out after {self._wf.timeout}"
        for run in self._steps.values():
            if run.busy == "running":
                self._interrupt(run, "workflow_timeout")
            elif run.busy == "backoff":
                run.timer.cancel()
                self._finish(run, S.FAILED, error=error)
        self._schedule()

    def _timer_hooks_timeout(self, _message) -> None:
        self._hooks_timed_out = True
        if self._hook is not None and self._hook.busy == "running":
            self._interrupt(self._hook, "hooks_timeout")
        elif self._hook is not None and self._hook.busy == "backoff":
            self._hook.timer.cancel()
            self._finish(self._hook, S.FAILED,
                         error=f"hooks timed out after {self._wf.hooks.timeout}")

    @staticmethod
    def _interrupt(run: _Run, reason: str) -> None:
        run.reason = reason
        run.cancel.set()
        if run.actor is not None:
            tell(run.actor, m.Interrupt())

    # --- hooks and the end ---

    def _main_done(self) -> None:
        for handle in self._timers:
            handle.cancel()
        self._main_ms = int((time.monotonic() - self._running_since) * 1000)
        self._outcome = self._outcome_for(self._first_failure)
        self._phase = "hooks"
        hooks = self._wf.hooks
        self._hooks = self._hooks_to_run(self._outcome[0])
        if self._hooks and hooks.timeout_seconds:
            self._schedule_timer(hooks.timeout_seconds, m.TimerFired("hooks_timeout"))
        self._next_hook()

    def _next_hook(self) -> None:
        while self._hooks and not self._hooks_timed_out and not self._shutdown:
            block, spec = self._hooks.pop(0)
            if block in self._stopped_blocks:
                continue
            self._hook = _Run(spec, block)
            self._ready(self._hook)
            return
        self._hook = None
        if self._shutdown:
            self._maybe_leave()
            return
        status, error = self._outcome
        self._write(lambda: store.finish_execution(self._id, status, error), "finished")

    def _after_hook(self, run: _Run) -> None:
        self._hook_results[run.spec.name] = run.cel_entry()
        if self._phase == "cancelled":
            self._maybe_end_cancelled()
            return
        if run.status == S.FAILED and not run.spec.continue_on_error:
            self._stopped_blocks.add(run.block)
        self._next_hook()

    def _after_finished(self, changed: bool) -> None:
        status = self._outcome[0]
        if changed:
            self._ctx.metrics.executions.labels(self._wf.name, status).inc()
            log.info("execution finished", extra={**self._context, "status": status})
            self._end(status)
        else:  # cancelled while the hooks ran
            self._end("cancelled")

    def _fail_execution(self, error: str) -> None:
        if self._phase == "ended":
            return
        self._outcome = ("failed", error)
        self._write(lambda: store.finish_execution(self._id, "failed", error), "finished")

    def _end(self, status: str) -> None:
        if self._phase == "ended":
            return
        self._phase = "ended"
        for handle in self._timers:
            handle.cancel()
        if self._active:
            self._ctx.metrics.active.dec()
        self._sup.tell(m.ExecutionEnded(self._id, self._wf.name, status))
        self.stop()

    # --- cancel and shutdown ---

    def _on_Cancel(self, _message) -> None:
        if self._phase in ("ended", "cancelled"):
            return
        starting = self._phase == "starting"
        self._phase = "cancelled"
        for handle in self._timers:
            handle.cancel()
        runs = list(self._steps.values()) + ([self._hook] if self._hook else [])
        for run in runs:
            if run.busy == "running":
                self._interrupt(run, "cancel")
            elif run.busy in ("backoff", "slot"):
                if run.busy == "slot":
                    run.busy = None  # the grant, when it comes, is released
                self._finish(run, S.CANCELLED)
            elif run.status == S.PENDING and not run.busy and run.block is None:
                self._finish(run, S.CANCELLED, attempt=0)
        if not starting:
            self._maybe_end_cancelled()

    def _maybe_end_cancelled(self) -> None:
        runs = list(self._steps.values()) + ([self._hook] if self._hook else [])
        if not any(run.busy for run in runs):
            log.info("execution finished", extra={**self._context, "status": "cancelled"})
            self._end("cancelled")

    def _on_Shutdown(self, _message) -> None:
        self._shutdown = True
        if self._phase in ("main", "hooks"):
            self._maybe_leave()

    def _on_StopNow(self, _message) -> None:
        self._shutdown = True
        runs = list(self._steps.values()) + ([self._hook] if self._hook else [])
        for run in runs:
            if run.busy == "running":
                self._interrupt(run, "shutdown")
        self._maybe_leave()

    def _maybe_leave(self) -> None:
        """During shutdown: stop once nothing is in flight; the rows stay for resume."""
        runs = list(self._steps.values()) + ([self._hook] if self._hook else [])
        if not any(run.busy in ("running", "writing") for run in runs):
            self._end("interrupted")
