"""The last cron firing of a workflow survives its triggers (SPEC 8: one execution per
scheduled minute).

A firing claims its minute on the trigger row (``last_fired_at``), and an ``apply`` or
``rollback`` that changes the schedule gives the new row the workflow's last firing. A version
without a cron trigger deletes the rows, though, and with them that firing: a rollback (or
apply) that brought the trigger back inside the minute's 30 s fired the minute again.
``workflows.cron_fired_at`` keeps the workflow's last firing, moved by every claim.

Frozen like 001: plain SQL per engine, nothing imported from the live models.
"""

from __future__ import annotations

import peewee

__all__ = ["NAME", "up", "down"]

NAME = "011_workflow_cron_fired"


def up(database: peewee.Database) -> None:
    kind = "TIMESTAMP" if isinstance(database, peewee.PostgresqlDatabase) else "DATETIME"
    database.execute_sql(f"ALTER TABLE workflows ADD COLUMN cron_fired_at {kind}")


def down(database: peewee.Database) -> None:
    database.execute_sql("ALTER TABLE workflows DROP COLUMN cron_fired_at")
