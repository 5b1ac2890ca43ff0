"""``mantle run`` and ``mantle cancel`` through the real command line, word for word (SPEC 6.2,
2.2, 4.6, 4.9), on SQLite and PostgreSQL.

Each command is a ``python -m mantle`` subprocess; the test process applies workflows and
watches the shared database directly (``db`` is bound to the same URL the CLI gets), so it
waits on rows instead of sleeping.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mantle.db.models import AuditEvent, StepExecution, WorkflowExecution
from tests.helpers.waiting import apply_yaml as apply  # noqa: F401 - re-exported
from tests.helpers.waiting import wait_until  # noqa: F401 - re-exported

REPO = Path(__file__).resolve().parents[2]


class Cli:
    """Runs ``mantle`` in ``cwd`` against one database URL: blocking, or as a Popen."""

    def __init__(self, cwd: Path, database_url: str):
        self.cwd = cwd
        self.database_url = database_url

    def _argv(self, args) -> tuple[list[str], dict]:
        argv = [sys.executable, "-m", "mantle", *args, "--database-url", self.database_url]
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(self.cwd)}
        return argv, env

    def __call__(self, *args: str) -> subprocess.CompletedProcess:
        argv, env = self._argv(args)
        return subprocess.run(argv, cwd=self.cwd, env=env, capture_output=True, text=True,
                              timeout=60)

    def start(self, *args: str) -> subprocess.Popen:
        argv, env = self._argv(args)
        return subprocess.Popen(argv, cwd=self.cwd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def run_all(self, *commands: list[str]) -> list[subprocess.CompletedProcess]:
        """Several independent commands at once (each start costs about half a second)."""
        return [finish(process) for process in [self.start(*args) for args in commands]]


def finish(process: subprocess.Popen, timeout: float = 30) -> subprocess.CompletedProcess:
    """Wait for a started command and collect its output like ``subprocess.run``."""
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        raise AssertionError(f"command did not end in {timeout}s: {stdout}{stderr}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.fixture
def cli(tmp_path, db, migrated_db_url) -> Cli:
    """The CLI on this case's database; ``db`` binds the test process to the same one."""
    return Cli(tmp_path, migrated_db_url)






def running_step(workflow: str, step: str, process: subprocess.Popen | None = None) -> str:
    """Wait until ``step`` of an execution of ``workflow`` has a ``running`` row; its id."""
    def found():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"command ended early: {finish(process)}")
        row = (StepExecution.select(StepExecution.execution_id)
               .join(WorkflowExecution)
               .where(WorkflowExecution.workflow_name == workflow,
                      StepExecution.step_name == step, StepExecution.status == "running")
               .first())
        return row.execution_id if row else None
    return wait_until(found, message=f"step {step} of {workflow} never ran")


def error_line(stderr: str) -> str:
    """The last stderr line; every line before it must be a JSON log record."""
    lines = stderr.splitlines()
    assert lines, "nothing on stderr"
    for line in lines[:-1]:
        assert json.loads(line)["level"] in ("WARN", "ERROR"), line
    return lines[-1]


def statuses(execution_id: str) -> dict[str, str]:
    """Latest status of each main step row of an execution."""
    rows = (StepExecution.select().where(StepExecution.execution_id == execution_id,
                                         ~StepExecution.is_hook)
            .order_by(StepExecution.attempt))
    return {row.step_name: row.status for row in rows}


SLEEPY = """
    name: sleepy
    steps:
      - {name: nap, action: core/sleep, params: {duration: 60s}}
      - {name: after, action: core/log, depends_on: [nap], params: {message: done}}
"""

TYPED = """
    name: typed
    inputs:
      count: {type: number}
      ratio: {type: number}
      big: {type: number}
      neg: {type: number}
      flag: {type: boolean}
      off: {type: boolean}
      label: {type: string}
      anything: {description: no type}
      limit: {type: number, default: 10}
    steps:
      - name: report
        action: core/log
        depends_on: [announce]
        params: {message: "{{ inputs.count + 1 }} {{ inputs.ratio }} {{ inputs.flag }}"}
      - {name: announce, action: core/log, params: {message: "{{ inputs.label }}"}}
      - {name: never, action: core/log, if: "inputs.off", depends_on: [report],
         params: {message: x}}
"""


