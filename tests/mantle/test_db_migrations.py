"""The migration runner and migration 001 on both engines (SPEC 4.11, 6.3)."""

from __future__ import annotations

import ast
import contextlib
import datetime as dt
import inspect
import sys
import threading
import time

import peewee
import pytest

from mantle import db
from mantle.db import is_postgres, migrations
from mantle.db.engine import migration_lock
from mantle.db.fields import utcnow
from mantle.db.migrations import m001_initial_schema
from mantle.db.models import ALL_MODELS
from tests.helpers import Background
from tests.helpers.database import lock_waiters
from tests.helpers.waiting import wait_until

TABLES = {"workflows", "workflow_definitions", "workflow_triggers", "workflow_executions",
          "step_executions", "audit_events", "api_keys", "nodes", "credentials",
          "schema_migrations"}


def _tables(database) -> set[str]:
    """Every table head has: PostgreSQL's journals also keep their commit marks (009)."""
    return TABLES | {"journal_marks"} if is_postgres(database) else TABLES


def test_head_is_the_newest_migration_and_001_comes_first():
    names = [migration.name for migration in migrations.MIGRATIONS]
    assert names[0] == "001_initial_schema"
    assert names == sorted(names)
    assert migrations.HEAD == names[-1]


def test_blank_database_is_not_at_head_and_lists_every_migration_pending(blank_db):
    assert migrations.is_at_head(blank_db) is False
    assert migrations.status(blank_db) == [(m.name, None) for m in migrations.MIGRATIONS]
    assert blank_db.get_tables() == []  # looking does not create anything


def test_migrate_creates_every_table_and_records_each_migration(blank_db):
    before = utcnow().replace(microsecond=0)
    applied = migrations.migrate(blank_db)
    assert applied == [m.name for m in migrations.MIGRATIONS]
    assert set(blank_db.get_tables()) == _tables(blank_db)
    assert migrations.is_at_head(blank_db)
    recorded = migrations.applied(blank_db)
    assert set(recorded) == set(applied)
    assert all(before <= when <= utcnow() for when in recorded.values())


def test_migrating_again_is_a_no_op(blank_db):
    migrations.migrate(blank_db)
    first = migrations.status(blank_db)
    assert migrations.migrate(blank_db) == []
    assert migrations.status(blank_db) == first


def test_status_gives_names_and_applied_times(blank_db):
    migrations.migrate(blank_db)
    rows = migrations.status(blank_db)
    assert [name for name, _ in rows] == [m.name for m in migrations.MIGRATIONS]
    assert all(isinstance(when, dt.datetime) and when.tzinfo is None for _, when in rows)


def test_migrate_down_reverts_the_newest_and_migrate_restores_it(blank_db):
    migrations.migrate(blank_db)
    assert migrations.migrate_down(blank_db) == migrations.HEAD
    assert not migrations.is_at_head(blank_db)
    assert dict(migrations.status(blank_db))[migrations.HEAD] is None
    if len(migrations.MIGRATIONS) == 1:
        assert blank_db.get_tables() == ["schema_migrations"]
    assert migrations.migrate(blank_db) == [migrations.HEAD]
    assert migrations.is_at_head(blank_db)
    assert set(blank_db.get_tables()) == _tables(blank_db)


def test_migrate_down_with_nothing_applied_returns_none(blank_db):
    assert migrations.migrate_down(blank_db) is None
    migrations.migrate(blank_db)
    for _ in migrations.MIGRATIONS:
        assert migrations.migrate_down(blank_db) is not None
    assert migrations.migrate_down(blank_db) is None


def test_failed_migration_leaves_nothing_behind(blank_db):
    # A table 001 wants to create already exists: 001 fails, and its transaction takes every
    # other table and the record with it.
    blank_db.execute_sql("CREATE TABLE runners (x INTEGER)")
    try:
        migrations.migrate(blank_db)
    except peewee.DatabaseError:
        pass
    else:
        raise AssertionError("migration 001 should have failed")
    assert set(blank_db.get_tables()) <= {"runners", "schema_migrations"}
    assert migrations.applied(blank_db) == {}


def test_unknown_applied_migration_is_listed_after_the_known_ones(db):
    records = migrations._records(db)
    records.create(name="999_from_the_future", applied_at=utcnow())
    names = [name for name, _ in migrations.status(db)]
    assert names[-1] == "999_from_the_future"
    assert migrations.is_at_head(db)


