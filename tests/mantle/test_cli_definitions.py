"""``validate``, ``plan``, ``apply``, ``rollback``, ``init``, ``migrate`` and ``version`` through the
real command line (a ``python -m mantle`` subprocess), word for word (SPEC 6.1, 6.3)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mantle import __version__
from mantle import db as mantle_db

REPO = Path(__file__).resolve().parents[2]

REPORT_V1 = """\
name: daily-report
description: Daily metrics
steps:
  - name: fetch
    action: http/request
    timeout: 10s
    params: {url: "https://example.com"}
  - name: announce
    action: core/log
    params: {message: hi}
"""
REPORT_V2 = """\
name: daily-report
steps:
  - name: fetch
    action: http/request
    timeout: 30s
    params: {url: "https://example.com"}
  - name: announce
    action: core/log
    params: {message: hi}
    retry:
      max_attempts: 3
"""


class Cli:
    """Runs ``mantle`` in ``cwd`` against one database URL."""

    def __init__(self, cwd: Path, database_url: str | None):
        self.cwd = cwd
        self.database_url = database_url

    def __call__(self, *args: str, db: bool = True) -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "mantle", *args]
        if db and self.database_url:
            argv += ["--database-url", self.database_url]
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(self.cwd)}
        return subprocess.run(argv, cwd=self.cwd, env=env, capture_output=True, text=True,
                              timeout=60)

    def write(self, name: str, text: str) -> str:
        (self.cwd / name).write_text(textwrap.dedent(text))
        return name


@pytest.fixture
def cli(tmp_path, migrated_db_url):
    return Cli(tmp_path, migrated_db_url)


@pytest.fixture
def offline_cli(tmp_path):
    return Cli(tmp_path, None)


def test_validate_prints_basename_valid(offline_cli):
    offline_cli.write("hello.yaml", "name: hello\nsteps: [{name: a, action: core/log}]\n")
    result = offline_cli("validate", "hello.yaml")
    assert (result.returncode, result.stdout, result.stderr) == (0, "hello.yaml: valid\n", "")


def test_validate_of_the_spec_example_prints_every_error_then_validation_failed(offline_cli):
    offline_cli.write("nightly.yaml", """\
        name: Nightly_Report
        steps:
          - name: fetch
            action: http/request
            timeout: 0s
          - name: fetch
            retry:
              max_attempts: 0
    """)
    result = offline_cli("validate", str(offline_cli.cwd / "nightly.yaml"))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        "nightly.yaml:1:1: error: name must match ^[a-z][a-z0-9-]*$ (name)\n"
        "nightly.yaml:5:5: error: timeout must be a positive duration (steps[0].timeout)\n"
        'nightly.yaml:6:5: error: duplicate step name "fetch" (steps[1].name)\n'
        "nightly.yaml:6:5: error: step action is required (steps[1].action)\n"
        "nightly.yaml:8:7: error: max_attempts must be greater than 0 "
        "(steps[1].retry.max_attempts)\n"
        "Error: validation failed\n")


@pytest.mark.parametrize("content, reason", [
    (None, "No such file or directory"),
    (b"x" * (1024 * 1024 + 1), "file is larger than 1048576 bytes"),
])
def test_unreadable_or_huge_files_get_a_cannot_read_error(offline_cli, content, reason):
    if content is not None:
        (offline_cli.cwd / "f.yaml").write_bytes(content)
    result = offline_cli("validate", "f.yaml")
    assert result.returncode == 1
    assert result.stderr == f'Error: cannot read "f.yaml": {reason}\n'


def test_directory_argument_is_a_clear_error(offline_cli):
    (offline_cli.cwd / "d.yaml").mkdir()
    result = offline_cli("validate", "d.yaml")
    assert result.returncode == 1
    assert result.stderr == 'Error: cannot read "d.yaml": Is a directory\n'


@pytest.mark.parametrize("content, fragment", [
    (b"name: a\nsteps: [{name: a, action: core/log}]\nbad: \xff\xfe\n", "not valid UTF-8"),
    (b"a: &a [" + b",".join([b"x"] * 10) + b"]\n" + b"".join(
        b"%s: &%s [%s]\n" % (bytes([98 + i]), bytes([98 + i]), b",".join(
            [b"*" + bytes([97 + i])] * 10)) for i in range(8)), "nodes"),
    (b"name: " + b"[" * 200 + b"]" * 200 + b"\n", "nesting deeper"),
])
def test_hostile_yaml_is_rejected_with_a_document_error(offline_cli, content, fragment):
    (offline_cli.cwd / "evil.yaml").write_bytes(content)
    result = offline_cli("validate", "evil.yaml")
    assert result.returncode == 1
    assert "error: invalid YAML: " in result.stderr
    assert fragment in result.stderr
    assert result.stderr.endswith("Error: validation failed\n")


def test_plan_of_a_new_workflow_announces_a_create(cli):
    cli.write("report.yaml", REPORT_V1)
    result = cli("plan", "report.yaml")
    assert (result.returncode, result.stdout) == (
        0, "+ daily-report (new)\n\nPlan: 1 workflow to create\n")


def test_apply_stores_version_one_then_reports_no_changes(cli):
    cli.write("report.yaml", REPORT_V1)
    first = cli("apply", "report.yaml")
    assert (first.returncode, first.stdout) == (0, "Applied daily-report version 1\n")
    again = cli("apply", "report.yaml")
    assert (again.returncode, again.stdout) == (
        0, "No changes — daily-report is already at version 1\n")
    plan = cli("plan", "report.yaml")
    assert plan.stdout == "No changes — daily-report is at version 1\n"


def test_apply_warns_but_applies_a_workflow_that_runs_itself(cli):
    """SPEC 13.3: a direct self-call only nests until the depth limit; apply says so."""
    cli.write("nest.yaml", """\
        name: nest
        steps:
          - {name: down, action: workflow/run, params: {workflow: nest}}
          - {name: other, action: workflow/run, params: {workflow: elsewhere}}
    """)
    result = cli("apply", "nest.yaml")
    assert (result.returncode, result.stdout) == (0, "Applied nest version 1\n")
    assert result.stderr == ('Warning: step "down" runs workflow "nest" itself; each level '
                             "nests one deeper until engine.max_workflow_depth (10) fails "
                             "it\n")


def test_plan_lists_changed_added_and_removed_leaves(cli):
    cli.write("report.yaml", REPORT_V1)
    cli("apply", "report.yaml")
    cli.write("report.yaml", REPORT_V2)
    result = cli("plan", "report.yaml")
    assert result.stdout == (
        "~ daily-report (version 1 → 2)\n"
        "  ~ steps[0].timeout: 10s → 30s\n"
        "  + steps[1].retry.max_attempts: 3\n"
        "  - description: Daily metrics\n"
        "\n"
        "Plan: 1 workflow to update (version 1 → 2)\n")
    assert cli("apply", "report.yaml").stdout == "Applied daily-report version 2\n"


def test_plan_notes_formatting_only_changes(cli):
    cli.write("report.yaml", REPORT_V1)
    cli("apply", "report.yaml")
    cli.write("report.yaml", "# a comment\n" + REPORT_V1)
    assert cli("plan", "report.yaml").stdout == (
        "~ daily-report (version 1 → 2)\n"
        "  (no definition changes; only formatting or comments differ)\n"
        "\n"
        "Plan: 1 workflow to update (version 1 → 2)\n")


def test_invalid_file_is_not_stored_by_apply(cli):
    cli.write("bad.yaml", "name: daily-report\nsteps: []\n")
    result = cli("apply", "bad.yaml")
    assert result.returncode == 1
    assert result.stderr == ("bad.yaml:2:1: error: at least one step is required (steps)\n"
                             "Error: validation failed\n")
    assert cli("rollback", "daily-report").stderr == 'Error: workflow "daily-report" not found\n'


def test_rollback_moves_the_current_version_pointer(cli):
    cli.write("report.yaml", REPORT_V1)
    cli("apply", "report.yaml")
    result = cli("rollback", "daily-report")
    assert (result.returncode, result.stderr) == (
        1, 'Error: workflow "daily-report" is at version 1 — nothing to roll back to\n')
    cli.write("report.yaml", REPORT_V2)
    cli("apply", "report.yaml")
    result = cli("rollback", "daily-report")
    assert (result.returncode, result.stdout) == (
        0, "Rolled back daily-report from version 2 to version 1\n")
    assert cli("rollback", "daily-report", "--to-version", "1").stderr == (
        'Error: workflow "daily-report" is already at version 1\n')
    assert cli("rollback", "daily-report", "--to-version", "9").stderr == (
        'Error: workflow "daily-report" version 9 not found\n')
    assert cli("rollback", "daily-report", "--to-version", "x").stderr == (
        'Error: invalid --to-version value "x"\n')
    assert cli("rollback", "daily-report", "--to-version", "-1").stderr == (
        'Error: invalid --to-version value "-1"\n')
    # Unicode digits passed isdigit() and then int() raised ValueError; past the version
    # column (SQLite: OverflowError) or 4300 digits (int()) likewise: tracebacks.
    huge = "1" + "0" * 5000
    for value, error in (("²", 'invalid --to-version value "²"'),
                         ("99999999999999999999",
                          'workflow "daily-report" version 99999999999999999999 not found'),
                         (huge, f'workflow "daily-report" version {huge} not found')):
        assert cli("rollback", "daily-report", "--to-version", value).stderr == (
            f"Error: {error}\n")
    forward = cli("rollback", "daily-report", "--to-version", "2")
    assert forward.stdout == "Rolled back daily-report from version 1 to version 2\n"
    # A new apply after a rollback is max+1, never a reuse of a number.
    cli.write("report.yaml", REPORT_V2 + "description: third\n")
    cli("rollback", "daily-report")
    assert cli("plan", "report.yaml").stdout.startswith("~ daily-report (version 1 → 3)\n")
    assert cli("apply", "report.yaml").stdout == "Applied daily-report version 3\n"


def test_webhook_path_owned_by_another_workflow_is_refused(cli):
    cli.write("a.yaml", """\
        name: owner
        steps: [{name: a, action: core/log}]
        triggers: [{type: webhook, path: /hooks/deploy}]
    """)
    cli.write("b.yaml", """\
        name: intruder
        steps: [{name: a, action: core/log}]
        triggers: [{type: webhook, path: /hooks/deploy}]
    """)
    assert cli("apply", "a.yaml").returncode == 0
    result = cli("apply", "b.yaml")
    assert result.returncode == 1
    assert result.stderr == ('Error: webhook path "/hooks/deploy" is already registered by '
                             'workflow "owner"\n')
    assert cli("rollback", "intruder").stderr == 'Error: workflow "intruder" not found\n'


def test_a_webhook_secret_reaches_no_log_line_even_at_debug(cli):
    """SPEC 13.8, 13.1.1: a webhook secret is never shown (``********``). At ``--log-level
    debug`` every SQL statement was logged with its parameters (peewee's DEBUG lines): the
    trigger row and the stored definition carried the secret into stderr."""
    secret = "whsec-do-not-log-4f1c"
    cli.write("hook.yaml", f"""\
        name: hooked
        steps: [{{name: a, action: core/log, params: {{message: hi}}}}]
        triggers: [{{type: webhook, path: /hooks/hooked, secret: {secret}}}]
    """)
    cli.write("hook2.yaml", f"""\
        name: hooked
        description: second
        steps: [{{name: a, action: core/log, params: {{message: hi}}}}]
        triggers: [{{type: webhook, path: /hooks/hooked, secret: {secret}}}]
    """)
    results = [cli("--log-level", "debug", "apply", "hook.yaml"),
               cli("--log-level", "debug", "apply", "hook2.yaml"),
               cli("--log-level", "debug", "rollback", "hooked"),
               cli("--log-level", "debug", "plan", "hook2.yaml")]
    assert [result.returncode for result in results] == [0, 0, 0, 0], results
    for result in results:
        assert secret not in result.stdout + result.stderr, result


def test_apply_and_rollback_write_audit_events(cli, migrated_db_url):
    from mantle import db
    from mantle.db.models import AuditEvent

    cli.write("report.yaml", REPORT_V1)
    cli("apply", "report.yaml")
    cli.write("report.yaml", REPORT_V2)
    cli("apply", "report.yaml")
    cli("rollback", "daily-report")
    database = db.connect(migrated_db_url)
    db.bind(database)
    try:
        events = [(e.actor, e.action, e.resource_type, e.resource_id, e.metadata)
                  for e in AuditEvent.select().order_by(AuditEvent.id)]
    finally:
        mantle_db.close_all(database)
    assert events == [
        ("cli", "workflow.applied", "workflow_definition", "daily-report", {"version": 1}),
        ("cli", "workflow.applied", "workflow_definition", "daily-report", {"version": 2}),
        ("cli", "workflow.rolled_back", "workflow_definition", "daily-report",
         {"from_version": 2, "to_version": 1}),
    ]


def test_commands_refuse_a_database_without_the_schema(tmp_path, db_url):
    cli = Cli(tmp_path, db_url)
    cli.write("report.yaml", REPORT_V1)
    result = cli("apply", "report.yaml")
    assert result.returncode == 1
    assert result.stderr == ("Error: database schema is not up to date — "
                             "run 'mantle init'\n")


def test_init_and_migrate_status_and_down(tmp_path, db_url):
    cli = Cli(tmp_path, db_url)
    status = cli("migrate", "status")
    assert status.stdout.splitlines()[:3] == [
        "%-31s %s" % ("Applied At", "Migration"), "=" * 60,
        "%-31s %s" % ("pending", "001_initial_schema")]
    init = cli("init")
    assert (init.returncode, init.stdout) == (0, "Running migrations...\nMigrations complete.\n")
    applied = cli("migrate", "status").stdout.splitlines()[2]
    assert applied.endswith(" 001_initial_schema")
    assert applied[:31].rstrip().endswith("+0000")
    assert cli("migrate").stdout == "Running migrations...\nMigrations complete.\n"
    down = cli("migrate", "down")
    assert down.stdout.startswith("Reverted ")


def test_unreachable_database_is_a_connect_error(offline_cli):
    offline_cli.write("report.yaml", REPORT_V1)
    result = offline_cli("apply", "report.yaml", "--database-url",
                         "sqlite:////nonexistent-dir/x.db")
    assert result.returncode == 1
    assert result.stderr.startswith("Error: failed to connect to database: ")


def test_version_needs_no_config_or_database(offline_cli):
    (offline_cli.cwd / "mantle.yaml").write_text("database: [broken\n")
    result = offline_cli("version")
    assert (result.returncode, result.stdout) == (
        0, f"mantle v{__version__} (unknown, built unknown)\n")


def test_global_options_are_accepted_before_or_after_the_command(offline_cli, tmp_path):
    offline_cli.write("hello.yaml", "name: hello\nsteps: [{name: a, action: core/log}]\n")
    before = offline_cli("--log-level", "error", "validate", "hello.yaml")
    after = offline_cli("validate", "hello.yaml", "--log-level", "error")
    assert before.stdout == after.stdout == "hello.yaml: valid\n"


def test_usage_errors_exit_one(offline_cli):
    result = offline_cli("validate")
    assert result.returncode == 1
    assert "usage:" in result.stderr
    assert result.stderr.rstrip().splitlines()[-1].startswith("Error: ")
    assert offline_cli("frobnicate").returncode == 1


def test_bad_log_level_is_reported(offline_cli):
    offline_cli.write("hello.yaml", "name: hello\nsteps: [{name: a, action: core/log}]\n")
    result = offline_cli("validate", "hello.yaml", "--log-level", "loud")
    assert result.stderr == ('Error: invalid log level "loud": must be one of debug, info, '
                             "warn, error\n")


def test_example_workflows_apply_cleanly(cli):
    for example in sorted((REPO / "examples").glob("*.yaml")):
        result = cli("apply", str(example))
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("Applied ")
