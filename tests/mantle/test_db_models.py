"""Models, column types, constraints, audit records and the engine helpers, on both engines."""

from __future__ import annotations

import datetime as dt
import random
import threading
import uuid

import peewee
import pytest

from mantle.db import (claim_rows, database_proxy, is_sqlite, lock_for_update, transaction,
                       upsert, write_transaction)
from mantle.db import audit
from mantle.db.fields import utcnow
from mantle.db.models import (ApiKey, AuditEvent, Node, StepExecution, Workflow,
                              WorkflowDefinition, WorkflowExecution, WorkflowTrigger)
from tests.helpers import Background

T0 = dt.datetime(2026, 3, 18, 9, 0, 0)


def _execution(workflow="wf", started_at=None, **extra) -> WorkflowExecution:
    values = {"workflow_name": workflow, "version": 1, "status": "pending",
              "inputs": {}, "trigger": {"type": "manual", "payload": None},
              "started_at": started_at or utcnow()}
    values.update(extra)
    return WorkflowExecution.create(**values)


def _raw(db, sql: str):
    return db.execute_sql(sql).fetchone()[0]


def test_json_columns_round_trip_and_are_stored_compact(db):
    inputs = {"name": "Zoë", "n": 3, "ratio": 0.25, "flags": [True, False, None],
              "nested": {"a": {"b": []}}}
    row = _execution(inputs=inputs, trigger={"type": "webhook", "payload": "text"})
    fetched = WorkflowExecution.get_by_id(row.id)
    assert fetched.inputs == inputs
    assert fetched.trigger == {"type": "webhook", "payload": "text"}
    assert _raw(db, "SELECT inputs FROM workflow_executions") == (
        '{"name":"Zoë","n":3,"ratio":0.25,"flags":[true,false,null],"nested":{"a":{"b":[]}}}')


def test_null_json_output_is_sql_null_and_scalars_round_trip(db):
    execution = _execution()
    for attempt, output in enumerate([None, "plain", 7, [1, "two"]], start=1):
        StepExecution.create(execution=execution, step_name="s", attempt=attempt,
                             status="completed", output=output)
    rows = StepExecution.select().order_by(StepExecution.attempt)
    assert [row.output for row in rows] == [None, "plain", 7, [1, "two"]]
    assert _raw(db, "SELECT COUNT(*) FROM step_executions WHERE output IS NULL") == 1


