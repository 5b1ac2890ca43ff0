"""``workflow/run`` attempts of an Execution actor: sub-workflows (SPEC 13.3).

An attempt creates its child execution through the same path as any run, with an
idempotency key derived from (parent, step, attempt): a resumed attempt finds the child it
created before the crash instead of creating another (exactly one child per parent step
attempt). The Supervisor reports the child's end (``ChildFinished``), whichever node runs
it. Cancelling the parent cancels its children in the same transaction
(``store.cancel_execution``); a step or workflow timeout cancels the child explicitly. A
mixin of ``actors.execution.ExecutionActor``, on its dispatcher turn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import hashlib
import threading

from actors import messages as m
from actors.context import tell
from mantle.connectors import ConnectorError, ConnectorInterrupted, Invocation
from mantle.errors import MantleError
from mantle.store import Parent

if TYPE_CHECKING:
    from actors.attempts import StepRun

__all__ = ["Children", "child_key", "child_outcome", "run_child_and_wait"]

_ACTION = "workflow/run"


def child_key(parent_id: str, step: str, attempt: int) -> str:
    """The idempotency key of the child of one parent step attempt (at most 255 chars)."""
    digest = hashlib.sha256(step.encode()).hexdigest()[:16]
    return f"mantle-child:{parent_id}:{digest}:{attempt}"


class _ToActor:
    """A RunRequest reply that tells the parent actor instead of waking a waiting thread."""

    def __init__(self, ref, step: str, attempt: int):
        self._ref, self._step, self._attempt = ref, step, attempt

    def set(self, value=None) -> None:
        tell(self._ref, m.ChildCreated(self._step, self._attempt, value))

    def set_exception(self, exc_info) -> None:
        tell(self._ref, m.ChildCreated(self._step, self._attempt, exc_info[1]))


def child_outcome(detail: dict) -> tuple[bool, dict, str | None]:
    """(ok, output, error) of a ``workflow/run`` whose child ended as ``detail`` (13.3)."""
    output = {"execution_id": detail["execution_id"], "status": detail["status"],
              "steps": detail["steps"]}
    if detail["status"] == "completed":
        return True, output, None
    error = f"child execution {detail['execution_id']} {detail['status']}"
    if detail.get("error"):
        error += f": {detail['error']}"
    return False, output, error


class _Waiter:
    """Stands in for an actor ref in ``AwaitChild``: wakes a waiting thread instead."""

    def __init__(self):
        self.done = threading.Event()
        self.detail: dict | None = None

    def tell(self, message: m.ChildFinished) -> None:
        self.detail = message.detail
        self.done.set()


def run_child_and_wait(ctx, supervisor, parent: dict, step: str, attempt: int, key: str,
                       params, token) -> dict:
    """A ``workflow/run`` on the calling thread (an AI tool): create the child (or find it
    again under ``key``), wait for its end, return the step output; raises ConnectorError,
    or ConnectorInterrupted when ``token`` is set (the child is then cancelled)."""
    from actors.context import Reply
    from actors.supervisor import submit_run

    parsed = _params(params)
    if isinstance(parsed, str):
        raise ConnectorError(parsed, retryable=False)
    depth = (parent.get("depth") or 1) + 1
    if depth > ctx.max_depth:
        raise ConnectorError(f"maximum workflow depth {ctx.max_depth} exceeded",
                             retryable=False)
    workflow, version, inputs = parsed
    reply = Reply()
    submit_run(ctx, supervisor, m.RunRequest(
        workflow, inputs, version, _trigger(parent["id"]), "engine", key, reply,
        parent=Parent(parent["id"], step, depth)))
    try:
        created = reply.get(timeout=60)
    except MantleError as exc:
        raise ConnectorError(f"{_ACTION}: {exc.message}", retryable=False) from None
    waiter = _Waiter()
    supervisor.tell(m.AwaitChild(created.execution_id, waiter, step, attempt))
    while not waiter.done.wait(0.05):
        if token.is_set():
            supervisor.tell(m.CancelExecution(created.execution_id, "engine", None))
            raise ConnectorInterrupted()
    ok, output, error = child_outcome(waiter.detail)
    if not ok:
        raise ConnectorError(error, output=output)
    return output


def _trigger(parent_id: str) -> dict:
    return {"type": "workflow", "payload": None, "parent_execution_id": parent_id}


def _params(params) -> tuple[str, int | None, dict] | str:
    """(workflow, version, inputs) from the step's params, or the error."""
    if not isinstance(params, dict):
        return f"{_ACTION}: params must be a map"
    workflow = params.get("workflow")
    if not isinstance(workflow, str) or not workflow:
        return f"{_ACTION}: workflow is required"
    version = params.get("version")
    if version is not None and (isinstance(version, bool) or not isinstance(version, int)
                                or version < 1):
        return f'{_ACTION}: "version" must be a positive integer'
    inputs = params.get("inputs")
    if inputs is not None and not isinstance(inputs, dict):
        return f'{_ACTION}: "inputs" must be a map'
    return workflow, version, inputs or {}


