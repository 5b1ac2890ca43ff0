"""Retention (SPEC 13.4): delete old final executions and old audit events, in small batches.

The same ``sweep`` serves ``mantle cleanup`` and the daemon's periodic sweep. Each batch is
one short transaction of at most ``BATCH`` rows (an execution counts with its step rows), so
a sweep over a large backlog never holds SQLite's write lock, or PostgreSQL row locks, long
enough to hold up the checkpoints of running executions.

An execution is deleted only when it is final (``completed``, ``failed``, ``cancelled``), its
``completed_at`` is older than the cutoff, none of its children is still ``pending`` or
``running`` and its parent (if any) is not either; its step rows go with it, and so does its
idempotency key (a column of its row). Audit events older than their cutoff are deleted,
on SQLite all but the newest row of the table (which keeps event ids increasing).
Node rows of dead processes (13.7) are pruned too: lease expired over an hour ago (by the
database's clock on PostgreSQL) and owning no pending or running execution.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import threading
from collections.abc import Callable

from peewee import SQL, fn

from mantle.config import Config
from mantle.db import database_proxy, is_postgres, unwrap, write_transaction
from mantle.db.fields import utcnow
from mantle.db.models import AuditEvent, Node, StepExecution, WorkflowExecution
from mantle.durations import parse_since
from mantle.errors import ConfigError, InvalidInput

__all__ = ["Retention", "SweepResult", "retention_from", "sweep", "count", "prune_nodes",
           "BATCH", "NODE_GRACE"]

BATCH = 1000  # rows per transaction, at most
_PAGES = 10  # batches' worth of candidates looked up at once
NODE_GRACE = dt.timedelta(hours=1)
_FINAL = ("completed", "failed", "cancelled")
_ACTIVE = ("pending", "running")
_DAYS = re.compile(r"[0-9]{1,6}")


@dataclasses.dataclass(frozen=True, slots=True)
class Retention:
    """What to keep: ``None`` days = keep that kind for ever; ``interval`` in seconds."""

    execution_days: int | None = None
    audit_days: int | None = None
    interval: float = 86400.0

    @property
    def configured(self) -> bool:
        return self.execution_days is not None or self.audit_days is not None


@dataclasses.dataclass(slots=True)
class SweepResult:
    executions: int = 0
    audit: int = 0
    nodes: int = 0


def _days(text: str | None, what: str, error) -> int | None:
    if text is None or text == "":
        return None
    text = str(text).strip()
    if not _DAYS.fullmatch(text) or int(text) < 1:
        raise error(f'invalid {what} value "{text}": must be a positive whole number of days')
    return int(text)


def retention_from(config: Config, execution_days: str | None = None,
                   audit_days: str | None = None) -> Retention:
    """The retention of ``config``, with ``--execution-days``/``--audit-days`` over it."""
    executions = _days(execution_days, "--execution-days", InvalidInput)
    if executions is None:
        executions = _days(config.retention_execution_days, "retention.execution_days",
                           ConfigError)
    audit = _days(audit_days, "--audit-days", InvalidInput)
    if audit is None:
        audit = _days(config.retention_audit_days, "retention.audit_days", ConfigError)
    try:
        interval = parse_since(config.retention_interval)
    except ValueError:
        interval = None
    # Longer than a thread can wait (292 years) is refused like any other bad value.
    if interval is None or interval >= threading.TIMEOUT_MAX:
        raise ConfigError(f'invalid retention.interval value "{config.retention_interval}": '
                          "must be a positive duration such as 24h or 7d")
    return Retention(executions, audit, interval)


def _cutoff(days: int, now: dt.datetime | None) -> dt.datetime:
    return (now or utcnow()) - dt.timedelta(days=days)


def _expired_executions(cutoff: dt.datetime):
    """Final executions completed before ``cutoff`` with no child still pending or running,
    and no parent still running: a parent awaiting its child's end reads the child's row,
    however long ago it ended (say, after every node was down for longer than the cutoff)."""
    child, parent = WorkflowExecution.alias("child"), WorkflowExecution.alias("parent")
    busy_child = (child.select(SQL("1"))
                  .where(child.parent_execution_id == WorkflowExecution.id,
                         child.status.in_(_ACTIVE)))
    busy_parent = (parent.select(SQL("1"))
                   .where(parent.id == WorkflowExecution.parent_execution_id,
                          parent.status.in_(_ACTIVE)))
    return (WorkflowExecution.select(WorkflowExecution.id)
            .where(WorkflowExecution.status.in_(_FINAL),
                   WorkflowExecution.completed_at < cutoff,
                   ~fn.EXISTS(busy_child), ~fn.EXISTS(busy_parent)))


def count(retention: Retention, now: dt.datetime | None = None) -> SweepResult:
    """What ``sweep`` would delete now (``--dry-run``); deletes nothing."""
    result = SweepResult()
    if retention.execution_days is not None:
        result.executions = _expired_executions(_cutoff(retention.execution_days, now)).count()
    if retention.audit_days is not None:
        cutoff = _cutoff(retention.audit_days, now)
        result.audit = _expired_audit(cutoff).count()
    return result


def sweep(retention: Retention, now: dt.datetime | None = None, batch: int = BATCH,
          on_batch: Callable[[str, int], bool] | None = None) -> SweepResult:
    """Delete what ``retention`` no longer keeps, in transactions of at most ``batch`` rows,
    then prune dead nodes; the counts deleted.

    ``on_batch(kind, n)`` is called after each committed batch (``kind`` is ``execution`` or
    ``audit``); returning False stops the sweep there (the daemon's shutdown). Runs on the
    calling thread with its own connection to the bound database.
    """
    result = SweepResult()
    go_on = on_batch or (lambda kind, n: True)
    if retention.execution_days is not None:
        cutoff = _cutoff(retention.execution_days, now)
        for deleted in _execution_batches(cutoff, batch):
            result.executions += deleted
            if not go_on("execution", deleted):
                return result
    if retention.audit_days is not None:
        cutoff = _cutoff(retention.audit_days, now)
        while (deleted := _delete_audit(cutoff, batch)):
            result.audit += deleted
            if not go_on("audit", deleted):
                return result
    result.nodes = prune_nodes()
    return result


def _execution_batches(cutoff: dt.datetime, batch: int):
    """Delete expired executions batch by batch; yields how many each batch deleted.

    The candidates are found by plain reads, outside any transaction (on a large backlog
    that search is the slow part, and a reader holds no lock a writer waits for); each write
    transaction then re-checks its few candidates by primary key and deletes them.
    """
    while True:
        page = [row.id for row in _expired_executions(cutoff)
                .order_by(WorkflowExecution.completed_at, WorkflowExecution.id)
                .limit(batch * _PAGES)]
        deleted_in_page = 0
        while page:
            chosen, page = _fill_batch(page, batch)
            deleted = _delete_executions(chosen, cutoff)
            deleted_in_page += deleted
            if deleted:
                yield deleted
        if not deleted_in_page:
            return


def _fill_batch(ids: list[str], batch: int) -> tuple[list[str], list[str]]:
    """The first ids whose rows, steps included, fit in ``batch`` (always at least one
    execution, however many steps it has), and the rest."""
    steps = dict(StepExecution.select(StepExecution.execution_id, fn.COUNT(SQL("*")))
                 .where(StepExecution.execution_id.in_(ids[:batch]))
                 .group_by(StepExecution.execution_id).tuples())
    rows = 0
    for index, execution_id in enumerate(ids[:batch]):
        rows += 1 + steps.get(execution_id, 0)
        if index and rows > batch:
            return ids[:index], ids[index:]
    return ids[:batch], ids[batch:]


def _delete_executions(ids: list[str], cutoff: dt.datetime) -> int:
    """One write transaction: those of ``ids`` still expired, with their steps."""
    with write_transaction():
        chosen = [row.id for row in _expired_executions(cutoff)
                  .where(WorkflowExecution.id.in_(ids))]
        if chosen:
            StepExecution.delete().where(StepExecution.execution_id.in_(chosen)).execute()
            WorkflowExecution.delete().where(WorkflowExecution.id.in_(chosen)).execute()
    return len(chosen)


def _expired_audit(cutoff: dt.datetime):
    """Audit events older than ``cutoff``, except, on SQLite, the newest of all: SQLite
    gives a new row the largest id left plus one, and the event streams go by these ids
    (SPEC 13.8: increasing, ``Last-Event-ID``); with every row deleted they would begin
    again at 1, below where open streams and their clients stand. PostgreSQL's sequence
    never goes back."""
    query = AuditEvent.select(AuditEvent.id).where(AuditEvent.timestamp < cutoff)
    if not is_postgres(unwrap(database_proxy)):
        newest = AuditEvent.alias("newest")
        query = query.where(AuditEvent.id < newest.select(fn.MAX(newest.id)))
    return query


def _delete_audit(cutoff: dt.datetime, batch: int) -> int:
    """One batch of the oldest expired audit events (found outside the transaction too)."""
    ids = [row.id for row in _expired_audit(cutoff).order_by(AuditEvent.id).limit(batch)]
    if not ids:
        return 0
    with write_transaction():
        return AuditEvent.delete().where(AuditEvent.id.in_(ids),
                                         AuditEvent.timestamp < cutoff).execute()


def prune_nodes() -> int:
    """Delete node rows whose lease expired more than NODE_GRACE ago and that own no pending
    or running execution (their process is gone and nothing will be taken over from them),
    and on PostgreSQL the journal marks last written a week ago (a live journal's mark is
    written again by its next transaction)."""
    postgres = is_postgres(unwrap(database_proxy))
    if postgres:
        # The database's clock decides lease expiry (13.7), never this host's.
        cutoff = SQL("(now() AT TIME ZONE 'UTC') - interval '1 hour'")
    else:
        cutoff = utcnow() - NODE_GRACE
    owning = (WorkflowExecution.select(SQL("1"))
              .where(WorkflowExecution.owner == Node.id, WorkflowExecution.status.in_(_ACTIVE)))
    with write_transaction():
        if postgres:
            # The commit marks of journals (migration 009) that wrote nothing for a week: a
            # journal cut off from the database that long with a commit whose outcome it
            # does not know would find no mark, and take its batch for not written.
            database_proxy.execute_sql("DELETE FROM journal_marks WHERE written_at < "
                                       "(now() AT TIME ZONE 'UTC') - interval '7 days'")
        return (Node.delete()
                .where(Node.lease_expires_at < cutoff, ~fn.EXISTS(owning)).execute())

