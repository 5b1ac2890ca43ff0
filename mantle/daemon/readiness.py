"""``/readyz`` (SPEC 7.5, 10.2, 10.3): server state plus a database probe per request.

The probe runs on a thread of its own, so a request gives up after 2 s even when connecting
hangs (PostgreSQL's connect timeout is longer); requests arriving while a probe is still
running share its answer instead of piling up more probes.

On SQLite the probe also takes the write lock and lets go of it at once: in WAL mode another
process holding the lock (``BEGIN EXCLUSIVE`` / ``IMMEDIATE``) leaves reads working, but
every checkpoint and run waits for it, so "answers a query" alone would report ready
through such an outage.
"""

from __future__ import annotations

import threading

from mantle.db import is_sqlite, migrations, unwrap

__all__ = ["Readiness", "PROBE_TIMEOUT", "WRITE_LOCK_WAIT"]

PROBE_TIMEOUT = 2.0
# How long the SQLite probe waits for the write lock: under PROBE_TIMEOUT, and far above a
# journal commit, so only a lock held by someone else for seconds reads as unavailable.
WRITE_LOCK_WAIT = 1.5

_UNREACHABLE = {"database": "unreachable"}


class _Probe:
    """One probe in flight: its result once done."""

    def __init__(self):
        self.done = threading.Event()
        self.result: dict | None = None


class Readiness:
    """``check()`` -> ``(ready, details)``; ``details`` is the 503 body's ``details``."""

    STARTING, READY, STOPPING = "starting", "ready", "stopping"

    def __init__(self, database, timeout: float = PROBE_TIMEOUT):
        self._database = unwrap(database)
        self._timeout = timeout
        self._state = self.STARTING
        self._lock = threading.Lock()
        self._probe: _Probe | None = None

    def mark_ready(self) -> None:
        self._state = self.READY

    def mark_stopping(self) -> None:
        self._state = self.STOPPING

    def check(self) -> tuple[bool, dict]:
        if self._state == self.STARTING:
            return False, {"server": "starting"}
        if self._state == self.STOPPING:
            return False, {"server": "shutting down"}
        problem = self._probe_database()
        return problem is None, problem or {}

    def _probe_database(self) -> dict | None:
        with self._lock:
            probe = self._probe
            if probe is None or probe.done.is_set():
                probe = self._probe = _Probe()
                threading.Thread(target=self._run, args=(probe,), name="mantle-readyz",
                                 daemon=True).start()
        if not probe.done.wait(self._timeout):
            return _UNREACHABLE
        return probe.result

    def _run(self, probe: _Probe) -> None:
        """Runs on a probe thread (its own connection, closed at the end)."""
        database = self._database
        try:
            database.execute_sql("SELECT 1").fetchone()
            if is_sqlite(database):
                _take_write_lock(database)
            at_head = migrations.is_at_head(database)
            probe.result = None if at_head else {"migrations": "pending"}
        except Exception:  # any failure to query means the database is not usable now
            probe.result = _UNREACHABLE
        finally:
            try:
                database.close()
            except Exception:  # a broken connection: forget it
                database._state.reset()
            probe.done.set()


def _take_write_lock(database) -> None:
    """Begin and roll back a write transaction on this thread's SQLite connection, waiting at
    most WRITE_LOCK_WAIT; sqlite3.OperationalError ("database is locked") when it cannot.

    The shorter busy timeout stays on this connection, which the probe closes afterwards.
    """
    conn = database.connection()
    conn.execute(f"PRAGMA busy_timeout = {int(WRITE_LOCK_WAIT * 1000)}")
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("ROLLBACK")
