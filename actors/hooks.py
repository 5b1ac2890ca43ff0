"""The hook phase of an Execution actor (SPEC 4.8, 13.1.8): after the main steps, before the
final status.

Blocks run in order (``on_success``/``on_failure`` by the outcome, then ``on_finish``), their
steps one at a time with the machinery of ``actors.attempts``. After a crash a completed hook
is never re-run and a running one restarts under its attempt number; ``hooks.timeout`` counts
from ``hooks_since``, stored when the phase first began (13.1.11). A mixin of
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
        """All main steps are final: pick the hook blocks for the outcome and run them."""
        self._cancel_execution_timers()
        self._phase = "hooks"
        self._outcome = self._outcome_for(self._first_failure)
        self._hook_queue = self._hooks_to_run(self._outcome[0])
        timeout = self._wf.hooks.timeout_seconds
        if not (self._hook_queue and timeout):
            self._next_hook()
        elif self._ex.get("hooks_since") is None:
            self._write(lambda: store.mark_hooks_started(self._id), m.HooksStarted())
        else:
            self._start_hooks_timer()

    def _on_HooksStarted(self, _message: m.HooksStarted) -> None:
        if self._phase == "hooks":
            self._ex["hooks_since"] = self._ctx.node.db_now()
            self._start_hooks_timer()

    def _start_hooks_timer(self) -> None:
        elapsed = (self._ctx.node.db_now() - self._ex["hooks_since"]).total_seconds()
        left = self._wf.hooks.timeout_seconds - max(0.0, elapsed)
        self._timers.append(self._after(max(0.0, left), m.HooksTimedOut()))
        self._next_hook()

    def _hooks_to_run(self, status: str) -> list[tuple[str, Step]]:
        blocks = ("on_success", "on_finish") if status == "completed" else (
            "on_failure", "on_finish")
        return [(block, spec) for block in blocks for spec in self._wf.hooks.block(block)
                if spec.name not in self._hook_results]

    def _next_hook(self) -> None:
        while self._hook_queue and not self._hooks_timed_out and self._may_continue():
            block, spec = self._hook_queue.pop(0)
            if block in self._stopped_blocks:
                continue
            self._hook = self._resumed_hooks.pop(spec.name, None) or StepRun(spec, block)
            self._prepare(self._hook)
            return
        self._hook = None
        if self._shutdown:
            self._maybe_leave()
        elif self._phase == "hooks":
            status, error = self._outcome
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
            self._transition(run, S.FAILED, error=self._hooks_timeout_error())

    def _hooks_timeout_error(self) -> str:
        return f"hooks timed out after {self._wf.hooks.timeout}"
