"""``mantle retry`` through the real command line, word for word (SPEC 6.2, 4.10, 9.3), on
SQLite and PostgreSQL.

Originals are made by the real engine in the test process (so they can carry a webhook
trigger); a local HTTP server's hit counts show which steps run again.
"""

from __future__ import annotations

import re
import signal

import pytest

from actors.engine import Engine
from mantle import queries
from mantle.db.models import AuditEvent, StepExecution, WorkflowExecution
from mantle.metrics import Metrics
from tests.mantle.test_cli_run import Cli, apply, error_line, finish, running_step

DURATION = r"\((\d+ms|\d+\.\ds)\)"
WEBHOOK = {"type": "webhook", "path": "/hooks/push", "payload": {"sha": "abc1234"},
           "headers": {"content-type": "application/json"}}


@pytest.fixture
def cli(tmp_path, db, migrated_db_url) -> Cli:
    return Cli(tmp_path, migrated_db_url)


def original(db, tmp_path, workflow: str, inputs=None, trigger=None) -> str:
    """Run ``workflow`` to its end in an in-process engine (stopped afterwards); its id."""
    engine = Engine(db, metrics=Metrics(), plugins_dir=str(tmp_path / "plugins")).start()
    try:
        execution_id = engine.run(workflow, inputs, trigger=trigger).execution_id
        assert engine.wait(execution_id, timeout=15) is not None
    finally:
        engine.shutdown(timeout=2)
    return execution_id


def step_lines(execution_id: str, reused: set[str]) -> list[str]:
    """Patterns of the summary's step lines, in API detail order."""
    patterns = []
    for step in queries.execution_detail(execution_id)["steps"]:
        name = re.escape(step["name"])
        if step["name"] in reused:
            patterns.append(f"  {name}: reused \\(cached\\)")
        elif step["started_at"] is None:
            patterns.append(f"  {name}: {step['status']}")
        else:
            patterns.append(f"  {name}: {step['status']} {DURATION}")
    return patterns


def assert_lines(stdout: str, patterns: list[str]) -> None:
    lines = stdout.splitlines()
    assert len(lines) == len(patterns), stdout
    for line, pattern in zip(lines, patterns):
        assert re.fullmatch(pattern, line), (line, pattern)


def new_execution(old: str) -> WorkflowExecution:
    return WorkflowExecution.get(WorkflowExecution.retry_of == old)


PIPELINE = """
    name: pipeline
    inputs:
      who: {{type: string}}
      limit: {{type: number, default: 5}}
    steps:
      - {{name: fetch, action: http/request, params: {{url: "{base}/data"}}}}
      - {{name: gate, action: core/log, if: "1 == 2", params: {{message: x}}}}
      - name: push
        action: http/request
        depends_on: [gate]
        params:
          method: POST
          url: "{base}/{push}"
          body: {{n: "{{{{ steps.fetch.output.json.n }}}}", who: "{{{{ inputs.who }}}}"}}
      - name: report
        action: core/log
        params:
          message: >-
            {{{{ steps.push.output.status }}}} {{{{ steps.fetch.output.json.n + 1 }}}}
            {{{{ inputs.limit }}}} {{{{ trigger.payload.sha }}}}
"""


def test_retry_reruns_from_the_failed_step_on_the_original_version(cli, db, tmp_path,
                                                                    http_target):
    http_target.route("/data", json={"n": 41})
    http_target.route("/flaky", status=500, body="down")
    apply(PIPELINE.format(base=http_target.base_url, push="flaky"))
    old = original(db, tmp_path, "pipeline", {"who": "ann"}, WEBHOOK)
    assert WorkflowExecution.get_by_id(old).status == "failed"
    apply(PIPELINE.format(base=http_target.base_url, push="v2"))  # current is now version 2
    http_target.route("/flaky", json={"stored": True})

    result = cli("retry", old)
    new = new_execution(old)
    assert (result.returncode, result.stderr) == (0, "")
    assert_lines(result.stdout, [
        re.escape(f'Retrying execution {old} from step "push"...'),
        re.escape(f"Execution {new.id}: completed"),
        *step_lines(new.id, {"fetch", "gate"})])
    assert result.stdout.splitlines()[2:4] in (
        ["  fetch: reused (cached)", "  gate: reused (cached)"],
        ["  gate: reused (cached)", "  fetch: reused (cached)"])

    # Upstream results were copied, not fetched again, and are visible downstream.
    assert (http_target.hits("/data"), http_target.hits("/flaky"), http_target.hits("/v2")) == \
        (1, 2, 0)
    assert http_target.requests("/flaky")[-1].json() == {"n": 41, "who": "ann"}
    report = StepExecution.get(StepExecution.execution_id == new.id,
                               StepExecution.step_name == "report")
    assert report.output == {"message": "200 42 5 abc1234"}
    copied = {row.step_name: row for row in StepExecution.select().where(
        StepExecution.execution_id == new.id, StepExecution.step_name.in_(["fetch", "gate"]))}
    first = {row.step_name: row for row in StepExecution.select().where(
        StepExecution.execution_id == old, StepExecution.step_name.in_(["fetch", "gate"]))}
    for name in ("fetch", "gate"):
        assert (copied[name].status, copied[name].output, copied[name].started_at,
                copied[name].completed_at) == (first[name].status, first[name].output,
                                               first[name].started_at, first[name].completed_at)

    # Same version, inputs and trigger; audited.
    source = WorkflowExecution.get_by_id(old)
    assert (new.version, new.inputs, new.trigger) == (1, source.inputs, source.trigger)
    assert new.inputs == {"who": "ann", "limit": 5}
    event = AuditEvent.get(AuditEvent.action == "execution.retried")
    assert (event.actor, event.resource_type, event.resource_id, event.metadata) == (
        "cli", "workflow_execution", new.id, {"original_execution_id": old, "from_step": "push"})

    # --from-step an upstream step runs it and its dependents again; gate is still reused.
    again = cli("retry", old, "--from-step", "fetch")
    newer = WorkflowExecution.select().where(WorkflowExecution.retry_of == old,
                                             WorkflowExecution.id != new.id).get()
    assert (again.returncode, again.stderr) == (0, "")
    assert_lines(again.stdout, [
        re.escape(f'Retrying execution {old} from step "fetch"...'),
        re.escape(f"Execution {newer.id}: completed"),
        *step_lines(newer.id, {"gate"})])
    assert "  gate: reused (cached)" in again.stdout.splitlines()
    assert (http_target.hits("/data"), http_target.hits("/flaky")) == (2, 3)


