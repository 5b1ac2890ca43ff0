"""The hook phase of an Execution actor (SPEC 4.8, 13.1.8): after the main steps, before the
final status.

Blocks run in order (``on_success``/``on_failure`` by the outcome, then ``on_finish``), their
steps one at a time with the machinery of ``actors.attempts``. When the phase first begins,
the outcome (blocks to run, final status) and ``hooks_since`` (``hooks.timeout`` counts from
it, 13.1.11) are stored before any hook runs. After a crash the phase goes on for the stored
outcome: a completed hook is never re-run, a block stopped by a failed hook stays stopped and
a running hook restarts under its attempt number. A mixin of
``actors.execution.ExecutionActor``, on its dispatcher turn.
"""

from __future__ import annotations

from actors import messages as m
from actors.attempts import StepRun
from mantle import store
from mantle.states import StepStatus as S
from mantle.workflow import Step

__all__ = ["HookPhase"]


class HookPhase:
    def _enter_hooks(self) -> None:
        """All main steps are final: pick the hook blocks for the outcome and run them.

        The outcome is fixed when the phase first begins and stored with ``hooks_since``
        (``mark_hooks_started``) before any hook runs; a node resuming the phase takes it
        from there, never from the step rows (which cannot tell, say, a workflow timeout
        that only cancelled steps still waiting for a slot)."""
        self._cancel_execution_timers()
        self._phase = "hooks"
        stored = self._ex.get("outcome")
        if stored is not None:  # resumed in its hooks (13.1.8)
            self._outcome = (stored["status"], stored.get("error"))
            failed_step = stored.get("failed_step")
            self._first_failure = (failed_step, None) if failed_step else None
            self._main_ms = stored.get("duration_ms") or 0
        else:
            self._outcome = self._outcome_for(self._first_failure)
            self._main_ms = self._main_phase_ms()
        self._hook_queue = self._hooks_to_run(self._outcome[0])
        if not self._hook_queue:
            self._next_hook()  # nothing to run: the final status
        elif stored is None:
            status, error = self._outcome
            outcome = {"status": status, "error": error,
                       "failed_step": self._first_failure[0] if self._first_failure else None,
                       "duration_ms": self._main_ms}
            self._write(lambda: store.mark_hooks_started(self._id, outcome),
                        m.HooksStarted(outcome))
        else:
            self._hooks_begun()

    def _main_phase_ms(self) -> int:
        """How long the main steps ran (``execution.duration_ms`` in hooks, SPEC 3.1): from
        ``running_since`` (a queued run's wait does not count) to now, in the database's
        time, so a node resuming the hooks reports what the first one measured (stored
        with the outcome)."""
        since = self._ex.get("running_since") or self._ex["started_at"]
        return max(0, round((self._ctx.node.db_now() - since).total_seconds() * 1000))

    def _on_HooksStarted(self, message: m.HooksStarted) -> None:
        if self._phase == "hooks":
            self._ex["outcome"] = message.outcome
            if self._ex.get("hooks_since") is None:
                self._ex["hooks_since"] = self._ctx.node.db_now()
            self._hooks_begun()

    def _hooks_begun(self) -> None:
        """The phase's start and outcome are stored: run the hooks, timed if they are."""
        if self._wf.hooks.timeout_seconds:
            self._start_hooks_timer()
        else:
            self._next_hook()

    def _start_hooks_timer(self) -> None:
        """``hooks.timeout`` counts from ``hooks_since`` (13.1.11). When it passed while
        nobody ran the execution it applies at once, before any hook is started again."""
        elapsed = (self._ctx.node.db_now() - self._ex["hooks_since"]).total_seconds()
        left = self._wf.hooks.timeout_seconds - max(0.0, elapsed)
        if left > 0:
            self._timers.append(self._after(left, m.HooksTimedOut()))
        else:
            self._hooks_timed_out = True
        self._next_hook()

    def _hooks_to_run(self, status: str) -> list[tuple[str, Step]]:
        blocks = ("on_success", "on_finish") if status == "completed" else (
            "on_failure", "on_finish")
        return [(block, spec) for block in blocks for spec in self._wf.hooks.block(block)
                if spec.name not in self._hook_results]

    def _next_hook(self) -> None:
        """Start the next hook of the queue, or write the final status when none is left.
        After the hooks timeout only a hook that was running at a crash is dealt with: it
        ends ``failed`` with the timeout's error, unstarted (4.7)."""
        while self._hook_queue and self._may_continue():
            block, spec = self._hook_queue.pop(0)
            resumed = self._resumed_hooks.pop(spec.name, None)
            if block in self._stopped_blocks or (self._hooks_timed_out and resumed is None):
                continue
            self._hook = resumed or StepRun(spec, block)
            if self._hooks_timed_out:
                self._transition(self._hook, S.FAILED, error=self._hooks_timeout_error())
            else:
                self._prepare(self._hook)
            return
        self._hook = None
        if self._shutdown:
            self._maybe_leave()
        elif self._phase == "hooks":
            status, error = self._outcome
            self._closing = True  # a shutdown now waits for it: its outcome is reported
            self._write(lambda: store.finish_execution(self._id, status, error),
                        lambda changed: m.ExecutionClosed(status, changed))

    def _after_hook(self, run: StepRun) -> None:
        """A hook step's final status is committed."""
        self._hook_results[run.spec.name] = run.cel_entry()
        if self._phase == "cancelled":
            self._maybe_end_cancelled()
            return
        if run.status == S.FAILED and not run.spec.continue_on_error:
            self._stopped_blocks.add(run.block)
        self._next_hook()

    def _on_HooksTimedOut(self, _message: m.HooksTimedOut) -> None:
        if self._phase != "hooks":
            return
        self._hooks_timed_out = True
        run = self._hook
        if run is None:
            return
        if run.stage == "running":
            self._interrupt(run, "hooks_timeout")
        elif run.stage in ("backoff", "slot") or (run.stage is None and
                                                 run.status == S.RUNNING):
            run.cancel_timers()
            run.stage = None
            self._release_slot(run)
            self._transition(run, S.FAILED, error=self._hooks_timeout_error())

    def _hooks_timeout_error(self) -> str:
        return f"hooks timed out after {self._wf.hooks.timeout}"
