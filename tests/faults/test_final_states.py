"""Every execution reaches a final state (issue 11; SPEC 4.7-4.11, 10.3, 13.1 items 3, 8-12).

Black-box: a real ``mantle serve`` subprocess on a real SQLite file or PostgreSQL database,
killed with a real SIGKILL where a crash is the point, and a local HTTP server
(``tests.helpers.http_target``) that counts, holds or slows the requests the steps make. The
test process reads the same database to see what the daemon stored.
"""

from __future__ import annotations

import json
import signal
import socket
import time

import pytest

from mantle.db.models import StepExecution, WorkflowExecution
from tests.faults.conftest import dump_database
from tests.web.support import Daemon, apply_yaml, wait_until

FINAL = ("completed", "failed", "cancelled")


# --- helpers ---------------------------------------------------------------------------

def _daemon(tmp_path, url: str, *args: str, **env: str) -> Daemon:
    return Daemon(tmp_path, url, args=args, env=env).start(timeout=60)


def _kill(daemon: Daemon) -> None:
    """SIGKILL: no shutdown code of the daemon runs."""
    daemon.send(signal.SIGKILL)
    daemon.wait(30)


def _run(daemon: Daemon, workflow: str, inputs: dict | None = None, **body) -> str:
    reply = daemon.post(f"/api/v1/run/{workflow}", {"inputs": inputs or {}, **body})
    assert reply.status == 202, (reply.status, reply.body)
    return reply.json["execution_id"]


def _rows(execution_id: str, hook: bool | None = None) -> list[tuple[str, int, str]]:
    """(step, attempt, status) of every stored attempt of the execution, in write order."""
    query = StepExecution.select().where(StepExecution.execution_id == execution_id)
    if hook is not None:
        query = query.where(StepExecution.is_hook == hook)
    return [(row.step_name, row.attempt, row.status) for row in query.order_by(StepExecution.id)]


def _status(execution_id: str) -> str:
    return WorkflowExecution.get_by_id(execution_id).status


def _step_status(execution_id: str, step: str, hook: bool = False) -> str | None:
    rows = [row for row in _rows(execution_id, hook) if row[0] == step]
    return rows[-1][2] if rows else None


def _no_log_line(daemon: Daemon, msg: str) -> None:
    found = [line for line in daemon.lines if line.get("msg") == msg]
    assert not found, f"unexpected {msg!r} log lines: {found}"


def _steps(detail: dict) -> dict[str, dict]:
    return {step["name"]: step for step in detail["steps"]}


def _hooks(detail: dict) -> dict[str, dict]:
    return {hook["name"]: hook for hook in detail["hooks"]}


# --- 1. a crash while a hook runs (13.1.8) -------------------------------------------------

HOOKED = """
    name: hooked
    steps:
      - {{name: main, action: core/log, params: {{message: main}}}}
    hooks:
      on_success:
        - {{name: first, action: http/request, params: {{url: "{first}"}}}}
      on_finish:
        - {{name: notify, action: http/request, params: {{url: "{notify}"}}}}
"""


def test_a_hook_running_at_a_sigkill_is_resumed_under_its_attempt_and_the_execution_completes(
        bound, tmp_path, http_target):
    http_target.route("/first", body="first")
    http_target.route("/notify", hold=True)
    apply_yaml(HOOKED.format(first=http_target.url("/first"),
                             notify=http_target.url("/notify")))
    daemon = _daemon(tmp_path, bound)
    execution_id = _run(daemon, "hooked")
    http_target.wait_for_hits("/notify", 1, timeout=20)  # the hook's request is held
    _kill(daemon)
    assert _status(execution_id) == "running"
    assert _rows(execution_id, hook=True) == [("first", 1, "completed"),
                                              ("notify", 1, "running")]
    http_target.release("/notify")
    http_target.route("/notify", body="noted")  # answers at once from now on

    again = _daemon(tmp_path, bound)
    try:
        detail = again.wait_for_status(execution_id, timeout=30)
        assert detail["status"] == "completed", detail
        hooks = _hooks(detail)
        assert (hooks["notify"]["status"], hooks["notify"]["attempt"]) == ("completed", 1)
        assert hooks["notify"]["output"]["body"] == "noted"
        assert _rows(execution_id, hook=True) == [("first", 1, "completed"),
                                                  ("notify", 1, "completed")]
        assert http_target.hits("/first") == 1  # a completed hook is never re-run
        assert http_target.hits("/notify") == 2  # the interrupted one ran again, once
        for process in (daemon, again):
            _no_log_line(process, "checkpoint failed")
    finally:
        again.stop()