def test_two_runners_migrating_at_once_apply_each_migration_once(db_url):
    start = threading.Barrier(2)

    def run():
        database = db.connect(db_url)
        try:
            start.wait(5)
            return migrations.migrate(database)
        finally:
            db.close_all(database)

    first, second = Background(run), Background(run)
    results = [job.join(30) for job in (first, second)]
    assert [job.error for job in results] == [None, None]
    names = [m.name for m in migrations.MIGRATIONS]
    assert sorted(first.result + second.result) == sorted(names)
    check = db.connect(db_url)
    try:
        assert migrations.is_at_head(check)
    finally:
        check.close()


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_a_migration_waits_for_another_runner_longer_than_the_statement_timeout(
        db_url, monkeypatch):
    """SPEC 13.7 bounds the engine's statements with ``statement_timeout`` (30 s); a
    migration run is not one: it waits its turn behind another runner (a daemon starting
    while ``mantle migrate`` builds an index on a large table) and then takes as long as
    its own statements take. It used to be cancelled at the timeout, so ``mantle serve``
    or ``mantle migrate`` failed. Here the timeout is 200 ms and the other runner holds
    the migration lock three times as long."""
    monkeypatch.setattr(sys.modules["mantle.db.connect"], "PG_STATEMENT_TIMEOUT_MS", 200)
    holder, runner, observer = db.connect(db_url), db.connect(db_url), db.connect(db_url)
    @contextlib.contextmanager
    def migration_locked():
        with holder.atomic():
            migration_lock(holder)
            yield

    try:
        _waits_behind(migration_locked, runner, lambda: lock_waiters(observer) == 1)
    finally:
        for database in (holder, runner, observer):
            db.close_all(database)


def _waits_behind(hold, runner, waiting=lambda: True) -> None:
    """While ``hold()`` (another runner's turn) is held, ``runner``'s migration is still
    waiting 0.6 s after ``waiting()`` (three times the limit each test sets); once it is let
    go, every migration is applied."""
    with hold():
        job = Background(lambda: migrations.migrate(runner))
        wait_until(lambda: waiting() or not job.running)
        deadline = time.monotonic() + 0.6
        wait_until(lambda: not job.running or time.monotonic() > deadline)
        assert job.running, job.error
    assert job.join(30).error is None
    assert job.result == [m.name for m in migrations.MIGRATIONS]


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_a_migration_waits_for_another_runners_writer_turn_beyond_the_busy_timeout(
        db_url, monkeypatch):
    """On SQLite a migration run's turn is the writer turn (``<file>-writer``), which other
    writers wait for at most the busy timeout (then: a locked database, an outage). A
    migration waits as long as another runner's takes, as on PostgreSQL: ``mantle serve``
    starting while ``mantle migrate`` builds an index must not fail. Here the writers' wait
    is 200 ms and the other runner holds its turn three times as long."""
    monkeypatch.setattr(db.engine._WriterTurn, "wait_s", 0.2)
    holder, runner = db.connect(db_url), db.connect(db_url)
    try:
        _waits_behind(lambda: db.transaction(holder), runner)
    finally:
        for database in (holder, runner):
            db.close_all(database)


def _model_indexes(model) -> set[tuple[tuple[str, ...], bool]]:
    found = set()
    for index in model._meta.fields_to_index():
        columns = tuple(field.column_name for field in index._expressions)
        found.add((columns, index._unique))
    return found


def test_live_models_match_the_migrated_schema(db):
    """A field added to a model without a migration (or the reverse) fails here."""
    for model in ALL_MODELS:
        table = model._meta.table_name
        columns = {column.name for column in db.get_columns(table)}
        assert columns == set(model._meta.columns), table
        indexes = {(tuple(index.columns), index.unique) for index in db.get_indexes(table)}
        assert _model_indexes(model) <= indexes, table


def test_migration_001_is_frozen_and_does_not_import_the_live_models():
    tree = ast.parse(inspect.getsource(m001_initial_schema))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module)
    assert imported <= {"__future__", "peewee"}


def test_migration_002_makes_existing_keys_admin_and_down_restores_001(blank_db):
    """Keys created before 002 become ``admin`` (SPEC 13.8); 002 reverts to 001's tables."""
    first, second = migrations.MIGRATIONS[0], migrations.MIGRATIONS[1]
    with db.transaction(blank_db):
        first.up(blank_db)
    blank_db.execute_sql(
        "INSERT INTO api_keys (name, prefix, key_hash, created_at) VALUES "
        f"('old', 'mk_abc', 'h', {blank_db.param})", (utcnow(),))
    with db.transaction(blank_db):
        second.up(blank_db)
    role, expires = blank_db.execute_sql("SELECT role, expires_at FROM api_keys").fetchone()
    assert (role, expires) == ("admin", None)
    assert {"nodes", "credentials"} <= set(blank_db.get_tables())
    assert "runners" not in blank_db.get_tables()
    with db.transaction(blank_db):
        second.down(blank_db)
    assert "runners" in blank_db.get_tables()
    assert not {"nodes", "credentials"} & set(blank_db.get_tables())
    columns = {column.name for column in blank_db.get_columns("workflow_executions")}
    assert "runner" in columns and "owner" not in columns
