"""``workflow/run`` attempts of an Execution actor: sub-workflows (SPEC 13.3).

An attempt creates its child execution through the same path as any run, with an
idempotency key derived from (parent, step or hook, attempt): a resumed attempt finds the
child it created before the crash instead of creating another (exactly one child per parent
step attempt). The creation is refused once the attempt's row is no longer ``running``, and
the write that ends an attempt for any other reason than its child's end (a step, workflow or
hooks timeout, an internal failure) cancels the attempt's children in the same transaction
(``store.cancel_children``): no timeout, takeover or crash can leave a child running that no
parent step awaits. A cancel of the parent cancels its children in its own transaction
(``store.cancel_execution``); a shutdown or a lost lease leaves them to the parent's next
owner. The Supervisor reports the child's end (``ChildFinished``), whichever node runs it. A
mixin of ``actors.execution.ExecutionActor``, on its dispatcher turn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import datetime as dt
import hashlib
import threading
import time

import pykka

from actors import messages as m
from actors.context import tell
from mantle import store
from mantle.connectors import ConnectorError, ConnectorInterrupted, Invocation
from mantle.connectors.base import MAX_OUTPUT_BYTES, json_size, output_too_large
from mantle.errors import LeaseLost, LimitReached, MantleError
from mantle.states import StepStatus as S
from mantle.store import CHILD_KEY_PREFIX, Parent
from mantle.workflow import Step

if TYPE_CHECKING:
    from actors.attempts import StepRun

__all__ = ["Children", "child_key", "child_outcome", "may_have_children",
           "run_child_and_wait"]

_ACTION = "workflow/run"
# How long a tool's child creation may take before the tool call fails (a stuck database).
_CREATE_TIMEOUT = 60.0


def child_key(parent_id: str, step: str, attempt: int, block: str | None = None,
              call: str | None = None) -> str:
    """The idempotency key of the child of one parent step attempt (at most 255 chars).

    A main step's key is the one children created before hooks had keys of their own carry
    (a resumed execution finds them again); a hook's names its block too, so a hook named
    like a main step has a child of its own. ``call`` names one tool call of an AI attempt
    (``<round>.<index>``): its key extends the attempt's (``<key>:<call>``), so
    ``store.cancel_children`` finds an attempt's tool children with its own child."""
    digest = hashlib.sha256(step.encode()).hexdigest()[:16]
    where = f"{digest}:{attempt}" if block is None else f"{digest}:{block}:{attempt}"
    key = f"{CHILD_KEY_PREFIX}{parent_id}:{where}"
    if call is None:
        return key
    if len(call) > 40:
        call = hashlib.sha256(call.encode()).hexdigest()[:16]
    return f"{key}:{call}"


def may_have_children(spec: Step) -> bool:
    """Whether an attempt of ``spec`` may create children: a ``workflow/run``, or an AI
    step whose tools may be one (SPEC 13.6)."""
    return spec.action in (_ACTION, "ai/completion")


class _ToActor:
    """A RunRequest reply that tells the parent actor instead of waking a waiting thread."""

    def __init__(self, ref, step: str, hook: bool, attempt: int):
        self._ref, self._step, self._hook, self._attempt = ref, step, hook, attempt

    def set(self, value=None) -> None:
        tell(self._ref, m.ChildCreated(self._step, self._hook, self._attempt, value))

    def set_exception(self, exc_info) -> None:
        tell(self._ref, m.ChildCreated(self._step, self._hook, self._attempt, exc_info[1]))


def child_outcome(detail: dict) -> tuple[bool, dict | None, str | None]:
    """(ok, output, error) of a ``workflow/run`` whose child ended as ``detail`` (13.3).

    The output holds every step output of the child, each within the step output limit but
    not all together: over the limit, the attempt fails as any step's would (4.5), or keeps
    the child's error without the output when the child did not complete."""
    output = {"execution_id": detail["execution_id"], "status": detail["status"],
              "steps": detail["steps"]}
    ok = detail["status"] == "completed"
    error = None
    if not ok:
        error = f"child execution {detail['execution_id']} {detail['status']}"
        if detail.get("error"):
            error += f": {detail['error']}"
    if (size := json_size(output)) > MAX_OUTPUT_BYTES:
        return False, None, error or output_too_large(size)
    return ok, output, error


