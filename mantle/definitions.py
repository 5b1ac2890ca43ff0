"""Versioned workflow definitions: plan, apply and rollback (SPEC 6.1, 8 lifecycle).

Every write happens in one transaction: a version, its current-version pointer, its trigger
rows and its audit event land together or not at all.
"""

from __future__ import annotations

import dataclasses
import hashlib

from peewee import IntegrityError

from mantle.db import audit, lock_for_update, upsert, write_transaction
from mantle.db.fields import MAX_INTEGER, utcnow
from mantle.db.models import Workflow as WorkflowRow
from mantle.db.models import WorkflowDefinition, WorkflowTrigger
from mantle.errors import (AlreadyAtVersion, NothingToRollBack, VersionNotFound,
                           WebhookPathTaken, WorkflowNotFound)
from mantle.workflow import Workflow, workflow_from_definition
from mantle.workflow.diff import Change, diff_definitions

__all__ = ["ApplyResult", "Plan", "content_hash", "apply_definition", "plan_definition",
           "rollback", "current_definition", "self_calls"]


@dataclasses.dataclass(frozen=True, slots=True)
class ApplyResult:
    name: str
    version: int
    created: bool


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    """What apply would do. ``current`` is None for a new workflow; ``changes`` leaf diffs."""

    name: str
    current: int | None
    new_version: int
    unchanged: bool
    changes: tuple[Change, ...]


def self_calls(workflow: Workflow) -> list[str]:
    """Names of the steps (and hook steps) that run ``workflow`` itself through
    ``workflow/run`` with a literal name: ``apply`` warns about them (SPEC 13.3)."""
    hooks = workflow.hooks
    steps = [*workflow.steps, *hooks.on_success, *hooks.on_failure, *hooks.on_finish]
    return [step.name for step in steps if step.action == "workflow/run"
            and isinstance(step.params, dict) and step.params.get("workflow") == workflow.name]


