"""The outcome an execution's hooks run for (SPEC 4.8, 13.1.8).

When the hook phase begins, the execution's outcome (``completed``, or ``failed`` with its
error and the first failed step) is fixed: the hooks run for it and the final status is
written from it. It is stored in ``outcome`` (JSON text) with ``hooks_since``, so a node that
resumes the execution in its hooks runs the blocks of the same outcome and ends it with the
same status and error, instead of inferring them again from the step rows (which cannot
tell, for instance, a workflow timeout that only cancelled steps waiting for a slot).

Frozen like 001: plain SQL, the same on both engines.
"""

from __future__ import annotations

import peewee

__all__ = ["NAME", "up", "down"]

NAME = "007_execution_outcome"


def up(database: peewee.Database) -> None:
    database.execute_sql("ALTER TABLE workflow_executions ADD COLUMN outcome TEXT")


def down(database: peewee.Database) -> None:
    database.execute_sql("ALTER TABLE workflow_executions DROP COLUMN outcome")
