"""Execution semantics of SPEC 4 through the real engine, on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import logging
import socket
import threading
import time

import pytest
from peewee import fn

from actors.attempts import prepare
from actors.engine import Engine
from mantle import db as mantle_db
from mantle import store
from mantle.db import transaction
from mantle.db.fields import utcnow
from mantle.db.models import AuditEvent, Node, StepExecution, WorkflowExecution
from mantle.errors import InvalidInput, VersionNotFound, WorkflowNotFound
from mantle.metrics import Metrics
from mantle.workflow import load_workflow
from tests.actors.conftest import apply, finish, run, steps_of, wait_until


def test_two_step_workflow_completes_with_checkpointed_steps(engine):
    apply("""
        name: hello
        steps:
          - {name: first, action: core/log, params: {message: hi}}
          - {name: second, action: core/log, depends_on: [first],
             params: {message: "{{ steps.first.output.message }} again"}}
    """)
    detail = run(engine, "hello")
    assert detail["status"] == "completed"
    assert detail["error"] is None
    assert detail["completed_at"] is not None
    steps = steps_of(detail)
    assert [s["name"] for s in detail["steps"]] == ["first", "second"]
    assert steps["second"]["output"] == {"message": "hi again"}
    assert steps["first"]["attempt"] == 1
    assert steps["first"]["completed_at"] <= steps["second"]["started_at"]


def test_unknown_workflow_and_version_are_refused(engine):
    with pytest.raises(WorkflowNotFound):
        engine.run("nope")
    apply("""
        name: one
        steps: [{name: a, action: core/log, params: {message: x}}]
    """)
    with pytest.raises(VersionNotFound):
        engine.run("one", version=7)


def test_supplied_inputs_are_checked_and_defaults_filled(engine):
    apply("""
        name: typed
        inputs:
          day: {type: string}
          limit: {type: number, default: 10}
        steps:
          - {name: a, action: core/log, params: {message: "{{ inputs.limit }}"}}
    """)
    with pytest.raises(InvalidInput, match='unknown input "nope"'):
        engine.run("typed", {"nope": 1})
    with pytest.raises(InvalidInput, match='input "day" must be a string'):
        engine.run("typed", {"day": 3})
    detail = run(engine, "typed", {"day": "mon"})
    assert detail["inputs"] == {"day": "mon", "limit": 10}
    assert steps_of(detail)["a"]["output"] == {"message": 10}


def test_false_if_skips_step_and_dependents_still_run(engine):
    apply("""
        name: skipper
        steps:
          - {name: check, action: core/log, if: "1 == 2", params: {message: x}}
          - name: after
            action: core/log
            depends_on: [check]
            params: {message: "{{ steps.check.status }} {{ steps.check.output }}"}
    """)
    steps = steps_of(run(engine, "skipper"))
    assert steps["check"]["status"] == "skipped"
    assert steps["check"]["attempt"] == 1
    assert steps["check"]["output"] is None
    assert steps["check"]["started_at"] == steps["check"]["completed_at"]
    assert steps["after"]["output"] == {"message": "skipped {}"}


@pytest.mark.alone
def test_independent_steps_run_concurrently(engine):
    apply("""
        name: parallel
        steps:
          - {name: a, action: core/sleep, params: {duration: 1s}}
          - {name: b, action: core/sleep, params: {duration: 1s}}
    """)
    started = time.monotonic()
    detail = run(engine, "parallel")
    assert detail["status"] == "completed"
    assert time.monotonic() - started < 1.8


def test_failure_cancels_transitive_dependents_but_not_independent_steps(engine):
    apply("""
        name: propagate
        steps:
          - {name: bad, action: core/fail, params: {message: boom}}
          - {name: child, action: core/log, depends_on: [bad], params: {message: x}}
          - {name: grandchild, action: core/log, depends_on: [child], params: {message: x}}
          - {name: other, action: core/sleep, params: {duration: 200ms}}
    """)
    detail = run(engine, "propagate")
    steps = steps_of(detail)
    assert detail["status"] == "failed"
    assert detail["error"] == 'step "bad" failed: boom'
    assert steps["bad"]["status"] == "failed"
    assert steps["bad"]["error"] == "boom"
    assert steps["child"]["status"] == "cancelled"
    assert steps["child"]["attempt"] == 0
    assert steps["grandchild"]["status"] == "cancelled"
    assert steps["other"]["status"] == "completed"


def test_execution_error_names_the_first_step_that_failed(engine):
    apply("""
        name: two-failures
        steps:
          - {name: early, action: core/fail, params: {message: first}}
          - {name: wait, action: core/sleep, params: {duration: 300ms}}
          - {name: late, action: core/fail, depends_on: [wait], params: {message: second}}
    """)
    detail = run(engine, "two-failures")
    assert detail["error"] == 'step "early" failed: first'


def test_continue_on_error_keeps_failed_status_but_resolves_dependents(engine):
    apply("""
        name: tolerant
        steps:
          - {name: flaky, action: core/fail, continue_on_error: true, params: {message: meh}}
          - name: next
            action: core/log
            depends_on: [flaky]
            params: {message: "{{ steps.flaky.error }}"}
    """)
    detail = run(engine, "tolerant")
    steps = steps_of(detail)
    assert detail["status"] == "completed"
    assert steps["flaky"]["status"] == "failed"
    assert steps["next"]["output"] == {"message": "meh"}
    actions = {e.action for e in AuditEvent.select()}
    assert "step.continued_on_error" in actions


def test_connector_failures_are_retried_with_one_row_per_attempt(engine, http_target):
    http_target.route("/flaky", status=500)
    name = apply(f"""
        name: retrying
        steps:
          - name: call
            action: http/request
            params: {{url: "{http_target.url('/flaky')}"}}
            retry: {{max_attempts: 2, backoff: fixed}}
    """)
    started = time.monotonic()
    detail = run(engine, name)
    elapsed = time.monotonic() - started
    step = steps_of(detail)["call"]
    assert step["status"] == "failed"
    assert step["attempt"] == 2
    assert step["error"] == f"http/request: GET {http_target.url('/flaky')} returned 500"
    assert step["output"]["status"] == 500
    assert http_target.hits("/flaky") == 2
    assert elapsed >= 1.0  # the fixed one-second backoff
    rows = list(StepExecution.select().where(StepExecution.step_name == "call")
                .order_by(StepExecution.attempt))
    assert [(r.attempt, r.status) for r in rows] == [(1, "failed"), (2, "failed")]


def test_retry_succeeds_when_a_later_attempt_works(engine, tmp_path):
    marker = tmp_path / "seen"
    plugin = tmp_path / "plugins" / "once"
    plugin.parent.mkdir()
    plugin.write_text(f"""#!/bin/sh