class _Waiter:
    """Stands in for an actor ref in ``AwaitChild``: wakes a waiting thread instead."""

    def __init__(self):
        self.done = threading.Event()
        self.detail: dict | None = None

    def tell(self, message: m.ChildFinished) -> None:
        self.detail = message.detail
        self.done.set()


def run_child_and_wait(ctx, supervisor, parent: dict, attempt: tuple[str, str | None, int],
                       key: str, params, token) -> dict:
    """A ``workflow/run`` on the calling thread (an AI tool of ``attempt``: step name, hook
    block or None, attempt number, of the execution ``parent``): create the child (or find
    it again under ``key``), wait for its end, return the step output; raises
    ConnectorError, or ConnectorInterrupted when ``token`` is set.

    An interrupted wait leaves the child alone, as a ``workflow/run`` step's does: what
    ends the attempt for good cancels it (a timeout, with the attempt's end; a cancel of
    the parent, by its cascade), and after a shutdown or a lost lease the parent's next owner
    makes the tool call again and finds this child under ``key`` (SPEC 13.3, 13.6)."""
    from actors.context import Reply
    from actors.supervisor import ABANDON_MARGIN, submit_run

    parsed = _params(params)
    if isinstance(parsed, str):
        raise ConnectorError(parsed, retryable=False)
    depth = (parent.get("depth") or 1) + 1
    if depth > ctx.max_depth:
        raise ConnectorError(f"maximum workflow depth {ctx.max_depth} exceeded",
                             retryable=False)
    workflow, version, inputs = parsed
    step, block, number = attempt
    reply = Reply()
    give_up = time.monotonic() + _CREATE_TIMEOUT
    # Not committed once the call has given up (``submit_run`` cuts a run off ABANDON_MARGIN
    # before its deadline): the model is told the child was not created, and may call again.
    submit_run(ctx, supervisor, m.RunRequest(
        workflow, inputs, version, _trigger(parent["id"]), "engine", key, reply,
        deadline=give_up + ABANDON_MARGIN,
        parent=Parent(parent["id"], step, depth, number, block is not None),
        fence=(parent["id"], parent["epoch"])))
    created = _created(reply, token, give_up)
    waiter = _Waiter()
    supervisor.tell(m.AwaitChild(created.execution_id, waiter, step, number,
                                 block is not None))
    while not waiter.done.wait(0.05):
        if token.is_set():
            raise ConnectorInterrupted()
    ok, output, error = child_outcome(waiter.detail)
    if not ok:
        raise ConnectorError(error, output=output)
    return output


def _created(reply, token, give_up: float):
    """The creation's answer (a RunResult); ConnectorInterrupted once ``token`` is set,
    ConnectorError when the creation was refused or not committed by ``give_up``."""
    while time.monotonic() <= give_up:
        try:
            return _answer(reply, 0.05)
        except pykka.Timeout:
            if token.is_set():
                raise ConnectorInterrupted() from None
    try:
        if not reply.abandon():  # an answer came meanwhile: it counts
            return _answer(reply, 0)
    except pykka.Timeout:  # the run was cut off at ``give_up``
        pass
    # No child was created, nor will be (barring a COMMIT in doubt then, whose child the
    # attempt's end cancels, ``_write_attempt_end``).
    raise ConnectorError(f"{_ACTION}: the child execution was not created in time")


