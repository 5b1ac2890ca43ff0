"""Supervisor actor: owns every execution of this process (SPEC 1, 4.9, 4.11).

It creates executions (limits, idempotency), starts one Execution actor per running
execution, hands out step ``max_parallel`` slots, promotes queued executions, notices cancels
written by other processes, keeps the runner heartbeat, and (in the daemon) resumes orphans.
Its database work goes through the journal like everyone else's.

All ``_on_*`` and ``_after_*`` methods run on the Supervisor's thread.
"""

from __future__ import annotations

import collections
import datetime as dt
import logging
import os
import time
from collections.abc import Callable

import pykka

from actors import messages as m
from actors.context import EngineContext, tell
from actors.execution import ExecutionActor
from mantle import store
from mantle.db.fields import utcnow
from mantle.errors import ExecutionFinished, ExecutionNotFound, MantleError
from mantle.workflow import Workflow, workflow_from_definition

__all__ = ["Supervisor", "RunResult", "ShuttingDown", "submit_run"]

log = logging.getLogger("mantle.engine")

HEARTBEAT_EVERY = 5.0
# A run still in the journal this close to its caller's deadline is dropped, not created: the
# caller has answered 503 (or is about to) and must be free to retry without a duplicate.
ABANDON_MARGIN = 1.0
ORPHAN_SCAN_EVERY = 30.0
STALE_AFTER = 30.0


class ShuttingDown(MantleError):
    def __init__(self) -> None:
        super().__init__("server is shutting down")


class RunResult:
    """What a run command answers: the execution and whether it already existed."""

    __slots__ = ("execution_id", "workflow", "version", "existing", "queued")

    def __init__(self, execution: dict, existing: bool, queued: bool):
        self.execution_id = execution["id"]
        self.workflow = execution["workflow"]
        self.version = execution["version"]
        self.existing = existing
        self.queued = queued

    def body(self) -> dict:
        return {"execution_id": self.execution_id, "workflow": self.workflow,
                "version": self.version}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fail(reply, exc: BaseException) -> None:
    reply.set_exception(exc_info=(type(exc), exc, exc.__traceback__))


def submit_run(ctx: EngineContext, supervisor: pykka.ActorRef, msg: m.RunRequest) -> None:
    """Create the execution in the journal; answer ``msg.reply`` and tell the Supervisor.

    The request goes to the journal from the caller's thread and is answered from the
    journal's, not through the Supervisor: two thread hand-offs fewer on the path of every
    ``POST /run`` (bench/README.md). The Supervisor only hears about the new execution.
    """
    def op():
        if msg.deadline is not None and time.monotonic() > msg.deadline - ABANDON_MARGIN:
            return None
        created = store.create_execution(
            msg.workflow, msg.inputs, msg.version, msg.trigger, ctx.runner, msg.actor,
            msg.idempotency_key, retry_of=msg.retry_of, from_step=msg.from_step)
        if msg.reuse and created.execution and not created.existing:
            store.copy_steps(created.execution["id"], list(msg.reuse))
        return created

    def done(created: store.Created | None) -> None:
        if created is None:
            _fail(msg.reply, pykka.Timeout("the run was not written in time"))
            return
        if created.error is not None:
            _fail(msg.reply, created.error)
            return
        msg.reply.set(RunResult(created.execution, created.existing, created.queued))
        if not created.existing:
            tell(supervisor, m.Created(msg, created))

    ctx.journal.submit(op, done, lambda exc: _fail(msg.reply, exc))