cat >/dev/null
if [ -e {marker} ]; then echo '{{"ok": true}}'; else touch {marker}; echo nope >&2; exit 3; fi
""")
    plugin.chmod(0o755)
    apply("""
        name: second-time
        steps:
          - {name: s, action: once/go, retry: {max_attempts: 3}}
    """)
    step = steps_of(run(engine, "second-time"))["s"]
    assert step["status"] == "completed"
    assert step["attempt"] == 2
    assert step["output"] == {"ok": True}


def test_a_response_holding_a_number_beyond_a_double_has_no_json_and_the_steps_after_run(
        engine, http_target):
    """SPEC 4.5/13.1.12: a JSON response holding an integer beyond a double (1 and 400 zeros)
    became the step's output; converting it for the next step's expressions raised
    OverflowError, not an expression error: the evaluation task died, the step stayed
    pending and the execution ``running`` for ever. Such text is not taken as JSON now
    (docs/workflows.md), so no output holds the number (the conversion's own error is
    tested in test_expressions_evaluate.py)."""
    body = '{"n": 1' + "0" * 400 + "}"
    http_target.route("/huge", body=body, content_type="application/json")
    apply(f"""
        name: huge
        steps:
          - {{name: fetch, action: http/request, params: {{url: "{http_target.url('/huge')}"}}}}
          - {{name: show, action: core/log, depends_on: [fetch],
              params: {{message: "{{{{ steps.fetch.output.status }}}}"}}}}
          - {{name: check, action: core/log, depends_on: [fetch],
              if: "!has(steps.fetch.output.json)", params: {{message: x}}}}
    """)
    detail = run(engine, "huge", timeout=20)
    steps = steps_of(detail)
    assert detail["status"] == "completed", detail
    assert steps["fetch"]["output"]["body"] == body
    assert "json" not in steps["fetch"]["output"]
    assert steps["check"]["status"] == "completed"


def test_expression_errors_fail_the_step_without_retry(engine):
    apply("""
        name: bad-exprs
        steps:
          - {name: cond, action: core/log, if: "inputs.missing == 1", retry: {max_attempts: 3},
             params: {message: x}}
          - {name: tmpl, action: core/log, retry: {max_attempts: 3},
             params: {message: "{{ 1 + 'a' }}"}}
          - {name: notbool, action: core/log, if: "1 + 1", params: {message: x}}
    """)
    steps = steps_of(run(engine, "bad-exprs"))
    assert steps["cond"]["error"].startswith("evaluating if condition: ")
    assert steps["cond"]["attempt"] == 1
    assert steps["tmpl"]["error"].startswith("resolving params: ")
    assert steps["notbool"]["error"].startswith("evaluating if condition: ")


def test_a_map_keyed_by_a_type_json_has_no_key_for_fails_the_step(engine):
    """SPEC 4.5: an expression whose result has no JSON form fails its step. celpy builds
    maps keyed by bytes, doubles or types; turning one into JSON raised ValueError or
    TypeError, not an expression error: the evaluation task died, the step stayed
    ``pending`` and the execution ``running`` for ever. A lone surrogate (a CEL escape) has
    no UTF-8 form: the params could not be stored, and the execution ended ``internal error``
    with its independent steps cancelled."""
    apply("""
        name: odd-maps
        steps:
          - {name: bytes-key, action: core/log, params: {message: "{{ {b'a': 1} }}"}}
          - {name: lone, action: core/log, params: {message: '{{ "\\ud800" }}'}}
          - {name: type-key, action: core/log, params: {message: "{{ {type(1): 1} }}"}}
          - {name: fine, action: core/log, params: {message: "{{ {1: 2} }}"}}
    """)
    detail = run(engine, "odd-maps")
    steps = steps_of(detail)
    assert detail["status"] == "failed"
    assert steps["bytes-key"]["error"] == "resolving params: map key of type bytes has no " \
                                          "JSON form"
    assert steps["type-key"]["error"] == "resolving params: map key of type type has no " \
                                         "JSON form"
    assert steps["lone"]["error"] == "resolving params: result holds a lone UTF-16 " \
                                     "surrogate (U+D800), which is not a character"
    assert steps["fine"]["status"] == "completed"


def test_step_preparation_answers_an_error_no_evaluation_expected_with_internal_error():
    """The backstop behind the map-key fix above: whatever goes wrong while a step's ``if``,
    templates or credential are evaluated, preparation answers (and the step fails with
    ``internal error: <reason>``), so no step waits ``pending`` for ever. Here the activation
    itself is broken, which no evaluation anticipates."""
    spec = load_workflow(b"""
