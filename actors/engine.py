"""The engine's thread-safe command API for code outside the actor system (CLI, web, tests).

``Engine`` wires the journal, the timers, the node lease, the cancel channel, the pools and the
Supervisor together. Every call ``ask``s or waits with a timeout; nothing here blocks an actor.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any

import pykka

from actors import messages as m
from actors.context import EngineContext, Reply
from actors.supervisor import RunResult, Supervisor, submit_run
from mantle.db import release_connection
from mantle.errors import EngineSaturated, ShuttingDown
from mantle.metrics import Metrics
from mantle.services.channel import CancelChannel
from mantle.services.journal import Journal
from mantle.services.nodes import DEFAULT_LEASE_TTL, NodeLease
from mantle.services.pools import ThreadPool
from mantle.services.timers import Timers

__all__ = ["Engine", "RunResult", "STEP_THREADS", "EVALUATION_THREADS"]

# Blocking attempts in flight at once (each holds one thread while it waits on I/O).
STEP_THREADS = 256
# ``if``/template/credential evaluations at once. They are CPU-bound: more threads would not
# evaluate faster under one interpreter lock, only take it from the cancel path more often.
EVALUATION_THREADS = 2
# Attempts waiting for a step thread beyond which new runs are refused (503).
SATURATED_STEPS = 10_000
# The most seconds the end of ``shutdown`` takes after the deadline (docs/systemd.md).
STOP_GRACE = 3.0


class Engine:
    """One per process: start it, send it commands, shut it down.

    ``kind``: ``serve`` (the daemon, which also takes over executions whose owner's lease
    expired), ``worker`` (one of ``serve --workers``), or ``run`` (an in-process CLI run).
    """

    def __init__(self, database, *, metrics: Metrics | None = None,
                 plugins_dir: str = ".mantle/plugins", env: Mapping[str, str] | None = None,
                 secrets: Mapping[str, str] | None = None, resume_orphans: bool = False,
                 on_outage=None, kind: str | None = None,
                 lease_ttl: float = DEFAULT_LEASE_TTL, max_depth: int = 10,
                 step_threads: int = STEP_THREADS):
        import os

        self.metrics = metrics or Metrics()
        self._database = database
        self._takeover = resume_orphans
        self.journal = Journal(database, on_outage=on_outage)
        self.timers = Timers()
        self.node = NodeLease(database, kind or ("serve" if resume_orphans else "run"),
                              ttl=lease_ttl, on_lapse=self._lapsed)
        self.channel = CancelChannel(database, self.node.id, self._cancel_heard)

        def release() -> None:
            release_connection(database)

        self._ended: dict[str, str] = {}
        self._ended_cond = threading.Condition()
        self._context = EngineContext(
            journal=self.journal, timers=self.timers, metrics=self.metrics, node=self.node,
            channel=self.channel, plugins_dir=plugins_dir, env=dict(env or {}),
            secrets=os.environ if secrets is None else secrets,
            # a pool thread keeps no database connection between tasks (release_connection)
            steps=ThreadPool("mantle-step", step_threads, after_task=release),
            evaluation=ThreadPool("mantle-eval", EVALUATION_THREADS, after_task=release),
            max_depth=max_depth)
        self._supervisor: pykka.ActorRef | None = None
        self._stopping = False
        self._dead = False

    @property
    def runner(self) -> str:
        """This process's node id (SPEC 13.7)."""
        return self.node.id

    def start(self) -> Engine:
        self.journal.start()
        self.channel.start()
        self.node.channel = self.channel.name
        self.node.start()
        self._supervisor = Supervisor.start(self._context, self._ended_callback,
                                            self._died, takeover=self._takeover)
        return self

    # --- commands ---

    def run(self, workflow: str, inputs: dict | None = None, *, version: int | None = None,
            trigger: Any = None, actor: str = "cli", idempotency_key: str | None = None,
            timeout: float = 30.0, retry_of: str | None = None, from_step: str | None = None,
            reuse: tuple = (), claim=None) -> RunResult:
        """Create an execution and start it (or queue it); the row exists on return.

        Raises ``pykka.Timeout`` when the row is not written within ``timeout`` (database
        outage); such a run never runs a step, so the caller may retry it (it is not
        created, or, where its COMMIT's outcome could not be told in time, ends
        ``cancelled``; see ``submit_run``). Raises
        ShuttingDown once the engine stops starting work, EngineSaturated while its queues
        are long (issue 11.9: back-pressure instead of growing queues). ``claim`` (optional)
        is called in the transaction that creates the execution: when it returns False the
        run is not created and AlreadyClaimed is raised; when the run is not created, the
        claim is not made either.
        """
        supervisor = self._supervisor
        if self._stopping or supervisor is None:
            raise ShuttingDown()
        if self.saturated:
            raise EngineSaturated()
        reply = Reply()
        submit_run(self._context, supervisor, m.RunRequest(
            workflow, inputs, version, trigger, actor, idempotency_key, reply, retry_of,
            from_step, tuple(reuse), deadline=time.monotonic() + timeout, claim=claim))
        try:
            return reply.get(timeout=timeout)
        except pykka.Timeout:
            if reply.abandon():  # a run created after all is not started (submit_run)
                raise
            return reply.get()  # answered while this wait ended

    def cancel(self, execution_id: str, actor: str = "cli", timeout: float = 30.0) -> str:
        """Commit ``cancelled``; return the status it had. Raises ExecutionNotFound or
        ExecutionFinished. The owner, wherever it runs, interrupts the execution."""
        supervisor = self._supervisor  # read once: shutdown may clear it meanwhile
        reply = Reply()
        try:
            if supervisor is None:
                raise pykka.ActorDeadError("the engine is stopped")
            supervisor.tell(m.CancelExecution(execution_id, actor, reply))
        except pykka.ActorDeadError:  # stopped: the last requests of a shutdown land here
            raise ShuttingDown() from None
        return reply.get(timeout=timeout)

    def wait(self, execution_id: str, timeout: float | None = None,
             poll: callable = None) -> str | None:
        """Wait until the execution ends in this process; ``poll()`` (optional) is called
        every half second and may return a final status seen in the database."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._ended_cond:
            while execution_id not in self._ended:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._ended_cond.wait(0.5 if left is None else min(0.5, left))
                if poll is not None and execution_id not in self._ended:
                    status = poll()
                    if status is not None:
                        return status
            return self._ended[execution_id]

    # --- health ---

    @property
    def saturated(self) -> bool:
        return self.journal.saturated or self._context.steps.backlog > SATURATED_STEPS

    def problem(self) -> str | None:
        """Why the engine cannot work, or None: a dead Supervisor or service thread."""
        if self._dead or (self._supervisor is not None and not self._supervisor.is_alive()):
            return "supervisor stopped"
        if not self.journal.alive and not self._stopping:
            return "journal stopped"
        return None

    def responsive(self, timeout: float = 2.0) -> bool:
        """True when the Supervisor answers a ping in time (systemd watchdog)."""
        supervisor = self._supervisor  # read once: shutdown may clear it meanwhile
        if supervisor is None or self.problem() is not None:
            return False
        try:
            return bool(supervisor.ask(m.Ping(), timeout=timeout))
        except (pykka.Timeout, pykka.ActorDeadError):
            return False

    def live_count(self, timeout: float = 5.0) -> int:
        return self._supervisor.ask(m.LiveCount(), timeout=timeout)

    # --- shutdown ---

    def stop_starting(self, deadline: float) -> None:
        """SPEC 10.3 step 3, at once: no execution or step starts any more; running attempts
        may finish until the monotonic ``deadline``, then they are interrupted."""
        if self._stopping or self._supervisor is None:
            return
        self._stopping = True
        try:
            self._supervisor.tell(m.Shutdown(deadline))
        except pykka.ActorDeadError:
            pass

    def shutdown(self, timeout: float = 30.0) -> None:
        """Start nothing new; let running attempts finish for ``timeout`` seconds, then
        interrupt them (their rows stay ``running`` for the next owner); stop everything.
        Returns at most STOP_GRACE seconds after the deadline."""
        if self._supervisor is None:
            return
        deadline = time.monotonic() + timeout
        self.stop_starting(deadline)
        self._wait_settled(deadline + STOP_GRACE / 2)
        self._stop_services()

    def _wait_settled(self, until: float) -> None:
        while time.monotonic() < until:
            try:
                if self.live_count(timeout=1.0) == 0:
                    return
            except (pykka.Timeout, pykka.ActorDeadError):
                return
            time.sleep(0.02)

    def stop_now(self) -> None:
        """Second signal: jump to the deadline."""
        supervisor = self._supervisor
        if supervisor is not None:
            try:
                supervisor.tell(m.StopNow())
            except pykka.ActorDeadError:
                pass

    def _stop_services(self) -> None:
        try:
            self._supervisor.stop(block=True, timeout=1)
        except (pykka.Timeout, pykka.ActorDeadError):
            pass
        self.journal.stop(timeout=STOP_GRACE / 2)
        self.channel.stop()
        self.node.stop()
        self.timers.stop()
        self._supervisor = None

    # --- callbacks from service threads ---

    def _ended_callback(self, execution_id: str, status: str) -> None:
        with self._ended_cond:
            self._ended[execution_id] = status
            if len(self._ended) > 10000:  # keep memory bounded in a long-lived daemon
                for key in list(self._ended)[:5000]:
                    del self._ended[key]
            self._ended_cond.notify_all()

    def _cancel_heard(self, execution_id: str) -> None:
        supervisor = self._supervisor
        if supervisor is not None:
            try:
                supervisor.tell(m.CancelNotified(execution_id))
            except pykka.ActorDeadError:
                pass

    def _lapsed(self) -> None:
        supervisor = self._supervisor
        if supervisor is not None:
            try:
                supervisor.tell(m.LeaseLapsed())
            except pykka.ActorDeadError:
                pass

    def _died(self) -> None:
        self._dead = True
