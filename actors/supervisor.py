"""Supervisor actor: the executions this node owns (SPEC 1, 4.9, 4.11, 13.7).

It starts one Execution actor per running execution it owns, promotes queued executions
(oldest first across all nodes), takes over running executions whose owner's lease expired,
routes cancels to their owners, hands out step ``max_parallel`` slots, reports sub-workflow
children's ends to their parents, and stops its executions at shutdown. Its database work
goes through the journal like everyone else's; every journal result comes back as an event.

No single bad message may stop it: each handler's exception is logged and the actor goes on;
if it dies anyway, ``on_death`` marks the engine dead (``/readyz`` 503, no watchdog pings).
All ``_on_*`` methods run on the Supervisor's thread.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable

import pykka

from actors import messages as m
from actors.context import EngineContext, internal_error, tell
from actors.execution import ExecutionActor
from mantle import store
from mantle.errors import (AlreadyClaimed, ExecutionFinished, ExecutionNotFound, GateClosed,
                           JournalStopped)
from mantle.services.channel import local_targets
from mantle.services.nodes import pid_alive

__all__ = ["Supervisor", "RunResult", "submit_run"]

log = logging.getLogger("mantle.engine")

# A run not committed this close to its caller's deadline is dropped, not created: the caller
# has answered 503 (or is about to) and must be free to retry without a duplicate. Checked
# when its operation starts and again just before its transaction commits (the journal's
# ``gate``). A COMMIT itself can last longer than this (the database lost mid-commit, its
# outcome asked once it answers): a run created after its caller gave up is then cancelled
# before it starts, unless its caller can find it again (an idempotency key) or nobody would
# make it again (a claimed cron minute). docs/api.md.
ABANDON_MARGIN = 1.0
TICK = 0.25
PROMOTE_EVERY = 0.5
TAKEOVER_EVERY = 2.0
BACKSTOP_EVERY = 1.0
# A node looks for running executions it owns but runs no actor for (a message or an actor
# lost to a bug) every this many lease periods (30 s by default): they are started again, so
# such a bug delays an execution instead of leaving it running for good under a live owner,
# which no other node would take over.
RECONCILE_LEASES = 2.0
# How many cancels heard for executions without an actor here are remembered: a start under
# way needs the memory for the moments its snapshot or row takes to arrive; on PostgreSQL
# every node hears every node's cancels.
HEARD_CANCELS = 10_000


class RunResult:
    """What a run command answers: the execution and whether it already existed."""

    __slots__ = ("execution_id", "workflow", "version", "started_at", "completed_at",
                 "existing", "queued")

    def __init__(self, execution: dict, existing: bool, queued: bool):
        self.execution_id = execution["id"]
        self.workflow = execution["workflow"]
        self.version = execution["version"]
        self.started_at, self.completed_at = execution["started_at"], execution["completed_at"]
        self.existing = existing
        self.queued = queued

    def body(self) -> dict:
        return {"execution_id": self.execution_id, "workflow": self.workflow,
                "version": self.version}


def _fail(reply, exc: BaseException) -> None:
    if reply is not None:
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
        if msg.claim is not None and not msg.claim():
            return store.Created(error=AlreadyClaimed())
        created = store.create_execution(
            msg.workflow, msg.inputs, msg.version, msg.trigger, ctx.node_id, msg.actor,
            msg.idempotency_key, retry_of=msg.retry_of, from_step=msg.from_step,
            parent=msg.parent, now=ctx.node.db_now())
        if msg.reuse and created.execution and not created.existing:
            store.copy_steps(created.execution["id"], list(msg.reuse))
        return created

    def done(created: store.Created | None) -> None:
        if created is None:
            _fail(msg.reply, pykka.Timeout("the run was not written in time"))
        elif created.error is not None:
            _fail(msg.reply, created.error)
        elif (msg.reply.set(RunResult(created.execution, created.existing, created.queued))
                or msg.idempotency_key is not None or msg.claim is not None):
            if not created.existing:
                tell(supervisor, m.Created(msg, created))
        else:
            log.warning("run abandoned", extra={
                "execution_id": created.execution["id"], "workflow": msg.workflow,
                "reason": "created after its caller stopped waiting"})
            tell(supervisor, m.CancelExecution(created.execution["id"], "engine", None))

    def failed(exc: BaseException) -> None:
        _fail(msg.reply, pykka.Timeout("the run was not written in time")
              if isinstance(exc, GateClosed) else exc)

    def wanted() -> bool:
        """Commit only while the caller still waits: a run whose caller gave up (answered
        503) is never created, however long its transaction waited (a row lock)."""
        return time.monotonic() <= msg.deadline - ABANDON_MARGIN

    ctx.journal.submit(op, done, failed, reads=msg.workflow if msg.version is None else None,
                       gate=wanted if msg.deadline is not None else None, fence=msg.fence)


class _Slot:
    """The ``max_parallel`` slots of one (workflow, step, hook) in this process: who holds one
    (execution, attempt token) and who waits, in order."""

    __slots__ = ("holders", "waiting")

    def __init__(self):
        self.holders: set[tuple[str, int]] = set()
        self.waiting: collections.deque[tuple[str, int, int]] = collections.deque()


class Supervisor(pykka.ThreadingActor):
    use_daemon_thread = True

    def __init__(self, ctx: EngineContext, on_ended: Callable[[str, str], None],
                 on_death: Callable[[], None], takeover: bool = False):
        super().__init__()
        self._ctx = ctx
        self._on_ended = on_ended
        self._on_death = on_death
        self._takeover = takeover
        self._live: dict[str, pykka.ActorRef] = {}
        self._starting: set[str] = set()  # snapshots being loaded for a start
        # Cancels heard for executions this node runs no actor for (yet), newest last: one
        # whose start is under way (its snapshot or the creation's row may predate the
        # cancel) is never started. Cancels are final, so an id may stay here for good.
        self._heard: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._epochs: dict[str, int] = {}
        self._cancelling: set[str] = set()
        self._slots: dict[tuple[str, str, bool], _Slot] = {}  # (workflow, step, hook)
        self._awaiting: dict[str, list[tuple[pykka.ActorRef, str, bool, int]]] = {}
        self._shutdown = False
        self._reconcile_every = RECONCILE_LEASES * ctx.node.ttl
        self._due = {"promote": 0.0, "takeover": 0.0, "backstop": 0.0,
                     "reconcile": time.monotonic() + self._reconcile_every}

    def on_start(self) -> None:
        self._after(0.0, m.Tick())

    def on_receive(self, message):
        handler = _HANDLERS.get(type(message))
        if handler is None:
            return super().on_receive(message)
        try:
            return handler(self, message)
        except Exception:  # the Supervisor must outlive any one bad message
            log.exception("supervisor error", extra={"message_type": type(message).__name__})
            return None

    def on_failure(self, exc_type, exc_value, traceback) -> None:
        log.error("engine supervisor stopped", extra={"error": str(exc_value)})
        self._on_death()

    def on_stop(self) -> None:
        """Stopped by the engine at the end of a shutdown, or by anything else: then the
        engine cannot work any more and says so (``/readyz``, watchdog, an ERROR line)."""
        if not self._shutdown:
            log.error("engine supervisor stopped", extra={"error": "stopped"})
            self._on_death()

    def _write(self, op, event: Callable, failed: Callable | None = None) -> None:
        """Run ``op`` in the journal; tell this actor ``event(result)`` once committed."""
        ref = self.actor_ref
        self._ctx.journal.submit(op, lambda result: tell(ref, event(result)), failed)

    def _after(self, delay: float, message) -> None:
        ref = self.actor_ref
        self._ctx.timers.schedule(delay, lambda: tell(ref, message))

    # --- starting executions ---

    def _on_Created(self, msg: m.Created) -> None:
        created = msg.created
        if created.queued:
            self._due["promote"] = 0.0  # a slot may be free already
            return
        self._start(created.execution, created.model, tuple(msg.request.reuse), resumed=False)

    def _start(self, execution: dict, model, rows, resumed: bool) -> None:
        if execution["id"] in self._live or execution["id"] in self._heard or self._shutdown:
            return
        try:
            actor = ExecutionActor.start(self._ctx, self.actor_ref, model, execution)
        except Exception as exc:
            self._unstartable(execution["id"], execution["epoch"],
                              str(exc) or type(exc).__name__,
                              execution["workflow"])
            return
        self._live[execution["id"]] = actor
        self._epochs[execution["id"]] = execution["epoch"]
        actor.tell(m.Begin(execution, tuple(rows), resumed))

    def _on_StartExecution(self, msg: m.StartExecution) -> None:
        ref = self.actor_ref
        self._starting.add(msg.execution_id)

        def failed(exc: BaseException) -> None:
            # Shutting down (the journal stopped): the next owner starts it.
            tell(ref, m.StartFailed(msg.execution_id, msg.epoch,
                                    None if isinstance(exc, JournalStopped) else exc))

        self._write(lambda: store.execution_snapshot(msg.execution_id),
                    lambda snapshot: m.SnapshotLoaded(msg, snapshot), failed)

    def _on_SnapshotLoaded(self, msg: m.SnapshotLoaded) -> None:
        execution_id = msg.start.execution_id
        self._starting.discard(execution_id)
        # A cancel committed after the snapshot was read (it says ``running``): the cancel is
        # what is true; its end was reported when it was heard.
        heard = execution_id in self._heard
        snapshot = msg.snapshot
        if snapshot is None:
            return
        execution = snapshot.execution
        mine = execution["owner"] == self._ctx.node_id and execution["epoch"] == msg.start.epoch
        if mine and (heard or execution["status"] == "cancelled"):
            self._close_cancelled(execution_id, msg.start.epoch, execution["workflow"],
                                  snapshot.rows)
            return
        if not mine or execution["status"] != "running":
            return
        if snapshot.error is not None:
            self._unstartable(execution["id"], execution["epoch"], snapshot.error,
                              execution["workflow"])
        else:
            self._start(execution, snapshot.model, snapshot.rows, msg.start.resumed)

    def _close_cancelled(self, execution_id: str, epoch: int, workflow: str, rows) -> None:
        """An execution this node owns (taken over, restarted) was cancelled before its
        actor started: no actor records its steps that were running when its last owner
        stopped, and no other node closes the steps of a live owner; so they end
        ``cancelled`` here (4.6), as the actor would have ended them. Fenced."""
        if any(row["status"] in ("pending", "running") for row in rows):
            self._ctx.journal.submit(
                lambda: store.close_cancelled_steps(execution_id),
                lambda steps: self._closed_unrun(execution_id, workflow, steps),
                fence=(execution_id, epoch))
        else:
            self._closed_unrun(execution_id, workflow, [])

    def _closed_unrun(self, execution_id: str, workflow: str, steps) -> None:
        """A cancelled execution that no actor stopped (its owner died first, or the cancel
        came while this node loaded it), whose steps still open this node ended
        ``cancelled``: logged as an actor logs its end, and its main steps counted (9.1).
        The node that committed the cancel counted the execution."""
        if steps:
            log.info("steps of a cancelled execution closed", extra={
                "workflow": workflow, "execution_id": execution_id,
                "steps": [step for step, _ in steps]})
        for step, hook in steps:
            if not hook:
                self._ctx.metrics.steps.labels(workflow, step, "cancelled").inc()
        log.info("execution finished", extra={
            "workflow": workflow, "execution_id": execution_id, "status": "cancelled"})

    def _on_StartFailed(self, msg: m.StartFailed) -> None:
        self._starting.discard(msg.execution_id)
        if msg.error is not None:
            self._unstartable(msg.execution_id, msg.epoch,
                              str(msg.error) or type(msg.error).__name__)

    def _unstartable(self, execution_id: str, epoch: int, reason: str,
                     workflow: str | None = None) -> None:
        """An execution this node owns but cannot load or start (its version missing or
        unreadable, its rows not what this code expects) ends ``failed`` with ``internal
        error: <reason>`` (13.1.12). Left ``running`` under a live owner, nothing would ever
        take it over, and it would hold its workflow's ``max_parallel_executions`` slot for
        good. Its running children end with it (cancelled, in the same transaction): no step
        of it awaits them any more (13.3). Fenced: only while this node still owns it."""
        error = internal_error(reason)
        log.error("execution could not be started",
                  extra={"execution_id": execution_id, "error": error})
        ref, metrics, me = self.actor_ref, self._ctx.metrics, self._ctx.node_id

        def op():
            """(the workflow of the execution ended, its children cancelled, their owners'
            channels); None when it was no longer running."""
            if not store.fail_execution(execution_id, error).changed:
                return None
            cancelled = store.cancel_children(execution_id)
            others = {owner for _, _, owner in cancelled if owner and owner != me}
            return (workflow or store.workflow_of(execution_id), cancelled,
                    store.node_channels(others))

        def done(result) -> None:
            if result is not None:
                ended, cancelled, channels = result
                metrics.executions.labels(ended, "failed").inc()
                log.info("execution finished", extra={
                    "workflow": ended, "execution_id": execution_id, "status": "failed"})
                tell(ref, m.ExecutionEnded(execution_id, ended, "failed"))
                if cancelled:
                    tell(ref, m.ChildrenCancelled(cancelled, channels))

        self._ctx.journal.submit(op, done, fence=(execution_id, epoch))

    # --- cancel ---

    def _on_CancelExecution(self, msg: m.CancelExecution) -> None:
        me = self._ctx.node_id

        def op():
            cancelled = store.cancel_execution(msg.execution_id, msg.actor)
            owners = {owner for _, _, owner in (cancelled.cancelled if cancelled else ())
                      if owner and owner != me}
            return cancelled, store.node_channels(owners)

        self._write(op, lambda result: m.CancelCommitted(msg, *result),
                    failed=lambda exc: _fail(msg.reply, exc))

    def _on_CancelCommitted(self, msg: m.CancelCommitted) -> None:
        cancelled, reply = msg.cancelled, msg.request.reply
        if cancelled is None:
            _fail(reply, ExecutionNotFound(msg.request.execution_id))
            return
        if cancelled.previous not in ("pending", "running"):
            _fail(reply, ExecutionFinished(msg.request.execution_id, cancelled.previous))
            return
        if reply is not None:
            reply.set(cancelled.previous)
        if cancelled.previous == "pending":  # queued: no actor ran it, none logs its end
            log.info("execution finished", extra={
                "workflow": cancelled.workflow, "execution_id": msg.request.execution_id,
                "status": "cancelled"})
        self._cancelled(cancelled.cancelled, msg.channels)

    def _on_ChildrenCancelled(self, msg: m.ChildrenCancelled) -> None:
        """A parent's step attempt ended and cancelled its children with it (13.3)."""
        self._cancelled(msg.cancelled, msg.channels)

    def _cancelled(self, cancelled, channels) -> None:
        """Executions committed ``cancelled``, as (id, workflow, owner): counted, and
        stopped here or by their owners on this host (other hosts hear NOTIFY)."""
        for execution_id, workflow, owner in cancelled:
            self._ctx.metrics.executions.labels(workflow, "cancelled").inc()
            if owner == self._ctx.node_id or owner is None:
                self._cancel_local(execution_id)
        node = self._ctx.node
        self._ctx.channel.send(local_targets(cancelled, channels, node.host_key, node.id))

    def _on_CancelNotified(self, msg: m.CancelNotified) -> None:
        self._cancel_local(msg.execution_id)

    def _cancel_local(self, execution_id: str) -> None:
        actor = self._live.get(execution_id)
        if actor is None:
            self._heard[execution_id] = None
            self._heard.move_to_end(execution_id)
            if len(self._heard) > HEARD_CANCELS:
                self._heard.popitem(last=False)
            self._on_ended(execution_id, "cancelled")
        elif execution_id not in self._cancelling:
            self._cancelling.add(execution_id)
            tell(actor, m.Cancel())

    # --- the end of an execution ---

    def _on_ExecutionEnded(self, msg: m.ExecutionEnded) -> None:
        self._live.pop(msg.execution_id, None)
        self._epochs.pop(msg.execution_id, None)
        self._cancelling.discard(msg.execution_id)
        for key, slot in list(self._slots.items()):
            before = len(slot.holders)
            slot.holders = {h for h in slot.holders if h[0] != msg.execution_id}
            slot.waiting = collections.deque(w for w in slot.waiting
                                             if w[0] != msg.execution_id)
            if len(slot.holders) < before:
                self._grant_waiting(key, slot)
        self._on_ended(msg.execution_id, msg.status)
        if msg.execution_id in self._awaiting:
            self._look_up_children([msg.execution_id])
        self._due["promote"] = 0.0

    # --- queue, takeover, backstops ---

    def _on_Tick(self, _msg: m.Tick) -> None:
        if self._shutdown:
            return
        now = time.monotonic()
        if now >= self._due["promote"]:
            self._due["promote"] = now + PROMOTE_EVERY
            self._promote()
        if self._takeover and now >= self._due["takeover"]:
            self._due["takeover"] = now + TAKEOVER_EVERY
            node = self._ctx.node

            def claim():
                store.expire_dead_neighbours(node.id, node.host_key, pid_alive)
                return node.claim(lambda floor: (
                    store.close_orphaned_steps(node.id, expired_since=floor),
                    store.claim_expired(node.id, expired_since=floor))) or ([], [])

            def claimed(result):
                closed, taken = result
                for execution_id, workflow, steps in closed:  # its owner died first
                    self._closed_unrun(execution_id, workflow, steps)
                return m.Claimed(tuple(taken))

            self._write(claim, claimed)
        if now >= self._due["reconcile"]:
            self._due["reconcile"] = now + self._reconcile_every
            me = self._ctx.node_id
            self._write(lambda: store.owned_running(me), lambda owned: m.OwnedFound(tuple(owned)))
        if now >= self._due["backstop"]:
            self._due["backstop"] = now + BACKSTOP_EVERY
            live = list(self._live)
            if live:
                self._write(lambda: store.cancelled_among(live),
                            lambda found: m.CancelsFound(tuple(found)))
            if self._awaiting:
                self._look_up_children(list(self._awaiting))
        self._after(TICK, m.Tick())

    def _promote(self) -> None:
        """Start queued executions where a slot is free: one journal operation over every
        workflow with a queue. A queue head that cannot be started (its version missing or
        unreadable) is ended ``failed`` there (13.1.12), reported here as it would be had it
        been started and failed, and its queue goes on."""
        me, own_only = self._ctx.node_id, not self._takeover
        ref, metrics = self.actor_ref, self._ctx.metrics

        def op():
            return [store.promote_queued(workflow, me, own_only=own_only,
                                         internal_error=internal_error)
                    for workflow in store.queued_workflows()]

        def done(promotions) -> None:
            for promotion in promotions:
                for execution_id, error in promotion.failed:
                    log.error("execution could not be started",
                              extra={"execution_id": execution_id, "error": error})
                    metrics.executions.labels(promotion.workflow, "failed").inc()
                    log.info("execution finished", extra={
                        "workflow": promotion.workflow, "execution_id": execution_id,
                        "status": "failed"})
                    tell(ref, m.ExecutionEnded(execution_id, promotion.workflow, "failed"))
            tell(ref, m.Promoted(tuple(started for promotion in promotions
                                       for started in promotion.started)))

        self._ctx.journal.submit(op, done)

    def _on_Promoted(self, msg: m.Promoted) -> None:
        for execution_id, epoch in msg.promoted:
            self._on_StartExecution(m.StartExecution(execution_id, epoch))

    def _on_Claimed(self, msg: m.Claimed) -> None:
        for execution_id, epoch in msg.claimed:
            log.info("execution taken over", extra={"execution_id": execution_id})
            self._on_StartExecution(m.StartExecution(execution_id, epoch, resumed=True))

    def _on_OwnedFound(self, msg: m.OwnedFound) -> None:
        """Start the running executions this node owns and neither runs nor is starting.
        One created here is live by now: its ``Created`` was told before this look-up's
        answer (both come from the journal, in commit order); one promoted or taken over is
        live or starting, for the same reason."""
        if self._shutdown:
            return
        for execution_id, epoch in msg.owned:
            if execution_id not in self._live and execution_id not in self._starting:
                log.warning("execution restarted", extra={"execution_id": execution_id})
                self._on_StartExecution(m.StartExecution(execution_id, epoch, resumed=True))

    def _on_CancelsFound(self, msg: m.CancelsFound) -> None:
        for execution_id in msg.execution_ids:
            self._cancel_local(execution_id)

    def _on_LeaseLapsed(self, _msg: m.LeaseLapsed) -> None:
        """The lease ran out before this node renewed it: executions taken over meanwhile
        carry a new epoch; stop those here at once, before they write or act further."""
        fences = set(self._epochs.items())
        if fences:
            self._write(lambda: store.refused_fences(fences),
                        lambda lost: m.OwnersChecked(tuple(sorted(id_ for id_, _ in lost))))

    def _on_OwnersChecked(self, msg: m.OwnersChecked) -> None:
        for execution_id in msg.lost:
            actor = self._live.get(execution_id)
            if actor is not None:
                tell(actor, m.LeaseLost())

    # --- sub-workflows ---

    def _on_AwaitChild(self, msg: m.AwaitChild) -> None:
        self._awaiting.setdefault(msg.child_id, []).append(
            (msg.parent, msg.step, msg.hook, msg.attempt))
        self._look_up_children([msg.child_id])

    def _look_up_children(self, child_ids: list[str]) -> None:
        def op():
            return store.final_results(child_ids)

        ref = self.actor_ref

        def done(results: dict) -> None:
            for child_id, detail in results.items():
                tell(ref, m.ChildResult(child_id, detail))

        self._ctx.journal.submit(op, done)

    def _on_ChildResult(self, msg: m.ChildResult) -> None:
        for parent, step, hook, attempt in self._awaiting.pop(msg.execution_id, ()):
            tell(parent, m.ChildFinished(step, hook, attempt, msg.detail))

    # --- step slots (max_parallel, 2.3, 13.1.10) ---

    def _on_AcquireStepSlot(self, msg: m.AcquireStepSlot) -> None:
        slot = self._slots.setdefault((msg.workflow, msg.step, msg.hook), _Slot())
        if len(slot.holders) < msg.limit and not slot.waiting:
            slot.holders.add((msg.execution_id, msg.token))
            self._grant(msg.execution_id, msg.step, msg.token, msg.hook)
        else:
            slot.waiting.append((msg.execution_id, msg.token, msg.limit))

    def _on_ReleaseStepSlot(self, msg: m.ReleaseStepSlot) -> None:
        key = (msg.workflow, msg.step, msg.hook)
        slot = self._slots.get(key)
        if slot is None:
            return
        holder = (msg.execution_id, msg.token)
        if holder in slot.holders:
            slot.holders.discard(holder)  # exactly once: a second release finds nothing
            self._grant_waiting(key, slot)
        else:
            slot.waiting = collections.deque(w for w in slot.waiting if w[:2] != holder)

    def _grant_waiting(self, key: tuple[str, str, bool], slot: _Slot) -> None:
        while slot.waiting and len(slot.holders) < slot.waiting[0][2]:
            execution_id, token, _ = slot.waiting.popleft()
            if execution_id in self._live and execution_id not in self._cancelling:
                slot.holders.add((execution_id, token))
                self._grant(execution_id, key[1], token, key[2])
        if not slot.holders and not slot.waiting:
            del self._slots[key]

    def _grant(self, execution_id: str, step: str, token: int, hook: bool) -> None:
        actor = self._live.get(execution_id)
        if actor is not None:
            tell(actor, m.StepSlotGranted(step, token, hook))

    # --- shutdown and probes ---

    def _on_Shutdown(self, msg: m.Shutdown) -> None:
        self._shutdown = True
        for actor in list(self._live.values()):
            tell(actor, m.Shutdown(msg.deadline))
        self._after(max(0.0, msg.deadline - time.monotonic()), m.StopNow())

    def _on_StopNow(self, _msg: m.StopNow) -> None:
        for actor in list(self._live.values()):
            tell(actor, m.StopNow())

    def _on_Ping(self, _msg: m.Ping) -> bool:
        return True

    def _on_LiveCount(self, _msg: m.LiveCount) -> int:
        return len(self._live)


