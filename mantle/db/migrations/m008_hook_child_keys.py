"""Hook children keep their parent after the upgrade to keys with a hook block (SPEC 13.3).

A ``workflow/run`` child's idempotency key names the parent step attempt that created it;
hooks' keys now also name their block (``mantle-child:<parent>:<digest>:<block>:<attempt>``),
so a hook named like a main step has a child of its own. A hook running at the upgrade
created its child under the key hooks had before (``...:<digest>:<attempt>``): that child,
still pending or running, gets the new key, so the upgraded node resuming the hook awaits
it instead of creating a second one, and the hook's end cancels it if it must.

Plain SQL, the same on both engines. Children of AI steps' ``workflow/run`` tools in flight
at the upgrade are not re-keyed (their new key comes from the conversation): such a tool
call creates its child again (docs/systemd.md).
"""

from __future__ import annotations

import peewee

__all__ = ["NAME", "up", "down"]

NAME = "008_hook_child_keys"


def up(database: peewee.Database) -> None:
    p = database.param
    rows = database.execute_sql(
        "SELECT c.id, c.idempotency_key, s.hook_block, s.attempt FROM workflow_executions c "
        "JOIN step_executions s ON s.execution_id = c.parent_execution_id "
        f"AND s.step_name = c.parent_step AND s.is_hook = {p} AND s.status = 'running' "
        f"WHERE c.status IN ('pending', 'running') AND c.idempotency_key LIKE {p}",
        (True, "mantle-child:%")).fetchall()
    for child_id, key, block, attempt in rows:
        parts = key.split(":")  # mantle-child, parent, digest, attempt: the old form
        if len(parts) != 4 or not block or parts[3] != str(attempt):
            continue
        database.execute_sql(
            f"UPDATE workflow_executions SET idempotency_key = {p} WHERE id = {p}",
            (":".join(parts[:3] + [block, parts[3]]), child_id))


def down(database: peewee.Database) -> None:
    """Nothing to undo: the new keys are where the children are; an older release
    resuming such a hook would create its child again, as it would have anyway."""