name: broken
steps: [{name: a, action: core/log, params: {message: "{{ inputs.x }}"}}]
""").steps[0]
    prepared = prepare(spec, False, None, None, True)
    assert (prepared.step, prepared.params) == ("a", None)
    assert prepared.error == ("internal error: TypeError: argument of type 'NoneType' is not "
                              "iterable")


def test_unknown_action_fails_without_retry(engine):
    apply("""
        name: unknown
        steps: [{name: s, action: nope/thing, retry: {max_attempts: 3}}]
    """)
    step = steps_of(run(engine, "unknown"))["s"]
    assert step["error"] == 'unknown action "nope/thing"'
    assert step["attempt"] == 1


def test_a_sleep_too_long_to_store_fails_its_step_with_invalid_duration(engine):
    # Its due time (stored, 13.1.11) cannot be written: the execution ended failed with
    # "internal error: Python int too large to convert to C int" and its steps cancelled.
    apply("""
        name: forever
        inputs:
          d: {type: string, default: 99999999999999999h}
        steps:
          - {name: nap, action: core/sleep, params: {duration: "{{ inputs.d }}"}}
    """)
    detail = run(engine, "forever")
    assert detail["status"] == "failed"
    assert steps_of(detail)["nap"]["status"] == "failed"
    assert steps_of(detail)["nap"]["error"] == \
        'core/sleep: invalid duration "99999999999999999h"'


def test_step_timeout_fails_the_attempt_and_is_retried(engine):
    apply("""
        name: slow
        steps:
          - {name: s, action: core/sleep, timeout: 100ms, retry: {max_attempts: 2},
             params: {duration: 5s}}
    """)
    started = time.monotonic()
    step = steps_of(run(engine, "slow"))["s"]
    assert step["status"] == "failed"
    assert step["error"] == "step timed out after 100ms"
    assert step["attempt"] == 2
    assert time.monotonic() - started < 3


def test_workflow_timeout_fails_running_cancels_pending_and_runs_failure_hooks(engine):
    apply("""
        name: deadline
        timeout: 300ms
        steps:
          - {name: long, action: core/sleep, params: {duration: 10s}}
          - {name: later, action: core/log, depends_on: [long], params: {message: x}}
        hooks:
          on_failure: [{name: alert, action: core/log, params: {message: "{{ execution.error }}"}}]
          on_finish: [{name: done, action: core/log, params: {message: "{{ execution.status }}"}}]
    """)
    detail = run(engine, "deadline")
    steps = steps_of(detail)
    assert detail["status"] == "failed"
    assert detail["error"] == "workflow timed out after 300ms"
    assert steps["long"]["status"] == "failed"
    assert steps["long"]["error"] == "workflow timed out after 300ms"
    assert steps["later"]["status"] == "cancelled"
    hooks = {h["name"]: h for h in detail["hooks"]}
    assert hooks["alert"]["output"] == {"message": "workflow timed out after 300ms"}
    assert hooks["done"]["output"] == {"message": "failed"}


def test_hooks_run_in_block_order_and_never_change_the_status(engine):
    apply("""
        name: hooked
        steps: [{name: main, action: core/log, params: {message: m}}]
        hooks:
          on_success:
            - {name: fails, action: core/fail}
            - {name: skipped-by-block, action: core/log, params: {message: never}}
          on_failure: [{name: not-run, action: core/log, params: {message: x}}]
          on_finish:
            - name: last
              action: core/log
              params: {message: "{{ hooks.fails.status }} {{ execution.status }}"}
    """)
    detail = run(engine, "hooked")
    assert detail["status"] == "completed"
    assert [(h["block"], h["name"], h["status"]) for h in detail["hooks"]] == [
        ("on_success", "fails", "failed"), ("on_finish", "last", "completed")]
    assert detail["hooks"][1]["output"] == {"message": "failed completed"}


def test_hooks_see_how_long_the_main_steps_ran_as_execution_duration_ms(engine):
    """SPEC 3.1: in hooks ``execution.duration_ms`` is the main-step phase's duration (it
    was always 0)."""
    apply("""
        name: timed
        steps: [{name: nap, action: core/sleep, params: {duration: 300ms}}]
        hooks:
          on_finish:
            - name: report
              action: core/log
              params: {message: "{{ string(execution.duration_ms) }}"}
    """)
    detail = run(engine, "timed")
    assert 300 <= int(detail["hooks"][0]["output"]["message"]) < 10_000


def test_hooks_timeout_fails_the_running_hook_and_skips_the_rest(engine):
    apply("""
        name: hook-deadline
        steps: [{name: main, action: core/log, params: {message: m}}]
        hooks:
          timeout: 200ms
          on_success: [{name: slow, action: core/sleep, params: {duration: 10s}}]
          on_finish: [{name: never, action: core/log, params: {message: x}}]
    """)
    detail = run(engine, "hook-deadline")
    assert detail["status"] == "completed"
    assert [(h["name"], h["status"]) for h in detail["hooks"]] == [("slow", "failed")]
    assert detail["hooks"][0]["error"] == "hooks timed out after 200ms"


LATE_CHECKPOINT = """
    name: late-checkpoint
    timeout: 2s
    steps:
      - {{name: call, action: http/request, params: {{url: "{url}"}}}}
    hooks:
      on_success: [{{name: cheer, action: core/log, params: {{message: fine}}}}]
      on_failure:
        - {{name: alert, action: core/log, params: {{message: "{{{{ execution.error }}}}"}}}}
