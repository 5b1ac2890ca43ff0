"""An index of the step rows still ``pending`` or ``running`` (SPEC 4.6, 13.7).

A cancel commits ``cancelled`` at once and leaves its running attempts to the execution's
owner, which records them ``cancelled`` once it has interrupted them. When the owner died
before doing so, a daemon taking over expired leases ends those steps itself
(``mantle.store.ownership.close_orphaned_steps``); it finds them through this index, which
holds only the few rows of attempts in progress, whatever the size of the table.

Frozen like 001: plain SQL, the same on both engines (both have partial indexes).
"""

from __future__ import annotations

import peewee

__all__ = ["NAME", "up", "down"]

NAME = "006_active_steps"


def up(database: peewee.Database) -> None:
    database.execute_sql("CREATE INDEX step_executions_active ON step_executions "
                         "(execution_id) WHERE status IN ('pending', 'running')")


def down(database: peewee.Database) -> None:
    database.execute_sql("DROP INDEX step_executions_active")
