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
from tests.helpers.sampling import RunningSampler
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


# --- 3. queued executions after a crash (13.1.10) -------------------------------------------

QUEUED = """
    name: one-at-a-time
    max_parallel_executions: 1
    on_limit: queue
    steps:
      - {{name: work, action: http/request, params: {{url: "{url}?e={{{{ execution.id }}}}"}}}}
"""


def test_queued_executions_left_by_a_sigkill_stay_queued_and_run_one_at_a_time_in_order(
        bound, tmp_path, http_target):
    http_target.route("/work", body="done", delay=0.7)
    apply_yaml(QUEUED.format(url=http_target.url("/work")))
    daemon = _daemon(tmp_path, bound)
    ids = [_run(daemon, "one-at-a-time") for _ in range(4)]
    http_target.wait_for_hits("/work", 1, timeout=20)  # the first one runs
    _kill(daemon)
    assert [_status(i) for i in ids] == ["running", "pending", "pending", "pending"]

    current: dict[str, Daemon] = {}
    with RunningSampler(lambda: current["daemon"].url if "daemon" in current else None,
                        "one-at-a-time") as sampler:
        current["daemon"] = again = _daemon(tmp_path, bound)
        try:
            details = [again.wait_for_status(i, timeout=40) for i in ids]
        finally:
            sampler.stop()
            again.stop()
    assert sampler.over(1) == [], "more than one execution ran at once"
    assert [d["status"] for d in details] == ["completed"] * 4, details
    assert len(sampler.samples) > 20, sampler.samples
    assert sampler.running_order() == ids  # promoted first in, first out
    callers = [r.target.split("e=")[1] for r in http_target.requests("/work")]
    assert callers == [ids[0]] + ids  # the interrupted first one again, then each in turn


# --- 4. the workflow timeout counts from running (13.1.9) ----------------------------------

PATIENT = """
    name: patient
    max_parallel_executions: 1
    on_limit: queue
    timeout: 3s
    inputs:
      pause: {type: string}
    steps:
      - {name: nap, action: core/sleep, params: {duration: "{{ inputs.pause }}"}}
"""


def test_a_queued_run_that_waited_longer_than_its_timeout_still_runs_its_steps(
        bound, tmp_path):
    apply_yaml(PATIENT)
    daemon = _daemon(tmp_path, bound)
    try:
        first = _run(daemon, "patient", {"pause": "2s"})
        second = _run(daemon, "patient", {"pause": "2s"})
        last = _run(daemon, "patient", {"pause": "200ms"})  # waits about 4 s in the queue
        details = [daemon.wait_for_status(i, timeout=30) for i in (first, second, last)]
    finally:
        daemon.stop()
    assert [d["status"] for d in details] == ["completed"] * 3, details
    row = WorkflowExecution.get_by_id(last)
    assert (row.running_since - row.started_at).total_seconds() > 3  # it did wait that long


SLOW = "inputs.xs.all(a, inputs.xs.all(b, inputs.xs.all(c, a + b + c >= 0)))"
LATE = """
    name: late-start
    timeout: 300ms
    inputs:
      xs: {{description: numbers for the slow conditions}}
    steps:
{slow}
      - {{name: late, action: http/request, if: "1 == 1", params: {{url: "{url}"}}}}
"""


def test_a_step_whose_start_is_in_flight_when_the_workflow_times_out_never_starts(
        bound, tmp_path, http_target):
    """Four conditions that evaluate for a full second hold every evaluation thread, so
    ``late``'s own (instant) condition is still waiting to be evaluated when the 300 ms
    timeout fires: its start is in flight, and it must not start afterwards."""
    http_target.route("/late", body="too late")
    slow = "\n".join(f'      - {{name: slow{n}, action: core/log, if: "{SLOW}", '
                     f"params: {{message: slow}}}}" for n in range(4))
    apply_yaml(LATE.format(slow=slow, url=http_target.url("/late")))
    daemon = _daemon(tmp_path, bound)
    try:
        execution_id = _run(daemon, "late-start", {"xs": list(range(100))})
        detail = daemon.wait_for_status(execution_id, timeout=20)
    finally:
        daemon.stop()
    assert detail["status"] == "failed", detail
    assert detail["error"] == "workflow timed out after 300ms"
    assert _steps(detail)["late"]["status"] == "cancelled", detail
    assert http_target.hits("/late") == 0
    assert ("late", 1, "running") not in _rows(execution_id)


GATED = """
    name: gated
    timeout: {timeout}
    steps:
      - {{name: call, action: http/request, max_parallel: 1,
         params: {{url: "{url}?e={{{{ execution.id }}}}"}}}}
"""