class Supervisor(pykka.ThreadingActor):
    use_daemon_thread = True

    def __init__(self, ctx: EngineContext, on_ended: Callable[[str, str], None],
                 resume_orphans: bool = False, tick: float = 0.5):
        super().__init__()
        self._ctx = ctx
        self._on_ended = on_ended
        self._resume_orphans = resume_orphans
        self._tick = tick
        self._live: dict[str, pykka.ActorRef] = {}
        self._cancelling: set[str] = set()  # cancelled, actor still winding down
        self._models: collections.OrderedDict[tuple[str, int], Workflow] = \
            collections.OrderedDict()
        self._slots: dict[tuple[str, str], list] = {}
        self._queued: dict[str, int] = {}  # workflow -> limit, while it has queued executions
        self._shutdown = False
        self._last_heartbeat = self._last_scan = 0.0
        self._cancel_seen = utcnow() - dt.timedelta(seconds=5)

    def on_start(self) -> None:
        self._schedule_tick(0.0)

    def on_receive(self, message):
        if isinstance(message, m.Written):
            data, result = message.data
            getattr(self, "_after_" + message.then)(*data, result)
            return None
        handler = getattr(self, "_on_" + type(message).__name__, None)
        if handler is None:
            return super().on_receive(message)
        try:
            return handler(message)
        except Exception:  # the Supervisor must outlive any one bad message
            log.exception("supervisor error")
            return None

    def _write(self, op, then: str, *data, failed=None) -> None:
        ref = self.actor_ref
        self._ctx.journal.submit(op, lambda result: tell(ref, m.Written(then, (data, result))),
                                 failed)

    def _schedule_tick(self, delay: float) -> None:
        ref = self.actor_ref
        self._ctx.timers.schedule(delay, lambda: tell(ref, m.Tick()))

    def _model(self, name: str, version: int, definition: dict) -> Workflow:
        key = (name, version)
        model = self._models.get(key)
        if model is None:
            model = self._models[key] = workflow_from_definition(definition)
            if len(self._models) > 256:
                self._models.popitem(last=False)
        return model

    # --- run ---

    def _on_Created(self, msg: m.Created) -> None:
        execution, created = msg.created.execution, msg.created
        if created.queued:
            model = self._model(execution["workflow"], execution["version"], created.definition)
            self._queued[model.name] = model.max_parallel_executions
            return
        self._start(execution, created.definition, tuple(msg.request.reuse), resumed=False)

    def _start(self, execution: dict, definition: dict, rows, resumed: bool) -> None:
        if execution["id"] in self._live or self._shutdown:
            return
        model = self._model(execution["workflow"], execution["version"], definition)
        actor = ExecutionActor.start(self._ctx, self.actor_ref, model, execution)
        self._live[execution["id"]] = actor
        actor.tell(m.Begin(execution, tuple(rows), resumed))

    def _on_StartExecution(self, msg: m.StartExecution) -> None:
        self._write(lambda: store.execution_snapshot(msg.execution_id), "snapshot",
                    msg.resumed)

    def _after_snapshot(self, resumed: bool, snapshot) -> None:
        if snapshot is None:
            return
        execution, definition, rows = snapshot
        if execution["status"] in ("pending", "running"):
            self._start(execution, definition, rows, resumed)

    # --- cancel ---

    def _on_CancelExecution(self, msg: m.CancelExecution) -> None:
        self._write(lambda: store.cancel_execution(msg.execution_id, msg.actor), "cancelled",
                    msg, failed=lambda exc: _fail(msg.reply, exc))

    def _after_cancelled(self, msg: m.CancelExecution, found: tuple | None) -> None:
        if found is None:
            _fail(msg.reply, ExecutionNotFound(msg.execution_id))
            return
        previous, workflow = found
        if previous not in ("pending", "running"):
            _fail(msg.reply, ExecutionFinished(msg.execution_id, previous))
            return
        msg.reply.set(previous)
        self._cancelled(msg.execution_id, workflow)

    def _cancelled(self, execution_id: str, workflow: str) -> None:
        self._ctx.metrics.executions.labels(workflow, "cancelled").inc()
        actor = self._live.get(execution_id)
        if actor is not None:
            self._cancelling.add(execution_id)
            tell(actor, m.Cancel())
        else:
            self._on_ended(execution_id, "cancelled")

    # --- end of an execution, queue ---

    def _on_ExecutionEnded(self, msg: m.ExecutionEnded) -> None:
        self._live.pop(msg.execution_id, None)
        self._cancelling.discard(msg.execution_id)
        self._on_ended(msg.execution_id, msg.status)
        if msg.workflow in self._queued and not self._shutdown:
            self._promote(msg.workflow)

    def _promote(self, workflow: str) -> None:
        limit = self._queued[workflow]
        self._write(lambda: store.promote_queued(workflow, self._ctx.runner, limit),
                    "promoted", workflow)

    def _after_promoted(self, workflow: str, result: tuple[list[str], bool]) -> None:
        promoted, more = result
        if not more:
            self._queued.pop(workflow, None)
        for execution_id in promoted:
            self._on_StartExecution(m.StartExecution(execution_id))

    # --- step slots ---

    def _on_AcquireStepSlot(self, msg: m.AcquireStepSlot) -> None:
        slot = self._slots.setdefault((msg.workflow, msg.step), [0, collections.deque()])
        if slot[0] < msg.limit:
            slot[0] += 1
            self._grant(msg.execution_id, msg.step)
        else:
            slot[1].append((msg.execution_id, msg.limit))

    def _on_ReleaseStepSlot(self, msg: m.ReleaseStepSlot) -> None:
        slot = self._slots.get((msg.workflow, msg.step))
        if slot is None:
            return
        slot[0] -= 1
        while slot[1] and slot[0] < slot[1][0][1]:
            execution_id, _ = slot[1].popleft()
            if execution_id in self._live:
                slot[0] += 1
                self._grant(execution_id, msg.step)
                break

    def _grant(self, execution_id: str, step: str) -> None:
        actor = self._live.get(execution_id)
        if actor is not None:
            tell(actor, m.StepSlotGranted(step))

    # --- housekeeping ---

    def _on_Tick(self, _msg) -> None:
        if self._shutdown:
            return
        now = time.monotonic()
        ctx = self._ctx
        if now - self._last_heartbeat >= HEARTBEAT_EVERY:
            self._last_heartbeat = now
            self._write(lambda: store.heartbeat(ctx.runner, ctx.hostname, os.getpid()), "noop")
        since = self._cancel_seen
        self._cancel_seen = utcnow() - dt.timedelta(seconds=5)
        if self._live:
            self._write(lambda: store.cancelled_since(ctx.runner, since), "external_cancels")
        for workflow in list(self._queued):
            self._promote(workflow)
        if self._resume_orphans and now - self._last_scan >= ORPHAN_SCAN_EVERY:
            self._last_scan = now
            self.resume_orphans()
        self._schedule_tick(self._tick)

    def _after_noop(self, _result) -> None:
        pass

    def _after_external_cancels(self, found: list[tuple[str, str]]) -> None:
        for execution_id, workflow in found:
            if execution_id in self._live and execution_id not in self._cancelling:
                self._cancelled(execution_id, workflow)

    def resume_orphans(self) -> None:
        """Claim every orphaned execution (4.11) and start it here."""
        ctx = self._ctx
        stale = utcnow() - dt.timedelta(seconds=STALE_AFTER)

        def op():
            claimed = []
            for execution_id, old in store.find_orphans(ctx.hostname, stale, _pid_alive):
                if old != ctx.runner and store.claim(execution_id, old, ctx.runner):
                    claimed.append(execution_id)
            return claimed

        self._write(op, "claimed")

    def _after_claimed(self, claimed: list[str]) -> None:
        for execution_id in claimed:
            self._on_StartExecution(m.StartExecution(execution_id, resumed=True))

    def _on_ResumeOrphans(self, _msg) -> None:
        self.resume_orphans()

    # --- shutdown ---

    def _on_Shutdown(self, msg: m.Shutdown) -> None:
        self._shutdown = True
        for actor in list(self._live.values()):
            tell(actor, m.Shutdown(msg.deadline))
        ref = self.actor_ref
        self._ctx.timers.schedule(max(0.0, msg.deadline - time.monotonic()),
                                  lambda: tell(ref, m.StopNow()))

    def _on_StopNow(self, _msg) -> None:
        for actor in list(self._live.values()):
            tell(actor, m.StopNow())

    def _on_Ping(self, _msg) -> bool:
        return True

    def _on_LiveCount(self, _msg) -> int:
        return len(self._live)