def test_run_prints_step_lines_as_steps_finish_then_the_execution_line_and_types_inputs(cli):
    apply(TYPED)
    pairs = ["count=41", "ratio=-2.50", "big=1e3", "neg=-7", "flag=TRUE", "off=fAlSe",
             "label=a=b c", "anything=42"]
    result = cli("run", "typed", *(arg for pair in pairs for arg in ("--input", pair)))
    assert (result.returncode, result.stderr) == (0, "")
    execution = WorkflowExecution.get()
    # Completion order (13.1.2): announce (defined second) finishes first.
    assert result.stdout == (
        "Running typed (version 1)...\n"
        "  announce: completed\n"
        "  report: completed\n"
        "  never: skipped\n"
        f"Execution {execution.id}: completed\n")
    inputs = execution.inputs
    assert inputs == {"count": 41, "ratio": -2.5, "big": 1000.0, "neg": -7, "flag": True,
                      "off": False, "label": "a=b c", "anything": "42", "limit": 10}
    assert [type(inputs[k]) for k in ("count", "ratio", "big", "neg", "anything")] == \
        [int, float, float, int, str]
    report = StepExecution.get(StepExecution.step_name == "report")
    assert report.output == {"message": "42 -2.5 true"}
    assert execution.trigger == {"type": "manual", "payload": None}
    assert AuditEvent.get(AuditEvent.action == "workflow.executed").actor == "cli"

    again = cli("cancel", execution.id)
    assert (again.returncode, again.stdout, again.stderr) == \
        (0, f"Execution {execution.id} is already completed\n", "")


def test_run_refuses_bad_workflows_and_inputs_without_creating_anything(cli):
    apply(TYPED)
    cases = [
        (["nope"], "workflow \"nope\" not found — have you run 'mantle apply'?"),
        (["typed", "--input", "count"], 'invalid input format "count" — expected key=value'),
        (["typed", "--input", "=5"], 'invalid input format "=5" — expected key=value'),
        (["typed", "--input", "colour=red"], 'unknown input "colour"'),
        (["typed", "--input", "count=12abc"], 'input "count" must be a number'),
        (["typed", "--input", "count=nan"], 'input "count" must be a number'),
        # Beyond a double, as 1e400 is, and as the API refuses it; past 4300 digits int()
        # raised ValueError, a traceback.
        (["typed", "--input", "count=1" + "0" * 400], 'input "count" must be a number'),
        (["typed", "--input", "count=-1" + "0" * 5000], 'input "count" must be a number'),
        (["typed", "--input", "count=1", "--input", "flag=yes"],
         'input "flag" must be a boolean'),
    ]
    results = cli.run_all(*(["run", *args] for args, _ in cases))
    for (args, message), result in zip(cases, results):
        assert (result.returncode, result.stdout, result.stderr) == \
            (1, "", f"Error: {message}\n"), args
    assert WorkflowExecution.select().count() == 0


def test_failed_run_exits_1_with_the_execution_error(cli):
    apply("""
        name: breaks
        steps:
          - {name: fetch, action: core/log, params: {message: ok}}
          - {name: parse, action: core/fail, depends_on: [fetch], params: {message: bad data}}
          - {name: store, action: core/log, depends_on: [parse], params: {message: x}}
    """)
    result = cli("run", "breaks")
    execution = WorkflowExecution.get()
    assert result.returncode == 1
    assert result.stdout == (
        "Running breaks (version 1)...\n"
        "  fetch: completed\n"
        "  parse: failed\n"
        "  store: cancelled\n"
        f"Execution {execution.id}: failed\n")
    assert error_line(result.stderr) == 'Error: step "parse" failed: bad data'


def test_cancel_from_another_process_ends_the_run_with_exit_1(cli):
    apply(SLEEPY)
    started = time.monotonic()
    runner = cli.start("run", "sleepy")
    execution_id = running_step("sleepy", "nap", runner)

    cancelled = cli("cancel", execution_id)
    assert (cancelled.returncode, cancelled.stdout, cancelled.stderr) == \
        (0, f"Cancelled execution {execution_id}\n", "")
    result = finish(runner)
    assert time.monotonic() - started < 20, "the 60 s sleep was not cut short"
    assert result.returncode == 1
    assert result.stdout == (
        "Running sleepy (version 1)...\n"
        "  nap: cancelled\n"
        "  after: cancelled\n"
        f"Execution {execution_id}: cancelled\n")
    assert error_line(result.stderr) == f"Error: execution {execution_id} was cancelled"
    # The interrupted attempt's row is settled before the runner exits (4.6).
    assert statuses(execution_id) == {"nap": "cancelled", "after": "cancelled"}
    assert AuditEvent.get(AuditEvent.action == "execution.cancelled").actor == "cli"

    again = cli("cancel", execution_id)
    assert (again.returncode, again.stdout, again.stderr) == \
        (0, f"Execution {execution_id} is already cancelled\n", "")