"""


def test_a_workflow_timeout_due_while_the_last_steps_outcome_is_written_changes_nothing(
        engine, backend, migrated_db_url, http_target):
    """SPEC 4.7: the workflow timeout fails the steps still running and cancels the pending
    ones; when it falls due, every main step here has its outcome already (``call``
    answered well before the deadline), only the checkpoint waits for the database (a row
    lock, an outage). The execution completes, as it does without hooks (its final status
    is written with that checkpoint); with hooks it used to end ``failed`` with the
    timeout's error, running ``on_failure``, though no step failed or was cancelled."""
    http_target.route("/call", hold=True, body="answered")
    apply(LATE_CHECKPOINT.format(url=http_target.url("/call")))
    execution_id = engine.run("late-checkpoint").execution_id
    http_target.wait_for_hits("/call", 1, timeout=10)
    since = WorkflowExecution.get_by_id(execution_id).running_since
    other = mantle_db.connect(migrated_db_url)
    try:
        with transaction(other):  # the database keeps the checkpoint waiting
            if backend == "postgres":
                other.execute_sql("SELECT id FROM workflow_executions WHERE id = %s "
                                  "FOR UPDATE", (execution_id,))
            http_target.release("/call")  # answered at once: well inside the 2 s
            wait_until(lambda: utcnow() > since + dt.timedelta(seconds=2.5), timeout=10)
            assert StepExecution.get(StepExecution.execution_id == execution_id
                                     ).status == "running"  # not written yet
    finally:
        mantle_db.close_all(other)
    detail = finish(engine, execution_id)
    hooks = [(h["name"], h["status"]) for h in detail["hooks"]]
    assert (detail["status"], detail["error"], steps_of(detail)["call"]["status"], hooks) == (
        "completed", None, "completed", [("cheer", "completed")])


