"""The journal: the engine's only database connection, writing in batched transactions.

Every checkpoint of every execution in the process goes through here. Operations queue up
while a transaction commits and are written together in the next one, so a thousand running
executions cost a few commits per second rather than thousands (STYLE habit 5). An operation's
``done`` callback runs only after its transaction committed, which is what lets the Execution
actor start dependents strictly after a step's outcome is durable (SPEC 4.11).

During a database outage the pending batch is retried (0.5 s doubling to 5 s) until it commits
or the journal is stopped; nothing waiting on it proceeds meanwhile.

The queue is not bounded by refusing writes (a checkpoint must never be dropped), but its
length is watched: ``saturated`` tells new work (``POST /run``) to be refused with 503 while
the backlog is long, which bounds it in practice (issue 11.9).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import peewee

from mantle.db import is_outage, is_postgres, transaction
from mantle.db.connect import (backend_identity, commit_outcome, journal_check_refused,
                               transaction_conflict)
from mantle.errors import GateClosed, JournalStopped
from mantle.store import (STARTING, batch_scope, check_with_writes, forget_current_versions,
                          known_current_versions, refused_fences)
from mantle.store.statements import Pending, Statements, settle

__all__ = ["Journal", "JournalStopped", "SATURATED_BACKLOG"]

log = logging.getLogger(__name__)

_MAX_BATCH = 500
_BACKOFF_START = 0.5
_BACKOFF_MAX = 5.0
# Conflicts (a deadlock) in a row written again at once before they count as an outage.
_CONFLICT_RETRIES = 5
# A commit waiting longer than this (SQLite waiting out another process's write lock, up to
# its 10 s busy timeout) makes the journal unhealthy: callers answer 503 instead of waiting.
_STALLED_AFTER = 2.0
# Operations waiting beyond which new work is refused (about a second of writes at full load).
SATURATED_BACKLOG = 20_000


class _Entry:
    __slots__ = ("op", "done", "failed", "fence", "reads", "gate")

    def __init__(self, op, done, failed, fence, reads, gate):
        self.op = op
        self.done = done
        self.failed = failed
        self.fence = fence
        self.reads = reads
        self.gate = gate


class _Refused:
    """The result of an operation skipped because its fence was refused: ``error``
    (LeaseLost, ExecutionStopped) goes to its ``failed``."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException):
        self.error = error


class _Closed(Exception):
    """Operations whose ``gate`` closed before their transaction could commit."""

    def __init__(self, entries: list[_Entry]):
        super().__init__("operations no longer wanted")
        self.entries = entries


class _StartsStopped(Exception):
    """``STARTING`` fences that held when the batch was checked and no longer do once its
    operations ran (one of them cancelled the execution): ``refused``, fence -> error. The
    batch is written again with them refused."""

    def __init__(self, refused: dict):
        super().__init__("an operation of the batch stopped an execution it starts")
        self.refused = refused


class _Uncertain(Exception):
    """The connection broke while a transaction's COMMIT was in flight (PostgreSQL): whether
    it committed is asked once the database answers again (``Journal._outcome``)."""

    def __init__(self, seq: int, backend: tuple[int, Any], results: list[Any]):
        super().__init__("the outcome of a commit is not known")
        self.seq = seq  # the journal mark the transaction set
        self.backend = backend  # the server process it was sent to (pid, start time)
        self.results = results


