"""Creating an execution with names and versions the database cannot hold (SPEC 7.2, 4.9):
the engine answers not found instead of failing the query (found by the API fuzzing); a
sub-workflow's child only while its parent runs (13.3)."""

from __future__ import annotations

from mantle import store
from mantle.db import transaction
from mantle.db.fields import MAX_INTEGER
from mantle.db.models import WorkflowExecution
from mantle.errors import ExecutionFinished, VersionNotFound, WorkflowNotFound
from tests.helpers.waiting import apply_yaml

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