def _handlers() -> dict[type, object]:
    """Message type -> handler: every message the Supervisor understands, explicitly."""
    s = Supervisor
    return {
        m.Created: s._on_Created, m.StartExecution: s._on_StartExecution,
        m.SnapshotLoaded: s._on_SnapshotLoaded, m.StartFailed: s._on_StartFailed,
        m.OwnedFound: s._on_OwnedFound, m.CancelExecution: s._on_CancelExecution,
        m.CancelCommitted: s._on_CancelCommitted, m.CancelNotified: s._on_CancelNotified,
        m.ExecutionEnded: s._on_ExecutionEnded, m.Tick: s._on_Tick,
        m.Promoted: s._on_Promoted, m.Claimed: s._on_Claimed,
        m.CancelsFound: s._on_CancelsFound, m.LeaseLapsed: s._on_LeaseLapsed,
        m.OwnersChecked: s._on_OwnersChecked, m.AwaitChild: s._on_AwaitChild,
        m.ChildResult: s._on_ChildResult, m.ChildrenCancelled: s._on_ChildrenCancelled,
        m.AcquireStepSlot: s._on_AcquireStepSlot,
        m.ReleaseStepSlot: s._on_ReleaseStepSlot, m.Shutdown: s._on_Shutdown,
        m.StopNow: s._on_StopNow, m.Ping: s._on_Ping, m.LiveCount: s._on_LiveCount,
    }


_HANDLERS = _handlers()
