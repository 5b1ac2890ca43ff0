"""`apply` and `rollback` running at once from several processes (SPEC 6.1): versions are
numbered max+1 without gaps or duplicates, and each apply either stores its version or
reports no changes, never a database error."""

from __future__ import annotations

import pytest

from mantle import definitions
from mantle.db.connect import is_postgres
from mantle.db.models import WorkflowDefinition
from tests.helpers.database import two_applies_at_once
from tests.helpers.waiting import apply_yaml

NEW = "name: fresh\nsteps: [{{name: a, action: core/log, params: {{message: {}}}}}]\n"


def _versions(name: str) -> list[tuple[int, str]]:
    return [(row.version, row.definition["steps"][0]["params"]["message"])
            for row in WorkflowDefinition.select().where(WorkflowDefinition.workflow_name == name)
            .order_by(WorkflowDefinition.version)]


@pytest.mark.parametrize("same", [False, True], ids=["different", "same"])
def test_two_applies_creating_one_new_workflow_at_once_store_versions_one_and_two(
        db, migrated_db_url, same):
    """SPEC 6.1: apply stores version max+1. Two applies of a workflow that does not exist
    yet, at once on PostgreSQL, both found no version: the second failed with a duplicate
    key on version 1. Now the second waits for the first and stores version 2, or reports no
    changes when its bytes are the first's."""
    if not is_postgres(db):
        pytest.skip("holds a table lock from another session (SQLite: applies take turns)")
    first, second = two_applies_at_once(migrated_db_url, NEW.format("one"),
                                        NEW.format("one" if same else "two"))
    assert first.error is None, first.error
    assert second.error is None, second.error
    if same:
        assert _versions("fresh") == [(1, "one")]
    else:
        assert _versions("fresh") == [(1, "one"), (2, "two")]
    assert definitions.current_definition("fresh").version == (1 if same else 2)


def test_an_apply_that_fails_leaves_no_trace_of_a_new_workflow(db):
    """An apply refused part-way (here: a webhook path another workflow owns) stores nothing:
    the new workflow is still unknown to plan, run and the workflow list."""
    apply_yaml("name: owner\ntriggers: [{type: webhook, path: /hooks/p}]\n"
               "steps: [{name: a, action: core/log, params: {message: x}}]\n")
    with pytest.raises(Exception, match="already registered"):
        apply_yaml("name: taker\ntriggers: [{type: webhook, path: /hooks/p}]\n"
                   "steps: [{name: a, action: core/log, params: {message: x}}]\n")
    assert definitions.current_definition("taker") is None
    assert db.execute_sql("SELECT count(*) FROM workflows WHERE name = 'taker'"
                          ).fetchone()[0] == 0