class Children:
    def _start_child(self, run: StepRun, invocation: Invocation) -> None:
        """Create (or find again) this attempt's child execution."""
        from actors.supervisor import submit_run

        parsed = _params(run.params)
        depth = (self._ex.get("depth") or 1) + 1
        if isinstance(parsed, str):
            self._child_failed(run, parsed, retryable=False)
            return
        if depth > self._ctx.max_depth:
            self._child_failed(run, f"maximum workflow depth {self._ctx.max_depth} exceeded",
                               retryable=False)
            return
        workflow, version, inputs = parsed
        reply = _ToActor(self.actor_ref, run.spec.name, run.attempt)
        run.child = ""  # the child is being created
        submit_run(self._ctx, self._sup, m.RunRequest(
            workflow, inputs, version, _trigger(self._id), "engine",
            child_key(self._id, run.spec.name, run.attempt), reply,
            parent=Parent(self._id, run.spec.name, depth)))

    def _on_ChildCreated(self, message: m.ChildCreated) -> None:
        run = self._run_of(message.step, False) or self._run_of(message.step, True)
        if run is None or run.stage != "running" or run.attempt != message.attempt:
            return
        if isinstance(message.result, BaseException):
            error = message.result.message if isinstance(message.result, MantleError) \
                else str(message.result)
            self._child_failed(run, f"{_ACTION}: {error}",
                               retryable=not isinstance(message.result, MantleError))
            return
        run.child = message.result.execution_id
        self._sup.tell(m.AwaitChild(run.child, self.actor_ref, run.spec.name, run.attempt))

    def _on_ChildFinished(self, message: m.ChildFinished) -> None:
        run = self._run_of(message.step, False) or self._run_of(message.step, True)
        if run is None or run.stage != "running" or run.attempt != message.attempt:
            return
        ok, output, error = child_outcome(message.detail)
        self._on_AttemptFinished(m.AttemptFinished(
            step=run.spec.name, attempt=run.attempt, hook=run.hook, ok=ok,
            output=output, error=error, retryable=True))

    def _child_failed(self, run: StepRun, error: str, retryable: bool) -> None:
        self._on_AttemptFinished(m.AttemptFinished(
            step=run.spec.name, attempt=run.attempt, hook=run.hook, ok=False, error=error,
            retryable=retryable))

    def _stop_child(self, run: StepRun, reason: str) -> None:
        """A timeout ends the attempt: its child is cancelled too (13.3). A cancel of the
        parent cancels children itself; a shutdown or a lost lease leaves the child to run
        (the parent's next owner awaits it)."""
        if run.child and reason in ("timeout", "workflow_timeout", "hooks_timeout"):
            self._sup.tell(m.CancelExecution(run.child, "engine", None))