def content_hash(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def current_definition(name: str) -> WorkflowDefinition | None:
    """The stored current version of ``name``, or None when never applied."""
    return (WorkflowDefinition.select()
            .join(WorkflowRow, on=(WorkflowRow.name == WorkflowDefinition.workflow_name))
            .where(WorkflowRow.name == name,
                   WorkflowDefinition.version == WorkflowRow.current_version)
            .first())


def _max_version(name: str) -> int:
    from peewee import fn

    return (WorkflowDefinition.select(fn.MAX(WorkflowDefinition.version))
            .where(WorkflowDefinition.workflow_name == name).scalar() or 0)


def plan_definition(raw: bytes, workflow: Workflow) -> Plan:
    """Compare ``raw`` with the current version; writes nothing."""
    current = current_definition(workflow.name)
    new_version = _max_version(workflow.name) + 1
    if current is None:
        return Plan(workflow.name, None, new_version, False, ())
    unchanged = current.content_hash == content_hash(raw)
    changes = () if unchanged else tuple(diff_definitions(current.definition,
                                                          workflow.definition))
    return Plan(workflow.name, current.version, new_version, unchanged, changes)


def apply_definition(raw: bytes, workflow: Workflow, actor: str = "cli") -> ApplyResult:
    """Store a new version unless the bytes equal the current one (then re-sync triggers)."""
    digest = content_hash(raw)
    with write_transaction():
        now = utcnow()
        # A new workflow's row, made first, is what a concurrent first apply waits on: without
        # it both would find no version and store version 1 (a duplicate key on PostgreSQL).
        # Uncommitted, it is seen by nobody else; a refused apply takes it back.
        upsert(WorkflowRow, {"name": workflow.name, "current_version": 0, "created_at": now,
                             "updated_at": now}, conflict=[WorkflowRow.name], update=[])
        triggers = _locked_triggers(workflow.name)
        current = current_definition(workflow.name)
        if current is not None and current.content_hash == digest:
            _sync_triggers(workflow.name, current.version, workflow, triggers)
            return ApplyResult(workflow.name, current.version, False)
        version = _max_version(workflow.name) + 1
        WorkflowDefinition.create(workflow_name=workflow.name, version=version,
                                  raw_yaml=raw.decode("utf-8"), definition=workflow.definition,
                                  content_hash=digest, created_at=now)
        _point_to(workflow.name, version, now)
        _sync_triggers(workflow.name, version, workflow, triggers)
        audit.record_audit(actor, "workflow.applied", "workflow_definition", workflow.name,
                           {"version": version})
    return ApplyResult(workflow.name, version, True)


def rollback(name: str, to_version: int | str | None = None,
             actor: str = "cli") -> tuple[int, int]:
    """Point ``name`` at an existing version and re-register its triggers; (from, to).

    ``to_version`` may be the digits of a number beyond any version (not found)."""
    with write_transaction():
        triggers = _locked_triggers(name)
        row = WorkflowRow.get_or_none(WorkflowRow.name == name)
        if row is None:
            raise WorkflowNotFound(name)
        current = row.current_version
        if to_version is None:
            if current <= 1:
                raise NothingToRollBack(name)
            to_version = current - 1
        # Beyond the column no version exists (and SQLite cannot even be asked: OverflowError).
        target = WorkflowDefinition.get_or_none(
            WorkflowDefinition.workflow_name == name, WorkflowDefinition.version == to_version
        ) if isinstance(to_version, int) and to_version <= MAX_INTEGER else None
        if target is None:
            raise VersionNotFound(name, to_version)
        if to_version == current:
            raise AlreadyAtVersion(name, current)
        _point_to(name, to_version, utcnow())
        _sync_triggers(name, to_version, workflow_from_definition(target.definition),
                       triggers)
        audit.record_audit(actor, "workflow.rolled_back", "workflow_definition", name,
                           {"from_version": current, "to_version": to_version})
    return current, to_version


def _point_to(name: str, version: int, now) -> None:
    WorkflowRow.update(current_version=version, updated_at=now).where(
        WorkflowRow.name == name).execute()


def _locked_triggers(name: str) -> list[WorkflowTrigger]:
    """The trigger rows of ``name``, locked (PostgreSQL) after the workflow's row, before
    the transaction writes anything. Every writer of both takes them in this order: a run
    of a workflow with a limit locks its row (SPEC 4.9), and a cron firing, which claims
    its minute by moving its trigger row's ``last_fired_at``, locks the workflow's row
    first (``mantle.services.scheduler``). So an apply never deadlocks with a firing, and
    reads the ``last_fired_at`` of a firing that committed first, which the new rows
    keep."""
    lock_for_update(WorkflowRow, WorkflowRow.name == name)
    return lock_for_update(WorkflowTrigger, WorkflowTrigger.workflow_name == name)


def _sync_triggers(name: str, version: int, workflow: Workflow,
                   rows: list[WorkflowTrigger]) -> None:
    """Make the trigger rows of ``name`` (``rows``, from ``_locked_triggers``) those of
    ``workflow`` (version ``version``).

    Rows already matching are left alone, so a cron trigger keeps its last firing time and an
    unchanged apply writes nothing. A cron trigger with a new schedule starts from the last
    firing of the workflow's cron triggers (also of rows a version without cron removed:
    ``workflows.cron_fired_at``): a minute already fired is not fired again because its
    schedule was edited, or its trigger removed and restored, inside the minute's window
    (SPEC 8).
    """
    wanted = [(t.type, t.schedule, t.path, t.secret) for t in workflow.triggers]
    have = [(r.type, r.schedule, r.path, r.secret) for r in rows]
    if sorted(map(repr, have)) == sorted(map(repr, wanted)) and all(
            r.version == version for r in rows):
        return
    for path in (t.path for t in workflow.triggers if t.type == "webhook"):
        owner = _path_owner(path, name)
        if owner is not None:
            raise WebhookPathTaken(path, owner)
    fired = {(r.type, r.schedule): r.last_fired_at for r in rows if r.type == "cron"}
    # The workflow's own record also counts when a version without cron deleted the rows.
    last = max((when for when in (*fired.values(), _cron_fired_at(name)) if when is not None),
               default=None)
    WorkflowTrigger.delete().where(WorkflowTrigger.workflow_name == name).execute()
    now = utcnow()
    for kind, schedule, path, secret in wanted:
        fired_at = fired.get((kind, schedule), last) if kind == "cron" else None
        try:
            with write_transaction():  # a savepoint: the owner can be read after a refusal
                WorkflowTrigger.create(workflow_name=name, version=version, type=kind,
                                       schedule=schedule, path=path, secret=secret,
                                       last_fired_at=fired_at, created_at=now)
        except IntegrityError:
            # An apply of another workflow registered the path since the look-up above, and
            # committed (PostgreSQL: this insert waited for it).
            owner = _path_owner(path, name) if path is not None else None
            if owner is None:
                raise
            raise WebhookPathTaken(path, owner) from None


def _cron_fired_at(name: str):
    """The last minute a cron trigger of ``name`` fired (its row is locked:
    ``_locked_triggers``)."""
    return (WorkflowRow.select(WorkflowRow.cron_fired_at).where(WorkflowRow.name == name)
            .scalar())


def _path_owner(path: str, name: str) -> str | None:
    """The workflow other than ``name`` whose webhook trigger has ``path``, if any."""
    return (WorkflowTrigger.select(WorkflowTrigger.workflow_name)
            .where(WorkflowTrigger.path == path, WorkflowTrigger.workflow_name != name)
            .scalar())