class Journal:
    """Runs submitted operations on one thread, many per transaction.

    ``submit`` may be called from any thread. ``op`` runs inside the transaction and returns a
    result; ``done(result)`` runs after the commit and ``failed(exc)`` if the operation itself
    raised (it is then retried alone, so one bad operation never sinks its batch-mates). Both
    callbacks run on the journal thread and must be quick (tell an actor, set a future).

    ``fence=(execution_id, epoch)`` makes the operation conditional on the execution still
    having that epoch (SPEC 13.7): one check per batch for all its fences, inside the
    transaction; an operation whose fence is refused is not run and its ``failed`` receives
    ``LeaseLost``. ``(execution_id, epoch, STARTING)`` also needs the execution ``running``
    (the operation starts an attempt), else ``failed`` receives ``ExecutionStopped``
    (``mantle.store.ownership``).

    ``reads=workflow``: the operation looks up the workflow's current version (a run); the
    batch reads it with the fence check, in the same round trip on PostgreSQL.

    ``gate``: asked once the operation ran, just before its transaction commits; False (its
    caller stopped waiting, say) rolls the transaction back, and the operation is dropped
    (``failed`` gets GateClosed) while the others are written again. So a caller told "not
    written" can rely on it even when the operation waited long in the database (a row
    lock), which a check when the operation starts cannot promise.

    On PostgreSQL a transaction is one message when it can be (migration 009): its
    operations run on the versions of workflows read before, and the fence and version
    checks go with the writes and COMMIT; should one fail, the transaction rolls back and
    the batch is written again with the checks up front, in a round trip of their own.
    Every transaction sets the journal's mark (``_mark``, ``_seq``), which tells whether
    one whose COMMIT was in flight when its connection broke committed.
    """

    def __init__(self, database: peewee.Database, on_outage: Callable[[bool], None] | None = None):
        self._db = database
        self._on_outage = on_outage
        self._queue: collections.deque[_Entry] = collections.deque()
        self._ready = threading.Condition()
        self._stopping = False
        self._abandon = threading.Event()
        self._in_outage = False
        self._commit_started: float | None = None  # monotonic, while a commit is under way
        self._postgres = is_postgres(database)
        self._mark = f"mantle-journal-{uuid.uuid4()}"
        self._seq = 0  # of the last transaction begun (PostgreSQL)
        self._thread = threading.Thread(target=self._run, name="mantle-journal", daemon=True)

    @property
    def backlog(self) -> int:
        return len(self._queue)

    @property
    def saturated(self) -> bool:
        return len(self._queue) > SATURATED_BACKLOG

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def healthy(self) -> bool:
        """False during an outage, and while a commit has waited more than _STALLED_AFTER."""
        started = self._commit_started
        stalled = started is not None and time.monotonic() - started > _STALLED_AFTER
        return not (self._in_outage or stalled)

    def start(self) -> None:
        self._thread.start()

    def submit(self, op: Callable[[], Any], done: Callable[[Any], None] | None = None,
               failed: Callable[[BaseException], None] | None = None,
               fence: tuple | None = None, reads: str | None = None,
               gate: Callable[[], bool] | None = None) -> None:
        with self._ready:
            if self._stopping:
                if failed is not None:
                    failed(JournalStopped("the journal is stopped"))
                return
            self._queue.append(_Entry(op, done, failed, fence, reads, gate))
            self._ready.notify()

    def call(self, op: Callable[[], Any], timeout: float | None = 30.0,
             fence: tuple | None = None) -> Any:
        """Run ``op`` through the journal and wait for its result (for non-actor callers);
        raises what the operation raised, LeaseLost for a refused fence, TimeoutError."""
        finished = threading.Event()
        box: dict[str, Any] = {}

        def done(result):
            box["result"] = result
            finished.set()

        def failed(exc):
            box["error"] = exc
            finished.set()

        self.submit(op, done, failed, fence)
        if not finished.wait(timeout):
            raise TimeoutError("database write did not complete in time")
        if "error" in box:
            raise box["error"]
        return box["result"]

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is queued (giving up after ``timeout``), then end the thread."""
        with self._ready:
            self._stopping = True
            self._ready.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._abandon.set()
            self._thread.join(2.0)

    # --- journal thread ---

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._queue and not self._stopping:
                    self._ready.wait()
                if not self._queue:
                    break
                batch = self._take(_MAX_BATCH)
            self._write(batch)
        self._fail_rest()
        self._db.close()

    def _take(self, limit: int) -> list[_Entry]:
        """Up to ``limit`` queued entries, oldest first (call holding ``_ready``)."""
        queue = self._queue
        return [queue.popleft() for _ in range(min(len(queue), limit))]

    def _write(self, batch: list[_Entry], uncertain: _Uncertain | None = None,
               top_up: bool = True) -> None:
        """Commit ``batch``, waiting out an outage; ``uncertain``: an earlier commit of it
        whose outcome is not known yet; ``top_up``: newer operations may join it (not
        while older ones wait their turn one by one)."""
        delay, conflicts = _BACKOFF_START, 0
        while True:
            try:
                results = self._outcome(uncertain) if uncertain is not None else None
                uncertain = None
                if results is None:
                    results = self._commit(batch, top_up=top_up)
                break
            except _Uncertain as exc:
                uncertain = exc
                self._outage(exc.__cause__)
            except _Closed as exc:
                self._drop(batch, exc.entries)
                continue
            except Exception as exc:
                if transaction_conflict(exc) and conflicts < _CONFLICT_RETRIES:
                    # The database rolled it back to end a deadlock with another writer
                    # (two nodes locking two limited workflows' rows in opposite orders):
                    # no outage, and the other writer has gone on.
                    conflicts += 1
                    log.warning("database write retried after a conflict",
                                extra={"error": str(exc).strip()})
                    continue
                if not is_outage(exc):
                    self._write_one_by_one(batch)
                    return
                self._outage(exc)
            if self._abandon.wait(delay):
                self._fail(batch, JournalStopped("shut down during a database outage"))
                return
            delay = min(delay * 2, _BACKOFF_MAX)
        self._recovered()
        for entry, result in zip(batch, results):
            self._finished(entry, result)

    def _outcome(self, uncertain: _Uncertain) -> list[Any] | None:
        """The results of the commit ``uncertain`` if it committed, None if it did not (its
        batch is then written again); raises ``uncertain`` again while it cannot be told.

        Writing a committed batch again would do twice what is not idempotent: a run's
        execution created a second time, a finish found already written and taken for a
        cancel that won, audit rows twice."""
        try:
            status = commit_outcome(self._db, self._mark, uncertain.seq, uncertain.backend)
        except Exception as exc:
            if is_outage(exc):
                self._reset_connection()
                raise uncertain from exc
            raise
        if status == "in progress":
            raise uncertain from uncertain.__cause__
        if status != "committed":
            return None
        pending = [result for result in uncertain.results if isinstance(result, Pending)]
        if pending:
            settle(self._db, pending)
        log.info("database commit confirmed after its answer was lost",
                 extra={"operations": len(uncertain.results)})
        return uncertain.results

    def _finished(self, entry: _Entry, result) -> None:
        if isinstance(result, Pending):
            result = result.value
        if isinstance(result, _Refused):
            self._callback(entry.failed, result.error)
        else:
            self._callback(entry.done, result)

    def _commit(self, batch: list[_Entry], top_up: bool = False) -> list[Any]:
        """Run ``batch`` in one transaction; its results, in order.

        ``top_up``: once the transaction has begun, ``batch`` (extended in place) takes in
        what was queued meanwhile. Beginning can mean waiting for the database's write lock
        (another ``serve`` worker's transaction, up to its commit); the operations that queued
        up during that wait then share this transaction instead of each process paying a turn
        of the lock for a few of them (each of ``serve --workers 2`` spent 45 % of its time
        waiting for its turn, while the second core was not fully used; bench/README.md)."""
        stopped: dict = {}
        try:
            return self._transaction(batch, top_up, checks_later=self._postgres)
        except _StartsStopped as exc:
            stopped = exc.refused
        except (_Closed, _Uncertain):
            raise
        except Exception as exc:
            if journal_check_refused(exc):
                forget_current_versions()
            elif is_outage(exc) or not self._postgres:
                raise
        # A fence or a version the batch went by no longer holds, or an operation failed
        # before its fence was checked (on what a new owner wrote, say): again, checks first,
        # so that the operations of executions lost to another node are not run at all.
        while True:
            try:
                return self._transaction(batch, top_up=False, checks_later=False,
                                         stopped=stopped)
            except _StartsStopped as exc:
                stopped = {**stopped, **exc.refused}

    def _transaction(self, batch: list[_Entry], top_up: bool, checks_later: bool,
                     stopped: dict | None = None) -> list[Any]:
        """``_commit``; ``checks_later``: the fences and versions are checked with the
        writes (PostgreSQL, when the versions the batch's runs need were read before);
        ``stopped``: fences refused by an earlier try of the batch (``_StartsStopped``)."""
        self._commit_started = time.monotonic()
        results = backend = None
        try:
            with transaction(self._db), batch_scope(self._db, ends_transaction=True):
                if top_up and len(batch) < _MAX_BATCH:
                    with self._ready:
                        batch.extend(self._take(_MAX_BATCH - len(batch)))
                fences = {entry.fence for entry in batch if entry.fence is not None}
                reads = {entry.reads for entry in batch if entry.reads is not None}
                starts = {fence for fence in fences if fence[2:] == (STARTING,)}
                later = False
                if self._postgres:
                    self._seq += 1
                    backend = backend_identity(self._db)
                    versions = known_current_versions(reads) if checks_later else None
                    if versions is not None:
                        check_with_writes(self._db, self._mark, self._seq, fences, versions)
                        fences, reads, later = (), (), True
                    else:
                        check_with_writes(self._db, self._mark, self._seq)
                refused = refused_fences(fences, reads) if fences or reads else {}
                refused.update(stopped or {})
                results = [_Refused(refused[entry.fence]) if entry.fence in refused
                           else entry.op()
                           for entry in batch]
                self._check_starts_again(starts - refused.keys(), later)
                closed = [entry for entry in batch if entry.gate is not None
                          and entry.fence not in refused and not entry.gate()]
                if closed:
                    results = None  # rolled back: nothing of it committed
                    raise _Closed(closed)
            return results
        except Exception as exc:
            if journal_check_refused(exc) or transaction_conflict(exc) or not is_outage(exc):
                raise  # a refusal or a conflict is no outage, and nothing of it committed
            self._reset_connection()
            # Broken while its last writes and COMMIT were in flight: it may have committed.
            if results is not None and backend is not None:
                raise _Uncertain(self._seq, backend, results) from exc
            raise
        finally:
            self._commit_started = None

    def _check_starts_again(self, starts: set[tuple], later: bool) -> None:
        """Check the ``STARTING`` fences ``starts`` again once the batch's operations ran:
        one of them (a cancel) may have stopped an execution that a later one starts, after
        the batch's check, and that start must not commit with it (SPEC 4.6).

        ``later`` (PostgreSQL, checks with the writes): ``mantle_journal_check`` goes once
        more with the writes and COMMIT when an operation that had to see the batch's
        writes sent the first one early. Else here, raising ``_StartsStopped``."""
        if not starts:
            return
        if later:
            if Statements.of(self._db).batch.check is None:
                check_with_writes(self._db, self._mark, self._seq, starts)
            return
        late = refused_fences(starts)
        if late:
            raise _StartsStopped(late)

    def _write_one_by_one(self, batch: list[_Entry]) -> None:
        for entry in batch:
            try:
                result = self._commit([entry])[0]
            except Exception as exc:
                if isinstance(exc, _Uncertain):  # this one may have committed: ask, go on
                    self._write([entry], exc, top_up=False)
                    continue
                if isinstance(exc, _Closed):
                    self._drop([entry], [entry])
                    continue
                if is_outage(exc):  # the outage began mid-way: retry the rest as a batch
                    self._write(batch[batch.index(entry):])
                    return
                log.exception("database write failed")
                self._callback(entry.failed, exc)
            else:
                self._finished(entry, result)

    def _drop(self, batch: list[_Entry], closed: list[_Entry]) -> None:
        """Take the operations whose gate closed out of ``batch``; tell their callers."""
        for entry in closed:
            batch.remove(entry)
            self._callback(entry.failed, GateClosed("the operation was no longer wanted"))

    def _reset_connection(self) -> None:
        try:
            self._db.close()
        except Exception:  # the connection is already broken; a new one is opened on retry
            pass

    def _outage(self, exc: BaseException) -> None:
        if not self._in_outage:
            self._in_outage = True
            log.error("database unavailable", extra={"error": str(exc).strip()})
            if self._on_outage:
                self._on_outage(True)

    def _recovered(self) -> None:
        if self._in_outage:
            self._in_outage = False
            log.info("database available again")
            if self._on_outage:
                self._on_outage(False)

    def _fail_rest(self) -> None:
        with self._ready:
            rest = list(self._queue)
            self._queue.clear()
        self._fail(rest, JournalStopped("the journal is stopped"))

    def _fail(self, entries: list[_Entry], exc: BaseException) -> None:
        for entry in entries:
            self._callback(entry.failed, exc)

    @staticmethod
    def _callback(callback, value) -> None:
        if callback is None:
            return
        try:
            callback(value)
        except Exception:
            log.exception("journal callback failed")
