"""``mantle logs`` (list and detail) and ``mantle status`` through the real command line, word
for word (SPEC 6.2), on SQLite and PostgreSQL.

Executions are made by the real engine in the test process; their timestamps are then set to
fixed values so that every time and duration on screen can be written out in full.
"""

from __future__ import annotations

import datetime as dt
import json

import pytest

from actors.engine import Engine
from mantle.db.fields import utcnow
from mantle.db.models import StepExecution, WorkflowExecution
from mantle.metrics import Metrics
from tests.mantle.test_cli_run import Cli, apply, wait_until

# The formats as SPEC 6.2 gives them.
HEADER = "%-38s %-20s %7s %-10s %-20s %-20s" % ("ID", "WORKFLOW", "VERSION", "STATUS",
                                                "STARTED", "COMPLETED")
ROW = "%-38s %-20s %7d %-10s %-20s %-20s"
DASHES = "-" * 120
EMPTY = "No executions found. Run a workflow with: mantle run <workflow>\n"
T0 = dt.datetime(2026, 3, 18, 9, 0, 0, 412000)


@pytest.fixture
def cli(tmp_path, db, migrated_db_url) -> Cli:
    return Cli(tmp_path, migrated_db_url)


@pytest.fixture
def engine(db, tmp_path):
    started = Engine(db, metrics=Metrics(), plugins_dir=str(tmp_path / "plugins")).start()
    yield started
    started.shutdown(timeout=2)


def run_to_end(engine: Engine, workflow: str, inputs=None) -> str:
    execution_id = engine.run(workflow, inputs).execution_id
    assert engine.wait(execution_id, timeout=15) is not None
    return execution_id


def at(ms: float) -> dt.datetime:
    return T0 + dt.timedelta(milliseconds=ms)


def set_times(execution_id: str, started: float, completed: float | None, **steps) -> None:
    """Fix the times of an execution and of its steps' latest rows (``name=(start, end)``,
    offsets from T0 in ms; ``hook_<name>`` for hook steps)."""
    (WorkflowExecution.update(started_at=at(started),
                              completed_at=None if completed is None else at(completed))
     .where(WorkflowExecution.id == execution_id).execute())
    for key, (start, end) in steps.items():
        is_hook = key.startswith("hook_")
        name = key.removeprefix("hook_").replace("_", "-")
        rows = (StepExecution.select().where(StepExecution.execution_id == execution_id,
                                             StepExecution.step_name == name,
                                             StepExecution.is_hook == is_hook)
                .order_by(StepExecution.attempt.desc()))
        latest = rows.first()
        latest.started_at, latest.completed_at = at(start), at(end)
        latest.save()


def insert_execution(workflow: str, status: str, started: dt.datetime,
                     completed: dt.datetime | None, version: int = 1) -> WorkflowExecution:
    """A bare execution row: the list reads nothing else."""
    return WorkflowExecution.create(workflow_name=workflow, version=version, status=status,
                                    inputs={}, trigger={"type": "manual", "payload": None},
                                    started_at=started, completed_at=completed)


def table(*rows: WorkflowExecution) -> str:
    """The expected list output for these rows, in this order."""
    def when(value):
        return "-" if value is None else value.strftime("%Y-%m-%d %H:%M:%S")
    lines = [HEADER, DASHES]
    lines += [ROW % (r.id, r.workflow_name, r.version, r.status, when(r.started_at),
                     when(r.completed_at)) for r in rows]
    return "\n".join(lines) + f"\n\n{len(rows)} execution(s) shown.\n"


def test_logs_of_the_spec_example_prints_it_line_for_line(cli, engine, http_target):
    http_target.route("/daily", json={"count": 42})
    for timeout in ("10s", "30s"):  # two applies: the run uses version 2
        apply(f"""
            name: daily-report
            inputs:
              day: {{type: string}}
            steps:
              - name: fetch-metrics
                action: http/request
                timeout: {timeout}
                params: {{url: "{http_target.url('/daily')}?day={{{{ inputs.day }}}}"}}
              - name: announce
                action: core/log
                if: "steps.fetch-metrics.output.status == 200"
                params:
                  message: >-
                    {{{{ steps.fetch-metrics.output.json.count }}}} events on {{{{ inputs.day }}}}
        """)
    execution_id = run_to_end(engine, "daily-report", {"day": "2026-03-17"})
    set_times(execution_id, 0, 1243, fetch_metrics=(8, 1206), announce=(1218, 1233))

    result = cli("logs", execution_id)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == (
        f"Execution: {execution_id}\n"
        "Workflow:  daily-report (version 2)\n"
        "Status:    completed\n"
        "Started:   2026-03-18T09:00:00Z\n"
        "Completed: 2026-03-18T09:00:01Z\n"
        "Duration:  1.243s\n"
        "\n"
        "Steps:\n"
        "  fetch-metrics        completed (1.2s)\n"
        "  announce             completed (15ms)\n")


