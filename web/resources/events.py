"""Server-Sent Events: ``GET /api/v1/executions/{id}/events`` and ``GET /api/v1/events``
(SPEC 13.8; event ids and their source: ``mantle.events``).

A stream is a WSGI body iterated by one waitress worker thread; ``mantle serve`` adds one
worker per allowed stream (``api.max_event_streams``) to the API's own, so open streams never
take a worker the API needs, and refuses streams beyond the limit with 503. While idle a stream
waits on its subscription (a condition), waking every second to notice a client that went
away, and writes a comment line every 15 s. It hands its thread's database connection back
after each read, so a hundred open streams do not hold a hundred PostgreSQL connections. A
database outage ends a stream (clients resume with ``Last-Event-ID``).
"""

from __future__ import annotations

import re
import time

from mantle import apikeys, events, queries
from mantle.db.models import WorkflowExecution
from mantle.db.fields import utcnow
from mantle.durations import parse_duration
from mantle.errors import ExecutionNotFound
from mantle.timefmt import rfc3339
from web.errors import OUTAGE_ERRORS, ApiError, reset_connection
from web.events import EventHub, Subscription, TooManyStreams, wire
from web.parsing import query_params

__all__ = ["ExecutionEvents", "AllEvents", "format_event", "KEEPALIVE", "EVENT_STREAM"]

EVENT_STREAM = "text/event-stream"
KEEPALIVE = 15.0
# A resumed stream of all executions also looks this many rows back for finishes that are
# placed after the resume point (their row is written before the execution's last rows).
_LOOKBACK = 2000
_LAST_ID = re.compile(r"[0-9]{1,18}")
_MAX_TIMEOUT = 86400.0
_GONE = (None, None, None)


def format_event(event: events.Event) -> bytes:
    return wire(event)


def _last_event_id(req) -> int:
    """The ``Last-Event-ID`` header, 0 without one. An id beyond every stored event, which
    this database never gave (a client of a database since restored from a backup, or of
    another one), counts as the newest event: the stream goes on with those written after."""
    text = req.get_header("Last-Event-ID")
    if text is None:
        return 0
    if not _LAST_ID.fullmatch(text):
        raise ApiError(400, "invalid Last-Event-ID header: must be an event id")
    after = int(text)
    return min(after, 2 * events.last_row_id() + 1) if after else 0


def _timeout(params: dict[str, str]) -> float | None:
    """``?timeout=``: a positive duration (2.3); longer than 24h counts as 24h."""
    text = params.get("timeout")
    if text is None:
        return None
    try:
        seconds = parse_duration(text)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:  # also NaN
        raise ApiError(400, "invalid timeout parameter: must be a positive duration such as "
                            "30s")
    return min(seconds, _MAX_TIMEOUT)


class _Body:
    """The response body: a generator plus a ``close`` that always gives the stream's slot
    back (waitress closes the body even when it never started iterating it)."""

    def __init__(self, generator, subscription: Subscription):
        self._generator = generator
        self._subscription = subscription

    def __iter__(self):
        return self

    def __next__(self) -> bytes:
        return next(self._generator)

    def close(self) -> None:
        try:
            self._generator.close()
        finally:
            self._subscription.close()


def _respond(resp, body: _Body) -> None:
    resp.content_type = EVENT_STREAM
    resp.set_header("Cache-Control", "no-cache")
    resp.set_header("X-Accel-Buffering", "no")  # a buffering proxy would hold events back
    resp.stream = body


def _subscribe(hub: EventHub, **what) -> Subscription:
    try:
        return hub.subscribe(**what)
    except TooManyStreams as full:
        raise ApiError(503, str(full), headers={"Retry-After": "5"}) from None


class _Waiter:
    """The live part of a stream: wait for events, keep-alive comments, the end conditions
    (the client left, the ``timeout`` parameter passed, the daemon is stopping, the API
    would no longer let the request in: its key was revoked or expired, or keys were
    created while it came without one)."""

    def __init__(self, req, hub: EventHub, subscription: Subscription,
                 timeout: float | None):
        self.subscription = subscription
        self._hub = hub
        self._key = req.context.get("key")
        self._gone = req.env.get("waitress.client_disconnected") or (lambda: False)
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._quiet_since = time.monotonic()

    def over(self) -> bool:
        expired = self._deadline is not None and time.monotonic() >= self._deadline
        return expired or self.subscription.closed or self._gone() or self._shut_out()

    def _shut_out(self) -> bool:
        """Whether ``web.auth.Authentication`` would refuse the request now. The keys are
        read at most once a second for the whole process (``apikeys.current_keys``); during
        an outage the stream goes on as its keys were."""
        try:
            keys = apikeys.current_keys()
        except OUTAGE_ERRORS:
            reset_connection(self._hub.database)
            return False
        finally:
            self._hub.idle_connection()
        if not keys:
            return False
        now = utcnow()
        return self._key is None or not any(
            key.name == self._key.name and not key.expired(now) for key in keys)

    def next(self) -> tuple[list[tuple[events.Event, bytes]], bool]:
        """((event, wire form) pairs, whether a keep-alive comment is due)."""
        wait = max(0.0, min(1.0, self._quiet_since + KEEPALIVE - time.monotonic()))
        if self._deadline is not None:
            wait = max(0.0, min(wait, self._deadline - time.monotonic()))
        got = self.subscription.get(wait)
        now = time.monotonic()
        if got:
            self._quiet_since = now
            return got, False
        if now - self._quiet_since >= KEEPALIVE:
            self._quiet_since = now
            return [], True
        return [], False