def _answer(reply, timeout: float):
    try:
        return reply.get(timeout=timeout)
    except MantleError as exc:
        raise ConnectorError(f"{_ACTION}: {exc.message}", retryable=False) from None


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
        name = run.spec.name
        reply = _ToActor(self.actor_ref, name, run.hook, run.attempt)
        run.child = ""  # the child is being created
        submit_run(self._ctx, self._sup, m.RunRequest(
            workflow, inputs, version, _trigger(self._id), "engine",
            child_key(self._id, name, run.attempt, run.block), reply,
            parent=Parent(self._id, name, depth, run.attempt, run.hook), fence=self._fence))

    def _on_ChildCreated(self, message: m.ChildCreated) -> None:
        run = self._run_of(message.step, message.hook)
        if run is None or run.stage != "running" or run.attempt != message.attempt:
            return  # the attempt is over: its end cancelled the child, or refused it
        if isinstance(message.result, LeaseLost):  # its fence refused: not ours any more
            self._on_LeaseLost(m.LeaseLost())
            return
        if isinstance(message.result, BaseException):
            refused = isinstance(message.result, MantleError)
            error = message.result.message if refused else str(message.result)
            # A refusal (unknown workflow, bad inputs) is final, but not the workflow's
            # limit (4.9 ``reject``): a later attempt may find the slot free.
            self._child_failed(run, f"{_ACTION}: {error}", retryable=not refused or
                               isinstance(message.result, LimitReached))
            return
        run.child = message.result.execution_id
        if message.result.existing and run.spec.timeout_seconds:
            self._time_resumed_child(run, message.result)
        self._sup.tell(m.AwaitChild(run.child, self.actor_ref, run.spec.name, run.attempt,
                                    run.hook))

    def _time_resumed_child(self, run: StepRun, child) -> None:
        """Resumed after a restart, the attempt goes on awaiting the child it created: its
        step timeout is due ``timeout`` after that child's creation, not after the resume,
        unless the child ended before then (its outcome stands)."""
        due = child.started_at + dt.timedelta(seconds=run.spec.timeout_seconds)
        if child.completed_at is not None and child.completed_at <= due:
            return
        run.cancel_timers()
        run.timers.append(self._after(
            max(0.0, (due - self._ctx.node.db_now()).total_seconds()),
            m.StepTimedOut(run.spec.name, run.hook, run.attempt)))

    def _on_ChildFinished(self, message: m.ChildFinished) -> None:
        run = self._run_of(message.step, message.hook)
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

    def _write_attempt_end(self, run: StepRun, attempt: int, status: S, op, event) -> None:
        """Write the end (``status``) of ``attempt`` of ``run`` (``op``, then ``event`` as
        ``_write`` takes them). The same transaction cancels the attempt's children still
        running (its child, its tool children): a step, workflow or hooks timeout of the
        parent cancels the child (13.3), also when the attempt ended before its child was
        created, or while nobody ran the parent, and no crash comes between the two. Not
        when a ``workflow/run`` completed: its child's end is what completed it. An AI
        attempt that completed may leave a tool's child whose call gave up waiting for its
        creation (``_created``), committed all the same (its COMMIT in doubt at the time):
        nothing awaits it any more."""
        if not attempt or status == S.SKIPPED or not may_have_children(run.spec) or (
                status == S.COMPLETED and run.spec.action == _ACTION):
            self._write(op, event)
            return
        self._write_cancelling_children(
            op, event, child_key(self._id, run.spec.name, attempt, run.block))

    def _write_cancelling_children(self, op, event, key: str | None) -> None:
        """``_write(op, event)``, cancelling in the same transaction this execution's
        running children created under ``key`` (or extending it; all of them when None);
        the Supervisor then stops them wherever they run (``ChildrenCancelled``)."""
        parent, me, sup = self._id, self._ctx.node_id, self._sup
        found: list = []

        def op_and_cancel():
            cancelled = store.cancel_children(parent, key)
            others = {owner for _, _, owner in cancelled if owner and owner != me}
            found[:] = [(cancelled, store.node_channels(others))] if cancelled else []
            return op()  # last: the journal resolves a final status it returns

        def after(result):
            if found:
                tell(sup, m.ChildrenCancelled(*found[0]))
            return event(result) if callable(event) else event

        self._write(op_and_cancel, after)