@pytest.mark.alone
def test_cancel_interrupts_a_sixty_second_sleep_within_a_second(engine):
    apply("""
        name: sleeper
        steps:
          - {name: nap, action: core/sleep, params: {duration: 60s}}
          - {name: after, action: core/log, depends_on: [nap], params: {message: x}}
        hooks:
          on_finish: [{name: hook, action: core/log, params: {message: x}}]
    """)
    result = engine.run("sleeper")
    wait_until(lambda: StepExecution.select().where(
        StepExecution.execution_id == result.execution_id,
        StepExecution.status == "running").exists())
    started = time.monotonic()
    assert engine.cancel(result.execution_id) == "running"
    detail = finish(engine, result.execution_id, timeout=1.0)
    assert time.monotonic() - started < 1.0
    steps = steps_of(detail)
    assert detail["status"] == "cancelled"
    assert steps["nap"]["status"] == "cancelled"
    assert steps["after"]["status"] == "cancelled"
    assert detail["hooks"] == []


@pytest.mark.alone
def test_cancel_written_by_another_process_is_noticed_within_a_second(engine, db):
    from mantle import store
    from mantle.db import transaction

    apply("""
        name: remote-cancel
        steps: [{name: nap, action: core/sleep, params: {duration: 60s}}]
    """)
    result = engine.run("remote-cancel")
    wait_until(lambda: StepExecution.select().where(
        StepExecution.execution_id == result.execution_id,
        StepExecution.status == "running").exists())
    with transaction(db):
        store.cancel_execution(result.execution_id, "cli")
    started = time.monotonic()
    wait_until(lambda: StepExecution.select().where(
        StepExecution.execution_id == result.execution_id,
        StepExecution.status == "cancelled").exists(), timeout=2.0)
    assert time.monotonic() - started < 1.5


def test_no_step_starts_after_a_cancel_its_owner_has_not_heard_of_yet(engine, db,
                                                                       http_target):
    """SPEC 4.6: after a cancel commits, nothing new starts. The owner hears of a cancel
    within milliseconds, or within a second when the notice is lost; meanwhile a step whose
    dependency ended started (its ``running`` row is fenced by epoch, which a cancel leaves
    alone) and called its target. Now the row that starts an attempt is refused once the
    execution is no longer running: the step ends ``cancelled`` without being called."""
    http_target.route("/first", hold=True)
    http_target.route("/second")
    apply(f"""
        name: unheard-cancel
        steps:
          - {{name: first, action: http/request, params: {{url: "{http_target.url('/first')}"}}}}
          - name: second
            action: http/request
            depends_on: [first]
            params: {{url: "{http_target.url('/second')}"}}
        hooks:
          on_finish: [{{name: hook, action: http/request,
                        params: {{url: "{http_target.url('/second')}"}}}}]
    """)
    execution_id = engine.run("unheard-cancel").execution_id
    http_target.wait_for_hits("/first")
    # A cancel committed by another node whose notice never arrived: no NOTIFY, no channel.
    with transaction(db):
        WorkflowExecution.update(status="cancelled", completed_at=utcnow()).where(
            WorkflowExecution.id == execution_id).execute()
    http_target.release("/first")
    wait_until(lambda: engine.live_count() == 0, message="the owner did not stop")
    steps = {row.step_name: row.status for row in StepExecution.select().where(
        StepExecution.execution_id == execution_id)}
    assert http_target.hits("/second") == 0
    assert steps["second"] == "cancelled"
    assert steps["first"] in ("completed", "cancelled")
    assert WorkflowExecution.get_by_id(execution_id).status == "cancelled"


def _queued(engine: Engine) -> list[str]:
    """What waits in the journal: ``cancel`` for a cancel, ``start`` for the write that starts
    an attempt, ``other``."""
    return ["start" if entry.fence and entry.fence[2:] == (store.STARTING,) else
            "cancel" if "_on_CancelExecution" in entry.op.__qualname__ else "other"
            for entry in list(engine.journal._queue)]


def test_no_retry_starts_in_the_transaction_that_cancels_its_execution(engine, http_target,
                                                                       caplog):
    """SPEC 4.6: after a cancel commits, nothing new starts. This node's cancel and the
    write that starts the next attempt of its execution (its back-off over) were queued
    together and written in one journal transaction; the batch's fences were checked
    before its cancel ran, so the retry's ``running`` row was written with the cancel and
    the retry called its target after the cancel had committed."""
    caplog.set_level(logging.INFO, logger="mantle.engine")
    http_target.route("/flaky", fail_first=1)
    apply(f"""
        name: cancelled-in-its-retry
        steps:
          - {{name: call, action: http/request, retry: {{max_attempts: 2, backoff: fixed}},
             params: {{url: "{http_target.url('/flaky')}"}}}}
    """)
    execution_id = engine.run("cancelled-in-its-retry").execution_id
    wait_until(lambda: StepExecution.select().where(
        StepExecution.execution_id == execution_id, StepExecution.attempt == 2).exists(),
        message="attempt 1 did not fail into its back-off")
    release, held = threading.Event(), threading.Event()
    engine.journal.submit(lambda: (held.set(), release.wait(10)))
    try:
        assert held.wait(10)
        threading.Thread(target=engine.cancel, args=(execution_id,), daemon=True).start()
        wait_until(lambda: "cancel" in _queued(engine), message="the cancel was not queued")
        wait_until(lambda: "start" in _queued(engine), timeout=5,
                   message="the retry's start was not queued behind the cancel")
        assert _queued(engine).index("cancel") < _queued(engine).index("start")
    finally:
        release.set()
    wait_until(lambda: engine.live_count() == 0, message="the owner did not stop")
    rows = [(row.attempt, row.status) for row in StepExecution.select().where(
        StepExecution.execution_id == execution_id).order_by(StepExecution.attempt)]
    started = [record.attempt for record in caplog.records
               if record.getMessage() == "step started"
               and getattr(record, "execution_id", None) == execution_id]
    assert (http_target.hits("/flaky"), started, rows) == (1, [1], [(1, "failed"),
                                                                   (2, "cancelled")])
    assert WorkflowExecution.get_by_id(execution_id).status == "cancelled"


