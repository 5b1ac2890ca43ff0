"""Every execution reaches a final state (issue 11; SPEC 4.7-4.11, 13.1 items 8-10 and 12):
a crash while a hook runs, storage errors, queued executions after a crash, the workflow
timeout counted from ``running``, and step ``max_parallel`` slots with retries and cancels.

Black-box: a real ``mantle serve`` subprocess on a real SQLite file or PostgreSQL database,
killed with a real SIGKILL where a crash is the point, and a local HTTP server
(``tests.helpers.http_target``) that counts, holds or slows the requests the steps make. The
test process reads the same database to see what the daemon stored. Shutdown, durable waits,
thread bounds and log lines are in ``test_waits_shutdown_and_bounds.py``.
"""

from __future__ import annotations

from mantle import db as mantle_db
from mantle.db.models import WorkflowExecution
from tests.faults.conftest import dump_database
from tests.faults.support import (hooks_of, kill, no_log_line, rows, run, start_daemon,
                                  status, steps_of)
from tests.helpers.database import refuse_poison
from tests.helpers.sampling import RunningSampler
from tests.web.support import Daemon, apply_yaml, cli, wait_until


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
    daemon = start_daemon(tmp_path, bound)
    execution_id = run(daemon, "hooked")
    http_target.wait_for_hits("/notify", 1, timeout=20)  # the hook's request is held
    kill(daemon)
    assert status(execution_id) == "running"
    assert rows(execution_id, hook=True) == [("first", 1, "completed"),
                                              ("notify", 1, "running")]
    http_target.release("/notify")
    http_target.route("/notify", body="noted")  # answers at once from now on

    again = start_daemon(tmp_path, bound)
    try:
        detail = again.wait_for_status(execution_id, timeout=30)
        assert detail["status"] == "completed", detail
        hooks = hooks_of(detail)
        assert (hooks["notify"]["status"], hooks["notify"]["attempt"]) == ("completed", 1)
        assert hooks["notify"]["output"]["body"] == "noted"
        assert rows(execution_id, hook=True) == [("first", 1, "completed"),
                                                  ("notify", 1, "completed")]
        assert http_target.hits("/first") == 1  # a completed hook is never re-run
        assert http_target.hits("/notify") == 2  # the interrupted one ran again, once
        for process in (daemon, again):
            no_log_line(process, "checkpoint failed")
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
    daemon = start_daemon(tmp_path, bound)
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
        assert (steps_of(detail)["boom"]["status"], steps_of(detail)["boom"]["error"]) == \
            ("failed", escaped)
        assert detail["inputs"] == {"message": "bad\x00byte"}  # JSON columns keep the NUL
        no_log_line(daemon, "checkpoint failed")
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


def test_a_write_the_database_refuses_ends_the_execution_failed_and_returns_its_slot(
        bound, backend, tmp_path, http_target):
    http_target.route("/poison", body="poison")
    http_target.route("/fine", body="fine")
    apply_yaml(GUARDED.format(base=http_target.base_url))
    database = mantle_db.database_proxy.obj
    refuse_poison(database, backend)
    daemon = start_daemon(tmp_path, bound)
    try:
        refused = run(daemon, "guarded", {"path": "poison"})
        detail = daemon.wait_for_status(refused, timeout=20)
        assert detail["status"] == "failed", detail
        assert detail["error"].startswith("internal error: "), detail
        assert "refused by the test trigger" in detail["error"]
        assert not [row for row in rows(refused) if row[2] in ("pending", "running")], \
            dump_database()
        # The step's max_parallel slot came back: the same step runs again, and the daemon
        # keeps working.
        later = run(daemon, "guarded", {"path": "fine"})
        detail = daemon.wait_for_status(later, timeout=20)
        assert detail["status"] == "completed", detail
        assert steps_of(detail)["call"]["output"]["body"] == "fine"
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
    daemon = start_daemon(tmp_path, bound)
    ids = [run(daemon, "one-at-a-time") for _ in range(4)]
    http_target.wait_for_hits("/work", 1, timeout=20)  # the first one runs
    kill(daemon)
    assert [status(i) for i in ids] == ["running", "pending", "pending", "pending"]

    current: dict[str, Daemon] = {}
    with RunningSampler(lambda: current["daemon"].url if "daemon" in current else None,
                        "one-at-a-time") as sampler:
        current["daemon"] = again = start_daemon(tmp_path, bound)
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
    daemon = start_daemon(tmp_path, bound)
    try:
        first = run(daemon, "patient", {"pause": "2s"})
        second = run(daemon, "patient", {"pause": "2s"})
        last = run(daemon, "patient", {"pause": "200ms"})  # waits about 4 s in the queue
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
    daemon = start_daemon(tmp_path, bound)
    try:
        execution_id = run(daemon, "late-start", {"xs": list(range(100))})
        detail = daemon.wait_for_status(execution_id, timeout=20)
    finally:
        daemon.stop()
    assert detail["status"] == "failed", detail
    assert detail["error"] == "workflow timed out after 300ms"
    assert steps_of(detail)["late"]["status"] == "cancelled", detail
    assert http_target.hits("/late") == 0
    assert ("late", 1, "running") not in rows(execution_id)


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
    daemon = start_daemon(tmp_path, bound)
    try:
        holder = run(daemon, "gated", version=1)
        http_target.wait_for_hits("/gate", 1, timeout=20)
        impatient = run(daemon, "gated")  # version 2
        detail = daemon.wait_for_status(impatient, timeout=20)
        assert (detail["status"], detail["error"]) == ("failed", "workflow timed out after 1s")
        assert steps_of(detail)["call"]["status"] == "cancelled"
        follower = run(daemon, "gated", version=1)
        http_target.release("/gate")
        for execution_id in (holder, follower):
            assert daemon.wait_for_status(execution_id, timeout=20)["status"] == "completed"
    finally:
        http_target.release("/gate")
        daemon.stop()
    callers = [r.target.split("e=")[1] for r in http_target.requests("/gate")]
    assert callers == [holder, follower]  # the timed-out one never called
    assert ("call", 1, "running") not in rows(impatient)


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
    daemon = start_daemon(tmp_path, bound)
    try:
        ids = [run(daemon, "limited") for _ in range(4)]
        details = [daemon.wait_for_status(i, timeout=40) for i in ids]
    finally:
        daemon.stop()
    assert http_target.peak("/flaky") == 1  # never two attempts at once, retries included
    assert [(d["status"], steps_of(d)["call"]["attempt"]) for d in details] == \
        [("failed", 3)] * 4, details
    assert http_target.hits("/flaky") == 12


