"""Engine metrics (SPEC 9.1), audit events (9.3), logs (9.2), plugins and interruption."""

from __future__ import annotations

import logging
import time

import pytest

from mantle.db.models import AuditEvent, StepExecution, WorkflowExecution
from tests.actors.conftest import apply, finish, run, steps_of, wait_until


def _sample(engine, name, labels=None):
    return engine.metrics.registry.get_sample_value(name, labels or {})


def test_engine_metrics_count_executions_steps_and_durations(engine):
    apply("""
        name: measured
        steps:
          - {name: ok, action: core/log, params: {message: x}}
          - {name: skip, action: core/log, if: "false", params: {message: x}}
          - {name: bad, action: core/fail, continue_on_error: true}
    """)
    run(engine, "measured")
    assert _sample(engine, "mantle_workflow_executions_total",
                   {"workflow": "measured", "status": "completed"}) == 1
    for step, status in (("ok", "completed"), ("skip", "skipped"), ("bad", "failed")):
        assert _sample(engine, "mantle_step_executions_total",
                       {"workflow": "measured", "step": step, "status": status}) == 1
    assert _sample(engine, "mantle_step_duration_seconds_count",
                   {"workflow": "measured", "step": "ok", "action": "core/log"}) == 1
    assert _sample(engine, "mantle_step_duration_seconds_count",
                   {"workflow": "measured", "step": "skip", "action": "core/log"}) is None
    assert _sample(engine, "mantle_connector_duration_seconds_count",
                   {"action": "core/fail"}) == 1
    assert _sample(engine, "mantle_active_executions") == 0


def test_active_executions_gauge_counts_running_ones(engine):
    apply("""
        name: active
        steps: [{name: nap, action: core/sleep, params: {duration: 60s}}]
    """)
    result = engine.run("active")
    wait_until(lambda: _sample(engine, "mantle_active_executions") == 1)
    engine.cancel(result.execution_id)
    finish(engine, result.execution_id)
    wait_until(lambda: _sample(engine, "mantle_active_executions") == 0)
    assert _sample(engine, "mantle_workflow_executions_total",
                   {"workflow": "active", "status": "cancelled"}) == 1


def test_audit_trail_records_execution_and_step_events(engine):
    apply("""
        name: audited
        steps:
          - {name: a, action: core/log, params: {message: x}}
          - {name: b, action: core/fail, depends_on: [a], params: {message: nope}}
        hooks:
          on_failure: [{name: h, action: core/log, params: {message: x}}]
    """)
    detail = run(engine, "audited")
    events = [(e.actor, e.action, e.resource_type, e.resource_id, e.metadata)
              for e in AuditEvent.select().order_by(AuditEvent.id)
              if e.action != "workflow.applied"]
    execution_id = detail["id"]
    assert events == [
        ("cli", "workflow.executed", "workflow_execution", execution_id,
         {"workflow": "audited", "version": 1}),
        ("engine", "step.started", "step_execution", "a",
         {"execution_id": execution_id, "attempt": 1}),
        ("engine", "step.completed", "step_execution", "a",
         {"execution_id": execution_id, "attempt": 1}),
        ("engine", "step.started", "step_execution", "b",
         {"execution_id": execution_id, "attempt": 1}),
        ("engine", "step.failed", "step_execution", "b",
         {"execution_id": execution_id, "attempt": 1, "error": "nope"}),
        ("engine", "hook.step.started", "hook_step_execution", "h",
         {"execution_id": execution_id, "hook_block": "on_failure"}),
        ("engine", "hook.step.completed", "hook_step_execution", "h",
         {"execution_id": execution_id, "hook_block": "on_failure"}),
        ("engine", "execution.finished", "workflow_execution", execution_id,
         {"workflow": "audited", "status": "failed", "error": 'step "b" failed: nope'}),
    ]


def test_engine_logs_carry_workflow_execution_and_step(engine, caplog):
    caplog.set_level(logging.INFO)
    apply("""
        name: logged
        steps:
          - {name: say, action: core/log, params: {message: hello there}}
          - {name: boom, action: core/fail, params: {message: bad}}
    """)
    detail = run(engine, "logged")
    records = {r.getMessage(): r for r in caplog.records}
    assert records["execution started"].execution_id == detail["id"]
    assert records["hello there"].step == "say"
    assert records["hello there"].workflow == "logged"
    assert records["step failed"].levelno == logging.ERROR
    assert records["step failed"].error == "bad"
    assert records["execution finished"].status == "failed"


def test_plugin_steps_run_as_subprocesses_with_params(engine, tmp_path):
    plugin = tmp_path / "plugins" / "greeter"
    plugin.parent.mkdir()
    plugin.write_text("#!/usr/bin/env python3\n"
                      "import json, sys\n"
                      "req = json.load(sys.stdin)\n"
                      "print(json.dumps({'hello': req['params']['who'], "
                      "'action': req['action']}))\n")
    plugin.chmod(0o755)
    apply("""
        name: plugged
        steps: [{name: greet, action: greeter/say, params: {who: "{{ 'wor' + 'ld' }}"}}]
    """)
    step = steps_of(run(engine, "plugged"))["greet"]
    assert step["output"] == {"hello": "world", "action": "greeter/say"}