def test_cancel_of_an_unknown_execution_is_an_error(cli):
    idents = ["0b6f3a8e-2d4c-4f1a-9e7b-5c3d2a1f0e9d", "not-a-uuid"]
    for ident, result in zip(idents, cli.run_all(*(["cancel", i] for i in idents))):
        assert (result.returncode, result.stdout, result.stderr) == \
            (1, "", f'Error: execution "{ident}" not found\n')


def test_ctrl_c_stops_logs_follow_with_exit_130_and_no_traceback(cli):
    apply("""
        name: watched
        steps:
          - {name: hello, action: core/log, params: {message: hi}}
          - {name: nap, action: core/sleep, depends_on: [hello], params: {duration: 60s}}
    """)
    runner = cli.start("run", "watched")
    execution_id = running_step("watched", "nap", runner)
    follower = cli.start("logs", "-f", execution_id)
    # Its first line says it is following (the steps that finished are printed first).
    assert follower.stdout.readline() == "  hello: completed\n"
    follower.send_signal(signal.SIGINT)
    result = finish(follower)
    assert (result.returncode, result.stderr) == (130, "")
    runner.send_signal(signal.SIGINT)
    assert finish(runner).returncode == 130


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_while_waiting_cancels_prints_the_summary_and_exits_130(cli, signum):
    apply(SLEEPY)
    runner = cli.start("run", "sleepy")
    execution_id = running_step("sleepy", "nap", runner)
    runner.send_signal(signum)
    result = finish(runner)
    assert result.returncode == 130
    assert result.stdout == (
        "Running sleepy (version 1)...\n"
        "  nap: cancelled\n"
        "  after: cancelled\n"
        f"Execution {execution_id}: cancelled\n")
    assert "Traceback" not in result.stderr
    execution = WorkflowExecution.get_by_id(execution_id)
    assert execution.status == "cancelled" and execution.completed_at is not None
    assert statuses(execution_id) == {"nap": "cancelled", "after": "cancelled"}


def test_run_over_the_limit_with_reject_is_refused(cli):
    apply("""
        name: single
        max_parallel_executions: 1
        on_limit: reject
        steps:
          - {name: nap, action: core/sleep, params: {duration: 60s}}
    """)
    first = cli.start("run", "single")
    first_id = running_step("single", "nap", first)
    second = cli("run", "single")
    assert (second.returncode, second.stdout, second.stderr) == (
        1, "", 'Error: workflow "single" has reached the maximum of 1 concurrent executions\n')
    assert [row.id for row in WorkflowExecution.select()] == [first_id]
    first.send_signal(signal.SIGINT)
    assert finish(first).returncode == 130


def test_run_over_the_limit_with_queue_waits_while_pending_then_completes(cli, http_target):
    http_target.route("/gate", hold=True, json={"ok": True})
    apply(f"""
        name: queued
        max_parallel_executions: 1
        steps:
          - {{name: call, action: http/request, params: {{url: "{http_target.url('/gate')}"}}}}
    """)
    first = cli.start("run", "queued")
    first_id = running_step("queued", "call", first)
    second = cli.start("run", "queued")
    second_id = wait_until(lambda: WorkflowExecution.select(WorkflowExecution.id).where(
        WorkflowExecution.status == "pending").scalar(), message="second run not queued")
    third = cli.start("run", "queued")
    third_id = wait_until(lambda: WorkflowExecution.select(WorkflowExecution.id).where(
        WorkflowExecution.status == "pending",
        WorkflowExecution.id != second_id).scalar(), message="third run not queued")
    assert second.poll() is None and third.poll() is None and http_target.hits("/gate") == 1

    # A queued execution cancelled by another process: its runner never started it.
    cancelled = cli("cancel", third_id)
    assert cancelled.stdout == f"Cancelled execution {third_id}\n"
    gone = finish(third)
    assert gone.returncode == 1
    assert gone.stdout == (
        "Running queued (version 1)...\n"
        "  call: cancelled\n"
        f"Execution {third_id}: cancelled\n")
    assert error_line(gone.stderr) == f"Error: execution {third_id} was cancelled"

    http_target.release("/gate")
    one, two = finish(first), finish(second)
    assert (one.returncode, one.stderr) == (0, "")
    assert (two.returncode, two.stderr) == (0, "")
    assert two.stdout == (
        "Running queued (version 1)...\n"
        "  call: completed\n"
        f"Execution {second_id}: completed\n")
    assert first_id != second_id and http_target.hits("/gate") == 2
    promoted = AuditEvent.get(AuditEvent.action == "execution.promoted")
    assert promoted.resource_id == second_id


