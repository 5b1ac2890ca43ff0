"""Stored workflow versions, read and parsed once: the process's one parsed-workflow cache.

Versions are immutable once stored, so (workflow, version) -> (definition, model) can be kept
for the life of the process. The cache is per database (tests, and a CLI next to a daemon,
may hold different workflows under the same name and version). Any thread may call these.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterable
from typing import Any

from mantle.db import database_proxy, unwrap
from mantle.db.fields import MAX_INTEGER, storable
from mantle.db.models import Workflow, WorkflowDefinition
from mantle.errors import MantleError, VersionNotFound, WorkflowNotFound
from mantle.store.statements import Statements
from mantle.workflow import Workflow as WorkflowModel
from mantle.workflow import workflow_from_definition

__all__ = ["stored_version", "version_of", "model_of", "current_versions_query",
           "note_current_versions", "known_current_versions", "forget_current_versions"]

_SIZE = 512
_lock = threading.Lock()
_caches: dict[int, tuple[object, collections.OrderedDict]] = {}
# Current versions last read, per database: a guess, checked when used (known_current_versions).
_currents: dict[int, tuple[object, dict[str, int]]] = {}


def _held(caches: dict, make) -> Any:
    database = unwrap(database_proxy)
    with _lock:
        held = caches.get(id(database))
        if held is None or held[0] is not database:
            held = caches[id(database)] = (database, make())
        return held[1]


def _cache() -> collections.OrderedDict:
    return _held(_caches, collections.OrderedDict)


def known_current_versions(workflows: Iterable[str]) -> dict[str, int] | None:
    """The current versions of ``workflows`` as this process last read them, or None when
    one of them was never read (or had none). Only a guess: a version changes on ``apply``,
    in any process, so whoever acts on it checks it in the same transaction (the journal,
    ``mantle_journal_check``) and calls ``forget_current_versions`` when it no longer holds."""
    known = _held(_currents, dict)
    try:
        return {name: known[name] for name in workflows}
    except KeyError:
        return None


def forget_current_versions() -> None:
    _held(_currents, dict).clear()


def _remember(rows: Iterable[tuple[str, int | None]]) -> None:
    known = _held(_currents, dict)
    for name, version in rows:
        if version is None:
            known.pop(name, None)
        elif len(known) < _SIZE or name in known:
            known[name] = version


def stored_version(workflow: str, version: int) -> tuple[dict, WorkflowModel] | None:
    """(definition, model) of a stored version, or None when it does not exist."""
    cache = _cache()
    key = (workflow, version)
    with _lock:
        found = cache.get(key)
    if found is not None:
        return found
    if not storable(workflow) or version > MAX_INTEGER:
        return None
    row = (WorkflowDefinition.select(WorkflowDefinition.definition)
           .where(WorkflowDefinition.workflow_name == workflow,
                  WorkflowDefinition.version == version).first())
    if row is None:
        return None
    found = (row.definition, workflow_from_definition(row.definition))
    with _lock:
        cache[key] = found
        if len(cache) > _SIZE:
            cache.popitem(last=False)
    return found


def model_of(workflow: str, version: int) -> WorkflowModel:
    """The parsed model of a stored version (KeyError-free: raises VersionNotFound)."""
    found = stored_version(workflow, version)
    if found is None:
        raise VersionNotFound(workflow, version)
    return found[1]


def _current_version(workflow: str) -> int | None:
    sql = Statements.of_bound()
    batch = sql.batch
    if batch is not None and workflow in batch.versions:
        return batch.versions[workflow]
    row = sql.db.execute_sql(sql.current_version, (workflow,)).fetchone()
    version = row[0] if row else None
    if batch is not None:
        batch.versions[workflow] = version
    _remember([(workflow, version)])
    return version


def current_versions_query(workflows: Iterable[str]) -> tuple[str, tuple] | None:
    """The statement reading the current versions of those of ``workflows`` this batch has
    not read yet (to be sent with others, its rows given to ``note_current_versions``), or
    None when there are none or no batch is open."""
    sql = Statements.of_bound()
    if sql.batch is None:
        return None
    wanted = tuple(sorted({name for name in workflows
                           if storable(name) and name not in sql.batch.versions}))
    if not wanted:
        return None
    return (f"SELECT name, current_version FROM workflows WHERE name IN "
            f"({sql.placeholders(len(wanted))})", wanted)


def note_current_versions(wanted: tuple, rows: list[tuple]) -> None:
    """Keep what ``current_versions_query`` read: ``version_of`` asks no more in this batch."""
    versions = Statements.of_bound().batch.versions
    versions.update(dict.fromkeys(wanted))
    versions.update(rows)
    _remember((name, versions[name]) for name in wanted)


def version_of(workflow: str, version: int | None
               ) -> tuple[int, dict, WorkflowModel] | MantleError:
    """(version, definition, model) of the requested or current version, or the error to
    report (WorkflowNotFound, VersionNotFound)."""
    if not storable(workflow):
        return WorkflowNotFound(workflow)
    if version is None:  # every run asks this: once per journal batch, hand-written SQL
        version = _current_version(workflow)
        if version is None:
            return WorkflowNotFound(workflow)
    found = stored_version(workflow, version)
    if found is None:
        if Workflow.get_or_none(Workflow.name == workflow) is None:
            return WorkflowNotFound(workflow)
        return VersionNotFound(workflow, version)
    return version, found[0], found[1]
