"""The engine's thread-safe command API for code outside the actor system (CLI, web, tests).

``Engine`` wires the journal, the timers and the Supervisor together. Every call ``ask``s or
waits with a timeout; nothing here blocks an actor.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any

import pykka

from actors import messages as m
from actors.context import EngineContext, Reply
from actors.journal import Journal
from actors.supervisor import RunResult, ShuttingDown, Supervisor, submit_run
from actors.timers import Timers
from mantle.metrics import Metrics

__all__ = ["Engine", "RunResult"]


class Engine:
    """One per process: start it, send it commands, shut it down.

    ``resume_orphans`` makes the Supervisor adopt orphaned executions at start and every 30 s
    (the daemon does this; an in-process CLI run does not).
    """

    def __init__(self, database, *, metrics: Metrics | None = None,
                 plugins_dir: str = ".mantle/plugins", env: Mapping[str, str] | None = None,
                 secrets: Mapping[str, str] | None = None, resume_orphans: bool = False,
                 on_outage=None):
        self.metrics = metrics or Metrics()
        hostname = socket.gethostname()
        self.runner = str(uuid.uuid4())  # this process's node id (SPEC 13.7)
        self.journal = Journal(database, on_outage=on_outage)
        self.timers = Timers()
        self._ended: dict[str, str] = {}
        self._ended_cond = threading.Condition()
        context = EngineContext(journal=self.journal, timers=self.timers, metrics=self.metrics,
                                runner=self.runner, hostname=hostname,
                                plugins_dir=plugins_dir, env=dict(env or {}),
                                secrets=os.environ if secrets is None else secrets)
        self._context = context
        self._resume = resume_orphans
        self._supervisor: pykka.ActorRef | None = None
        self._stopping = False

    def start(self) -> Engine:
        self.journal.start()
        self._supervisor = Supervisor.start(self._context, self._ended_callback,
                                            resume_orphans=self._resume)
        if self._resume:
            self._supervisor.tell(m.ResumeOrphans())
        return self

    # --- commands ---

    def run(self, workflow: str, inputs: dict | None = None, *, version: int | None = None,
            trigger: Any = None, actor: str = "cli", idempotency_key: str | None = None,
            timeout: float = 30.0, retry_of: str | None = None, from_step: str | None = None,
            reuse: tuple = ()) -> RunResult:
        """Create an execution and start it (or queue it); the row exists on return.

        Raises ``pykka.Timeout`` when the row is not written within ``timeout`` (database
        outage); such a run is then never created, so the caller may retry it.
        """
        supervisor = self._supervisor
        if self._stopping or supervisor is None:
            raise ShuttingDown()
        reply = Reply()
        submit_run(self._context, supervisor, m.RunRequest(
            workflow, inputs, version, trigger, actor, idempotency_key, reply, retry_of,
            from_step, tuple(reuse), deadline=time.monotonic() + timeout))
        return reply.get(timeout=timeout)

    def cancel(self, execution_id: str, actor: str = "cli", timeout: float = 30.0) -> str:
        """Commit ``cancelled``; return the status it had. Raises ExecutionNotFound or
        ExecutionFinished."""
        reply = Reply()
        self._supervisor.tell(m.CancelExecution(execution_id, actor, reply))
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

    def responsive(self, timeout: float = 2.0) -> bool:
        """True when the Supervisor answers a ping in time (systemd watchdog)."""
        supervisor = self._supervisor  # read once: shutdown may clear it meanwhile
        if supervisor is None:
            return False
        try:
            return bool(supervisor.ask(m.Ping(), timeout=timeout))
        except (pykka.Timeout, pykka.ActorDeadError):
            return False

    def live_count(self, timeout: float = 5.0) -> int:
        return self._supervisor.ask(m.LiveCount(), timeout=timeout)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Start nothing new; let running attempts finish for ``timeout`` seconds, then
        interrupt them (their rows stay ``running`` for the next runner); stop everything."""
        if self._supervisor is None:
            return
        self._stopping = True
        deadline = time.monotonic() + timeout
        self._supervisor.tell(m.Shutdown(deadline))
        while time.monotonic() < deadline + 2.0:
            try:
                if self.live_count(timeout=2.0) == 0:
                    break
            except (pykka.Timeout, pykka.ActorDeadError):
                break
            time.sleep(0.02)
        self._stop_actors()

    def stop_now(self) -> None:
        """Second signal: jump to the deadline."""
        supervisor = self._supervisor
        if supervisor is not None:
            try:
                supervisor.tell(m.StopNow())
            except pykka.ActorDeadError:
                pass

    def _stop_actors(self) -> None:
        try:
            self._supervisor.stop(block=True, timeout=5)
        except (pykka.Timeout, pykka.ActorDeadError):
            pass
        self.journal.stop(timeout=5)
        self.timers.stop()
        self._supervisor = None

    def _ended_callback(self, execution_id: str, status: str) -> None:
        with self._ended_cond:
            self._ended[execution_id] = status
            if len(self._ended) > 10000:  # keep memory bounded in a long-lived daemon
                for key in list(self._ended)[:5000]:
                    del self._ended[key]
            self._ended_cond.notify_all()
