"""Execution actor: drives one execution from start (or resume) to its final status (SPEC 4).

It never touches the database itself: every write is a journal operation under the
execution's fence (``(id, epoch)``, SPEC 13.7), and the next move happens only when the
journal reports the commit as an event message. Attempts run elsewhere (``actors.step``);
this actor interrupts them through their cancel tokens, so it stays free to hear ``Cancel``.

Phases: ``starting`` -> ``main`` -> ``hooks`` -> ``ended``; or ``cancelled`` (the row is
already cancelled: wind down), ``lost`` (another node owns it: stop, write nothing),
``failing`` (an engine or storage error: end ``failed``, 13.1.12).

The step machinery is in ``actors.attempts``, the hook phase in ``actors.hooks``. Every
method runs on a dispatcher thread of ``actors.runtime``, one message at a time.
"""

from __future__ import annotations

import logging
import time

import pykka

from actors import messages as m
from actors.attempts import Attempts, StepRun
from actors.children import Children
from actors.context import EngineContext, internal_error, tell
from actors.hooks import HookPhase
from actors.runtime import PooledActor
from mantle import store
from mantle.errors import ExecutionStopped, LeaseLost
from mantle.store import STARTING
from mantle.states import StepStatus as S
from mantle.timefmt import rfc3339
from mantle.workflow import Workflow

__all__ = ["ExecutionActor"]

log = logging.getLogger("mantle.engine")


