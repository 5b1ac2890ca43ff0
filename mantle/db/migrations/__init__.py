"""Schema migrations: ordered modules ``mNNN_<name>.py`` in this package.

Each module has ``NAME`` (e.g. ``001_initial_schema``), ``up(db)`` and ``down(db)``. Each runs in
its own transaction together with its row in ``schema_migrations``, under a lock that makes
concurrent runners (a daemon starting while ``mantle init`` runs) take turns; a runner re-checks
inside the lock, so a migration is applied exactly once. Migrations must not import the live
models: they freeze the tables they create.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib
import pkgutil
import re
import weakref
from collections.abc import Callable

import peewee

from mantle.db.connect import unwrap
from mantle.db.engine import migration_lock, transaction
from mantle.db.fields import UtcDateTimeField, utcnow
from mantle.errors import MantleError

__all__ = ["Migration", "MIGRATIONS", "HEAD", "MigrationError", "migrate", "migrate_down",
           "status", "is_at_head", "applied"]

_NAME = re.compile(r"^[0-9]{3}_[a-z0-9_]+$")
_TABLE = "schema_migrations"


class MigrationError(MantleError):
    """The migrations in the database do not fit the ones this version of mantle knows."""


@dataclasses.dataclass(frozen=True, slots=True)
class Migration:
    name: str
    up: Callable[[peewee.Database], None]
    down: Callable[[peewee.Database], None]


def _discover() -> tuple[Migration, ...]:
    found = []
    for info in pkgutil.iter_modules(__path__):
        if not re.match(r"^m[0-9]{3}_", info.name):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        if not _NAME.match(module.NAME) or info.name != f"m{module.NAME}":
            raise ImportError(f"migration module {info.name} has a bad NAME {module.NAME!r}")
        found.append(Migration(module.NAME, module.up, module.down))
    found.sort(key=lambda migration: migration.name)
    return tuple(found)


MIGRATIONS: tuple[Migration, ...] = _discover()
HEAD: str = MIGRATIONS[-1].name

_record_models: "weakref.WeakKeyDictionary[peewee.Database, type[peewee.Model]]" = (
    weakref.WeakKeyDictionary())


def _records(database: peewee.Database) -> type[peewee.Model]:
    """The ``schema_migrations`` model bound to ``database`` (one class per database, so the
    runner works on any database, bound to the proxy or not)."""
    model = _record_models.get(database)
    if model is None:
        class SchemaMigrationRecord(peewee.Model):
            name = peewee.CharField(max_length=255, primary_key=True)
            applied_at = UtcDateTimeField()

            class Meta:
                table_name = _TABLE

        SchemaMigrationRecord._meta.set_database(database)
        model = _record_models.setdefault(database, SchemaMigrationRecord)
    return model


def applied(database) -> dict[str, dt.datetime]:
    """Applied migration names with their times (UTC); empty on a blank database."""
    database = unwrap(database)
    if not database.table_exists(_TABLE):
        return {}
    records = _records(database)
    return {row.name: row.applied_at for row in records.select()}


def migrate(database) -> list[str]:
    """Apply pending migrations in order; returns the names applied (empty when at head)."""
    database = unwrap(database)
    if is_at_head(database):
        return []
    done = []
    for migration in MIGRATIONS:
        with transaction(database, patient=True):
            migration_lock(database)
            records = _records(database)
            records.create_table(safe=True)
            if records.get_or_none(records.name == migration.name) is not None:
                continue  # applied before, or by a concurrent runner while we waited
            migration.up(database)
            records.create(name=migration.name, applied_at=utcnow())
        done.append(migration.name)
    return done


def migrate_down(database) -> str | None:
    """Revert the newest applied migration; its name, or None when none is applied."""
    database = unwrap(database)
    known = {migration.name: migration for migration in MIGRATIONS}
    with transaction(database, patient=True):
        migration_lock(database)
        names = sorted(applied(database))
        if not names:
            return None
        newest = names[-1]
        if newest not in known:
            raise MigrationError(f'migration "{newest}" is unknown to this version of mantle')
        known[newest].down(database)
        records = _records(database)
        records.delete().where(records.name == newest).execute()
    return newest


def status(database) -> list[tuple[str, dt.datetime | None]]:
    """Every known migration with its applied time (None = pending), then any applied ones
    this version does not know, in name order."""
    done = applied(database)
    rows = [(migration.name, done.get(migration.name)) for migration in MIGRATIONS]
    known = {migration.name for migration in MIGRATIONS}
    rows += sorted((name, when) for name, when in done.items() if name not in known)
    return rows


def is_at_head(database) -> bool:
    """True when every migration this version knows is applied."""
    done = applied(database)
    return all(migration.name in done for migration in MIGRATIONS)