class ExecutionEvents:
    """One execution: its history from the database, then live, until ``execution.finished``."""

    def __init__(self, hub: EventHub):
        self._hub = hub

    def on_get(self, req, resp, id: str) -> None:  # noqa: A002 - the route's field name
        after = _last_event_id(req)
        timeout = _timeout(query_params(req))
        if not queries.is_uuid(id):
            raise ExecutionNotFound(id)
        row = (WorkflowExecution.select(WorkflowExecution.workflow_name,
                                        WorkflowExecution.status)
               .where(WorkflowExecution.id == id).first())
        if row is None:
            raise ExecutionNotFound(id)
        subscription = _subscribe(self._hub, execution_id=id)
        waiter = _Waiter(req, self._hub, subscription, timeout)
        final = row.status in events.FINAL
        _respond(resp, _Body(self._stream(id, row.workflow_name, final, after, waiter),
                             subscription))

    def _stream(self, execution_id: str, workflow: str, final: bool, after: int,
                waiter: _Waiter):
        try:
            yield from self._events(execution_id, workflow, final, after, waiter)
        except OUTAGE_ERRORS:  # the client resumes with Last-Event-ID once it is back
            reset_connection(self._hub.database)

    def _events(self, execution_id: str, workflow: str, final: bool, after: int,
                waiter: _Waiter):
        """``final``: the execution had ended when the stream opened."""
        upto = waiter.subscription.upto
        history, ended = events.execution_history(execution_id, workflow, after, upto)
        if final and not ended:  # its finish is not stored (retention) or not polled yet
            rest, ended = self._ended_meanwhile(execution_id, workflow,
                                                history[-1].id if history else after)
            history += rest
        self._hub.idle_connection()
        last = history[-1].id if history else after
        # The history in one write; with none, a comment: headers and a first byte, so that
        # clients see the stream is live.
        yield b"".join(map(format_event, history)) or b": stream open\n\n"
        if ended:
            return
        while not waiter.over():
            got, keepalive = waiter.next()
            chunk, ended = [], False
            for event, text in got:  # one write for what arrived together
                if event.id > last:
                    chunk.append(text)
                    last = event.id
                ended = ended or event.kind == "execution.finished"
            if chunk:
                yield b"".join(chunk)
            if ended:
                return
            if keepalive:
                yield b": keep-alive\n\n"
                rest, ended = self._ended_meanwhile(execution_id, workflow, last)
                self._hub.idle_connection()
                if rest:
                    yield b"".join(map(format_event, rest))
                if ended:
                    return

    @staticmethod
    def _ended_meanwhile(execution_id: str, workflow: str,
                         last: int) -> tuple[list[events.Event], bool]:
        """For a stream idle for a while, or of an execution that had ended when it opened:
        whether the execution has ended (or is gone) without the poller delivering its
        finish (it ended before migration 005, retention deleted its audit rows, or rows were
        written after its finish), and then the events after ``last`` from storage, the
        finish last (none when the client had it)."""
        status, error, completed = (
            WorkflowExecution.select(WorkflowExecution.status, WorkflowExecution.error,
                                     WorkflowExecution.completed_at)
            .where(WorkflowExecution.id == execution_id).tuples().first() or _GONE)
        if status is None:  # deleted by retention meanwhile: nothing more to tell
            return [], True
        if status not in events.FINAL:
            return [], False
        rest, ended = events.execution_history(execution_id, workflow, last, None)
        position = 2 * events.last_execution_row(execution_id) + 1
        if ended or last >= position:  # the client had it (or resumed from beyond it)
            return rest, True
        return rest + [events.Event(position, "execution.finished", execution_id, workflow,
                                    {"execution_id": execution_id, "workflow": workflow,
                                     "status": status, "error": error,
                                     "time": rfc3339(completed)})], True


class AllEvents:
    """Every execution (``?workflow=W``: one workflow's), live; with ``Last-Event-ID`` the
    events after it are read from the database first."""

    def __init__(self, hub: EventHub):
        self._hub = hub

    def on_get(self, req, resp) -> None:
        after = _last_event_id(req)
        params = query_params(req)
        timeout = _timeout(params)
        workflow = params.get("workflow")
        subscription = _subscribe(self._hub, workflow=workflow, since_now=not after)
        waiter = _Waiter(req, self._hub, subscription, timeout)
        _respond(resp, _Body(self._stream(after, workflow, waiter), subscription))

    def _stream(self, after: int, workflow: str | None, waiter: _Waiter):
        try:
            yield from self._events(after, workflow, waiter)
        except OUTAGE_ERRORS:  # the client resumes with Last-Event-ID once it is back
            reset_connection(self._hub.database)

    def _events(self, after: int, workflow: str | None, waiter: _Waiter):
        last = after
        if after:
            for event in self._history(after, waiter.subscription.upto, workflow):
                yield format_event(event)
                last = event.id
            self._hub.idle_connection()
        yield b": stream open\n\n"  # headers and a first byte, so clients see it is live
        while not waiter.over():
            got, keepalive = waiter.next()
            chunk = []
            for event, text in got:  # one write for what arrived together
                if event.id > last:
                    chunk.append(text)
                    last = event.id
            if chunk:
                yield b"".join(chunk)
            if keepalive:
                yield b": keep-alive\n\n"

    @staticmethod
    def _history(after: int, upto: int, workflow: str | None):
        translator = events.Translator()
        start = after // 2
        for finish in events.finished_rows_between(max(0, start - _LOOKBACK), start):
            for event in translator.expect_finish(finish, start):
                if event.id > after and (workflow is None or event.workflow == workflow):
                    yield event
        while start < upto:
            rows = [row for row in events.rows_after(start, 1000) if row.id <= upto]
            if not rows:
                break
            for event in translator.feed(rows):
                if event.id > after and (workflow is None or event.workflow == workflow):
                    yield event
            start = rows[-1].id
