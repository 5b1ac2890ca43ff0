"""Execution actor: drives one execution's DAG, hooks and final status (SPEC 4).

It never touches the database itself: every checkpoint is a journal operation, and the
continuation (start the attempt, start the dependents, run the next hook) runs only when the
journal reports the commit. Attempts run in Step actors; this actor interrupts them by setting
their ``cancel`` events, so it stays free to hear ``Cancel`` at any time.

All methods run on a dispatcher thread of ``actors.runtime``, one message at a time.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

import pykka

from actors import messages as m
from actors.context import EngineContext, tell
from actors.lifecycle import ExecutionLifecycle, _Run
from actors.runtime import PooledActor
from actors.step import is_instant, run_instant, start_step
from mantle import store
from mantle.connectors import ConnectorError, ConnectorInterrupted, Invocation, run_action
from mantle.credentials import resolve as resolve_credential
from mantle.db.fields import utcnow
from mantle.expressions import (ActivationCache, ExpressionError, evaluate_condition,
                                resolve_params)
from mantle.states import STEP_TRANSITIONS, check_transition
from mantle.states import StepStatus as S
from mantle.timefmt import rfc3339
from mantle.workflow import Step, Workflow

__all__ = ["ExecutionActor"]

log = logging.getLogger("mantle.engine")

_AUDIT = {S.COMPLETED: "step.completed", S.FAILED: "step.failed", S.SKIPPED: "step.skipped"}
_HOOK_AUDIT = {S.COMPLETED: "hook.step.completed", S.FAILED: "hook.step.failed"}


def _tool_runner(invocation: Invocation):
    """``Invocation.run_tool``: another action run on the calling step's thread, with the
    step's credential, cancel and plugins (AI tools, SPEC 13.6)."""
    def run_tool(action: str, params) -> dict:
        return run_action(dataclasses.replace(
            invocation, action=action, params=params, progress=None, checkpoint=None))
    return run_tool


