"""The daemon's retention sweep (SPEC 13.4): ``mantle cleanup`` every ``retention.interval``.

A plain thread of its own, outside the actor system. It sweeps once soon after startup (a
daemon restarted more often than the interval would otherwise never sweep), then every
interval. After each batch it pauses at least as long as the batch took, so it never takes
more than half of the database's (or, on a small host, the CPUs') time from running
executions, and their checkpoints get the database in between; a stop request ends the
sweep after the batch in progress.
"""

from __future__ import annotations

import logging
import threading
import time

import peewee

from mantle import retention
from mantle.db import unwrap
from mantle.metrics import Metrics

__all__ = ["RetentionSweeper", "FIRST_DELAY", "PAUSE", "BATCH"]

log = logging.getLogger("mantle.retention")

FIRST_DELAY = 1.0  # seconds after start: out of the way of startup and resumption
PAUSE = 0.01  # seconds between two batches at least: room for other writers
# Rows per transaction: a quarter of what ``mantle cleanup`` takes, so each batch is short
# next to the executions' own checkpoints (SPEC 13.4 allows at most 1,000).
BATCH = 250


class RetentionSweeper:
    """``start()``/``stop()`` run ``retention.sweep`` every ``kept.interval`` on a thread.

    Without a configured retention only dead nodes are pruned (they are bookkeeping, not user
    data, and would otherwise pile up with every ``mantle run``).
    """

    def __init__(self, kept: retention.Retention, metrics: Metrics, database,
                 first_delay: float = FIRST_DELAY):
        self._kept = kept
        self._metrics = metrics
        self._database = unwrap(database)
        self._first_delay = first_delay
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._batch_began = 0.0

    def start(self) -> RetentionSweeper:
        self._thread = threading.Thread(target=self._loop, name="mantle-retention",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        """Runs on the retention thread."""
        delay = self._first_delay
        while not self._stopping.wait(delay):
            self.sweep_once()
            delay = self._kept.interval
        self._close_connection()

    def sweep_once(self) -> retention.SweepResult | None:
        """One sweep on the calling thread; None when it failed (logged, tried again at the
        next interval)."""
        started = time.monotonic()
        if self._kept.configured:
            log.info("retention sweep started")
        self._batch_began = started
        try:
            if self._kept.configured:
                result = retention.sweep(self._kept, batch=BATCH, on_batch=self._after_batch)
            else:
                result = retention.SweepResult(nodes=retention.prune_nodes())
        except Exception as exc:  # an outage above all; the thread must live on regardless
            if isinstance(exc, peewee.PeeweeException):
                self._close_connection()
            else:
                log.exception("retention sweep error")
            log.error("retention sweep failed", extra={"error": str(exc).strip()
                                                       or type(exc).__name__})
            return None
        if self._kept.configured:
            log.info("retention sweep finished", extra={
                "executions": result.executions, "audit_events": result.audit,
                "nodes": result.nodes,
                "duration_ms": int((time.monotonic() - started) * 1000)})
        return result

    def _after_batch(self, kind: str, deleted: int) -> bool:
        """Count the batch, then pause as long as it took (at least PAUSE); False to stop."""
        self._metrics.retention_deleted.labels(kind=kind).inc(deleted)
        took = time.monotonic() - self._batch_began
        stop = self._stopping.wait(max(PAUSE, took))
        self._batch_began = time.monotonic()
        return not stop

    def _close_connection(self) -> None:
        try:
            self._database.close()
        except Exception:  # a broken connection: forget it
            self._database._state.reset()