def test_a_step_waiting_for_its_slot_when_the_workflow_times_out_never_starts(
        bound, tmp_path, http_target):
    """Version 1 (timeout 60s) holds the step's only slot; version 2 (timeout 1s) waits for
    it and times out while waiting. When the slot frees, it must go to the next execution,
    not to the one that timed out."""
    http_target.route("/gate", hold=True, body="through")
    apply_yaml(GATED.format(timeout="60s", url=http_target.url("/gate")))
    apply_yaml(GATED.format(timeout="1s", url=http_target.url("/gate")))
    daemon = _daemon(tmp_path, bound)
    try:
        holder = _run(daemon, "gated", version=1)
        http_target.wait_for_hits("/gate", 1, timeout=20)
        impatient = _run(daemon, "gated")  # version 2
        detail = daemon.wait_for_status(impatient, timeout=20)
        assert (detail["status"], detail["error"]) == ("failed", "workflow timed out after 1s")
        assert _steps(detail)["call"]["status"] == "cancelled"
        follower = _run(daemon, "gated", version=1)
        http_target.release("/gate")
        for execution_id in (holder, follower):
            assert daemon.wait_for_status(execution_id, timeout=20)["status"] == "completed"
    finally:
        http_target.release("/gate")
        daemon.stop()
    callers = [r.target.split("e=")[1] for r in http_target.requests("/gate")]
    assert callers == [holder, follower]  # the timed-out one never called
    assert ("call", 1, "running") not in _rows(impatient)


# --- 5. step max_parallel with retries and cancels (13.1.10) -----------------------------

LIMITED = """
    name: limited
    steps:
      - {{name: call, action: http/request, max_parallel: 1, retry: {{max_attempts: 3}},
         params: {{url: "{url}?e={{{{ execution.id }}}}"}}}}
"""


def test_every_retry_attempt_of_a_max_parallel_step_holds_the_slot(bound, tmp_path,
                                                                    http_target):
    """Four executions, 0.5 s per attempt, 1 s back-off: the first retries are due while
    other executions' first attempts still hold the slot, so they must wait for it."""
    http_target.route("/flaky", status=500, body="try again", delay=0.5)
    apply_yaml(LIMITED.format(url=http_target.url("/flaky")))
    daemon = _daemon(tmp_path, bound)
    try:
        ids = [_run(daemon, "limited") for _ in range(4)]
        details = [daemon.wait_for_status(i, timeout=40) for i in ids]
    finally:
        daemon.stop()
    assert http_target.peak("/flaky") == 1  # never two attempts at once, retries included
    assert [(d["status"], _steps(d)["call"]["attempt"]) for d in details] == \
        [("failed", 3)] * 4, details
    assert http_target.hits("/flaky") == 12


def test_cancelling_an_execution_that_holds_or_waits_for_a_step_slot_lets_the_others_go_on(
        bound, tmp_path, http_target):
    """Each execution's first attempt fails at once, so the attempts that hold and wait for
    the slot are retries; the held ones end when the engine closes their connection."""
    http_target.route("/flaky", hold=True, fail_first=1, body="held")
    apply_yaml(LIMITED.format(url=http_target.url("/flaky")))
    daemon = _daemon(tmp_path, bound)

    def callers() -> list[str]:
        return [r.target.split("e=")[1] for r in http_target.requests("/flaky")]

    try:
        ids = [_run(daemon, "limited") for _ in range(4)]
        http_target.wait_for_hits("/flaky", 5, timeout=20)  # four first attempts, one retry
        holder = callers()[4]
        waiter, *others = [i for i in ids if i != holder]
        wait_until(lambda: all(("call", 2, "running") in _rows(i) for i in ids), timeout=10)
        assert daemon.post(f"/api/v1/cancel/{waiter}").status == 200  # waits for the slot
        daemon.wait_for_status(waiter, ("cancelled",))
        assert daemon.post(f"/api/v1/cancel/{holder}").status == 200  # holds it
        http_target.wait_for_hits("/flaky", 6, timeout=10)
        second = callers()[5]
        assert second in others  # the cancelled waiter never got the slot back
        assert daemon.post(f"/api/v1/cancel/{second}").status == 200
        http_target.wait_for_hits("/flaky", 7, timeout=10)
        last = callers()[6]
        assert sorted([second, last]) == sorted(others)
        http_target.release("/flaky")
        detail = daemon.wait_for_status(last, timeout=20)
        assert (detail["status"], _steps(detail)["call"]["attempt"]) == ("completed", 2)
        for cancelled in (holder, waiter, second):
            assert daemon.wait_for_status(cancelled)["status"] == "cancelled"
        assert http_target.hits("/flaky") == 7
        assert http_target.peak("/flaky") == 1  # never two attempts at once
    finally:
        http_target.release("/flaky")
        daemon.stop()