def test_reject_limit_refuses_a_second_running_execution(engine):
    from mantle.errors import LimitReached

    apply("""
        name: single
        max_parallel_executions: 1
        on_limit: reject
        steps: [{name: nap, action: core/sleep, params: {duration: 60s}}]
    """)
    first = engine.run("single")
    wait_until(lambda: WorkflowExecution.get_by_id(first.execution_id).status == "running")
    with pytest.raises(LimitReached) as caught:
        engine.run("single")
    assert str(caught.value) == ('workflow "single" has reached the maximum of 1 '
                                 "concurrent executions")
    engine.cancel(first.execution_id)


def test_queue_limit_starts_waiting_executions_in_order(engine, http_target):
    # The first holds the slot until the others were seen queued (a 200 ms sleep held it:
    # on a loaded machine it could end before the third run).
    http_target.route("/gate", hold=True)
    apply(f"""
        name: queued
        max_parallel_executions: 1
        steps: [{{name: call, action: http/request,
                 params: {{url: "{http_target.url('/gate')}"}}}}]
    """)
    ids = [engine.run("queued").execution_id for _ in range(3)]
    statuses = [WorkflowExecution.get_by_id(i).status for i in ids]
    assert statuses == ["running", "pending", "pending"]
    http_target.release("/gate")
    details = [finish(engine, i) for i in ids]
    assert all(d["status"] == "completed" for d in details)
    starts = [steps_of(d)["call"]["started_at"] for d in details]
    assert starts == sorted(starts)
    promoted = AuditEvent.select().where(AuditEvent.action == "execution.promoted").count()
    assert promoted == 2


def test_an_in_process_run_starts_only_its_own_queued_executions_in_their_fifo_place(
        engine, http_target):
    """A ``mantle run`` process exits once its execution ends and takes nothing over: had it
    promoted another process's queued execution, that one would stay ``running`` with no
    owner (found by CI: the next ``mantle run`` in the queue waited forever). It starts its
    own queued executions only, and not ahead of a live process's older one."""
    http_target.route("/gate", hold=True, json={"ok": True})
    apply(f"""
        name: queued
        max_parallel_executions: 1
        steps:
          - {{name: call, action: http/request, params: {{url: "{http_target.url('/gate')}"}}}}
    """)
    first = engine.run("queued").execution_id
    wait_until(lambda: http_target.hits("/gate") == 1)
    now = utcnow()
    Node.create(id="other-run", hostname="elsewhere", pid=1, kind="run", host_key="elsewhere",
                started_at=now, lease_expires_at=now + dt.timedelta(hours=1))
    with transaction():  # what another ``mantle run`` process writes for its run
        other = store.create_execution("queued", {}, None, None, "other-run", "cli", None)
    assert other.queued
    own = engine.run("queued").execution_id
    assert WorkflowExecution.get_by_id(own).status == "pending"

    http_target.release("/gate")
    assert finish(engine, first)["status"] == "completed"
    # The older queued execution's process is alive to start it: ours waits behind it.
    # Once that process is gone (its lease ended), ours goes ahead; its own stays queued
    # for a daemon, which promotes any node's.
    before = AuditEvent.select(fn.MAX(AuditEvent.id)).scalar()
    Node.update(lease_expires_at=now - dt.timedelta(hours=1)).where(
        Node.id == "other-run").execute()
    assert finish(engine, own)["status"] == "completed"
    assert WorkflowExecution.get_by_id(other.execution["id"]).status == "pending"
    promoted = AuditEvent.get(AuditEvent.action == "execution.promoted")
    assert (promoted.resource_id, promoted.id > before) == (own, True)


