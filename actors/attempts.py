"""The life of one step (main or hook) inside an Execution actor (SPEC 4.2-4.7, 13.1).

prepare (``if``, templates, credential — off the actor's thread when there is anything to
evaluate) -> a ``max_parallel`` slot for each attempt -> the attempt's ``running`` row ->
launch -> outcome -> retry after a durable back-off, or the final status.

Every status change of a step goes through ``_transition``: it checks the state table, writes
the row (with the execution's fence) and its audit events, and names the event that continues
once the row is committed. Logs and metrics follow from the committed change
(``_on_StepRecorded``). A mixin of ``actors.execution.ExecutionActor``; all methods run on
that actor's dispatcher turn.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from actors import messages as m
from actors.children import child_key, run_child_and_wait
from actors.context import internal_error, tell
from actors.step import (is_instant, is_sleep, run_inline, run_on_pool, sleep_output,
                         sleep_seconds)
from mantle import store
from mantle.connectors import CancelToken, ConnectorError, ConnectorInterrupted, Invocation
from mantle.credentials import resolve as resolve_credential
from mantle.db import OUTAGE_ERRORS, database_proxy, release_connection, reset_connection
from mantle.expressions import ActivationCache, ExpressionError, evaluate_condition
from mantle.expressions import resolve_params
from mantle.states import STEP_TRANSITIONS, check_transition
from mantle.states import StepStatus as S
from mantle.workflow import Step

__all__ = ["StepRun", "Attempts", "INTERRUPT_GRACE"]

log = logging.getLogger("mantle.engine")

# How long an interrupted attempt may take to report back before it is treated as ended
# (a connector stuck where a cancel cannot reach, e.g. DNS): the execution never waits on it.
INTERRUPT_GRACE = 1.0
# After a database outage kept a step's credential from being read.
PREPARE_RETRY = 1.0

# Why an attempt is interrupted, by rank (``_interrupt``): the step's own timeout and a
# shutdown yield to what ends the execution's work (any other reason: cancel, the workflow or
# hooks timeout), and everything yields to a lost lease.
_RANK = {"timeout": 0, "shutdown": 0, "lost": 2}

_AUDIT = {S.RUNNING: "step.started", S.COMPLETED: "step.completed", S.FAILED: "step.failed",
          S.SKIPPED: "step.skipped"}
_HOOK_AUDIT = {S.RUNNING: "hook.step.started", S.COMPLETED: "hook.step.completed",
               S.FAILED: "hook.step.failed"}


class StepRun:
    """The live state of one step of this execution. ``stage`` says what it waits for:
    None (nothing in flight), ``preparing``, ``slot``, ``writing``, ``running`` (an attempt,
    or a sleep's timer), ``backoff``, ``interrupting`` (an interrupted attempt's report)."""

    __slots__ = ("spec", "block", "status", "attempt", "output", "error", "started_at",
                 "completed_at", "params", "credential", "progress", "wait_kind",
                 "wait_until", "stage", "reason", "token", "timers", "slot", "resuming",
                 "child", "clock")

    def __init__(self, spec: Step, block: str | None = None):
        self.spec = spec
        self.block = block
        self.status = S.PENDING
        self.attempt = 0
        self.output = self.error = self.started_at = self.completed_at = None
        self.params = self.credential = self.progress = None
        self.wait_kind = self.wait_until = None
        self.stage: str | None = None
        self.reason: str | None = None  # why a running attempt is being interrupted
        self.token: CancelToken | None = None
        self.timers: list = []
        self.slot: int | None = None  # the token of the max_parallel slot held
        self.resuming = False  # the attempt was running when the last owner stopped
        self.child: str | None = None  # workflow/run: the child execution awaited
        # monotonic start of an attempt this actor runs itself (a sleep's timer, a child
        # awaited): timed when it ends, as ``actors.step.finished`` times the others
        self.clock: float | None = None

    @property
    def hook(self) -> bool:
        return self.block is not None

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

    def cancel_timers(self) -> None:
        for handle in self.timers:
            handle.cancel()
        self.timers.clear()


def _has_templates(value: Any) -> bool:
    if isinstance(value, str):
        return "{{" in value
    if isinstance(value, dict):
        return any(_has_templates(item) for item in value.values())
    if isinstance(value, list):
        return any(_has_templates(item) for item in value)
    return False


def prepare(spec: Step, hook: bool, activation: dict, secrets, check_condition: bool
            ) -> m.Prepared:
    """Evaluate a step's ``if``, templates and credential (4.2, 4.5, 5.3): on an evaluation
    pool thread, or inline when there is nothing to evaluate. Always answers: an error no
    evaluation expected (a bug) fails the step with ``internal error: <reason>``; unanswered,
    the step would wait ``pending`` and its execution ``running`` for ever."""
    try:
        return _prepare(spec, hook, activation, secrets, check_condition)
    except Exception as exc:
        log.exception("step preparation failed", extra={"step": spec.name})
        return m.Prepared(spec.name, hook, error=internal_error(
            f"{type(exc).__name__}: {exc}"))


def _prepare(spec: Step, hook: bool, activation: dict, secrets, check_condition: bool
             ) -> m.Prepared:
    cache = ActivationCache(activation)
    try:
        if check_condition and spec.condition is not None and not evaluate_condition(
                spec.condition, activation, cache):
            return m.Prepared(spec.name, hook, skip=True)
    except ExpressionError as exc:
        return m.Prepared(spec.name, hook, error=f"evaluating if condition: {exc}")
    try:
        params = resolve_params(spec.params, activation, cache)
    except ExpressionError as exc:
        return m.Prepared(spec.name, hook, error=f"resolving params: {exc}")
    credential = None
    if spec.credential:
        try:
            credential = resolve_credential(spec.credential, secrets)
        except ConnectorError as exc:
            return m.Prepared(spec.name, hook, error=exc.message)
        except OUTAGE_ERRORS:  # the credential store is unreachable: try again shortly
            reset_connection(database_proxy)
            return m.Prepared(spec.name, hook, retry=True)
    return m.Prepared(spec.name, hook, params=params, credential=credential)


class Attempts:
    # --- preparing ---

    def _prepare(self, run: StepRun) -> None:
        """Evaluate what the step needs before its first (or resumed) attempt."""
        spec = run.spec
        check = not run.resuming
        if not ((check and spec.condition is not None) or spec.credential
                or _has_templates(spec.params)):
            self._on_Prepared(m.Prepared(spec.name, run.hook, params=spec.params))
            return
        run.stage = "preparing"
        activation, secrets, ref = self._activation(), self._ctx.secrets, self.actor_ref
        self._ctx.evaluation.submit(
            lambda: tell(ref, prepare(spec, run.hook, activation, secrets, check)))

    def _on_PrepareAgain(self, message: m.PrepareAgain) -> None:
        run = self._run_of(message.step, message.hook)
        if run is not None and run.stage == "preparing":
            run.stage = None
            run.timers.clear()
            self._prepare(run)

    def _on_Prepared(self, message: m.Prepared) -> None:
        run = self._run_of(message.step, message.hook)
        if run is None or run.stage not in (None, "preparing"):
            return
        run.stage = None
        if not self._may_start(run):
            self._not_started(run)
        elif message.retry:
            run.stage = "preparing"
            run.timers.append(self._after(PREPARE_RETRY, m.PrepareAgain(run.spec.name,
                                                                        run.hook)))
        elif message.skip:
            self._transition(run, S.SKIPPED, attempt=1)
        elif message.error is not None:
            self._transition(run, S.FAILED, attempt=run.attempt or 1, error=message.error)
        else:
            run.params, run.credential = message.params, message.credential
            if run.resuming and run.wait_kind == "retry":  # crashed during its back-off
                self._backoff(run)
            else:
                self._acquire(run)

    # --- slots ---

    def _acquire(self, run: StepRun) -> None:
        """Take a ``max_parallel`` slot for this attempt (2.3, 13.1.10; a hook step's too,
        2.4), then start it."""
        if run.spec.max_parallel <= 0:
            self._start_attempt(run)
            return
        run.stage = "slot"
        run.slot = self._next_slot_token()
        self._sup.tell(m.AcquireStepSlot(self._id, self._wf.name, run.spec.name, run.slot,
                                         run.spec.max_parallel, run.hook))

    def _on_StepSlotGranted(self, message: m.StepSlotGranted) -> None:
        run = self._run_of(message.step, message.hook)
        if run is None or run.stage != "slot" or run.slot != message.token:
            self._sup.tell(m.ReleaseStepSlot(self._id, self._wf.name, message.step,
                                             message.token, message.hook))
            return
        run.stage = None
        if not self._may_start(run):
            self._release_slot(run)
            self._not_started(run)
            return
        self._start_attempt(run)

    def _release_slot(self, run: StepRun) -> None:
        if run.slot is not None:
            self._sup.tell(m.ReleaseStepSlot(self._id, self._wf.name, run.spec.name, run.slot,
                                             run.hook))
            run.slot = None

    # --- an attempt ---

    def _start_attempt(self, run: StepRun) -> None:
        """Write the attempt's ``running`` row, then launch it once the row is committed.

        A row that exists already (an attempt resumed after a crash, or one written when its
        back-off began) is written again, ending its wait: the launch always follows a
        fenced write, so a node that lost the execution while it waited (its lease ran out
        during a back-off or a slot wait) is refused and calls nothing (13.7). A resumed
        ``core/sleep`` keeps its stored wait and just goes on waiting: it acts on nothing,
        and its end is a fenced write."""
        sleeping = is_sleep(run.spec.action)
        existing = run.status == S.RUNNING
        if existing and sleeping and run.wait_kind == "sleep":
            self._launch(run)
            return
        attempt = run.attempt if existing else run.attempt + 1
        wait = (None, None)
        if sleeping:
            seconds = self._sleep_length(run)
            if seconds is not None:
                wait = ("sleep", self._ctx.node.db_now() + _seconds(seconds))
        started = run.started_at if existing else self._ctx.node.db_now()
        self._transition(run, S.RUNNING, attempt=attempt, started_at=started, wait=wait)

    def _on_AttemptRowWritten(self, message: m.AttemptRowWritten) -> None:
        run = self._run_of(message.step, message.hook)
        if run is not None and run.stage == "writing" and run.attempt == message.attempt:
            run.stage = None
            self._launch(run)

    def _launch(self, run: StepRun) -> None:
        """Start the attempt, unless the execution stopped or timed out meanwhile (13.1.9)."""
        if not self._may_start(run):
            self._release_slot(run)
            self._not_started(run)
            return
        spec = run.spec
        run.token, run.reason, run.stage, run.resuming = CancelToken(), None, "running", False
        log.info("step started", extra={**self._context, "step": spec.name,
                                         "attempt": run.attempt})
        invocation = self._invocation(run)
        if spec.timeout_seconds:
            run.timers.append(self._after(self._timeout_left(run), m.StepTimedOut(
                spec.name, run.hook, run.attempt)))
        if is_instant(spec.action):
            self._on_AttemptFinished(run_inline(invocation, run.hook, self._ctx.metrics))
        elif is_sleep(spec.action):
            self._sleep(run, invocation)
        elif spec.action == "workflow/run":
            run.clock = time.monotonic()
            self._start_child(run, invocation)
        else:
            run_on_pool(self._ctx, self.actor_ref, invocation, run.hook)

    def _invocation(self, run: StepRun) -> Invocation:
        progress, run.progress = run.progress, None
        return Invocation(
            action=run.spec.action, params=run.params, cancel=run.token,
            credential=run.credential, step_timeout=run.spec.timeout_seconds,
            plugins_dir=self._ctx.plugins_dir, workflow=self._wf.name, execution_id=self._id,
            step=run.spec.name, attempt=run.attempt, progress=progress,
            checkpoint=self._checkpointer(run), run_tool=self._tool_runner(run),
            metrics=self._ctx.metrics)

    def _sleep(self, run: StepRun, invocation: Invocation) -> None:
        """A core/sleep attempt: a timer for what is left of it (13.1.11), no thread."""
        seconds = self._sleep_length(run)
        if seconds is None:
            self._on_AttemptFinished(run_inline(invocation, run.hook, self._ctx.metrics))
            return
        run.clock = time.monotonic()
        left = seconds
        if run.wait_kind == "sleep" and run.wait_until is not None:
            left = (run.wait_until - self._ctx.node.db_now()).total_seconds()
        run.timers.append(self._after(max(0.0, left), m.SleepEnded(
            run.spec.name, run.hook, run.attempt)))

    def _timeout_left(self, run: StepRun) -> float:
        """What is left of the attempt's step ``timeout`` as it is launched: all of it, but
        for a ``core/sleep`` that goes on with its stored wait after a restart (13.1.11):
        that is the same attempt, timed from when its wait began, not from the resume. A
        sleep shorter than its timeout ends first however late it is resumed."""
        timeout = run.spec.timeout_seconds
        if run.wait_kind != "sleep" or run.wait_until is None:
            return timeout
        seconds = self._sleep_length(run)
        if seconds is None or seconds < timeout:
            return timeout
        began = run.wait_until - _seconds(seconds)
        return max(0.0, timeout - (self._ctx.node.db_now() - began).total_seconds())

    def _sleep_length(self, run: StepRun) -> float | None:
        try:
            return sleep_seconds(Invocation(run.spec.action, run.params, threading.Event()))
        except ConnectorError:
            return None  # the attempt fails with the connector's own message

    def _on_SleepEnded(self, message: m.SleepEnded) -> None:
        run = self._run_of(message.step, message.hook)
        if run is None or run.stage != "running" or run.attempt != message.attempt:
            return
        seconds = self._sleep_length(run) or 0.0
        self._on_AttemptFinished(m.AttemptFinished(
            step=run.spec.name, attempt=run.attempt, hook=run.hook, ok=True,
            output=sleep_output(seconds)))

    # --- interrupting ---

    def _interrupt(self, run: StepRun, reason: str) -> None:
        """Stop the running attempt (cancel, timeouts, shutdown deadline, lost lease): its
        token is set at once; the outcome comes as its AttemptFinished, or after a grace.

        An attempt already being interrupted keeps its first reason, so its outcome is the
        one of what stopped it first (a step timeout due meanwhile changes nothing), except
        that a cancel or a workflow or hooks timeout outranks the step's own timeout and a
        shutdown, and a lost lease outranks everything: then nothing is written."""
        if run.stage != "running":
            return
        if run.reason is not None:
            if _RANK.get(reason, 1) > _RANK.get(run.reason, 1):
                run.reason = reason
            return
        run.reason = reason
        run.cancel_timers()  # its step timeout: the attempt is stopping already
        run.token.set()
        # A child being awaited is left alone here: the write of the attempt's end cancels
        # it (``_write_attempt_end``), a cancel's cascade does; a shutdown leaves it running
        if is_sleep(run.spec.action) or run.child is not None:
            self._on_AttemptFinished(m.AttemptFinished(
                step=run.spec.name, attempt=run.attempt, hook=run.hook, ok=False,
                interrupted=True))
            return
        run.timers.append(self._after(INTERRUPT_GRACE, m.InterruptGraceOver(
            run.spec.name, run.hook, run.attempt)))

    def _on_InterruptGraceOver(self, message: m.InterruptGraceOver) -> None:
        run = self._run_of(message.step, message.hook)
        if run is not None and run.stage == "running" and run.attempt == message.attempt:
            log.warning("interrupted attempt did not stop", extra={
                **self._context, "step": run.spec.name, "attempt": run.attempt})
            self._on_AttemptFinished(m.AttemptFinished(
                step=run.spec.name, attempt=run.attempt, hook=run.hook, ok=False,
                interrupted=True))

    def _on_StepTimedOut(self, message: m.StepTimedOut) -> None:
        run = self._run_of(message.step, message.hook)
        if run is not None and run.attempt == message.attempt:
            self._interrupt(run, "timeout")

    # --- outcomes ---

    def _on_AttemptFinished(self, message: m.AttemptFinished) -> None:
        run = self._run_of(message.step, message.hook)
        if run is None or run.attempt != message.attempt or run.stage != "running":
            return  # a late report of an attempt already dealt with
        run.cancel_timers()
        self._release_slot(run)
        if run.clock is not None:  # 9.1: every attempt of every action
            self._ctx.metrics.connector_duration.labels(run.spec.action).observe(
                time.monotonic() - run.clock)
            run.clock = None
        reason, run.reason, run.token, run.stage, run.child = run.reason, None, None, None, None
        if reason == "lost":
            return
        if message.ok:
            self._transition(run, S.COMPLETED, output=message.output)
        elif reason == "cancel":
            self._transition(run, S.CANCELLED)
        elif reason == "shutdown":
            self._maybe_leave()
        elif reason == "workflow_timeout":
            self._transition(run, S.FAILED, error=self._workflow_timeout_error())
        elif reason == "hooks_timeout":
            self._transition(run, S.FAILED, error=self._hooks_timeout_error())
        elif reason == "timeout":
            self._failed_attempt(run, f"step timed out after {run.spec.timeout}", None, True)
        else:
            self._failed_attempt(run, message.error, message.output, message.retryable)

    def _failed_attempt(self, run: StepRun, error: str, output, retryable: bool) -> None:
        if not retryable or run.attempt >= run.spec.max_attempts or self._stopped:
            self._transition(run, S.FAILED, output=output, error=error)
            return
        delay = 1.0 if run.spec.backoff == "fixed" else float(2 ** (run.attempt - 1))
        self._transition(run, S.RUNNING, attempt=run.attempt + 1,
                         started_at=self._ctx.node.db_now(),
                         retry=(output, error, delay))

    def _on_RetryRowsWritten(self, message: m.RetryRowsWritten) -> None:
        run = self._run_of(message.step, message.hook)
        if run is None or run.stage != "writing" or run.attempt != message.attempt:
            return
        # Announced once committed (a node whose write was refused retries nothing).
        log.warning("step retrying", extra={**self._context, "step": run.spec.name,
                                            "attempt": message.attempt - 1,
                                            "delay_ms": message.delay_ms,
                                            "error": message.error})
        run.stage = None
        self._backoff(run)

    def _backoff(self, run: StepRun) -> None:
        """Wait what is left of the back-off stored with the attempt's row (13.1.11)."""
        if not self._may_start(run):
            self._not_started(run)
            return
        left = (run.wait_until - self._ctx.node.db_now()).total_seconds()
        run.stage = "backoff"
        run.timers.append(self._after(max(0.0, left), m.BackoffEnded(
            run.spec.name, run.hook, run.attempt)))

    def _on_BackoffEnded(self, message: m.BackoffEnded) -> None:
        run = self._run_of(message.step, message.hook)
        if run is not None and run.stage == "backoff" and run.attempt == message.attempt:
            run.stage = None
            run.timers.clear()
            self._acquire(run)

    def _not_started(self, run: StepRun) -> None:
        """A step that was about to start when the execution stopped starting steps.

        What that means depends on why it stopped (cancel, workflow or hooks timeout,
        shutdown), which only the execution knows: ``ExecutionActor`` decides.
        """
        raise NotImplementedError

    # --- the one transition function ---

    def _transition(self, run: StepRun, status: S, *, attempt: int | None = None,
                    output=None, error: str | None = None, started_at=None,
                    wait=(None, None), retry: tuple | None = None) -> None:
        """Change a step's status: check the table, write the row(s) and audit events under
        the execution's fence, and continue with an event once committed.

        ``retry=(output, error, delay)``: the running attempt failed and ``attempt`` starts
        after ``delay``: the failed row and the next attempt's ``running`` row (its back-off
        stored as its wait) are one transaction.
        """
        check_transition(STEP_TRANSITIONS, run.status, status)
        now = self._ctx.node.db_now()  # as every node stamps its rows: in the database's time
        audit = _HOOK_AUDIT if run.hook else _AUDIT
        block, name, execution_id = run.block, run.spec.name, self._id
        if retry is not None:
            old, (failed_output, failed_error, delay) = run.attempt, retry
            old_started = run.started_at
            until = self._ctx.node.db_now() + _seconds(delay)

            def op():
                store.write_step(execution_id, name, old, "failed", hook_block=block,
                                 output=failed_output, error=failed_error,
                                 started_at=old_started, completed_at=now,
                                 audit_action=audit[S.FAILED])
                store.write_step(execution_id, name, attempt, "running", hook_block=block,
                                 started_at=started_at, wait_kind="retry", wait_until=until,
                                 audit_action=audit[S.RUNNING])

            run.status, run.attempt, run.started_at, run.stage = status, attempt, started_at, \
                "writing"
            run.wait_kind, run.wait_until = "retry", until
            self._write_attempt_end(run, old, S.FAILED, op, m.RetryRowsWritten(
                name, run.hook, attempt, failed_error, int(delay * 1000)))
            return
        if status == S.RUNNING:
            wait_kind, wait_until = wait
            # the attempt's row written again (its wait ends, or it resumes): started once
            started_audit = None if run.status == S.RUNNING else audit[S.RUNNING]

            def op():
                store.write_step(execution_id, name, attempt, "running", hook_block=block,
                                 started_at=started_at, wait_kind=wait_kind,
                                 wait_until=wait_until, audit_action=started_audit)

            run.status, run.attempt, run.started_at, run.stage = status, attempt, started_at, \
                "writing"
            run.wait_kind, run.wait_until = wait
            self._write(op, m.AttemptRowWritten(name, run.hook, attempt), starting=True)
            return
        self._finish_step(run, status, attempt, output, error, now)

    def _finish_step(self, run: StepRun, status: S, attempt, output, error, now) -> None:
        attempt = run.attempt if attempt is None else attempt
        started_at = run.started_at or now if attempt else None
        completed_at = now if attempt else None
        if status == S.SKIPPED:
            started_at = completed_at = now
        audit = (_HOOK_AUDIT if run.hook else _AUDIT).get(status)
        if status == S.FAILED and run.spec.continue_on_error and not run.hook:
            audit = (audit, "step.continued_on_error")
        run.status, run.attempt, run.output, run.error = status, attempt, output, error
        run.started_at, run.completed_at, run.stage = started_at, completed_at, "writing"
        block, name, execution_id = run.block, run.spec.name, self._id

        def op():
            store.write_step(execution_id, name, attempt, str(status), hook_block=block,
                             output=output, error=error, started_at=started_at,
                             completed_at=completed_at, audit_action=audit)

        closing = self._closing_outcome(run)
        if closing is None:
            self._write_attempt_end(run, attempt, status, op, m.StepRecorded(name, run.hook))
            return

        def op_and_close():  # the last checkpoint and the final status, one transaction
            op()
            return store.finish_execution(execution_id, *closing)

        self._write_attempt_end(run, attempt, status, op_and_close, lambda changed: (
            m.StepRecorded(name, run.hook, closing, changed)))

    def _on_StepRecorded(self, message: m.StepRecorded) -> None:
        run = self._run_of(message.step, message.hook)
        if run is None or run.stage != "writing":
            return
        run.stage = None
        self._observe(run)
        if run.hook:
            self._after_hook(run)
        elif message.closing is not None:
            self._closed(message.closing, message.changed)
        else:
            if run.status == S.FAILED and not run.spec.continue_on_error:
                self._first_failure = self._first_failure or (run.spec.name, run.error)
            self._step_settled()

    def _observe(self, run: StepRun) -> None:
        """Log and count a committed final status (9.1, 9.2, 13.1.3)."""
        context = {**self._context, "step": run.spec.name}
        # Both stamps are the database's time as their nodes estimated it (a resumed attempt
        # was started by another node): never below zero however far those estimates drift.
        seconds = 0.0
        if run.started_at and run.completed_at:
            seconds = max(0.0, (run.completed_at - run.started_at).total_seconds())
        duration = int(seconds * 1000)
        fields = {**context, "status": str(run.status), "duration_ms": duration}
        if run.status == S.FAILED:
            fields["error"] = run.error
        log.info("step finished", extra=fields)
        if run.status == S.FAILED:
            if run.hook:
                log.warning("hook step failed", extra={**context, "error": run.error})
            else:
                log.error("step failed", extra={**context, "error": run.error})
        if run.hook:
            return
        metrics = self._ctx.metrics
        metrics.steps.labels(self._wf.name, run.spec.name, str(run.status)).inc()
        if run.status != S.SKIPPED and run.started_at and run.completed_at:
            metrics.step_duration.labels(self._wf.name, run.spec.name, run.spec.action).observe(
                seconds)

    # --- services offered to connectors ---

    def _checkpointer(self, run: StepRun):
        """``Invocation.checkpoint`` for this attempt: store the progress under the fence
        and wait for the commit (on the attempt's own thread); stop the attempt when its row
        is no longer running or the execution is no longer ours."""
        journal, fence, token = self._ctx.journal, self._fence, run.token
        execution_id, name, attempt, hook = self._id, run.spec.name, run.attempt, run.hook

        def checkpoint(progress) -> None:
            if token.is_set():
                raise ConnectorInterrupted()
            try:
                stored = journal.call(lambda: store.write_progress(
                    execution_id, name, attempt, hook, progress), timeout=None, fence=fence)
            except Exception:  # lost lease, journal stopped: the attempt cannot go on
                raise ConnectorInterrupted() from None
            if not stored or token.is_set():
                raise ConnectorInterrupted()

        return checkpoint

    def _tool_runner(self, run: StepRun):
        """``Invocation.run_tool``: another action on the calling attempt's thread, with the
        attempt's cancel token and the tool's own credential, resolved like a step's (AI
        tools, SPEC 13.6); a ``workflow/run`` tool creates one child per tool call, named
        by the call's place in the conversation (``call_id``: ``<round>.<index>``, stable
        across a resume), never by the server's id, which servers reuse across rounds."""
        from mantle.connectors import run_action

        ctx, supervisor, parent = self._ctx, self._sup, dict(self._ex)
        step, attempt, token, block = run.spec.name, run.attempt, run.token, run.block
        base = dict(plugins_dir=ctx.plugins_dir, workflow=self._wf.name,
                    execution_id=self._id, step=step, attempt=attempt, metrics=ctx.metrics)

        def run_tool(action: str, params, credential: str | None = None,
                     call_id: str | None = None) -> dict:
            if action == "workflow/run":
                key = child_key(parent["id"], step, attempt, block, call=call_id or "")
                return run_child_and_wait(ctx, supervisor, parent, (step, block, attempt),
                                          key, params, token)
            resolved = None if credential is None else tool_credential(credential)
            return run_action(Invocation(action, params, token, credential=resolved, **base))

        def tool_credential(name: str):
            """Read on a pooled connection, given back at once: the attempt runs on for
            minutes (the model's turns, the tools), and step threads are many more than the
            pool's places. A connection the server dropped fails the read: reset, it is read
            once more on a fresh one before the call fails."""
            for last in (False, True):
                try:
                    return resolve_credential(name, ctx.secrets)
                except OUTAGE_ERRORS:
                    reset_connection(database_proxy)
                    if last:
                        raise ConnectorError(f'credential "{name}" cannot be read: '
                                             "database unavailable") from None
                finally:
                    release_connection(database_proxy)
            raise AssertionError("unreachable")

        return run_tool


def _seconds(value: float):
    import datetime as dt

    return dt.timedelta(seconds=value)
