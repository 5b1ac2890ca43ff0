"""Creating an execution with names and versions the database cannot hold (SPEC 7.2, 4.9):
the engine answers not found instead of failing the query (found by the API fuzzing); a
sub-workflow's child only while its parent runs (13.3)."""

from __future__ import annotations

import pytest

from mantle import store
from mantle.db import database_proxy, transaction
from mantle.db.connect import connect, is_postgres
from mantle.db.fields import MAX_INTEGER
from mantle.db.models import WorkflowExecution
from mantle.errors import ExecutionFinished, VersionNotFound, WorkflowNotFound
from tests.helpers import Background
from tests.helpers.database import lock_waiters
from tests.helpers.waiting import apply_yaml, wait_until

TINY = "name: tiny\nsteps: [{name: a, action: core/log, params: {message: x}}]\n"


def _create(workflow, version=None, key=None):
    with transaction():
        return store.create_execution(workflow, {}, version, None, "r:1", "api", key)


def test_a_workflow_name_with_nul_is_not_found(db):
    apply_yaml(TINY)
    for key in (None, "once"):
        created = _create("ti\x00ny", key=key)
        assert isinstance(created.error, WorkflowNotFound)
        assert str(created.error) == str(WorkflowNotFound("ti\x00ny"))


def test_a_version_beyond_the_integer_column_is_not_found(db):
    apply_yaml(TINY)
    assert isinstance(_create("tiny", MAX_INTEGER + 1).error, VersionNotFound)
    assert isinstance(_create("ghost", MAX_INTEGER + 1).error, WorkflowNotFound)
    assert _create("tiny", 1).error is None


def _create_child(parent_id: str):
    with transaction():
        return store.create_execution("tiny", {}, None, None, "r:1", "engine",
                                      f"child-of-{parent_id}",
                                      parent=store.Parent(parent_id, "call", 2))


def test_a_child_is_created_only_while_its_parent_runs(db):
    """SPEC 13.3: cancelling a parent cancels its children. A cancel committed before the
    creation of a child (from another node, or ahead of it in the owner's journal) cannot
    cascade to a child created after it, so the creation refuses."""
    apply_yaml(TINY)
    running = _create("tiny").execution["id"]
    created = _create_child(running)
    assert created.error is None
    assert created.execution["parent_execution_id"] == running

    cancelled = _create("tiny").execution["id"]
    with transaction():
        store.cancel_execution(cancelled, "api")
    refused = _create_child(cancelled)
    assert isinstance(refused.error, ExecutionFinished)
    assert str(refused.error) == f"execution {cancelled} is already cancelled"
    assert not WorkflowExecution.select().where(
        WorkflowExecution.parent_execution_id == cancelled).exists()


def test_a_key_sent_to_two_nodes_at_once_answers_the_original_at_the_reject_limit(
        db, migrated_db_url):
    """SPEC 7.2 and 13.7: an Idempotency-Key already used for the workflow answers the
    original execution, whichever node the repeat reaches. Two nodes create with the same
    key at once for a workflow at ``max_parallel_executions: 1`` with ``reject``: both wait
    for its row (the limit check's lock), the first creates the execution; the second, let
    through after it, must answer that execution, not 429 because it now holds the slot."""
    if not is_postgres(db):
        pytest.skip("holds row locks from another session (SQLite takes turns to write)")
    apply_yaml("""
        name: single
        max_parallel_executions: 1
        on_limit: reject
        steps: [{name: a, action: core/log, params: {message: x}}]
    """)
    holder, watcher = connect(migrated_db_url), connect(migrated_db_url)
    calls = []
    try:
        holder.execute_sql("BEGIN")
        holder.execute_sql("SELECT 1 FROM workflows WHERE name = 'single' FOR UPDATE")

        def create(node: str):
            try:
                with transaction():
                    return store.create_execution("single", {}, None, None, node, "webhook",
                                                  "delivery-1")
            finally:
                database_proxy.close()  # this thread's connection

        calls = [Background(lambda node=node: create(node)) for node in ("n:1", "n:2")]
        wait_until(lambda: lock_waiters(watcher) == 2)
    finally:
        holder.execute_sql("ROLLBACK")
        holder.close()
        watcher.close()
    results = [call.join(10).result for call in calls]
    assert [created.error for created in results] == [None, None]
    assert len({created.execution["id"] for created in results}) == 1
    assert sorted(created.existing for created in results) == [False, True]
    assert WorkflowExecution.select().count() == 1