NIGHTLY = """
    name: nightly
    steps:
      - {name: hello, action: core/log, params: {message: hi}}
      - name: flaky
        action: core/fail
        params: {message: still broken}
        retry: {max_attempts: 2}
        continue_on_error: true
      - {name: gate, action: core/log, if: "1 == 2", params: {message: x}}
      - {name: boom, action: core/fail, depends_on: [gate], params: {message: boom}}
      - {name: tail, action: core/log, depends_on: [boom], params: {message: x}}
    hooks:
      on_failure: [{name: alert, action: core/log, params: {message: "{{ execution.error }}"}}]
      on_finish: [{name: cleanup, action: core/fail, params: {message: lock gone}}]
"""


@pytest.fixture
def nightly(engine) -> str:
    """A failed execution with every kind of step line: retried, skipped, failed, never
    started, and hooks (one failed)."""
    apply(NIGHTLY)
    execution_id = run_to_end(engine, "nightly")
    assert WorkflowExecution.get_by_id(execution_id).status == "failed"
    set_times(execution_id, 0, 2500, hello=(1, 2), gate=(5, 5), boom=(10, 1510),
              flaky=(1010, 1030), hook_alert=(2000, 2003), hook_cleanup=(2004, 2008))
    return execution_id


def test_logs_and_status_of_an_execution_with_every_kind_of_step_line(cli, nightly):
    result, status = cli.run_all(["logs", nightly], ["status", nightly])
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == (
        f"Execution: {nightly}\n"
        "Workflow:  nightly (version 1)\n"
        "Status:    failed\n"
        "Started:   2026-03-18T09:00:00Z\n"
        "Completed: 2026-03-18T09:00:02Z\n"
        "Duration:  2.500s\n"
        "\n"
        "Steps:\n"
        "  hello                completed (1ms)\n"
        "  gate                 skipped (0ms)\n"
        "  boom                 failed (1.5s)\n"
        "    error: boom\n"
        "  flaky                failed (20ms, 2 attempts)\n"
        "    error: still broken\n"
        "  tail                 cancelled\n"
        "\n"
        "Hooks:\n"
        "  on_failure/alert     completed (3ms)\n"
        "  on_finish/cleanup    failed (4ms)\n"
        "    error: lock gone\n")

    # status: the header without Duration, then counts in the fixed order.
    assert (status.returncode, status.stderr) == (0, "")
    assert status.stdout == (
        f"Execution: {nightly}\n"
        "Workflow:  nightly (version 1)\n"
        "Status:    failed\n"
        "Started:   2026-03-18T09:00:00Z\n"
        "Completed: 2026-03-18T09:00:02Z\n"
        "\n"
        "Steps:\n"
        "  completed: 1\n"
        "  failed: 2\n"
        "  skipped: 1\n"
        "  cancelled: 1\n")


def test_a_running_execution_has_no_completed_or_duration_line(cli, engine):
    apply("""
        name: sleepy
        steps:
          - {name: nap, action: core/sleep, params: {duration: 60s}}
          - {name: after, action: core/log, depends_on: [nap], params: {message: done}}
          - {name: flaky, action: core/fail, retry: {max_attempts: 9}, params: {message: x}}
    """)
    execution_id = engine.run("sleepy").execution_id
    wait_until(lambda: StepExecution.get_or_none(StepExecution.step_name == "nap",
                                                 StepExecution.status == "running"))
    # On its second attempt (or in the backoff before it): no duration, so no attempt count.
    wait_until(lambda: StepExecution.get_or_none(StepExecution.step_name == "flaky",
                                                 StepExecution.attempt == 2))
    set_times(execution_id, 0, None)
    header = (f"Execution: {execution_id}\n"
              "Workflow:  sleepy (version 1)\n"
              "Status:    running\n"
              "Started:   2026-03-18T09:00:00Z\n"
              "\n"
              "Steps:\n")
    try:
        logs, status = cli.run_all(["logs", execution_id], ["status", execution_id])
    finally:
        engine.cancel(execution_id)
    assert (logs.returncode, logs.stderr) == (0, "")
    assert logs.stdout == header + ("  nap                  running\n"
                                    "  flaky                running\n"
                                    "  after                pending\n")
    assert (status.returncode, status.stderr) == (0, "")
    assert status.stdout == header + "  pending: 1\n  running: 2\n"