# --- 7. SIGTERM stops starting steps at once (10.3) ----------------------------------------

TERM = """
    name: term
    steps:
      - {{name: a, action: core/sleep, params: {{duration: 2s}}}}
      - {{name: b, action: http/request, depends_on: [a], params: {{url: "{url}"}}}}
"""


def _stays_false(predicate, seconds: float) -> None:
    """Check ``predicate`` every 20 ms for ``seconds``; fail the moment it holds."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert not predicate()
        time.sleep(0.02)


def test_after_sigterm_no_step_starts_and_the_next_start_resumes_the_execution(
        bound, tmp_path, http_target):
    """A slow client keeps a request in flight, so the daemon's HTTP side is still draining
    when ``a`` finishes: the engine must already have stopped starting steps (``b``)."""
    http_target.route("/b", body="b ran")
    apply_yaml(TERM.format(url=http_target.url("/b")))
    daemon = _daemon(tmp_path, bound, "--shutdown-timeout", "20s")
    execution_id = _run(daemon, "term")
    wait_until(lambda: _step_status(execution_id, "a") == "running")
    body = b'{"inputs": {}}'
    slow_client = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
    slow_client.sendall(b"POST /api/v1/run/term HTTP/1.1\r\nHost: x\r\nContent-Type: "
                        b"application/json\r\nContent-Length: " + str(len(body)).encode()
                        + b"\r\n\r\n" + body[:3])
    signalled = time.monotonic()
    daemon.send(signal.SIGTERM)
    try:
        daemon.wait_for_log("shutting down")
        wait_until(lambda: _step_status(execution_id, "a") == "completed", timeout=10)
        _stays_false(lambda: http_target.hits("/b") > 0, 1.0)  # a is done; b does not start
        slow_client.sendall(body[3:])
        assert slow_client.recv(65536).startswith(b"HTTP/1.1 503 ")
    finally:
        slow_client.close()
    assert daemon.wait(30) == 0
    assert time.monotonic() - signalled < 20 + 5  # within shutdown_timeout and a few seconds
    assert http_target.hits("/b") == 0
    assert _rows(execution_id) == [("a", 1, "completed")]
    assert _status(execution_id) == "running"

    again = _daemon(tmp_path, bound)
    try:
        detail = again.wait_for_status(execution_id, timeout=30)
    finally:
        again.stop()
    assert detail["status"] == "completed", detail
    assert _steps(detail)["b"]["output"]["body"] == "b ran"
    assert http_target.hits("/b") == 1
    assert _rows(execution_id) == [("a", 1, "completed"), ("b", 1, "completed")]


# --- 8. durable waits (13.1.11) -------------------------------------------------------------

SLEEPY = """
    name: sleepy
    steps:
      - {name: nap, action: core/sleep, params: {duration: 6s}}
"""


def _sleep_until(moment: float) -> None:
    """Wait for a chosen moment of the scenario (when to kill), not for a condition."""
    time.sleep(max(0.0, moment - time.monotonic()))


def test_a_sleep_killed_halfway_finishes_on_time_after_the_restart(bound, tmp_path):
    apply_yaml(SLEEPY)
    daemon = _daemon(tmp_path, bound)
    execution_id = _run(daemon, "sleepy")
    began = time.monotonic()
    wait_until(lambda: _step_status(execution_id, "nap") == "running")
    _sleep_until(began + 3)
    _kill(daemon)
    assert _rows(execution_id) == [("nap", 1, "running")]
    again = _daemon(tmp_path, bound)
    try:
        detail = again.wait_for_status(execution_id, timeout=20)
        ended = time.monotonic()
    finally:
        again.stop()
    assert detail["status"] == "completed", detail
    assert 5.8 <= ended - began <= 7.0, f"6 s sleep took {ended - began:.2f} s"  # not 9
    row = StepExecution.get(StepExecution.execution_id == execution_id)
    assert row.attempt == 1
    stored = (row.completed_at - row.started_at).total_seconds()
    assert 5.8 <= stored <= 7.0, stored


BACKOFF = """
    name: backing-off
    steps:
      - {{name: call, action: http/request, retry: {{max_attempts: 4, backoff: exponential}},
         params: {{url: "{url}"}}}}
