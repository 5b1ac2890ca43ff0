"""WAL checkpoints of the daemon's SQLite file, on a thread of their own.

SQLite copies the write-ahead log back into the database file (a checkpoint) inside the
commit that makes the log pass ``wal_autocheckpoint`` pages, and with ``synchronous=NORMAL``
that checkpoint syncs the log and the file to disk. The committing writer is the journal, so
every few hundred transactions one commit waited on two disk syncs while it held the write
lock: every other writer of the file (``serve --workers``) waited with it. Commits took 1.3 ms
on the benchmark's disk against 0.5 ms on a RAM disk (bench/README.md, item 24).

Here a thread checkpoints every ``interval`` with ``PRAGMA wal_checkpoint(PASSIVE)``, which
waits for no reader and no writer, on a connection of its own that takes no write lock; the
daemon's connections checkpoint by themselves only past ``FALLBACK_PAGES`` (if this thread
falls behind, the log still stays bounded). Every worker of ``serve --workers`` runs one; two
at once on one file are harmless (SQLite lets one in, the other skips a turn).
"""

from __future__ import annotations

import logging
import sqlite3
import threading

from mantle.db import unwrap
from mantle.db.engine import sqlite_file

__all__ = ["WalCheckpointer", "CHECKPOINT_INTERVAL", "FALLBACK_PAGES"]

log = logging.getLogger(__name__)

CHECKPOINT_INTERVAL = 0.1  # seconds; the log grows by a few hundred pages at most meanwhile
FALLBACK_PAGES = 10_000  # ~40 MiB of log before a commit checkpoints by itself
_SKIPPED = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


class WalCheckpointer:
    """Start with ``start()``, stop with ``stop()``; ``for_database`` gives None where there
    is nothing to do (PostgreSQL, an in-memory SQLite database)."""

    def __init__(self, path: str, interval: float = CHECKPOINT_INTERVAL):
        self._path = path
        self._interval = interval
        self._stopped = threading.Event()
        self._failing = False
        self._thread = threading.Thread(target=self._run, name="mantle-checkpoint", daemon=True)

    @classmethod
    def for_database(cls, database, interval: float = CHECKPOINT_INTERVAL
                     ) -> WalCheckpointer | None:
        """A checkpointer for ``database``; its connections from now on (and the calling
        thread's) checkpoint by themselves only past FALLBACK_PAGES."""
        path = sqlite_file(database)
        if path is None:
            return None
        unwrap(database).pragma("wal_autocheckpoint", FALLBACK_PAGES, permanent=True)
        return cls(path, interval)

    def start(self) -> WalCheckpointer:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        connection = None
        try:
            while not self._stopped.wait(self._interval):
                try:
                    if connection is None:
                        # timeout 0: a checkpoint never waits for a lock, it tries next time
                        connection = sqlite3.connect(self._path, timeout=0,
                                                     isolation_level=None)
                    connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as exc:
                    if getattr(exc, "sqlite_errorcode", None) in _SKIPPED:
                        continue  # a writer or another checkpoint holds a lock: next turn
                    self._failed(exc)
                    if connection is not None:
                        connection.close()
                        connection = None
                else:
                    self._recovered()
        finally:
            if connection is not None:
                connection.close()

    def _failed(self, exc: sqlite3.Error) -> None:
        if not self._failing:  # once per run of failures, not ten times a second
            self._failing = True
            log.warning("WAL checkpoint failed", extra={"error": str(exc)})

    def _recovered(self) -> None:
        if self._failing:
            self._failing = False
            log.info("WAL checkpoint succeeded again")