class Lines:
    """A started command's stdout, read line by line on a thread as it is printed."""

    def __init__(self, process: subprocess.Popen):
        import threading

        self.process = process
        self.seen: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.seen.append(line.rstrip("\n"))

    def wait_for(self, line: str) -> None:
        wait_until(lambda: line in self.seen or self.process.poll() is not None,
                   message=f"{line!r} never printed: {self.seen}")
        assert line in self.seen, f"ended without {line!r}: {self.seen}"

    def finish(self) -> int:
        code = self.process.wait(30)
        self._reader.join(5)
        return code


def test_run_prints_each_step_line_as_soon_as_the_step_finishes(cli, http_target):
    http_target.route("/gate", hold=True, json={"ok": True})
    apply(f"""
        name: live
        steps:
          - {{name: gated, action: http/request, params: {{url: "{http_target.url('/gate')}"}}}}
          - {{name: quick, action: core/log, params: {{message: hi}}}}
          - {{name: after, action: core/log, depends_on: [gated], params: {{message: x}}}}
    """)
    runner = cli.start("run", "live")
    lines = Lines(runner)
    execution_id = running_step("live", "gated", runner)
    lines.wait_for("  quick: completed")
    # Printed while the execution still runs: gated is held by the server.
    assert WorkflowExecution.get_by_id(execution_id).status == "running"
    assert lines.seen == ["Running live (version 1)...", "  quick: completed"]
    http_target.release("/gate")
    assert lines.finish() == 0
    assert lines.seen == ["Running live (version 1)...", "  quick: completed",
                          "  gated: completed", "  after: completed",
                          f"Execution {execution_id}: completed"]


def test_a_retried_step_is_printed_once_and_hooks_follow_the_main_steps(cli):
    apply("""
        name: hooked
        steps:
          - {name: flaky, action: core/fail, retry: {max_attempts: 2}, params: {message: no}}
          - {name: steady, action: core/log, params: {message: ok}}
        hooks:
          on_failure: [{name: alert, action: core/log, params: {message: failed}}]
          on_finish: [{name: tidy, action: core/log, params: {message: done}}]
    """)
    result = cli("run", "hooked")
    execution = WorkflowExecution.get()
    assert result.returncode == 1
    assert result.stdout == ("Running hooked (version 1)...\n"
                             "  steady: completed\n"
                             "  flaky: failed\n"
                             "  alert (hook): completed\n"
                             "  tidy (hook): completed\n"
                             f"Execution {execution.id}: failed\n")
    assert StepExecution.select().where(StepExecution.step_name == "flaky").count() == 2


def test_run_nests_sub_workflows_only_as_deep_as_the_configured_depth(cli, tmp_path):
    """SPEC 13.3: a ``workflow/run`` deeper than ``engine.max_workflow_depth`` fails its step,
    in every process that runs executions (13.7: ``mantle run`` is one). ``mantle run``
    used to ignore the setting (and ``engine.lease_ttl``) and nest to the default 10."""
    (tmp_path / "mantle.yaml").write_text("engine:\n  max_workflow_depth: 3\n")
    apply("""
        name: nest
        steps: [{name: down, action: workflow/run, params: {workflow: nest}}]
    """)
    result = cli("run", "nest")
    assert result.returncode == 1, result
    levels = list(WorkflowExecution.select().order_by(WorkflowExecution.depth))
    assert [row.depth for row in levels] == [1, 2, 3]
    assert levels[-1].error == 'step "down" failed: maximum workflow depth 3 exceeded'
