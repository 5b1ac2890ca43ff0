"""The cron scheduler of ``mantle serve`` (SPEC 8).

Each tick reads the cron trigger rows (so ``apply`` and ``rollback`` take effect at the next
tick) and fires every trigger whose schedule matches the current UTC minute, if that minute
began less than ``WINDOW`` seconds ago, by the database's time (its node's estimate, SPEC
13.7), never this host's clock. A firing moves the row's ``last_fired_at`` to the
minute with a compare-and-set in the transaction that creates the execution, and only the
caller that moved it creates one: a restarted daemon, or a second daemon on the same
database, never fires a minute twice, and a firing that created nothing (the daemon shutting
down or killed, the database gone for the whole run timeout) claimed nothing either, so the
next tick here or on another node fires the minute while its window lasts; a firing not
written in time (the database takes no writes) ends the tick, rather than each due trigger
waiting as long in turn. A minute that passed while no daemon ran is not caught up; a firing
refused by a ``reject`` limit is not retried.

The scheduler is a plain thread, outside the actor system: it uses ``Engine.run`` like any
other client.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time

import pykka
from croniter import croniter

from mantle.db import OUTAGE_ERRORS, lock_for_update, reset_connection, unwrap
from mantle.db.models import Workflow, WorkflowTrigger
from mantle.errors import AlreadyClaimed, LimitReached, MantleError, ShuttingDown

__all__ = ["Scheduler", "WINDOW", "POLL_EVERY"]

log = logging.getLogger("mantle.scheduler")

# A scheduled minute may fire until this many seconds after it began (SPEC 8: "within 30 s").
WINDOW = 30.0
# The longest sleep between ticks (besides waking just after every minute boundary), so a
# tick missed because the database was briefly unreachable is retried inside the window.
POLL_EVERY = 10.0
_AFTER_BOUNDARY = 0.2


class Scheduler:
    """Fires cron triggers through ``engine``; ``start()``/``stop()`` run ``tick`` on a thread.

    ``tick(now)`` is public so tests can drive it with a chosen time.
    """

    def __init__(self, engine, database, *, poll_every: float = POLL_EVERY,
                 run_timeout: float = 10.0):
        self._engine = engine
        self._database = unwrap(database)
        self._poll_every = poll_every
        self._run_timeout = run_timeout
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._in_outage = False
        self._bad_schedules: set[str] = set()

    def start(self) -> Scheduler:
        self._thread = threading.Thread(target=self._loop, name="mantle-scheduler", daemon=True)
        self._thread.start()
        log.info("cron scheduler started")
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        """Runs on the scheduler thread."""
        delay = 0.0
        while not self._stopping.wait(delay):
            try:
                self.tick()
            except Exception:  # keep scheduling whatever one tick hit
                log.exception("cron scheduler error")
            delay = self._next_delay(self._now().replace(tzinfo=dt.timezone.utc).timestamp())
        self._close_connection()

    def _next_delay(self, now: float) -> float:
        to_boundary = 60.0 - now % 60.0 + _AFTER_BOUNDARY
        return min(self._poll_every, to_boundary)

    def _now(self) -> dt.datetime:
        """The database's time as this node knows it: no host's clock decides (13.7)."""
        return self._engine.node.db_now()

    def tick(self, now: dt.datetime | None = None) -> list[str]:
        """Fire what is due at ``now`` (naive UTC; default: the database's time); return
        execution ids."""
        now = now or self._now()
        minute = now.replace(second=0, microsecond=0)
        if (now - minute).total_seconds() >= WINDOW:
            return []
        try:
            due = [row for row in self._cron_rows() if self._due(row, minute)]
        except OUTAGE_ERRORS as exc:
            self._outage(str(exc).strip())
            return []
        fired = []
        for row in due:
            try:
                execution_id = self._fire(row, minute)
            except pykka.Timeout as exc:
                # Not written in time: the database takes no writes. Each further firing
                # would wait as long in turn, holding up the ticks of the next minutes; the
                # next tick fires what is still due.
                self._outage(str(exc) or "the run was not written in time")
                return fired
            if execution_id is not None:
                fired.append(execution_id)
        self._in_outage = False
        return fired

    def _cron_rows(self) -> list[WorkflowTrigger]:
        return list(WorkflowTrigger.select().where(WorkflowTrigger.type == "cron")
                    .order_by(WorkflowTrigger.id))

    def _due(self, row: WorkflowTrigger, minute: dt.datetime) -> bool:
        if row.last_fired_at is not None and row.last_fired_at >= minute:
            return False
        try:
            return croniter.match(row.schedule, minute)
        except Exception:  # validated at apply; a row edited by hand must not stop the rest
            if row.schedule not in self._bad_schedules:
                self._bad_schedules.add(row.schedule)
                log.error("invalid cron schedule", extra={"workflow": row.workflow_name,
                                                          "schedule": row.schedule})
            return False

    @staticmethod
    def _claim(row: WorkflowTrigger, minute: dt.datetime) -> bool:
        """Compare-and-set ``last_fired_at`` to ``minute``: True for the one caller that did.

        The workflow's ``cron_fired_at`` moves with it. The workflow's row is locked first, as
        an ``apply`` and a limit check lock it (``mantle.definitions._locked_triggers``):
        taken in one order, the locks of a firing, a run and an apply of the workflow never
        deadlock."""
        lock_for_update(Workflow, Workflow.name == row.workflow_name)
        if not WorkflowTrigger.update(last_fired_at=minute).where(
                (WorkflowTrigger.id == row.id)
                & (WorkflowTrigger.last_fired_at.is_null()
                   | (WorkflowTrigger.last_fired_at < minute))).execute():
            return False
        # The workflow's last firing, which outlives its trigger rows (``_sync_triggers``).
        Workflow.update(cron_fired_at=minute).where(
            (Workflow.name == row.workflow_name)
            & (Workflow.cron_fired_at.is_null() | (Workflow.cron_fired_at < minute))).execute()
        return True

    def _fire(self, row: WorkflowTrigger, minute: dt.datetime) -> str | None:
        """Start the execution of ``minute`` unless another caller did; its id or None."""
        trigger = {"type": "cron", "schedule": row.schedule, "payload": None}
        context = {"workflow": row.workflow_name, "schedule": row.schedule}
        try:
            result = self._engine.run(row.workflow_name, None, trigger=trigger,
                                      actor="scheduler", timeout=self._run_timeout,
                                      claim=lambda: self._claim(row, minute))
        except LimitReached as exc:
            log.warning("cron execution rejected", extra={**context, "error": str(exc)})
        except (AlreadyClaimed, ShuttingDown):
            pass
        except pykka.Timeout:
            raise
        except MantleError as exc:
            log.error("cron firing failed", extra={**context, "error": str(exc)})
        except Exception as exc:  # keep firing the other triggers
            log.error("cron firing failed",
                      extra={**context, "error": str(exc) or type(exc).__name__})
        else:
            return result.execution_id
        return None

    def _outage(self, error: str) -> None:
        self._close_connection()
        if not self._in_outage:
            self._in_outage = True
            log.error("cron firing skipped: database unavailable", extra={"error": error})

    def _close_connection(self) -> None:
        reset_connection(self._database)