def test_detail_of_an_unknown_execution_is_an_error(cli):
    cases = [(command, ident) for command in ("logs", "status")
             for ident in ("5c0f8a52-3b7e-4c1e-9a43-0d2b7f0e6a11", "nope")]
    for (command, ident), result in zip(cases, cli.run_all(*map(list, cases))):
        assert (result.returncode, result.stdout, result.stderr) == \
            (1, "", f'Error: execution "{ident}" not found\n'), command


def test_list_shows_newest_first_with_dashes_for_unfinished(cli):
    now = utcnow().replace(microsecond=0)
    old = insert_execution("daily-report", "completed", now - dt.timedelta(days=3),
                           now - dt.timedelta(days=3) + dt.timedelta(seconds=2), version=2)
    mid = insert_execution("a-workflow-name-longer-than-twenty", "failed",
                           now - dt.timedelta(hours=2), now - dt.timedelta(hours=2))
    new = insert_execution("sleepy", "running", now - dt.timedelta(minutes=10), None)
    queued = insert_execution("sleepy", "pending", now - dt.timedelta(minutes=5), None)

    result = cli("logs")
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == table(queued, new, mid, old)
    assert result.stdout.splitlines()[0] == (
        "ID                                     WORKFLOW             VERSION STATUS     "
        "STARTED              COMPLETED           ")


def test_list_filters_combine(cli):
    now = utcnow().replace(microsecond=0)
    old = insert_execution("alpha", "completed", now - dt.timedelta(days=3), now)
    mid = insert_execution("beta", "failed", now - dt.timedelta(hours=2), now)
    new = insert_execution("alpha", "completed", now - dt.timedelta(minutes=10), now)
    newest = insert_execution("alpha", "cancelled", now - dt.timedelta(minutes=1), now)

    cases = [
        (["--workflow", "alpha"], [newest, new, old]),
        (["--status", "completed"], [new, old]),
        (["--since", "1h"], [newest, new]),
        (["--since", "2d"], [newest, new, mid]),
        (["--since", "90s"], [newest]),
        (["--limit", "2"], [newest, new]),
        (["--workflow", "alpha", "--status", "completed", "--since", "4d", "--limit", "1"],
         [new]),
    ]
    cases.append((["--workflow", "gamma"], None))
    results = cli.run_all(*(["logs", *args] for args, _ in cases))
    for (args, expected), result in zip(cases, results):
        output = EMPTY if expected is None else table(*expected)
        assert (result.returncode, result.stdout, result.stderr) == (0, output, ""), args


def test_list_is_limited_to_20_by_default(cli):
    now = utcnow().replace(microsecond=0)
    rows = [insert_execution("many", "completed", now - dt.timedelta(minutes=n), now)
            for n in range(21)]
    default, most = cli.run_all(["logs"], ["logs", "--limit", "1000"])
    assert (default.returncode, default.stdout) == (0, table(*rows[:20]))
    assert (most.returncode, most.stdout) == (0, table(*rows))


def test_empty_list_suggests_running_a_workflow(cli):
    result = cli("logs")
    assert (result.returncode, result.stdout, result.stderr) == (0, EMPTY, "")


SINCE_ERROR = ('invalid --since value "{}": must be a positive duration such as 90s, 30m, '
               "1h30m or 7d")


def test_list_filter_errors(tmp_path):
    cases = [
        (["--status", "done"], 'invalid status "done": must be one of pending, running, '
                               "completed, failed, cancelled"),
        (["--status", "skipped"], 'invalid status "skipped": must be one of pending, running, '
                                  "completed, failed, cancelled"),
        (["--since", "yesterday"], SINCE_ERROR.format("yesterday")),
        (["--since", "0s"], SINCE_ERROR.format("0s")),
        (["--since=-5m"], SINCE_ERROR.format("-5m")),
        (["--since", "-5m"], SINCE_ERROR.format("-5m")),
        (["--since", "0d"], SINCE_ERROR.format("0d")),
        (["--limit", "0"], "--limit must be between 1 and 1000"),
        (["--limit", "1001"], "--limit must be between 1 and 1000"),
        (["--limit", "ten"], "--limit must be between 1 and 1000"),
    ]
    # Checked before the database is opened (this one does not exist), so once is enough.
    cli = Cli(tmp_path, f"sqlite:///{tmp_path / 'absent.db'}")
    results = cli.run_all(*(["logs", *args] for args, _ in cases))
    for (args, message), result in zip(cases, results):
        assert (result.returncode, result.stdout, result.stderr) == \
            (1, "", f"Error: {message}\n"), args