def test_step_max_parallel_limits_attempts_across_executions(engine, http_target):
    http_target.route("/one", delay=0.2, json={"ok": True})
    apply(f"""
        name: throttled
        steps:
          - {{name: call, action: http/request, max_parallel: 1,
             params: {{url: "{http_target.url('/one')}"}}}}
    """)
    ids = [engine.run("throttled").execution_id for _ in range(3)]
    details = [finish(engine, i) for i in ids]
    spans = sorted((steps_of(d)["call"]["started_at"], steps_of(d)["call"]["completed_at"])
                   for d in details)
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert end <= start


def test_hook_step_max_parallel_limits_its_attempts_across_executions(engine, http_target):
    """SPEC 2.4: hook steps take the step fields except ``depends_on``, ``max_parallel``
    (2.3) among them, and it is validated for them (docs/workflows.md); the engine ignored
    it for hooks, so an ``on_finish`` hook with ``max_parallel: 1`` (a lock release, a
    rate-limited notification) ran in every execution at once."""
    http_target.route("/notify", delay=0.2, json={"ok": True})
    apply(f"""
        name: throttled-hook
        steps: [{{name: work, action: core/log, params: {{message: hi}}}}]
        hooks:
          on_finish:
            - {{name: notify, action: http/request, max_parallel: 1,
               params: {{url: "{http_target.url('/notify')}"}}}}
    """)
    ids = [engine.run("throttled-hook").execution_id for _ in range(3)]
    details = [finish(engine, i) for i in ids]
    spans = sorted((hook["started_at"], hook["completed_at"])
                   for d in details for hook in d["hooks"])
    assert len(spans) == 3
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert end <= start, f"hook attempts overlapped: {spans}"


def test_version_is_pinned_at_creation(engine):
    apply("""
        name: pinned
        max_parallel_executions: 1
        steps: [{name: a, action: core/sleep, params: {duration: 300ms}}]
    """)
    first = engine.run("pinned")
    second = engine.run("pinned")  # queued behind the first, on version 1
    apply("""
        name: pinned
        steps: [{name: b, action: core/log, params: {message: v2}}]
    """)
    assert finish(engine, first.execution_id)["version"] == 1
    detail = finish(engine, second.execution_id)
    assert detail["version"] == 1
    assert [s["name"] for s in detail["steps"]] == ["a"]


def test_missing_credential_fails_without_retry(engine):
    apply("""
        name: creds
        steps: [{name: s, action: core/log, credential: api-token, retry: {max_attempts: 3},
                 params: {message: x}}]
    """)
    step = steps_of(run(engine, "creds"))["s"]
    assert step["error"] == 'credential "api-token" not found (set MANTLE_SECRET_API_TOKEN)'
    assert step["attempt"] == 1


@pytest.mark.parametrize("secrets", [{"MANTLE_SECRET_API_TOKEN": "s3cret"}])
def test_credential_is_sent_as_bearer_token_and_never_stored(engine, http_target, db):
    http_target.route("/auth", echo=True)
    apply(f"""
        name: with-creds
        steps:
          - {{name: s, action: http/request, credential: api-token,
             params: {{url: "{http_target.url('/auth')}"}}}}
    """)
    detail = run(engine, "with-creds")
    assert detail["status"] == "completed"
    assert http_target.requests("/auth")[0].header("Authorization") == "Bearer s3cret"
    assert "s3cret" not in str(detail)


def test_oversized_output_fails_the_step(engine, http_target):
    http_target.route("/big", body=b"x" * (1024 * 1024 + 10))
    apply(f"""
        name: big
        steps: [{{name: s, action: http/request, params: {{url: "{http_target.url('/big')}"}}}}]
    """)
    step = steps_of(run(engine, "big"))["s"]
    assert step["error"].startswith("step output exceeds 1048576 byte limit (")


def test_a_failed_steps_partial_output_over_the_limit_is_not_stored(engine, http_target, db):
    # A 500 with a 2 MiB page kept the whole response (body and all) as the failed step's
    # output, past the 1 MiB every stored output is held to; the step keeps its own error,
    # without the output, as workflow/run does for a child that did not complete.
    http_target.route("/down", status=500, body=b"x" * (2 * 1024 * 1024))
    apply(f"""
        name: big-failure
        steps: [{{name: s, action: http/request, params: {{url: "{http_target.url('/down')}"}}}}]
    """)
    step = steps_of(run(engine, "big-failure"))["s"]
    assert step["error"] == f"http/request: GET {http_target.url('/down')} returned 500"
    assert step["output"] is None
    assert StepExecution.get(StepExecution.step_name == "s").output is None