"""


def test_a_retry_back_off_killed_midway_starts_the_next_attempt_at_its_original_due_time(
        bound, tmp_path, http_target):
    http_target.route("/call", status=500, body="not yet")
    apply_yaml(BACKOFF.format(url=http_target.url("/call")))
    daemon = _daemon(tmp_path, bound)
    execution_id = _run(daemon, "backing-off")
    http_target.wait_for_hits("/call", 3, timeout=20)  # attempts at 0, 1 s, 3 s
    third = http_target.requests("/call")[2].at
    wait_until(lambda: ("call", 4, "running") in _rows(execution_id), timeout=5)
    _sleep_until(third + 1.0)  # in the 4 s wait before attempt 4
    _kill(daemon)
    http_target.route("/call", body="at last")
    again = _daemon(tmp_path, bound)
    try:
        detail = again.wait_for_status(execution_id, timeout=30)
    finally:
        again.stop()
    assert detail["status"] == "completed", detail
    assert _steps(detail)["call"]["attempt"] == 4
    assert http_target.hits("/call") == 4
    fourth = http_target.requests("/call")[3].at
    assert abs(fourth - (third + 4.0)) <= 1.0, f"attempt 4 came {fourth - third:.2f} s " \
        "after attempt 3 (due 4 s after)"


# --- 9. bounded threads under 300 concurrent HTTP steps (issue 11.9) ------------------------

HELD = """
    name: many
    steps:
      - {{name: call, action: http/request, params: {{url: "{url}"}}}}
"""


def _threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    raise AssertionError("no Threads line")


def test_300_concurrent_http_steps_keep_the_daemon_under_296_threads(bound, tmp_path,
                                                                     http_target):
    from concurrent.futures import ThreadPoolExecutor

    http_target.route("/held", hold=True, body="ok")
    apply_yaml(HELD.format(url=http_target.url("/held")))
    daemon = _daemon(tmp_path, bound)
    try:
        with ThreadPoolExecutor(8) as pool:
            ids = list(pool.map(lambda _: _run(daemon, "many"), range(300)))
        http_target.wait_for_hits("/held", 256, timeout=60)
        most = 0
        for _ in range(10):  # while the 256 requests are held
            most = max(most, _threads(daemon.process.pid))
            time.sleep(0.05)
        assert most < 256 + 40, f"{most} threads"
        http_target.release("/held")
        wait_until(lambda: WorkflowExecution.select().where(
            WorkflowExecution.status == "completed").count() == 300, timeout=60,
            message="not every execution completed")
        assert http_target.hits("/held") == 300
    finally:
        http_target.release("/held")
        daemon.stop()
    assert len(set(ids)) == 300


# --- 10. step lines in the daemon's log (13.1.3) --------------------------------------------

LOGGED = """
    name: logged
    steps:
      - {{name: fetch, action: http/request, params: {{url: "{ok}"}}}}
    hooks:
      on_finish:
        - {{name: notify, action: http/request, retry: {{max_attempts: 2}},
           params: {{url: "{broken}"}}}}
"""


def test_the_daemon_logs_step_started_finished_and_retrying_for_steps_and_hooks(
        bound, tmp_path, http_target):
    http_target.route("/ok", body="fine")
    http_target.route("/broken", status=503, body="down")
    apply_yaml(LOGGED.format(ok=http_target.url("/ok"), broken=http_target.url("/broken")))
    daemon = _daemon(tmp_path, bound)
    try:
        execution_id = _run(daemon, "logged")
        assert daemon.wait_for_status(execution_id)["status"] == "completed"
        daemon.wait_for_log("execution finished", execution_id=execution_id)
    finally:
        daemon.stop()
    ours = {"workflow": "logged", "execution_id": execution_id}

    def lines(msg: str, step: str) -> list[dict]:
        return [line for line in daemon.lines if line.get("msg") == msg
                and line.get("step") == step and all(line.get(k) == v for k, v in ours.items())]

    assert [(l["level"], l["attempt"]) for l in lines("step started", "fetch")] == [("INFO", 1)]
    [finished] = lines("step finished", "fetch")
    assert (finished["level"], finished["status"]) == ("INFO", "completed")
    assert isinstance(finished["duration_ms"], int) and finished["duration_ms"] >= 0
    assert "error" not in finished

    assert [(l["level"], l["attempt"]) for l in lines("step started", "notify")] == \
        [("INFO", 1), ("INFO", 2)]
    [retrying] = lines("step retrying", "notify")
    assert (retrying["level"], retrying["attempt"], retrying["delay_ms"]) == ("WARN", 1, 1000)
    [failed] = lines("step finished", "notify")
    assert (failed["level"], failed["status"]) == ("INFO", "failed")
    assert failed["error"].startswith("http/request: ") and "503" in failed["error"]
    assert isinstance(failed["duration_ms"], int)
    messages = [line["msg"] for line in daemon.lines
                if line.get("step") in ("fetch", "notify") and line.get("msg", "").startswith(
                    "step ")]
    assert messages == ["step started", "step finished", "step started", "step retrying",
                        "step started", "step finished"]