class ExecutionActor(ExecutionLifecycle, PooledActor):

    def __init__(self, ctx: EngineContext, supervisor: pykka.ActorRef, workflow: Workflow,
                 execution: dict):
        super().__init__()
        self._ctx = ctx
        self._sup = supervisor
        self._wf = workflow
        self._ex = execution
        self._id = execution["id"]
        self._steps = {spec.name: _Run(spec) for spec in workflow.steps}
        self._phase = "starting"  # starting | main | hooks | cancelled | ended
        self._timed_out = self._hooks_timed_out = self._shutdown = self._active = False
        self._first_failure: tuple[str, str] | None = None
        self._outcome: tuple[str, str | None] | None = None
        self._running_since = time.monotonic()
        self._main_ms = 0
        self._timers: list = []
        self._hooks: list[tuple[str, Step]] = []
        self._hook: _Run | None = None
        self._hook_results: dict[str, dict] = {}
        self._stopped_blocks: set[str] = set()
        self._context = {"workflow": workflow.name, "execution_id": self._id}

    # --- dispatch ---

    def on_receive(self, message):
        handler = getattr(self, "_on_" + type(message).__name__, None)
        if handler is None:
            return super().on_receive(message)
        try:
            handler(message)
        except Exception as exc:  # keep the actor alive long enough to record the failure
            log.exception("execution actor error", extra={**self._context, "error": str(exc)})
            self._fail_execution(f"internal error: {exc}")

    def on_failure(self, exc_type, exc_value, traceback):
        self._sup.tell(m.ExecutionEnded(self._id, self._wf.name, "unknown"))

    def _write(self, op, then: str, *data) -> None:
        ref = self.actor_ref
        self._ctx.journal.submit(op, lambda result: tell(ref, m.Written(then, (data, result))),
                                 lambda exc: tell(ref, m.WriteFailed(then, str(exc))))

    def _on_Written(self, message: m.Written) -> None:
        data, result = message.data
        getattr(self, "_after_" + message.then)(*data, result)

    def _on_WriteFailed(self, message: m.WriteFailed) -> None:
        if self._phase != "ended":
            log.error("checkpoint failed", extra={**self._context, "error": message.error})
            self._end("unknown")

    def _schedule_timer(self, delay: float, message) -> object:
        ref = self.actor_ref
        handle = self._ctx.timers.schedule(delay, lambda: tell(ref, message))
        self._timers.append(handle)
        return handle

    # --- start and resume ---

    def _on_Begin(self, message: m.Begin) -> None:
        self._reload(message.rows)
        if message.execution["status"] == "pending":
            self._write(lambda: store.mark_running(self._id, self._wf.name, self._ex["version"],
                                                   "engine"), "running")
        else:  # resumed, or promoted from the queue (already marked running)
            message_text = "execution resumed" if message.resumed else "execution started"
            log.info(message_text, extra=self._context)
            self._enter_main()

    def _reload(self, rows) -> None:
        """Take over stored step rows: final ones are kept, a running one restarts as is."""
        latest: dict[tuple[bool, str], dict] = {}
        for row in rows:
            key = (row["is_hook"], row["step"])
            if key not in latest or row["attempt"] >= latest[key]["attempt"]:
                latest[key] = row
        for (is_hook, name), row in latest.items():
            if is_hook:
                if row["status"] not in ("pending", "running"):
                    self._hook_results[name] = {"output": row["output"], "error": row["error"],
                                                "status": row["status"]}
                continue
            run = self._steps.get(name)
            if run is None:
                continue
            run.attempt = row["attempt"]
            run.output, run.error = row["output"], row["error"]
            run.started_at, run.completed_at = row["started_at"], row["completed_at"]
            if row["status"] == "running":
                run.resume_attempt = row["attempt"]
                run.progress = row.get("progress")
            elif row["status"] != "pending":
                run.status = S(row["status"])
                if run.blocks_dependents and run.status == S.FAILED:
                    self._first_failure = self._first_failure or (name, run.error)

    def _after_running(self, changed: bool) -> None:
        if not changed or self._phase == "cancelled":  # cancelled while pending
            self._end("cancelled")
            return
        log.info("execution started", extra=self._context)
        self._enter_main()

    def _enter_main(self) -> None:
        self._phase = "main"
        self._active = True
        self._ctx.metrics.active.inc()
        if self._wf.timeout_seconds:
            elapsed = (utcnow() - self._ex["started_at"]).total_seconds()
            self._schedule_timer(max(0.0, self._wf.timeout_seconds - elapsed),
                                 m.TimerFired("workflow_timeout"))
        self._schedule()

    # --- main steps ---

    def _schedule(self) -> None:
        """Start every pending step whose dependencies are resolved; notice the end."""
        if self._phase != "main":
            return
        for run in self._steps.values():
            if run.status != S.PENDING or run.busy:
                continue
            deps = [self._steps[name] for name in run.spec.dependencies]
            if self._timed_out or any(dep.blocks_dependents for dep in deps):
                self._finish(run, S.CANCELLED, attempt=0)
            elif all(dep.resolved for dep in deps) and not self._shutdown:
                self._ready(run)
        if self._shutdown:
            self._maybe_leave()
        elif all(run.status.is_final and not run.busy for run in self._steps.values()):
            self._main_done()

    def _activation(self) -> dict:
        started = self._ex["started_at"]
        activation = {
            "inputs": self._ex["inputs"] or {},
            "steps": {name: run.cel_entry() for name, run in self._steps.items()
                      if run.status in (S.COMPLETED, S.SKIPPED, S.FAILED)},
            "env": dict(self._ctx.env),
            "trigger": self._ex["trigger"],
            "execution": {"id": self._id, "workflow_name": self._wf.name,
                          "workflow_version": self._ex["version"],
                          "started_at": rfc3339(started)},
        }
        if self._phase == "hooks":
            status, error = self._outcome
            failed_step = self._first_failure[0] if self._first_failure else ""
            activation["execution"].update(status=status, error=error or "",
                                           failed_step=failed_step, duration_ms=self._main_ms)
            activation["hooks"] = dict(self._hook_results)
        return activation

    def _ready(self, run: _Run) -> None:
        """Evaluate ``if``, resolve templates and the credential, then start attempt 1."""
        activation = self._activation()
        cache = ActivationCache(activation)
        try:
            if run.spec.condition is not None and not evaluate_condition(
                    run.spec.condition, activation, cache):
                self._finish(run, S.SKIPPED, attempt=1, started_at=utcnow())
                return
        except ExpressionError as exc:
            self._finish(run, S.FAILED, error=f"evaluating if condition: {exc}", attempt=1)
            return
        try:
            run.params = resolve_params(run.spec.params, activation, cache)
        except ExpressionError as exc:
            self._finish(run, S.FAILED, error=f"resolving params: {exc}", attempt=1)
            return
        if run.spec.credential:
            try:
                run.credential = resolve_credential(run.spec.credential, self._ctx.secrets)
            except ConnectorError as exc:
                self._finish(run, S.FAILED, error=exc.message, attempt=1)
                return
        if run.spec.max_parallel > 0 and run.block is None:
            run.busy = "slot"
            self._sup.tell(m.AcquireStepSlot(self._id, self._wf.name, run.spec.name,
                                             run.spec.max_parallel))
            return
        self._start_attempt(run)

    def _on_StepSlotGranted(self, message: m.StepSlotGranted) -> None:
        run = self._steps[message.step]
        if run.busy == "slot" and self._phase == "main" and not self._shutdown:
            self._start_attempt(run)
        else:
            self._release_slot(run)
            if run.busy == "slot":
                run.busy = None
                self._schedule()

    def _release_slot(self, run: _Run) -> None:
        if run.spec.max_parallel > 0 and run.block is None:
            self._sup.tell(m.ReleaseStepSlot(self._id, self._wf.name, run.spec.name))

    def _start_attempt(self, run: _Run) -> None:
        resumed = run.resume_attempt is not None
        attempt = run.resume_attempt or run.attempt + 1
        run.resume_attempt = None
        check_transition(STEP_TRANSITIONS, run.status, S.RUNNING)
        run.attempt, run.status, run.busy = attempt, S.RUNNING, "writing"
        run.started_at = utcnow()
        action = "hook.step.started" if run.block else "step.started"
        self._write(lambda: store.write_step(
            self._id, run.spec.name, attempt, "running", hook_block=run.block,
            started_at=run.started_at, audit_action=action, new=not resumed),
            "attempt_row", run)

    def _after_attempt_row(self, run: _Run, _result) -> None:
        self._launch(run)

    def _launch(self, run: _Run) -> None:
        """Hand the attempt to a fresh Step actor, unless the execution stopped meanwhile."""
        run.busy = None
        if self._phase == "cancelled":
            self._finish(run, S.CANCELLED)
            return
        if self._shutdown:
            self._release_slot(run)
            self._maybe_leave()
            return
        run.cancel, run.reason, run.busy = threading.Event(), None, "running"
        spec = run.spec
        invocation = Invocation(
            action=spec.action, params=run.params, cancel=run.cancel,
            credential=run.credential, step_timeout=spec.timeout_seconds,
            plugins_dir=self._ctx.plugins_dir, workflow=self._wf.name,
            execution_id=self._id, step=spec.name, attempt=run.attempt,
            progress=run.progress, checkpoint=self._checkpointer(run, run.cancel),
            metrics=self._ctx.metrics)
        invocation = dataclasses.replace(invocation, run_tool=_tool_runner(invocation))
        run.progress = None
        attempt = m.RunAttempt(invocation, run.attempt, hook=run.block is not None)
        if is_instant(spec.action):
            self._on_AttemptFinished(run_instant(attempt, self._ctx.metrics))
            return
        run.actor = start_step(self.actor_ref, invocation, self._ctx.metrics, self._ctx.timers)
        run.actor.tell(attempt)
        if spec.timeout_seconds:
            run.timer = self._schedule_timer(
                spec.timeout_seconds, m.TimerFired("step_timeout", spec.name, run.attempt))

    def _checkpointer(self, run: _Run, cancel: threading.Event):
        """``Invocation.checkpoint`` for this attempt: store the progress, wait for the commit
        (on the step's own thread), stop the attempt when its row is no longer running."""
        journal, execution_id = self._ctx.journal, self._id
        name, attempt, is_hook = run.spec.name, run.attempt, run.block is not None

        def checkpoint(progress) -> None:
            if cancel.is_set():
                raise ConnectorInterrupted()
            stored = journal.call(lambda: store.write_progress(
                execution_id, name, attempt, is_hook, progress), timeout=None)
            if not stored or cancel.is_set():
                raise ConnectorInterrupted()

        return checkpoint

    def _run_of(self, name: str, hook: bool) -> _Run | None:
        if hook:
            return self._hook if self._hook and self._hook.spec.name == name else None
        return self._steps.get(name)

    def _on_AttemptFinished(self, message: m.AttemptFinished) -> None:
        run = self._run_of(message.step, message.hook)
        if run is None or run.attempt != message.attempt or run.busy != "running":
            return
        if run.timer is not None:
            run.timer.cancel()
        self._release_slot(run)
        reason, run.reason, run.cancel, run.busy = run.reason, None, None, None
        run.actor = None
        if message.ok:
            self._finish(run, S.COMPLETED, output=message.output)
        elif reason == "cancel":
            self._finish(run, S.CANCELLED)
        elif reason == "shutdown":
            self._maybe_leave()
        elif reason == "workflow_timeout":
            self._finish(run, S.FAILED, error=f"workflow timed out after {self._wf.timeout}")
        elif reason == "hooks_timeout":
            self._finish(run, S.FAILED,
                         error=f"hooks timed out after {self._wf.hooks.timeout}")
        elif reason == "timeout":
            self._failed_attempt(run, f"step timed out after {run.spec.timeout}", None, True)
        else:
            self._failed_attempt(run, message.error, message.output, message.retryable)

    def _failed_attempt(self, run: _Run, error: str, output, retryable: bool) -> None:
        if not retryable or run.attempt >= run.spec.max_attempts or self._phase == "cancelled":
            self._finish(run, S.FAILED, output=output, error=error)
            return
        delay = 1.0 if run.spec.backoff == "fixed" else float(2 ** (run.attempt - 1))
        log.warning("step retrying", extra={**self._context, "step": run.spec.name,
                                            "attempt": run.attempt, "error": error})
        failed_action = "hook.step.failed" if run.block else "step.failed"
        started_action = "hook.step.started" if run.block else "step.started"
        old, new, now = run.attempt, run.attempt + 1, utcnow()
        started, block, name = run.started_at, run.block, run.spec.name

        def op():
            store.write_step(self._id, name, old, "failed", hook_block=block, output=output,
                             error=error, started_at=started, completed_at=now,
                             audit_action=failed_action)
            store.write_step(self._id, name, new, "running", hook_block=block, started_at=now,
                             audit_action=started_action, new=True)

        run.attempt, run.started_at, run.busy = new, now, "writing"
        self._write(op, "retry_rows", run, delay)

    def _after_retry_rows(self, run: _Run, delay: float, _result) -> None:
        if self._phase == "cancelled" or self._timed_out and run.block is None:
            run.busy = None
            self._finish(run, S.CANCELLED if self._phase == "cancelled" else S.FAILED,
                         error=None if self._phase == "cancelled"
                         else f"workflow timed out after {self._wf.timeout}")
            return
        run.busy = "backoff"
        run.timer = self._schedule_timer(delay, m.TimerFired("retry", run.spec.name,
                                                             run.attempt))

    def _finish(self, run: _Run, status: S, *, output=None, error=None, attempt=None,
                started_at=None) -> None:
        """Checkpoint a step's final status; the continuation moves the execution on."""
        now = utcnow()
        attempt = run.attempt if attempt is None else attempt
        if attempt and started_at is None:
            started_at = run.started_at or now
        completed_at = now if attempt else None
        if status == S.SKIPPED:
            started_at = completed_at = now
        audit_action = (_HOOK_AUDIT if run.block else _AUDIT).get(status)
        if status == S.FAILED and run.spec.continue_on_error and run.block is None:
            audit_action = (audit_action, "step.continued_on_error")
        check_transition(STEP_TRANSITIONS, run.status, status)
        run.status, run.busy = status, "writing"
        block, name = run.block, run.spec.name

        def op():
            store.write_step(self._id, name, attempt, str(status), hook_block=block,
                             output=output, error=error, started_at=started_at,
                             completed_at=completed_at, audit_action=audit_action)

        run.attempt, run.output, run.error = attempt, output, error
        run.started_at, run.completed_at = started_at, completed_at
        closing = self._closing_outcome(run)
        if closing is None:
            self._write(op, "final", run, None)
            return

        def op_and_finish():  # the last checkpoint and the final status, one transaction
            op()
            return store.finish_execution(self._id, *closing)

        self._write(op_and_finish, "final", run, closing)

    def _closing_outcome(self, run: _Run) -> tuple[str, str | None] | None:
        """The execution's final status when ``run``'s outcome ends it with no hook to run.

        Then the outcome and the final status are written in one transaction: the outcome is
        still durable no later than the final status (SPEC 4.11), for one commit less.
        """
        if run.block is not None or self._phase != "main" or self._shutdown:
            return None
        if any(other is not run and (not other.status.is_final or other.busy)
               for other in self._steps.values()):
            return None
        failure = self._first_failure
        if failure is None and run.blocks_dependents and run.status == S.FAILED:
            failure = (run.spec.name, run.error)
        outcome = self._outcome_for(failure)
        if self._hooks_to_run(outcome[0]):
            return None
        return outcome

    def _outcome_for(self, failure) -> tuple[str, str | None]:
        if self._timed_out:
            return "failed", f"workflow timed out after {self._wf.timeout}"
        if failure:
            return "failed", f'step "{failure[0]}" failed: {failure[1]}'
        return "completed", None

    def _hooks_to_run(self, status: str) -> list[tuple[str, Step]]:
        blocks = ("on_success", "on_finish") if status == "completed" else (
            "on_failure", "on_finish")
        return [(block, spec) for block in blocks for spec in getattr(self._wf.hooks, block)
                if spec.name not in self._hook_results]

    def _after_final(self, run: _Run, closing, result) -> None:
        if closing is not None:
            run.busy = None
            self._count_step(run)
            if run.status == S.FAILED:
                log.error("step failed", extra={**self._context, "step": run.spec.name,
                                                "error": run.error})
            self._main_ms = int((time.monotonic() - self._running_since) * 1000)
            self._outcome, self._phase = closing, "hooks"
            self._after_finished(result)
            return
        run.busy = None
        context = {**self._context, "step": run.spec.name}
        if run.status == S.FAILED:
            if run.block is None:
                log.error("step failed", extra={**context, "error": run.error})
            else:
                log.warning("hook step failed", extra={**context, "error": run.error})
        if run.block is not None:
            self._after_hook(run)
            return
        self._count_step(run)
        if run.status == S.FAILED and not run.spec.continue_on_error:
            self._first_failure = self._first_failure or (run.spec.name, run.error)
        if self._phase == "cancelled":
            self._maybe_end_cancelled()
        else:
            self._schedule()

    def _count_step(self, run: _Run) -> None:
        metrics = self._ctx.metrics
        metrics.steps.labels(self._wf.name, run.spec.name, str(run.status)).inc()
        if run.status != S.SKIPPED and run.started_at and run.completed_at:
            seconds = (run.completed_at - run.started_at).total_seconds()
            metrics.step_duration.labels(self._wf.name, run.spec.name,
                                         run.spec.action).observe(seconds)
