"""Retention (SPEC 13.4) on SQLite and PostgreSQL: rows backdated with SQL, then ``mantle
cleanup`` through the real command line deletes exactly the expired ones (``--dry-run``
nothing), never pending/running executions, a parent whose child still runs or a child whose
parent still runs (and may yet read its result); batches stay within 1,000 rows; dead nodes
are pruned."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest

from mantle import retention
from mantle.config import load_config
from mantle.db import write_transaction
from mantle.db.fields import utcnow
from mantle.db.models import AuditEvent, Node, StepExecution, WorkflowExecution
from mantle.errors import ConfigError, InvalidInput
from tests.web.support import cli

NOW = utcnow()


def days_ago(days: float) -> dt.datetime:
    return NOW - dt.timedelta(days=days)


def execution(status: str, completed_days_ago: float | None, steps: int = 2,
              parent: str | None = None, key: str | None = None, owner: str | None = None) -> str:
    """An execution row (and ``steps`` step rows) written straight into the database."""
    ident = str(uuid.uuid4())
    started = days_ago((completed_days_ago or 0) + 0.01)
    WorkflowExecution.insert(
        id=ident, workflow_name="etl", version=1, status=status, inputs={}, trigger={},
        started_at=started, idempotency_key=key, owner=owner, parent_execution_id=parent,
        completed_at=None if completed_days_ago is None else days_ago(completed_days_ago),
    ).execute()
    for index in range(steps):
        StepExecution.insert(execution=ident, step_name=f"s{index}", attempt=1,
                             status="completed", started_at=started).execute()
    return ident


def audit_event(days: float) -> int:
    return AuditEvent.insert(timestamp=days_ago(days), actor="cli", action="workflow.applied",
                             resource_type="workflow_definition", resource_id="etl",
                             metadata={}).execute()


def remaining() -> set[str]:
    return {row.id for row in WorkflowExecution.select(WorkflowExecution.id)}


@pytest.fixture
def history(db):
    """A mix of executions and audit events of every age and status."""
    with write_transaction():
        made = {
            "old_completed": execution("completed", 40, key="key-1"),
            "old_failed": execution("failed", 31),
            "old_cancelled": execution("cancelled", 100, steps=0),
            "recent_completed": execution("completed", 29),
            "old_running": execution("running", None),
            "old_pending": execution("pending", None, steps=0),
        }
        made["busy_parent"] = execution("completed", 60)
        made["running_child"] = execution("running", None, parent=made["busy_parent"])
        made["done_parent"] = execution("completed", 60)
        made["done_child"] = execution("completed", 50, parent=made["done_parent"])
        made["waiting_parent"] = execution("running", None)
        made["awaited_child"] = execution("completed", 50, parent=made["waiting_parent"])
        old_audit = [audit_event(days) for days in (91, 200, 365)]
        new_audit = [audit_event(days) for days in (89, 1)]
    return made, old_audit, new_audit


def test_cleanup_deletes_exactly_the_expired_executions_and_audit_events(
        history, tmp_path, migrated_db_url):
    made, old_audit, new_audit = history
    result = cli(tmp_path, migrated_db_url, "cleanup", "--execution-days", "30",
                 "--audit-days", "90")
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == ("Deleted 5 workflow execution(s) older than 30 day(s).\n"
                             "Deleted 3 audit event(s) older than 90 day(s).\n")
    gone = {"old_completed", "old_failed", "old_cancelled", "done_parent", "done_child"}
    assert remaining() == {made[name] for name in made if name not in gone}
    # Steps go with their execution; the kept ones keep theirs.
    step_owners = {row.execution_id for row in StepExecution.select()}
    assert step_owners == {made[n] for n in ("recent_completed", "old_running", "busy_parent",
                                             "running_child", "waiting_parent",
                                             "awaited_child")}
    # The idempotency key went with its execution.
    assert not WorkflowExecution.select().where(
        WorkflowExecution.idempotency_key == "key-1").exists()
    assert {row.id for row in AuditEvent.select()} == set(new_audit)
    again = cli(tmp_path, migrated_db_url, "cleanup", "--execution-days", "30",
                "--audit-days", "90")
    assert again.stdout == ("Deleted 0 workflow execution(s) older than 30 day(s).\n"
                            "Deleted 0 audit event(s) older than 90 day(s).\n")


def test_dry_run_counts_the_same_rows_and_deletes_nothing(history, tmp_path, migrated_db_url):
    made, _, _ = history
    executions, steps, audit = (WorkflowExecution.select().count(),
                                StepExecution.select().count(), AuditEvent.select().count())
    result = cli(tmp_path, migrated_db_url, "cleanup", "--execution-days", "30",
                 "--audit-days", "90", "--dry-run")
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == ("Would delete 5 workflow execution(s) older than 30 day(s).\n"
                             "Would delete 3 audit event(s) older than 90 day(s).\n")
    assert (WorkflowExecution.select().count(), StepExecution.select().count(),
            AuditEvent.select().count()) == (executions, steps, audit)


def test_only_the_configured_kinds_are_cleaned_and_printed(history, tmp_path, migrated_db_url):
    made, _, _ = history
    audit_only = cli(tmp_path, migrated_db_url, "cleanup",
                     env={"MANTLE_RETENTION_AUDIT_DAYS": "90"})
    assert (audit_only.returncode, audit_only.stdout) == \
        (0, "Deleted 3 audit event(s) older than 90 day(s).\n")
    assert len(remaining()) == len(made)
    (tmp_path / "mantle.yaml").write_text("retention:\n  execution_days: 45\n")
    from_file = cli(tmp_path, migrated_db_url, "cleanup")
    assert from_file.stdout == "Deleted 3 workflow execution(s) older than 45 day(s).\n"
    flag_wins = cli(tmp_path, migrated_db_url, "cleanup", "--execution-days", "30",
                    "--dry-run")
    assert flag_wins.stdout == "Would delete 2 workflow execution(s) older than 30 day(s).\n"


def test_cleanup_without_a_retention_says_so_and_deletes_nothing(history, tmp_path,
                                                                  migrated_db_url):
    made, _, _ = history
    result = cli(tmp_path, migrated_db_url, "cleanup")
    assert (result.returncode, result.stdout, result.stderr) == \
        (0, "Nothing to clean up: no retention configured.\n", "")
    assert len(remaining()) == len(made)


def test_bad_retention_values_are_refused(db, tmp_path, migrated_db_url):
    for args, message in (
            (["--execution-days", "0"],
             'invalid --execution-days value "0": must be a positive whole number of days'),
            (["--audit-days", "-3"],
             'invalid --audit-days value "-3": must be a positive whole number of days'),
            (["--execution-days", "1.5"],
             'invalid --execution-days value "1.5": must be a positive whole number of days')):
        result = cli(tmp_path, migrated_db_url, "cleanup", *args)
        assert (result.returncode, result.stdout, result.stderr) == \
            (1, "", f"Error: {message}\n"), args
    with pytest.raises(ConfigError, match='invalid retention.execution_days value "soon"'):
        retention.retention_from(load_config({}, {"MANTLE_RETENTION_EXECUTION_DAYS": "soon"},
                                             cwd=tmp_path))
    # Longer than a thread can wait: the sweep thread died after its first sweep.
    for interval in ("often", "99999999999d", "1" + "0" * 400 + "d"):
        with pytest.raises(ConfigError, match=f'invalid retention.interval value "{interval}"'):
            retention.retention_from(load_config({}, {"MANTLE_RETENTION_INTERVAL": interval},
                                                 cwd=tmp_path))
    with pytest.raises(InvalidInput):
        retention.retention_from(load_config({}, {}, cwd=tmp_path), execution_days="x")


def test_retention_settings_come_from_file_environment_and_defaults(tmp_path):
    (tmp_path / "mantle.yaml").write_text(
        "retention:\n  execution_days: 30\n  audit_days: 365\n  interval: 6h\n")
    kept = retention.retention_from(load_config({}, {}, cwd=tmp_path))
    assert kept == retention.Retention(30, 365, 6 * 3600.0)
    env = {"MANTLE_RETENTION_EXECUTION_DAYS": "7", "MANTLE_RETENTION_INTERVAL": "1d"}
    assert retention.retention_from(load_config({}, env, cwd=tmp_path)) == \
        retention.Retention(7, 365, 86400.0)
    default = retention.retention_from(load_config({}, {}, cwd=tmp_path / "nowhere"))
    assert default == retention.Retention(None, None, 86400.0) and not default.configured


def test_each_transaction_deletes_at_most_the_batch_counting_step_rows(db):
    with write_transaction():
        ids = [execution("completed", 40, steps=3) for _ in range(25)]
        big = execution("completed", 41, steps=12)  # alone, it exceeds a batch
        for days in range(23):
            audit_event(100 + days)
        audit_event(1)  # the newest is recent (on SQLite the newest is never deleted)
    batches = []
    result = retention.sweep(retention.Retention(30, 90), batch=10,
                             on_batch=lambda kind, n: batches.append((kind, n)) or True)
    assert (result.executions, result.audit) == (26, 23)
    assert batches[0] == ("execution", 1)  # the oldest: 13 rows, alone in its batch
    assert [n for kind, n in batches[1:] if kind == "execution"] == [2] * 12 + [1]
    assert [n for kind, n in batches if kind == "audit"] == [10, 10, 3]
    assert not remaining() and StepExecution.select().count() == 0
    assert big not in remaining() and ids


def test_a_stop_request_ends_the_sweep_after_the_batch_in_progress(db):
    with write_transaction():
        for _ in range(5):
            execution("completed", 40, steps=0)
    result = retention.sweep(retention.Retention(30, None), batch=2,
                             on_batch=lambda kind, n: False)
    assert result.executions == 2 and len(remaining()) == 3


def test_nodes_of_dead_processes_are_pruned_after_an_hour(db, tmp_path, migrated_db_url):
    def node(expired_minutes_ago: float) -> str:
        ident = str(uuid.uuid4())
        Node.insert(id=ident, hostname="h", pid=1, kind="run", host_key="k",
                    started_at=days_ago(1),
                    lease_expires_at=NOW - dt.timedelta(minutes=expired_minutes_ago)).execute()
        return ident
    dead, recent, alive, owner = node(90), node(30), node(-1), node(120)
    execution("running", None, owner=owner)
    execution("completed", 1, owner=dead)
    result = cli(tmp_path, migrated_db_url, "cleanup")  # even with no retention configured
    assert result.returncode == 0
    assert {row.id for row in Node.select()} == {recent, alive, owner}
    assert retention.prune_nodes() == 0


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_journal_marks_of_journals_gone_a_week_are_pruned_with_dead_nodes(db):
    """The journal's commit marks (migration 009; one row per process that ever wrote) do
    not pile up: a mark last written more than a week ago goes, a newer one stays (a live
    journal writes its mark with every transaction; one cut off from the database for days
    may still need its mark to learn whether its last commit happened)."""
    db.execute_sql(
        "INSERT INTO journal_marks (journal, seq, written_at) VALUES "
        "('gone', 3, (now() AT TIME ZONE 'UTC') - interval '7 days 1 minute'), "
        "('live', 5, (now() AT TIME ZONE 'UTC') - interval '6 days 23 hours')")
    retention.prune_nodes()
    assert db.execute_sql("SELECT journal, seq FROM journal_marks").fetchall() == [("live", 5)]