def test_timestamps_round_trip_with_microseconds_as_naive_utc(db):
    exact = dt.datetime(2026, 3, 18, 9, 0, 1, 123456)
    row = _execution(started_at=exact)
    assert WorkflowExecution.get_by_id(row.id).started_at == exact
    aware = dt.datetime(2026, 3, 18, 11, 0, 1, 5, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    other = _execution(started_at=aware)
    stored = WorkflowExecution.get_by_id(other.id).started_at
    assert stored == dt.datetime(2026, 3, 18, 9, 0, 1, 5) and stored.tzinfo is None


def test_utcnow_is_naive_and_close_to_the_real_utc_time():
    now = utcnow()
    assert now.tzinfo is None
    real = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    assert abs((real - now).total_seconds()) < 5


def test_timestamps_are_stored_as_fixed_width_text_on_sqlite_and_timestamp_on_postgres(db):
    _execution(started_at=T0)
    stored = _raw(db, "SELECT started_at FROM workflow_executions")
    assert stored == ("2026-03-18 09:00:00.000000" if is_sqlite(db) else T0)


def test_timestamps_order_and_compare_with_and_without_microseconds(db):
    times = [T0 - dt.timedelta(microseconds=1), T0, T0 + dt.timedelta(microseconds=1),
             T0 + dt.timedelta(microseconds=500000), T0 + dt.timedelta(seconds=1),
             T0 + dt.timedelta(seconds=10)]
    shuffled = times[:]
    random.Random(7).shuffle(shuffled)
    for when in shuffled:
        _execution(started_at=when)
    ordered = [row.started_at for row in
               WorkflowExecution.select().order_by(WorkflowExecution.started_at)]
    assert ordered == times
    newest_first = [row.started_at for row in WorkflowExecution.select()
                    .order_by(WorkflowExecution.started_at.desc(), WorkflowExecution.id.desc())]
    assert newest_first == times[::-1]
    since = WorkflowExecution.select().where(WorkflowExecution.started_at >= T0).count()
    assert since == 5  # T0 itself included, although stored and compared without fraction
    exact = WorkflowExecution.select().where(WorkflowExecution.started_at == T0).count()
    assert exact == 1


def test_step_rows_are_found_by_execution_id(db):
    execution = _execution()
    StepExecution.insert(execution_id=execution.id, step_name="fetch", attempt=1,
                         status="running", is_hook=False).execute()
    row = StepExecution.get(StepExecution.execution_id == execution.id)
    assert (row.execution_id, row.step_name, row.is_hook) == (execution.id, "fetch", False)
    assert [step.step_name for step in execution.steps] == ["fetch"]


def _violates(create) -> bool:
    try:
        with write_transaction():
            create()
    except peewee.IntegrityError:
        return True
    return False


def test_webhook_path_belongs_to_one_workflow(db):
    def trigger(workflow, path):
        return lambda: WorkflowTrigger.create(workflow_name=workflow, version=1, type="webhook",
                                              path=path, created_at=utcnow())

    assert not _violates(trigger("a", "/hooks/deploy"))
    assert _violates(trigger("b", "/hooks/deploy"))
    for workflow in ("a", "b"):  # cron triggers have no path; NULLs never collide
        WorkflowTrigger.create(workflow_name=workflow, version=1, type="cron",
                               schedule="* * * * *", created_at=utcnow())
    assert WorkflowTrigger.select().count() == 3


def test_a_workflow_version_is_stored_once(db):
    def version(workflow, number):
        return lambda: WorkflowDefinition.create(
            workflow_name=workflow, version=number, raw_yaml="name: x\n",
            definition={"name": workflow}, content_hash="0" * 64, created_at=utcnow())

    assert not _violates(version("a", 1))
    assert _violates(version("a", 1))
    assert not _violates(version("a", 2))
    assert not _violates(version("b", 1))


def test_idempotency_key_is_unique_per_workflow_only(db):
    assert not _violates(lambda: _execution("a", idempotency_key="k1"))
    assert _violates(lambda: _execution("a", idempotency_key="k1"))
    assert not _violates(lambda: _execution("b", idempotency_key="k1"))
    assert not _violates(lambda: _execution("a"))
    assert not _violates(lambda: _execution("a"))  # no key: any number of executions


def test_one_row_per_step_attempt_and_hook_flag(db):
    execution = _execution()

    def attempt(number, is_hook=False, name="s"):
        return lambda: StepExecution.create(execution=execution, step_name=name,
                                            attempt=number, status="running", is_hook=is_hook)

    assert not _violates(attempt(1))
    assert _violates(attempt(1))
    assert not _violates(attempt(2))
    assert not _violates(attempt(1, is_hook=True))


def test_step_rows_need_an_existing_execution(db):
    assert _violates(lambda: StepExecution.insert(
        execution_id=str(uuid.uuid4()), step_name="s", attempt=1, status="running").execute())


def test_api_key_names_and_hashes_are_unique(db):
    def key(name, digest):
        return lambda: ApiKey.create(name=name, prefix="mk_abcdef", key_hash=digest,
                                     created_at=utcnow())

    assert not _violates(key("ci", "a" * 64))
    assert _violates(key("ci", "b" * 64))
    assert _violates(key("other", "a" * 64))


def test_execution_ids_default_to_lowercase_uuid4(db):
    row = _execution()
    assert str(uuid.UUID(row.id)) == row.id and uuid.UUID(row.id).version == 4


def test_audit_event_commits_and_rolls_back_with_the_outer_transaction(db):
    with write_transaction():
        audit.record_audit("cli", "workflow.applied", "workflow_definition", "daily",
                           {"version": 2})
    with pytest.raises(RuntimeError):
        with write_transaction():
            audit.record_audit("cli", "workflow.applied", "workflow_definition", "daily",
                               {"version": 3})
            raise RuntimeError("the change failed")
    audit.record_audit("engine", "step.started", "step_execution", "fetch", None)
    events = list(AuditEvent.select().order_by(AuditEvent.id))
    assert [(e.actor, e.action, e.resource_type, e.resource_id, e.metadata) for e in events] == [
        ("cli", "workflow.applied", "workflow_definition", "daily", {"version": 2}),
        ("engine", "step.started", "step_execution", "fetch", {}),
    ]
    assert events[0].timestamp <= events[1].timestamp <= utcnow()


def _node(node_id: str, pid: int) -> Node:
    return Node.create(id=node_id, hostname="h", pid=pid, kind="run", host_key="k",
                       started_at=T0, lease_expires_at=T0)


def test_nested_transaction_failure_rolls_back_only_the_inner_part(db):
    with transaction(database_proxy):
        _node("h:1", 1)
        with pytest.raises(peewee.IntegrityError):
            with transaction():
                _node("h:2", 2)
                _node("h:1", 1)
    assert [r.id for r in Node.select()] == ["h:1"]


def test_upsert_inserts_then_updates_the_chosen_columns(db):
    def beat(pid, at):
        upsert(Node, {"id": "host:9", "hostname": "host", "pid": pid, "kind": "run",
                      "host_key": "k", "started_at": at, "lease_expires_at": at},
               conflict=[Node.id], update=[Node.lease_expires_at])

    beat(9, T0)
    beat(10, T0 + dt.timedelta(seconds=5))
    row = Node.get_by_id("host:9")
    assert (row.pid, row.started_at, row.lease_expires_at) == (
        9, T0, T0 + dt.timedelta(seconds=5))
    upsert(Node, {"id": "host:9", "hostname": "x", "pid": 1, "kind": "run", "host_key": "k",
                  "started_at": T0, "lease_expires_at": T0}, conflict=[Node.id], update=[])
    assert Node.get_by_id("host:9").hostname == "host"


def test_lock_for_update_serialises_read_modify_write(db):
    """Two increments under the lock never lose one, on either engine."""
    Workflow.create(name="wf", current_version=1, created_at=T0, updated_at=T0)
    first_locked, second_done = threading.Event(), threading.Event()

    def increment(hold: bool):
        with write_transaction():
            row = lock_for_update(Workflow, Workflow.name == "wf")[0]
            if hold:
                first_locked.set()
                second_done.wait(0.4)  # the second must be kept waiting meanwhile
            Workflow.update(current_version=row.current_version + 1).where(
                Workflow.name == "wf").execute()
        if not hold:
            second_done.set()
        database_proxy.close()

    first = Background(lambda: increment(True))
    assert first_locked.wait(5)
    second = Background(lambda: increment(False))
    for job in (first.join(15), second.join(15)):
        assert job.error is None, job.error
    assert Workflow.get_by_id("wf").current_version == 3


def test_concurrent_claims_get_different_rows(db):
    """PostgreSQL skips the row the first claimer holds; SQLite makes the second wait."""
    ids = [_execution(started_at=T0 + dt.timedelta(seconds=i)).id for i in range(3)]
    first_claimed, second_done = threading.Event(), threading.Event()

    def claim(name: str, hold: bool) -> list[str]:
        with write_transaction():
            query = (WorkflowExecution.select()
                     .where(WorkflowExecution.owner.is_null())
                     .order_by(WorkflowExecution.started_at))
            rows = claim_rows(query, limit=1)
            for row in rows:
                WorkflowExecution.update(owner=name).where(
                    WorkflowExecution.id == row.id).execute()
            if hold:
                first_claimed.set()
                second_done.wait(0.4)  # still uncommitted while the second claims
        if not hold:
            second_done.set()
        database_proxy.close()
        return [row.id for row in rows]

    first = Background(lambda: claim("a", True))
    assert first_claimed.wait(5)
    second = Background(lambda: claim("b", False))
    assert first.join(15).error is None and second.join(15).error is None
    assert first.result == [ids[0]]
    assert second.result == [ids[1]]
    owners = {row.id: row.owner for row in WorkflowExecution.select()}
    assert owners == {ids[0]: "a", ids[1]: "b", ids[2]: None}
