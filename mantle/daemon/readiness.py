"""``/readyz`` (SPEC 7.5, 10.2, 10.3): server state, the engine's health, and the database as
last probed.

Probes never wait on the database (SPEC 13.7) and never touch it per request (issue 15.4): a
thread of its own probes once a second and ``check()`` answers from its latest result. A probe
that has not finished within ``PROBE_TIMEOUT`` (a hung connection) counts as unreachable.

On SQLite the probe also takes the write lock and lets go of it at once: in WAL mode another
process holding the lock (``BEGIN EXCLUSIVE`` / ``IMMEDIATE``) leaves reads working, but
every checkpoint and run waits for it, so "answers a query" alone would report ready through
such an outage. Once a second, this costs nothing the engine notices.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from mantle.db import is_sqlite, migrations, reset_connection, unwrap

__all__ = ["Readiness", "PROBE_TIMEOUT", "PROBE_EVERY", "WRITE_LOCK_WAIT"]

PROBE_TIMEOUT = 2.0
PROBE_EVERY = 1.0
# How long the SQLite probe waits for the write lock: under PROBE_TIMEOUT, and far above a
# journal commit, so only a lock held by someone else for seconds reads as unavailable.
WRITE_LOCK_WAIT = 1.5

_UNREACHABLE = {"database": "unreachable"}


class Readiness:
    """``check()`` -> ``(ready, details)``; ``details`` is the 503 body's ``details``.

    ``engine_problem()`` (set by ``watch``) names why the engine cannot work, or None.
    """

    STARTING, READY, STOPPING = "starting", "ready", "stopping"

    def __init__(self, database, every: float = PROBE_EVERY, timeout: float = PROBE_TIMEOUT):
        self._database = unwrap(database)
        self._every = every
        self._timeout = timeout
        self._state = self.STARTING
        self._engine_problem: Callable[[], str | None] = lambda: None
        self._result: dict | None = _UNREACHABLE
        self._probe_started: float | None = None
        self._probed_at = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mantle-readyz", daemon=True)

    def start(self) -> Readiness:
        """Probe once now (so the first answer is known), then once a second."""
        self._probe_once()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def watch(self, engine_problem: Callable[[], str | None]) -> None:
        self._engine_problem = engine_problem

    def mark_ready(self) -> None:
        self._state = self.READY

    def mark_stopping(self) -> None:
        self._state = self.STOPPING

    def check(self) -> tuple[bool, dict]:
        if self._state == self.STARTING:
            return False, {"server": "starting"}
        if self._state == self.STOPPING:
            return False, {"server": "shutting down"}
        problem = self._engine_problem()
        if problem is not None:
            return False, {"engine": problem}
        started, now = self._probe_started, time.monotonic()
        if started is not None and now - started > self._timeout:
            return False, _UNREACHABLE  # the probe in flight hangs
        if now - self._probed_at > self._every + self._timeout:
            return False, _UNREACHABLE  # no probe finished lately
        result = self._result
        return result is None, result or {}

    def _run(self) -> None:
        """Runs on the probe thread (its own connection)."""
        while not self._stop.wait(self._every):
            self._probe_once()
        reset_connection(self._database)

    def _probe_once(self) -> None:
        self._probe_started = time.monotonic()
        self._result = self._probe()
        self._probed_at = time.monotonic()
        self._probe_started = None

    def _probe(self) -> dict | None:
        database = self._database
        try:
            database.execute_sql("SELECT 1").fetchone()
            if is_sqlite(database):
                _take_write_lock(database)
            at_head = migrations.is_at_head(database)
            return None if at_head else {"migrations": "pending"}
        except Exception:  # any failure to query means the database is not usable now
            reset_connection(database)
            return _UNREACHABLE


def _take_write_lock(database) -> None:
    """Begin and roll back a write transaction on this thread's SQLite connection, waiting at
    most WRITE_LOCK_WAIT; sqlite3.OperationalError ("database is locked") when it cannot."""
    conn = database.connection()
    conn.execute(f"PRAGMA busy_timeout = {int(WRITE_LOCK_WAIT * 1000)}")
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("ROLLBACK")
