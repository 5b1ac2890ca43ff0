"""The shared event poller of one process and its subscriptions (SPEC 13.8; issue 15).

``EventHub`` follows the audit table (``mantle.events``) with one thread, ``mantle-events``,
while at least one stream is open: one query every ``poll_interval`` however many streams
there are. Each stream holds a ``Subscription`` that the poller fills with the events it
wants; the stream's own (waitress) thread writes them out.

PostgreSQL hands out ids when rows are inserted but they become visible at commit, so a row
can appear after rows with higher ids. The poller therefore never passes a missing id until
it has been missing for ``gap_wait`` seconds (a rolled-back insert leaves a hole forever);
transactions that write audit rows commit within milliseconds of taking their ids. SQLite
commits one writer at a time, in id order, so holes there are never waited for.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time

from mantle import events
from mantle.db import is_postgres, unwrap
from mantle.errors import MantleError
from web.errors import OUTAGE_ERRORS, reset_connection

__all__ = ["EventHub", "Subscription", "TooManyStreams", "wire"]

log = logging.getLogger("mantle.http")

_BATCH = 1000
# How far back (audit ids) an idle hub looks for rows still being committed (PostgreSQL).
_LOOK_BACK = 1000


def wire(event: events.Event) -> bytes:
    """The event as the stream sends it (``id``, ``event``, ``data`` lines, a blank line)."""
    data = json.dumps(event.data, separators=(",", ":"), ensure_ascii=False)
    return f"id: {event.id}\nevent: {event.kind}\ndata: {data}\n\n".encode()


class TooManyStreams(MantleError):
    def __init__(self, limit: int):
        super().__init__(f"too many event streams (limit {limit})")
        self.limit = limit


class Subscription:
    """The events one stream wants: of one execution, of one workflow, or all; only those
    positioned after ``floor`` (what the stream reads from the database itself)."""

    def __init__(self, hub: EventHub, execution_id: str | None, workflow: str | None,
                 floor: int, before: frozenset[int] = frozenset()):
        self.execution_id = execution_id
        self.workflow = workflow
        self.floor = floor
        self.before = before  # rows after ``floor`` committed before this began: not wanted
        self.closed = False
        self._hub = hub
        self._queue: collections.deque = collections.deque()
        self._ready = threading.Condition()

    @property
    def upto(self) -> int:
        """The last audit row id the poller had passed when this subscription began."""
        return self.floor // 2

    def wants(self, event: events.Event) -> bool:
        if event.id <= self.floor or event.id // 2 in self.before:
            return False
        if self.execution_id is not None:
            return event.execution_id == self.execution_id
        return self.workflow is None or event.workflow == self.workflow

    def push(self, batch: list[tuple[events.Event, bytes]]) -> None:
        """Called by the poller thread with (event, its ``wire`` form), formatted once for
        every stream."""
        wanted = [item for item in batch if self.wants(item[0])]
        if wanted:
            with self._ready:
                self._queue.extend(wanted)
                self._ready.notify()

    def get(self, timeout: float) -> list[tuple[events.Event, bytes]]:
        """The events queued so far, waiting up to ``timeout`` for one (stream thread)."""
        with self._ready:
            if not self._queue and not self.closed:
                self._ready.wait(timeout)
            taken = list(self._queue)
            self._queue.clear()
            return taken

    def end(self) -> None:
        """The hub is closing: wake the stream so that it ends."""
        with self._ready:
            self.closed = True
            self._ready.notify()

    def close(self) -> None:
        self._hub.release(self)


class EventHub:
    """Open streams (at most ``max_streams``) and the poller thread that feeds them."""

    def __init__(self, database, max_streams: int = 100, poll_interval: float = 0.2,
                 gap_wait: float = 3.0):
        self.max_streams = max_streams
        self._database = database
        self._interval = poll_interval
        self._gap_wait = gap_wait
        self._lock = threading.Condition()
        self._subscriptions: set[Subscription] = set()
        self._passed: int | None = None  # the last row id processed
        self._gaps: dict[int, float] = {}  # first missing id -> when it was first missed
        self._translator = events.Translator()
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def open_streams(self) -> int:
        return len(self._subscriptions)

    @property
    def database(self):
        return self._database

    def idle_connection(self) -> None:
        """Close the calling (stream) thread's database connection: the thread waits for a
        long time and may never read again; the next query on it reconnects."""
        try:
            database = unwrap(self._database)
            if not database.in_transaction():
                database.close()
        except Exception:  # nothing to close, or a broken connection: forget it
            pass

    def subscribe(self, execution_id: str | None = None, workflow: str | None = None,
                  since_now: bool = False) -> Subscription:
        """A subscription to events from now on; its ``upto`` is where the caller's own
        history ends. ``since_now`` (a stream that reads no history): the rows already
        committed that the poller has not passed yet are not handed to it, so it gets no
        event of the past (on PostgreSQL an idle hub starts before the ids still missing
        among the last ones: the rows after such a hole are old). Raises TooManyStreams at
        the limit (and once closed)."""
        with self._lock:
            if self._closed or len(self._subscriptions) >= self.max_streams:
                raise TooManyStreams(self.max_streams)
            if self._passed is None:
                self._passed, self._gaps = self._start()
            before = (frozenset(events.ids_between(self._passed, events.last_row_id()))
                      if since_now else frozenset())
            subscription = Subscription(self, execution_id, workflow, 2 * self._passed + 1,
                                        before)
            self._subscriptions.add(subscription)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="mantle-events",
                                                daemon=True)
                self._thread.start()
            self._lock.notify_all()
            return subscription

    def release(self, subscription: Subscription) -> None:
        with self._lock:
            self._subscriptions.discard(subscription)

    def close(self, timeout: float = 5.0) -> None:
        """End every stream and the poller (daemon shutdown)."""
        with self._lock:
            self._closed = True
            subscriptions = list(self._subscriptions)
            self._lock.notify_all()
            thread = self._thread
        for subscription in subscriptions:
            subscription.end()
        if thread is not None:
            thread.join(timeout)

    def _start(self) -> tuple[int, dict[int, float]]:
        """Where an idle hub starts following the audit table, and the ids it waits for.

        SQLite commits in id order: from the table's end. On PostgreSQL a transaction under
        way (another node's cancel, say) may hold ids below the table's end and commit after
        this: starting at the end would lose its rows, to live streams and to the history a
        new stream reads alike. So the hub starts before the first id missing among the last
        ``_LOOK_BACK`` and waits for each missing one as for any gap (``gap_wait``); a few
        rows committed just before the stream opened then come live rather than in its
        history."""
        last = events.last_row_id()
        if not is_postgres(self._database) or last == 0:
            return last, {}
        low = max(last - _LOOK_BACK, 0)
        present = set(events.ids_between(low, last))
        missing = [row_id for row_id in range(low + 1, last + 1) if row_id not in present]
        if not missing:
            return last, {}
        return missing[0] - 1, dict.fromkeys(missing, time.monotonic())

    # --- the poller thread ---

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._subscriptions and not self._closed:
                    # Idle: start afresh from the table's end at the next subscription
                    # rather than reading everything written meanwhile.
                    self._passed, self._gaps = None, {}
                    self._translator = events.Translator()
                    self._lock.wait()
                if self._closed:
                    return
                passed = self._passed
            try:
                full = self._poll(passed)
            except OUTAGE_ERRORS:
                reset_connection(self._database)
                full = False
            except Exception:  # keep following: a stream must not die with the poller
                log.exception("event poll failed")
                full = False
            if not full:
                with self._lock:
                    if not self._closed:
                        self._lock.wait(self._interval)

    def _poll(self, passed: int) -> bool:
        """Read, translate and hand out the rows after ``passed``; True when there may be
        more to read at once."""
        rows = events.rows_after(passed, _BATCH)
        ready = self._ready(rows, passed)
        batch = [(event, wire(event)) for event in self._translator.feed(ready)]
        with self._lock:
            if ready:
                self._passed = ready[-1].id
            subscriptions = list(self._subscriptions)
        for subscription in subscriptions:
            subscription.push(batch)
        return len(rows) == _BATCH and len(ready) == len(rows)

    def _ready(self, rows: list[events.Row], passed: int) -> list[events.Row]:
        """The rows that may be handed out: on PostgreSQL, up to the first id missing for
        less than ``gap_wait`` seconds."""
        if not rows or not is_postgres(self._database):
            return rows
        now = time.monotonic()
        expected, ready = passed + 1, []
        for row in rows:
            if row.id != expected:
                first = self._gaps.setdefault(expected, now)
                if now - first < self._gap_wait:
                    break
            ready.append(row)
            expected = row.id + 1
        self._gaps = {start: when for start, when in self._gaps.items() if start >= expected}
        return ready
