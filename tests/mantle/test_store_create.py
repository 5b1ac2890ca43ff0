"""Creating an execution with names and versions the database cannot hold (SPEC 7.2, 4.9):
the engine answers not found instead of failing the query (found by the API fuzzing)."""

from __future__ import annotations

from mantle import store
from mantle.db import transaction
from mantle.db.fields import MAX_INTEGER
from mantle.errors import VersionNotFound, WorkflowNotFound
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