CHAIN = """
    name: chain
    steps:
      - {name: soft, action: core/fail, continue_on_error: true, params: {message: meh}}
      - {name: ok, action: core/log, params: {message: hi}}
      - {name: hard, action: core/fail, depends_on: [ok], params: {message: nope}}
      - {name: last, action: core/log, depends_on: [hard], params: {message: x}}
"""


def test_default_point_skips_continue_on_error_failures_and_a_failed_retry_exits_1(cli):
    apply(CHAIN)
    first = cli("run", "chain")
    assert first.returncode == 1
    old = WorkflowExecution.get().id

    result = cli("retry", old)
    new = new_execution(old)
    assert result.returncode == 1
    # soft failed with continue_on_error: not the retry point, and run again (not copied).
    assert_lines(result.stdout, [
        re.escape(f'Retrying execution {old} from step "hard"...'),
        re.escape(f"Execution {new.id}: failed"),
        *step_lines(new.id, {"ok"})])
    lines = result.stdout.splitlines()
    assert "  ok: reused (cached)" in lines and "  last: cancelled" in lines
    assert any(re.fullmatch(f"  soft: failed {DURATION}", line) for line in lines)
    assert error_line(result.stderr) == 'Error: step "hard" failed: nope'


def test_retry_errors(cli, db, tmp_path):
    apply(CHAIN)
    apply("""
        name: fine
        steps: [{name: a, action: core/log, params: {message: hi}}]
    """)
    failed = original(db, tmp_path, "chain")
    completed = original(db, tmp_path, "fine")
    cases = [
        ([completed], f"execution {completed} is not in a failed state (status: completed)."),
        ([failed, "--from-step", "nope"], 'step "nope" not found in workflow "chain"'),
        (["5c0f8a52-3b7e-4c1e-9a43-0d2b7f0e6a11"],
         'execution "5c0f8a52-3b7e-4c1e-9a43-0d2b7f0e6a11" not found'),
        (["not-an-id"], 'execution "not-an-id" not found'),
    ]
    results = cli.run_all(*(["retry", *args] for args, _ in cases))
    for (args, message), result in zip(cases, results):
        assert (result.returncode, result.stdout, result.stderr) == \
            (1, "", f"Error: {message}\n"), args
    assert WorkflowExecution.select().count() == 2


def test_signal_during_a_retry_cancels_it_and_exits_130(cli, db, tmp_path, http_target):
    http_target.route("/data", json={"n": 1})
    http_target.route("/slow", status=503)
    apply(f"""
        name: stalls
        steps:
          - {{name: fetch, action: http/request, params: {{url: "{http_target.url('/data')}"}}}}
          - {{name: slow, action: http/request, depends_on: [fetch],
             params: {{url: "{http_target.url('/slow')}"}}}}
    """)
    old = original(db, tmp_path, "stalls")
    http_target.route("/slow", hold=True)

    retry = cli.start("retry", old)
    new_id = running_step("stalls", "slow", retry)
    http_target.wait_for_hits("/slow", 2)
    retry.send_signal(signal.SIGTERM)
    result = finish(retry)
    assert result.returncode == 130
    assert_lines(result.stdout, [
        re.escape(f'Retrying execution {old} from step "slow"...'),
        re.escape(f"Execution {new_id}: cancelled"),
        "  fetch: reused \\(cached\\)",
        f"  slow: cancelled {DURATION}"])
    assert "Traceback" not in result.stderr
    assert http_target.hits("/data") == 1


def test_retry_accepts_defaults_that_do_not_match_their_declared_type(cli, db, tmp_path):
    # Validation does not check defaults; the retry must not treat one as a supplied value.
    apply("""
        name: loose
        inputs:
          limit: {type: number, default: ten}
          day: {type: string}
        steps:
          - {name: boom, action: core/fail, params: {message: "{{ inputs.limit }}"}}
    """)
    old = original(db, tmp_path, "loose", {"day": "mon"})
    result = cli("retry", old)
    assert result.returncode == 1
    assert error_line(result.stderr) == 'Error: step "boom" failed: ten'
    assert new_execution(old).inputs == {"limit": "ten", "day": "mon"}