def test_cancelling_an_execution_that_holds_or_waits_for_a_step_slot_lets_the_others_go_on(
        bound, tmp_path, http_target):
    """Each execution's first attempt fails at once, so the attempts that hold and wait for
    the slot are retries; the held ones end when the engine closes their connection."""
    http_target.route("/flaky", hold=True, fail_first=1, body="held")
    apply_yaml(LIMITED.format(url=http_target.url("/flaky")))
    daemon = start_daemon(tmp_path, bound)

    def callers() -> list[str]:
        return [r.target.split("e=")[1] for r in http_target.requests("/flaky")]

    try:
        ids = [run(daemon, "limited") for _ in range(4)]
        http_target.wait_for_hits("/flaky", 5, timeout=20)  # four first attempts, one retry
        holder = callers()[4]
        waiter, *others = [i for i in ids if i != holder]
        wait_until(lambda: all(("call", 2, "running") in rows(i) for i in ids), timeout=10)
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
        assert (detail["status"], steps_of(detail)["call"]["attempt"]) == ("completed", 2)
        for cancelled in (holder, waiter, second):
            assert daemon.wait_for_status(cancelled)["status"] == "cancelled"
        assert http_target.hits("/flaky") == 7
        assert http_target.peak("/flaky") == 1  # never two attempts at once
    finally:
        http_target.release("/flaky")
        daemon.stop()


# --- 6. a cancel whose owner is gone (4.6, 13.7) --------------------------------------------

NAPPING = """
    name: napping
    steps:
      - {name: nap, action: core/sleep, params: {duration: 60s}}
"""


def test_a_cancel_committed_after_its_owner_died_still_ends_the_running_step(bound, tmp_path):
    """A cancel commits ``cancelled`` at once and leaves the running attempts to the owner,
    which records them ``cancelled`` when it has interrupted them (4.6). When the owner died
    first (here it is killed, then the execution is cancelled from the CLI before anyone
    takes it over), nobody would: the execution is final, so nothing takes it over, and its
    step stayed ``running`` for good. The next daemon ends such steps ``cancelled``."""
    apply_yaml(NAPPING)
    owner = start_daemon(tmp_path, bound)
    execution_id = run(owner, "napping")
    wait_until(lambda: rows(execution_id) == [("nap", 1, "running")])
    kill(owner)
    cancelled = cli(tmp_path, bound, "cancel", execution_id)
    assert cancelled.stdout == f"Cancelled execution {execution_id}\n", cancelled.stderr
    assert (status(execution_id), rows(execution_id)) == ("cancelled", [("nap", 1, "running")])

    successor = start_daemon(tmp_path, bound)
    try:
        wait_until(lambda: rows(execution_id) == [("nap", 1, "cancelled")], timeout=15)
        successor.wait_for_log("steps of a cancelled execution closed",
                               execution_id=execution_id)
        # the end is logged once, as an actor logs it (9.3): no actor ran it to its end
        successor.wait_for_log("execution finished", execution_id=execution_id,
                               status="cancelled", workflow="napping")
        step = steps_of(successor.get(f"/api/v1/executions/{execution_id}").json)["nap"]
        assert step["completed_at"] is not None
        # counted as an actor counts the steps it ends (9.1): no actor ended this one
        assert 'mantle_step_executions_total{status="cancelled",step="nap",' \
               'workflow="napping"} 1.0' in successor.get("/metrics").text
    finally:
        successor.stop()