class ExecutionActor(Attempts, HookPhase, Children, PooledActor):

    def __init__(self, ctx: EngineContext, supervisor: pykka.ActorRef, workflow: Workflow,
                 execution: dict):
        super().__init__()
        self._ctx = ctx
        self._sup = supervisor
        self._wf = workflow
        self._ex = dict(execution)
        self._id = execution["id"]
        self._fence = (execution["id"], execution["epoch"])
        self._steps = {spec.name: StepRun(spec) for spec in workflow.steps}
        self._phase = "starting"
        self._timed_out = self._hooks_timed_out = self._shutdown = self._active = False
        self._closing = False  # the final status written after the hooks is in flight
        self._first_failure: tuple[str, str] | None = None
        self._outcome: tuple[str, str | None] | None = None
        self._started = time.monotonic()
        self._main_ms = 0
        self._timers: list = []
        self._hook_queue: list = []
        self._hook: StepRun | None = None
        self._hook_results: dict[str, dict] = {}
        self._resumed_hooks: dict[str, StepRun] = {}
        self._stopped_blocks: set[str] = set()
        self._slot_tokens = 0
        self._context = {"workflow": workflow.name, "execution_id": self._id}

    # --- plumbing ---

    def on_receive(self, message):
        handler = _HANDLERS.get(type(message))
        if handler is None:
            return super().on_receive(message)
        try:
            handler(self, message)
        except Exception as exc:  # the execution must end, not hang (13.1.12)
            log.exception("execution actor error", extra={**self._context, "error": str(exc)})
            self._fail_internal(str(exc))
        return None

    def on_failure(self, exc_type, exc_value, traceback):
        self._sup.tell(m.ExecutionEnded(self._id, self._wf.name, "unknown"))

    def _write(self, op, event, starting: bool = False) -> None:
        """Submit ``op`` under this execution's fence; tell ``event`` (or ``event(result)``)
        to this actor once committed, WriteRefused/WriteFailed otherwise.

        ``starting``: ``op`` starts an attempt (its ``running`` row) and is refused if the
        execution is no longer running: ``StartRefused`` then carries ``event``."""
        ref = self.actor_ref

        def done(result):
            tell(ref, event(result) if callable(event) else event)

        def failed(exc):
            if isinstance(exc, ExecutionStopped):
                tell(ref, m.StartRefused(event))
            else:
                tell(ref, m.WriteRefused() if isinstance(exc, LeaseLost) else m.WriteFailed(
                    str(exc).strip() or type(exc).__name__))

        fence = (*self._fence, STARTING) if starting else self._fence
        self._ctx.journal.submit(op, done, failed, fence=fence)

    def _after(self, delay: float, message):
        ref = self.actor_ref
        return self._ctx.timers.schedule(delay, lambda: tell(ref, message))

    def _next_slot_token(self) -> int:
        self._slot_tokens += 1
        return self._slot_tokens

    def _run_of(self, name: str, hook: bool) -> StepRun | None:
        if hook:
            return self._hook if self._hook is not None and self._hook.spec.name == name \
                else None
        return self._steps.get(name)

    def _runs(self) -> list[StepRun]:
        return list(self._steps.values()) + ([self._hook] if self._hook else [])

    def _cancel_execution_timers(self) -> None:
        for handle in self._timers:
            handle.cancel()
        self._timers.clear()

    @property
    def _stopped(self) -> bool:
        return self._phase in ("cancelled", "lost", "failing", "ended")

    def _may_continue(self) -> bool:
        return not self._shutdown and self._phase in ("main", "hooks")

    def _may_start(self, run: StepRun) -> bool:
        if not self._may_continue():
            return False
        if run.hook:
            return self._phase == "hooks" and not self._hooks_timed_out
        return self._phase == "main" and not self._timed_out

    # --- start and resume ---

    def _on_Begin(self, message: m.Begin) -> None:
        self._reload(message.rows)
        log.info("execution resumed" if message.resumed else "execution started",
                 extra=self._context)
        self._active = True
        self._ctx.metrics.active.inc()
        if self._phase == "cancelled":  # cancelled before this message
            self._phase = "starting"
            self._on_Cancel(m.Cancel())
            return
        self._phase = "main"
        if all(run.status.is_final for run in self._steps.values()):
            self._enter_hooks()  # resumed after its main steps: in (or before) its hooks
            return
        if self._wf.timeout_seconds and not self._start_workflow_timer():
            # the deadline passed while nobody ran the execution: it applies before anything
            # starts again (13.1.9): resumed attempts end failed, ready steps cancelled
            self._on_WorkflowTimedOut(m.WorkflowTimedOut())
            return
        for run in self._steps.values():
            if run.resuming:
                self._prepare(run)
        self._schedule()

    def _reload(self, rows) -> None:
        """Take over stored step rows: final ones are kept; a running one restarts under its
        attempt number (its wait, if any, continues with what is left).

        The first failure is the step that failed first (4.3), by the time its failure was
        stored, not by where its rows are; in the hooks the stored outcome decides
        (``_enter_hooks``)."""
        latest: dict[tuple[bool, str], dict] = {}
        for row in rows:
            key = (row["is_hook"], row["step"])
            if key not in latest or row["attempt"] >= latest[key]["attempt"]:
                latest[key] = row
        failures: list[StepRun] = []
        for (is_hook, name), row in latest.items():
            if is_hook:
                self._reload_hook(name, row)
                continue
            run = self._steps.get(name)
            if run is not None:
                self._reload_run(run, row)
                if run.blocks_dependents and run.status == S.FAILED:
                    failures.append(run)
                if run.status == S.FAILED and run.error == self._workflow_timeout_error():
                    self._timed_out = True
        if failures:
            first = min(failures, key=lambda run: (run.completed_at is None,
                                                   run.completed_at or 0))
            self._first_failure = (first.spec.name, first.error)
        # A main step cancelled while its dependencies were all resolved was cancelled by the
        # workflow timeout: in a running execution nothing else cancels it (a cancel ends the
        # execution, a failed dependency is not resolved). Its row carries no error, and the
        # owner may have stopped before it wrote the outcome (4.7).
        if self._wf.timeout_seconds and any(
                run.status == S.CANCELLED and all(
                    self._steps[name].resolved for name in run.spec.dependencies)
                for run in self._steps.values()):
            self._timed_out = True

    def _reload_hook(self, name: str, row: dict) -> None:
        """A final hook is never re-run; one that failed without ``continue_on_error``
        stopped its block, also for this owner (4.8); a running one is resumed (13.1.8)."""
        spec = next((spec for spec in self._wf.hooks.block(row["hook_block"])
                     if spec.name == name), None)
        if row["status"] not in ("pending", "running"):
            # as ``StepRun.cel_entry`` gives it live: a skipped hook's output is {} (3.1)
            output = {} if row["status"] == S.SKIPPED else row["output"]
            self._hook_results[name] = {"output": output, "error": row["error"],
                                        "status": row["status"]}
            if row["status"] == S.FAILED and spec is not None and not spec.continue_on_error:
                self._stopped_blocks.add(row["hook_block"])
            return
        if spec is not None:
            run = StepRun(spec, row["hook_block"])
            self._reload_run(run, row)
            self._resumed_hooks[name] = run

    @staticmethod
    def _reload_run(run: StepRun, row: dict) -> None:
        run.attempt = row["attempt"]
        run.output, run.error = row["output"], row["error"]
        run.started_at, run.completed_at = row["started_at"], row["completed_at"]
        run.status = S(row["status"])
        if run.status == S.RUNNING:
            run.resuming = True
            run.wait_kind, run.wait_until = row.get("wait_kind"), row.get("wait_until")
            run.progress = row.get("progress")

    def _start_workflow_timer(self) -> bool:
        """The workflow timeout counts from ``running_since`` (13.1.9), across crashes.
        False, and no timer, when it has already passed."""
        since = self._ex.get("running_since")
        elapsed = 0.0 if since is None else (self._ctx.node.db_now() - since).total_seconds()
        left = self._wf.timeout_seconds - max(0.0, elapsed)
        if left <= 0:
            return False
        self._timers.append(self._after(left, m.WorkflowTimedOut()))
        return True

    # --- main steps ---

    def _schedule(self) -> None:
        """Start every pending step whose dependencies are resolved; notice the end."""
        if self._phase != "main":
            return
        for run in self._steps.values():
            if run.status != S.PENDING or run.stage is not None:
                continue
            deps = [self._steps[name] for name in run.spec.dependencies]
            if self._timed_out or any(dep.blocks_dependents for dep in deps):
                self._transition(run, S.CANCELLED, attempt=0)
            elif all(dep.resolved for dep in deps) and not self._shutdown:
                self._prepare(run)
        if self._shutdown:
            self._maybe_leave()
        elif all(run.status.is_final and run.stage is None for run in self._steps.values()):
            self._enter_hooks()

    def _step_settled(self) -> None:
        """A main step's final status is committed."""
        if self._phase == "cancelled":
            self._maybe_end_cancelled()
        else:
            self._schedule()

    def _activation(self) -> dict:
        activation = {
            "inputs": self._ex["inputs"] or {},
            "steps": {name: run.cel_entry() for name, run in self._steps.items()
                      if run.status in (S.COMPLETED, S.SKIPPED, S.FAILED)},
            "env": dict(self._ctx.env),
            "trigger": self._ex["trigger"],
            "execution": {"id": self._id, "workflow_name": self._wf.name,
                          "workflow_version": self._ex["version"],
                          "started_at": rfc3339(self._ex["started_at"])},
        }
        if self._phase == "hooks":
            status, error = self._outcome
            failed_step = self._first_failure[0] if self._first_failure else ""
            activation["execution"].update(status=status, error=error or "",
                                           failed_step=failed_step, duration_ms=self._main_ms)
            activation["hooks"] = dict(self._hook_results)
        return activation

    def _on_WorkflowTimedOut(self, _message: m.WorkflowTimedOut) -> None:
        if self._phase != "main":
            return
        if all(run.status.is_final for run in self._steps.values()):
            # Every main step has its outcome, only checkpoints are still being written: the
            # timeout has nothing left to fail or cancel, and the outcome stands (as it does
            # when the final status goes with the last checkpoint, ``_closing_outcome``).
            return
        self._timed_out = True
        for run in self._steps.values():
            if run.stage == "running":
                self._interrupt(run, "workflow_timeout")
            elif run.stage in ("backoff", "slot"):
                run.cancel_timers()
                run.stage = None
                self._release_slot(run)
                self._not_started(run)
            elif run.stage is None and run.status == S.RUNNING:  # resumed, not yet prepared
                self._not_started(run)
        self._schedule()

    def _workflow_timeout_error(self) -> str:
        return f"workflow timed out after {self._wf.timeout}"

    def _not_started(self, run: StepRun) -> None:
        """A step that was about to start when the execution stopped starting steps."""
        if self._phase == "cancelled":
            if run.hook and run.status == S.PENDING:
                self._hook = None  # hooks do not run after a cancel (4.6)
                self._maybe_end_cancelled()
            else:
                self._transition(run, S.CANCELLED)
        elif run.hook and self._hooks_timed_out:
            if run.status == S.RUNNING:
                self._transition(run, S.FAILED, error=self._hooks_timeout_error())
            else:
                self._next_hook()
        elif not run.hook and self._timed_out:
            if run.status == S.RUNNING:
                self._transition(run, S.FAILED, error=self._workflow_timeout_error())
            else:
                self._transition(run, S.CANCELLED, attempt=0)
        elif self._shutdown:  # what is stored stays for the next owner
            self._maybe_leave()

    # --- the end ---

    def _closing_outcome(self, run: StepRun) -> tuple[str, str | None] | None:
        """The execution's final status when ``run``'s outcome ends it with no hook to run.

        Then the outcome and the final status are written in one transaction: the outcome is
        still durable no later than the final status (SPEC 4.11), for one commit less. Also
        during a shutdown: finishing an execution starts nothing.
        """
        if run.hook or self._phase != "main":
            return None
        if any(other is not run and (not other.status.is_final or other.stage)
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
            return "failed", self._workflow_timeout_error()
        if failure:
            return "failed", f'step "{failure[0]}" failed: {failure[1]}'
        return "completed", None

    def _closed(self, closing: tuple[str, str | None], changed: bool) -> None:
        self._outcome = closing
        self._on_ExecutionClosed(m.ExecutionClosed(closing[0], changed))

    def _on_ExecutionClosed(self, message: m.ExecutionClosed) -> None:
        if self._phase == "ended":
            return
        for name, hook in message.closed:  # interrupted, their rows closed with the end
            run = self._run_of(name, hook) or (self._resumed_hooks.get(name) if hook else None)
            if run is not None:
                run.status, run.completed_at = S.CANCELLED, message.completed_at
                self._observe(run)
        if not message.changed:  # a cancel was committed first (it counted the execution)
            log.info("execution finished", extra={**self._context, "status": "cancelled"})
            self._end("cancelled")
            return
        self._ctx.metrics.executions.labels(self._wf.name, message.status).inc()
        log.info("execution finished", extra={**self._context, "status": message.status})
        self._end(message.status)

    def _end(self, status: str) -> None:
        if self._phase == "ended":
            return
        self._phase = "ended"
        self._cancel_execution_timers()
        for run in self._runs():
            run.cancel_timers()
        if self._active:
            self._ctx.metrics.active.dec()
        self._sup.tell(m.ExecutionEnded(self._id, self._wf.name, status))
        self.stop()

    # --- cancel, shutdown, lost lease, internal failure ---

    def _on_Cancel(self, _message: m.Cancel) -> None:
        if self._phase in ("ended", "cancelled", "lost", "failing"):
            return
        starting = self._phase == "starting"
        self._phase = "cancelled"
        if starting:
            return  # Begin sees the phase
        self._cancel_execution_timers()
        for run in self._runs():
            if run.stage == "running":
                self._interrupt(run, "cancel")
            elif run.stage in ("backoff", "slot"):
                run.cancel_timers()
                run.stage = None
                self._release_slot(run)
                self._not_started(run)
            elif run.stage is None and not run.status.is_final:
                self._not_started(run)
        self._maybe_end_cancelled()

    def _maybe_end_cancelled(self) -> None:
        if self._phase == "cancelled" and not any(run.stage for run in self._runs()):
            log.info("execution finished", extra={**self._context, "status": "cancelled"})
            self._end("cancelled")

    def _on_Shutdown(self, _message: m.Shutdown) -> None:
        self._shutdown = True
        if self._phase in ("main", "hooks"):
            self._maybe_leave()

    def _on_StopNow(self, _message: m.StopNow) -> None:
        self._shutdown = True
        for run in self._runs():
            self._interrupt(run, "shutdown")
        self._maybe_leave()

    def _maybe_leave(self) -> None:
        """During shutdown: stop once no attempt or write is in flight; the rows stay for
        the next owner, which resumes them."""
        if self._phase in ("main", "hooks", "starting") and not self._closing and not any(
                run.stage in ("running", "writing") for run in self._runs()):
            self._end("interrupted")

    def _on_StartRefused(self, message: m.StartRefused) -> None:
        """A cancel committed before this owner heard of it (its notice is late or lost):
        stop as for the cancel; the attempt whose row was refused ends ``cancelled``
        without starting (4.6)."""
        self._on_Cancel(m.Cancel())
        self._on_AttemptRowWritten(message.written)

    def _on_WriteRefused(self, _message: m.WriteRefused) -> None:
        self._on_LeaseLost(m.LeaseLost())

    def _on_LeaseLost(self, _message: m.LeaseLost) -> None:
        """Another node took the execution over: no new step, no further write, running
        attempts interrupted, never reported as finished (13.7)."""
        if self._phase in ("ended", "lost"):
            return
        log.warning("execution lease lost", extra=self._context)
        self._phase = "lost"
        for run in self._runs():
            self._interrupt(run, "lost")
        self._end("lost")

    def _on_WriteFailed(self, message: m.WriteFailed) -> None:
        if self._phase == "failing":
            log.error("execution could not be failed", extra={**self._context,
                                                               "error": message.error})
            self._end("unknown")
            return
        log.error("checkpoint failed", extra={**self._context, "error": message.error})
        self._fail_internal(message.error)

    def _fail_internal(self, reason: str) -> None:
        """End the execution ``failed`` with ``internal error: <reason>`` (13.1.12): running
        attempts interrupted, slots returned, leftover step rows closed, children
        cancelled."""
        if self._phase in ("ended", "lost", "failing"):
            return
        self._phase = "failing"
        self._cancel_execution_timers()
        for run in self._runs():
            run.cancel_timers()
            self._interrupt(run, "lost")
            self._release_slot(run)
        error = internal_error(reason)
        # its children end with it: no step of it awaits them any more (13.3)
        self._write_cancelling_children(
            lambda: store.fail_execution(self._id, error),
            lambda failed: m.ExecutionClosed("failed", failed.changed, failed.closed,
                                             failed.completed_at), None)


def _handlers() -> dict[type, object]:
    """Message type -> handler: every message this actor understands, explicitly."""
    actor = ExecutionActor
    return {
        m.Begin: actor._on_Begin, m.Cancel: actor._on_Cancel,
        m.Shutdown: actor._on_Shutdown, m.StopNow: actor._on_StopNow,
        m.LeaseLost: actor._on_LeaseLost, m.WriteRefused: actor._on_WriteRefused,
        m.StartRefused: actor._on_StartRefused,
        m.WriteFailed: actor._on_WriteFailed, m.ExecutionClosed: actor._on_ExecutionClosed,
        m.Prepared: actor._on_Prepared, m.PrepareAgain: actor._on_PrepareAgain,
        m.StepSlotGranted: actor._on_StepSlotGranted,
        m.AttemptRowWritten: actor._on_AttemptRowWritten,
        m.RetryRowsWritten: actor._on_RetryRowsWritten, m.StepRecorded: actor._on_StepRecorded,
        m.AttemptFinished: actor._on_AttemptFinished, m.StepTimedOut: actor._on_StepTimedOut,
        m.BackoffEnded: actor._on_BackoffEnded, m.SleepEnded: actor._on_SleepEnded,
        m.InterruptGraceOver: actor._on_InterruptGraceOver,
        m.WorkflowTimedOut: actor._on_WorkflowTimedOut,
        m.HooksTimedOut: actor._on_HooksTimedOut, m.HooksStarted: actor._on_HooksStarted,
        m.ChildCreated: actor._on_ChildCreated, m.ChildFinished: actor._on_ChildFinished,
    }


_HANDLERS = _handlers()
