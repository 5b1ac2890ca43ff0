"""Nothing starts once an execution is cancelled (SPEC 4.6), also on a node that has not
heard of the cancel yet.

A cancel commits ``cancelled`` without changing the execution's epoch, and its owner hears
of it through a notice (PostgreSQL ``NOTIFY``, a channel on one host) or, should that be
lost, within a second. Meanwhile the owner's fenced writes were accepted, among them the
``running`` row that starts an attempt, so a step could start (and call its target) after
the cancel. The journal now marks such a write's fence ``STARTING``
(``mantle.store.ownership``), and ``mantle_journal_check`` refuses it unless the execution is
still ``running``. SQLite checks the same in Python (``refused_fences``).
"""

from __future__ import annotations

import peewee

from mantle.db.migrations.m009_journal_marks import check_function

__all__ = ["NAME", "up", "down"]

NAME = "010_starts_need_running"


def up(database: peewee.Database) -> None:
    if isinstance(database, peewee.PostgresqlDatabase):
        database.execute_sql(check_function(starting=True))


def down(database: peewee.Database) -> None:
    if isinstance(database, peewee.PostgresqlDatabase):
        database.execute_sql(check_function(starting=False))