@pytest.mark.alone
def test_cancel_aborts_an_in_flight_http_request(engine, http_target):
    http_target.route("/hang", hold=True)
    apply(f"""
        name: hanging
        steps: [{{name: call, action: http/request,
                  params: {{url: "{http_target.url('/hang')}"}}}}]
    """)
    result = engine.run("hanging")
    http_target.wait_for_hits("/hang", 1)
    started = time.monotonic()
    engine.cancel(result.execution_id)
    detail = finish(engine, result.execution_id, timeout=1.0)
    assert time.monotonic() - started < 1.0
    assert steps_of(detail)["call"]["status"] == "cancelled"


def test_shutdown_interrupts_attempts_and_leaves_them_running_for_resume(db):
    from actors.engine import Engine
    from mantle.metrics import Metrics

    apply("""
        name: interrupted
        steps: [{name: nap, action: core/sleep, params: {duration: 60s}}]
    """)
    engine = Engine(db, metrics=Metrics()).start()
    result = engine.run("interrupted")
    wait_until(lambda: StepExecution.select().where(
        StepExecution.execution_id == result.execution_id,
        StepExecution.status == "running").exists())
    started = time.monotonic()
    engine.shutdown(timeout=0.2)
    assert time.monotonic() - started < 3
    assert WorkflowExecution.get_by_id(result.execution_id).status == "running"
    row = StepExecution.get(StepExecution.execution_id == result.execution_id)
    assert (row.status, row.attempt) == ("running", 1)


def test_shutdown_lets_short_steps_finish_and_checkpoint(db):
    from actors.engine import Engine
    from mantle.metrics import Metrics

    # The shutdown has to come while the nap runs: with 300 ms, a look delayed that long (a
    # loaded machine) found the execution over.
    apply("""
        name: short
        steps:
          - {name: nap, action: core/sleep, params: {duration: 1s}}
          - {name: next, action: core/log, depends_on: [nap], params: {message: x}}
    """)
    engine = Engine(db, metrics=Metrics()).start()
    result = engine.run("short")
    wait_until(lambda: StepExecution.select().where(
        StepExecution.execution_id == result.execution_id, StepExecution.step_name == "nap",
        StepExecution.status == "running").exists())
    engine.shutdown(timeout=5)
    rows = {r.step_name: r.status for r in StepExecution.select().where(
        StepExecution.execution_id == result.execution_id)}
    assert rows == {"nap": "completed"}  # finished and checkpointed; "next" never started
    assert WorkflowExecution.get_by_id(result.execution_id).status == "running"


def test_idempotency_key_returns_the_original_execution(engine):
    apply("""
        name: once
        steps: [{name: a, action: core/log, params: {message: x}}]
    """)
    first = engine.run("once", idempotency_key="k-1")
    again = engine.run("once", idempotency_key="k-1")
    assert again.existing and not first.existing
    assert again.execution_id == first.execution_id
    assert WorkflowExecution.select().count() == 1


def test_execution_finished_comes_after_the_last_steps_audit_rows(engine):
    """The event streams read the audit trail in id order and end at execution.finished:
    its row must follow the rows of the step whose outcome ended the execution, written in
    the same transaction."""
    apply("""
        name: one-step
        steps: [{name: only, action: core/log, params: {message: x}}]
    """)
    execution_id = run(engine, "one-step")["id"]
    actions = [e.action for e in AuditEvent.select().order_by(AuditEvent.id)
               if e.action != "workflow.applied"]
    assert actions == ["workflow.executed", "step.started", "step.completed",
                       "execution.finished"], execution_id


def test_sleep_and_sub_workflow_attempts_are_timed_like_every_connector(engine):
    """SPEC 9.1: `mantle_connector_duration_seconds{action}` observes each connector
    invocation, every attempt, hooks too. `core/sleep` (a timer of the Execution actor) and
    `workflow/run` (a child execution awaited by the actor) run without the step pool, and
    were never observed; an interrupted one counts as any interrupted attempt does."""
    apply("""
        name: leaf
        steps: [{name: c, action: core/log, params: {message: x}}]
    """)
    apply("""
        name: nested
        steps:
          - {name: nap, action: core/sleep, params: {duration: 50ms}}
          - {name: sub, action: workflow/run, params: {workflow: leaf}}
        hooks:
          on_success: [{name: rest, action: core/sleep, params: {duration: 10ms}}]
    """)
    assert run(engine, "nested")["status"] == "completed"
    count = "mantle_connector_duration_seconds_count"
    assert _sample(engine, count, {"action": "core/sleep"}) == 2
    assert _sample(engine, count, {"action": "workflow/run"}) == 1
    assert _sample(engine, "mantle_connector_duration_seconds_sum",
                   {"action": "core/sleep"}) >= 0.05  # the two sleeps, give or take a timer tick
    apply("""
        name: long-nap
        steps: [{name: nap, action: core/sleep, params: {duration: 60s}}]
    """)
    execution_id = engine.run("long-nap").execution_id
    wait_until(lambda: StepExecution.select().where(
        StepExecution.execution_id == execution_id, StepExecution.status == "running").exists())
    engine.cancel(execution_id)
    finish(engine, execution_id)
    assert _sample(engine, count, {"action": "core/sleep"}) == 3
