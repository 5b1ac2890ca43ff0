"""Helpers for the fault tests that drive a real ``mantle serve``: start, kill, run, and read
what the daemon stored (the models are bound to the same database in the test process)."""

from __future__ import annotations

import signal
import time

from mantle.db.models import StepExecution, WorkflowExecution
from tests.web.support import Daemon

__all__ = ["start_daemon", "kill", "run", "rows", "status", "step_status", "no_log_line",
           "steps_of", "hooks_of", "stays_false", "sleep_until"]


def start_daemon(tmp_path, url: str, *args: str, **env: str) -> Daemon:
    """``mantle serve`` on ``url`` with extra ``args`` and environment, ready to answer."""
    return Daemon(tmp_path, url, args=args, env=env).start(timeout=60)


def kill(daemon: Daemon) -> None:
    """SIGKILL: no shutdown code of the daemon runs."""
    daemon.send(signal.SIGKILL)
    daemon.wait(30)


def run(daemon: Daemon, workflow: str, inputs: dict | None = None, **body) -> str:
    """``POST /api/v1/run/<workflow>``; the new execution's id (202 expected)."""
    reply = daemon.post(f"/api/v1/run/{workflow}", {"inputs": inputs or {}, **body})
    assert reply.status == 202, (reply.status, reply.body)
    return reply.json["execution_id"]


def rows(execution_id: str, hook: bool | None = None) -> list[tuple[str, int, str]]:
    """(step, attempt, status) of every stored attempt of the execution, in write order."""
    query = StepExecution.select().where(StepExecution.execution_id == execution_id)
    if hook is not None:
        query = query.where(StepExecution.is_hook == hook)
    return [(row.step_name, row.attempt, row.status) for row in query.order_by(StepExecution.id)]


def status(execution_id: str) -> str:
    return WorkflowExecution.get_by_id(execution_id).status


def step_status(execution_id: str, step: str, hook: bool = False) -> str | None:
    """The status of the step's latest stored attempt, or None before its first row."""
    found = [row for row in rows(execution_id, hook) if row[0] == step]
    return found[-1][2] if found else None


def no_log_line(daemon: Daemon, msg: str) -> None:
    found = [line for line in daemon.lines if line.get("msg") == msg]
    assert not found, f"unexpected {msg!r} log lines: {found}"


def steps_of(detail: dict) -> dict[str, dict]:
    return {step["name"]: step for step in detail["steps"]}


def hooks_of(detail: dict) -> dict[str, dict]:
    return {hook["name"]: hook for hook in detail["hooks"]}


def stays_false(predicate, seconds: float) -> None:
    """Check ``predicate`` every 20 ms for ``seconds``; fail the moment it holds (for
    something that must not happen, there is no event to wait for)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert not predicate()
        time.sleep(0.02)


def sleep_until(moment: float) -> None:
    """Wait for a chosen moment of the scenario (when to kill), not for a condition."""
    time.sleep(max(0.0, moment - time.monotonic()))