# --- 2. storage errors end executions (13.1.12) -------------------------------------------

FAILING = """
    name: nul-message
    inputs:
      message: {type: string}
    steps:
      - {name: boom, action: core/fail, params: {message: "{{ inputs.message }}"}}
"""


def test_a_step_error_holding_nul_is_stored_escaped_and_the_execution_ends_failed(
        bound, tmp_path):
    apply_yaml(FAILING)
    daemon = _daemon(tmp_path, bound)
    try:
        body = '{"inputs": {"message": "bad\\u0000byte"}}'  # a NUL, as JSON sends it
        reply = daemon.request("POST", "/api/v1/run/nul-message", body,
                               {"Content-Type": "application/json"})
        assert reply.status == 202, reply.body
        execution_id = reply.json["execution_id"]
        detail = daemon.wait_for_status(execution_id, timeout=20)
        escaped = "bad\\u0000byte"  # the six characters \u0000 in place of the NUL
        assert detail["status"] == "failed", detail
        assert detail["error"] == f'step "boom" failed: {escaped}'
        assert (_steps(detail)["boom"]["status"], _steps(detail)["boom"]["error"]) == \
            ("failed", escaped)
        assert detail["inputs"] == {"message": "bad\x00byte"}  # JSON columns keep the NUL
        _no_log_line(daemon, "checkpoint failed")
    finally:
        daemon.stop()


GUARDED = """
    name: guarded
    inputs:
      path: {{type: string}}
    steps:
      - {{name: call, action: http/request, max_parallel: 1,
         params: {{url: "{base}/{{{{ inputs.path }}}}"}}}}
"""

REFUSE_SQL = {
    # Refuse the completed row of the one step whose output holds the word "poison".
    "sqlite": [
        """CREATE TRIGGER refuse_poison BEFORE UPDATE ON step_executions
           WHEN NEW.status = 'completed' AND instr(NEW.output, 'poison') > 0
           BEGIN SELECT RAISE(ABORT, 'refused by the test trigger'); END""",
        """CREATE TRIGGER refuse_poison_insert BEFORE INSERT ON step_executions
           WHEN NEW.status = 'completed' AND instr(NEW.output, 'poison') > 0
           BEGIN SELECT RAISE(ABORT, 'refused by the test trigger'); END""",
    ],
    "postgres": [
        """CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN
             IF NEW.status = 'completed' AND strpos(NEW.output::text, 'poison') > 0 THEN
               RAISE EXCEPTION 'refused by the test trigger';
             END IF;
             RETURN NEW;
           END $$""",
        """CREATE TRIGGER refuse_poison BEFORE INSERT OR UPDATE ON step_executions
           FOR EACH ROW EXECUTE FUNCTION refuse_poison()""",
    ],
}


def test_a_write_the_database_refuses_ends_the_execution_failed_and_returns_its_slot(
        bound, backend, tmp_path, http_target):
    from mantle import db as mantle_db

    http_target.route("/poison", body="poison")
    http_target.route("/fine", body="fine")
    apply_yaml(GUARDED.format(base=http_target.base_url))
    database = mantle_db.database_proxy.obj
    for statement in REFUSE_SQL[backend]:
        database.execute_sql(statement)
    daemon = _daemon(tmp_path, bound)
    try:
        refused = _run(daemon, "guarded", {"path": "poison"})
        detail = daemon.wait_for_status(refused, timeout=20)
        assert detail["status"] == "failed", detail
        assert detail["error"].startswith("internal error: "), detail
        assert "refused by the test trigger" in detail["error"]
        assert not [row for row in _rows(refused) if row[2] in ("pending", "running")], \
            dump_database()
        # The step's max_parallel slot came back: the same step runs again, and the daemon
        # keeps working.
        later = _run(daemon, "guarded", {"path": "fine"})
        detail = daemon.wait_for_status(later, timeout=20)
        assert detail["status"] == "completed", detail
        assert _steps(detail)["call"]["output"]["body"] == "fine"
        assert daemon.get("/readyz").status == 200
    finally:
        daemon.stop()