def test_cel_variables_expose_inputs_env_trigger_and_execution(engine):
    apply("""
        name: vars
        inputs: {who: {type: string}}
        steps:
          - name: fetch-data
            action: core/log
            params: {message: {n: 2}}
          - name: show
            action: core/log
            if: "steps.fetch-data.output.message.n == 2"
            params:
              message: "{{ inputs.who }} {{ env.REGION }} {{ trigger.type }} {{ execution.workflow_name }}"
              whole: "{{ steps['fetch-data'].output.message }}"
    """)
    detail = run(engine, "vars", {"who": "ann"})
    output = steps_of(detail)["show"]["output"]
    assert output == {"message": "ann eu manual vars"}


def test_exponential_backoff_waits_one_then_two_seconds(engine, http_target):
    http_target.route("/down", status=503)
    apply(f"""
        name: backing-off
        steps:
          - name: call
            action: http/request
            params: {{url: "{http_target.url('/down')}"}}
            retry: {{max_attempts: 3, backoff: exponential}}
    """)
    detail = run(engine, "backing-off")
    assert steps_of(detail)["call"]["attempt"] == 3
    rows = list(StepExecution.select().where(StepExecution.step_name == "call")
                .order_by(StepExecution.attempt))
    # Attempt n+1's row is written (running) when the backoff begins, so the waits show as
    # the spacing of the attempts' ends; each request itself takes milliseconds.
    gaps = [(later.completed_at - earlier.completed_at).total_seconds()
            for earlier, later in zip(rows, rows[1:])]
    assert 0.9 <= gaps[0] < 1.6
    assert 1.9 <= gaps[1] < 2.6


# --- a step timeout due while something else interrupts the attempt ------------------------

class SilentServer:
    """A TCP server that accepts connections and never answers: a ``postgres/query``
    attempt connecting to it cannot be stopped at once (its cancel has no statement to
    cancel yet), so an interrupted attempt reports back only after the connector's 1 s
    cancel grace, like any attempt stuck where a cancel cannot reach."""

    def __init__(self):
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.accepted: list[float] = []
        self._held: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            self._held.append(connection)
            self.accepted.append(time.monotonic())

    def url(self) -> str:
        return f"postgresql://mantle@127.0.0.1:{self.port}/none?connect_timeout=30"

    def close(self):
        self._listener.close()
        for connection in self._held:
            connection.close()


@pytest.fixture
def silent_engine(db, tmp_path):
    """An engine whose ``warehouse`` credential points at a SilentServer."""
    server = SilentServer()
    started = Engine(db, metrics=Metrics(), plugins_dir=str(tmp_path / "plugins"),
                     secrets={"MANTLE_SECRET_WAREHOUSE": server.url()}).start()
    yield started, server
    started.shutdown(timeout=1)
    server.close()


STUCK = """
    name: stuck
    {timeout}
    steps:
      - name: query
        action: postgres/query
        credential: warehouse
        timeout: 1s
        params: {{query: "SELECT 1"}}
"""


def _attempt_rows(execution_id: str) -> list[tuple]:
    return [(r.step_name, r.attempt, r.status, r.error) for r in StepExecution.select()
            .where(StepExecution.execution_id == execution_id).order_by(StepExecution.id)]


def test_a_step_timeout_due_while_a_cancel_interrupts_the_attempt_leaves_the_step_cancelled(
        silent_engine):
    """SPEC 4.6: after a cancel, running attempts are interrupted and their steps become
    ``cancelled``. The attempt's own 1 s step timeout falls due before it reports back; the
    first reason it was interrupted for stays, so it is not taken for a step timeout."""
    engine, silent = silent_engine
    apply(STUCK.format(timeout=""))
    execution_id = engine.run("stuck").execution_id
    wait_until(lambda: silent.accepted, timeout=10)  # the attempt is connecting
    wait_until(lambda: time.monotonic() > silent.accepted[0] + 0.3, timeout=2)
    assert engine.cancel(execution_id) == "running"
    wait_until(lambda: _attempt_rows(execution_id) and _attempt_rows(execution_id)[-1][2]
               not in ("pending", "running"), timeout=10)
    assert WorkflowExecution.get_by_id(execution_id).status == "cancelled"
    assert _attempt_rows(execution_id) == [("query", 1, "cancelled", None)]


def test_a_step_timeout_due_while_the_workflow_timeout_interrupts_keeps_the_workflow_error(
        silent_engine):
    """SPEC 4.7: at the workflow timeout running steps are ``failed`` with ``workflow timed
    out after <timeout>`` (not retried). The step's own 1 s timeout falls due while the
    500 ms workflow timeout is interrupting the attempt, and changes nothing."""
    engine, _silent = silent_engine
    apply(STUCK.format(timeout="timeout: 500ms"))
    detail = finish(engine, engine.run("stuck").execution_id, timeout=20)
    assert (detail["status"], detail["error"]) == ("failed", "workflow timed out after 500ms")
    assert _attempt_rows(detail["id"]) == [
        ("query", 1, "failed", "workflow timed out after 500ms")]