def test_a_limit_of_more_digits_than_int_reads_is_the_limit_error(tmp_path, capsys):
    # Past 4300 digits int() refuses the text: that was a ValueError traceback.
    from mantle.cli import main

    url = f"sqlite:///{tmp_path / 'absent.db'}"
    assert main(["logs", "--limit", "1" * 5000, "--database-url", url]) == 1
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", "Error: --limit must be between 1 and 1000\n")


def test_a_since_reaching_before_year_one_filters_nothing(cli):
    row = insert_execution("alpha", "completed", utcnow().replace(microsecond=0), None)
    for since in ("999999999d", "1" + "0" * 400 + "d"):
        result = cli("logs", "--since", since)
        assert (result.returncode, result.stdout, result.stderr) == (0, table(row), ""), since


def test_logs_shows_sub_workflow_children_indented_under_their_parent_step(cli, engine):
    """SPEC 13.3: ``mantle logs <id>`` shows the children under the step that started
    them, with their own steps, one level deeper each."""
    apply("""
        name: grandkid
        steps: [{name: leaf, action: core/log, params: {message: leaf}}]
    """)
    apply("""
        name: kid
        steps: [{name: inner, action: workflow/run, params: {workflow: grandkid}}]
    """)
    apply("""
        name: top
        steps:
          - {name: outer, action: workflow/run, params: {workflow: kid}}
          - {name: after, action: core/log, depends_on: [outer], params: {message: done}}
    """)
    top = run_to_end(engine, "top")
    kid = WorkflowExecution.get(WorkflowExecution.parent_execution_id == top)
    grandkid = WorkflowExecution.get(WorkflowExecution.parent_execution_id == kid.id)
    for execution_id, steps in ((top, {"outer": (0, 1000), "after": (1000, 1010)}),
                                (kid.id, {"inner": (10, 990)}),
                                (grandkid.id, {"leaf": (20, 25)})):
        set_times(execution_id, 0, 1020, **steps)
    result = cli("logs", top)
    assert result.stdout.split("Steps:\n", 1)[1] == (
        "  outer                completed (1.0s)\n"
        f"    kid {kid.id}: completed\n"
        "      inner                completed (980ms)\n"
        f"        grandkid {grandkid.id}: completed\n"
        "          leaf                 completed (5ms)\n"
        "  after                completed (10ms)\n")
    detail = cli("logs", top, "-o", "json")
    document = json.loads(detail.stdout)
    assert document["children"] == [{"id": kid.id, "workflow": "kid", "status": "completed",
                                     "parent_step": "outer"}]
    assert document["parent_execution_id"] is None
    listed = json.loads(cli("logs", "-o", "json").stdout)["executions"]
    assert {(row["id"], row["parent_execution_id"], row["parent_step"]) for row in listed} == {
        (top, None, None), (kid.id, top, "outer"), (grandkid.id, kid.id, "inner")}


def test_logs_shows_a_hooks_child_under_that_hook_not_under_a_main_step_of_its_name(
        cli, engine):
    """SPEC 13.3: a hook's child is shown under the hook that started it, also when a main
    step has the hook's name (a child's ``parent_step`` names the step, not its block)."""
    apply("""
        name: kid
        steps: [{name: leaf, action: core/log, params: {message: leaf}}]
    """)
    apply("""
        name: top
        steps: [{name: report, action: core/log, params: {message: main}}]
        hooks:
          on_finish: [{name: report, action: workflow/run, params: {workflow: kid}}]
    """)
    top = run_to_end(engine, "top")
    kid = WorkflowExecution.get(WorkflowExecution.parent_execution_id == top)
    set_times(top, 0, 1020, report=(0, 10), hook_report=(10, 1000))
    set_times(kid.id, 20, 990, leaf=(20, 25))
    result = cli("logs", top)
    assert result.stdout.split("Steps:\n", 1)[1] == (
        "  report               completed (10ms)\n"
        "\n"
        "Hooks:\n"
        "  on_finish/report     completed (990ms)\n"
        f"    kid {kid.id}: completed\n"
        "      leaf                 completed (5ms)\n")
