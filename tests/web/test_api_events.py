"""Server-Sent Events (issue 15 item 11; SPEC 13.8, 13.1.2): history then live, resumption
with ``Last-Event-ID``, the stream of every execution, keep-alive comments, the stream limit,
streams of executions another process runs, ``mantle logs -f`` in-process and through a
server.

Over a real socket (``tests.web.served`` or a ``mantle serve`` subprocess), on SQLite and
PostgreSQL. A local HTTP server holds a step until the test releases it, so "live" is a fact
the test arranges, not a race it hopes to win.
"""

from __future__ import annotations

import datetime as dt
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

from mantle import apikeys, retention
from mantle.db import transaction
from mantle.db.fields import utcnow
from mantle.db.models import AuditEvent
from mantle.store.executions import cancel_execution
from tests.web.served import served
from tests.web.sse import open_stream
from tests.web.support import REPO, Daemon, apply_yaml, wait_until
from web.resources import events as event_resources
from web.settings import ApiSettings

HELD = """
    name: held
    steps:
      - {{name: first, action: core/log, params: {{message: hi}}}}
      - name: wait
        action: http/request
        depends_on: [first]
        params: {{url: "{url}"}}
      - {{name: last, action: core/log, depends_on: [wait], params: {{message: bye}}}}
    hooks:
      on_success: [{{name: notify, action: core/log, params: {{message: done}}}}]
"""
RETRIED = """
    name: retried
    steps:
      - name: call
        action: http/request
        retry: {{max_attempts: 2}}
        params: {{url: "{url}"}}
"""
GATED = """
    name: gated
    steps:
      - {{name: boom, action: core/fail, params: {{message: no}}}}
      - {{name: after, action: core/log, depends_on: [boom], params: {{message: x}}}}
    hooks:
      on_failure:
        - {{name: first-hook, action: core/log, params: {{message: h}}}}
        - {{name: gate, action: http/request, params: {{url: "{url}"}}}}
"""
OTHER = """
    name: other
    steps: [{name: only, action: core/log, params: {message: x}}]
"""


@pytest.fixture
def workflows(http_target, db):
    http_target.route("/hold", hold=True, body='{"ok": true}')
    http_target.route("/down", status=503)
    apply_yaml(HELD.format(url=http_target.url("/hold")))
    apply_yaml(RETRIED.format(url=http_target.url("/down")))
    http_target.route("/gate", hold=True, body='{"ok": true}')
    apply_yaml(GATED.format(url=http_target.url("/gate")))
    apply_yaml(OTHER)
    return http_target


@pytest.fixture
def api(engine, db, workflows):
    with served(engine, db) as server:
        yield server


def _kinds(events) -> list[tuple[str, str | None]]:
    return [(event.event, event.data.get("step")) for event in events]


def _held_run(api, target) -> str:
    """An execution of ``held`` whose ``wait`` step is running (held by the target)."""
    execution_id = api.post("/api/v1/run/held", {}).json["execution_id"]
    target.wait_for_hits("/hold", 1, timeout=10)
    return execution_id


def test_an_execution_stream_replays_history_then_goes_live_and_ends_after_it_finishes(
        api, workflows):
    execution_id = _held_run(api, workflows)
    with open_stream(api.url, f"/api/v1/executions/{execution_id}/events") as stream:
        assert stream.status == 200
        assert stream.headers["content-type"] == "text/event-stream"
        assert stream.headers["cache-control"] == "no-cache"
        history = [stream.next(10) for _ in range(4)]
        assert _kinds(history) == [("execution.started", None), ("step.started", "first"),
                                   ("step.finished", "first"), ("step.started", "wait")]
        workflows.release("/hold")  # from here on, events happen while the stream is open
        live = stream.rest(20)
        assert stream.ended
    assert _kinds(live) == [("step.finished", "wait"), ("step.started", "last"),
                            ("step.finished", "last"), ("step.started", "notify"),
                            ("step.finished", "notify"), ("execution.finished", None)]
    events = history + live
    ids = [event.id for event in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(event.data["execution_id"] == execution_id for event in events)
    assert all(event.data["workflow"] == "held" for event in events)
    assert all(event.data["time"].endswith("Z") for event in events)
    assert history[0].data["version"] == 1
    assert history[2].data == {**history[2].data, "attempt": 1, "status": "completed"}
    assert live[4].data["block"] == "on_success" and live[4].data["status"] == "completed"
    assert live[-1].data == {**live[-1].data, "status": "completed", "error": None}


def test_a_failed_attempt_that_is_retried_is_step_retrying(api, workflows):
    execution_id = api.post("/api/v1/run/retried", {}).json["execution_id"]
    with open_stream(api.url, f"/api/v1/executions/{execution_id}/events") as stream:
        events = stream.rest(30)
    assert _kinds(events) == [("execution.started", None), ("step.started", "call"),
                              ("step.retrying", "call"), ("step.started", "call"),
                              ("step.finished", "call"), ("execution.finished", None)]
    error = f"http/request: GET {workflows.url('/down')} returned 503"
    assert events[2].data == {**events[2].data, "attempt": 1, "error": error}
    assert "status" not in events[2].data
    assert events[3].data["attempt"] == 2
    assert events[4].data == {**events[4].data, "attempt": 2, "status": "failed",
                              "error": error}
    assert events[5].data == {**events[5].data, "status": "failed",
                              "error": f'step "call" failed: {error}'}


def test_last_event_id_resumes_after_that_event_without_loss(api, workflows):
    execution_id = _held_run(api, workflows)
    path = f"/api/v1/executions/{execution_id}/events"
    # Read two events, leave; the execution moves on meanwhile; come back after the second.
    with open_stream(api.url, path) as stream:
        seen = [stream.next(10), stream.next(10)]
    workflows.release("/hold")
    with open_stream(api.url, path, {"Last-Event-ID": str(seen[-1].id)}) as stream:
        resumed = stream.rest(20)
    with open_stream(api.url, path) as stream:
        everything = stream.rest(20)
    assert seen + resumed == everything
    assert len(everything) == 10
    # From any event of the finished execution: exactly the ones after it.
    for index, event in enumerate(everything):
        with open_stream(api.url, path, {"Last-Event-ID": str(event.id)}) as stream:
            assert stream.rest(10) == everything[index + 1:], event
    # An id beyond the end: the stream is over at once.
    with open_stream(api.url, path, {"Last-Event-ID": str(everything[-1].id + 1000)}) as stream:
        assert stream.rest(10) == []


def test_the_stream_of_all_executions_is_live_filtered_by_workflow_and_resumable(api, engine):
    with open_stream(api.url, "/api/v1/events?workflow=other") as only_other, \
            open_stream(api.url, "/api/v1/events") as everything:
        assert only_other.status == everything.status == 200
        first = api.post("/api/v1/run/other", {}).json["execution_id"]
        retried = api.post("/api/v1/run/retried", {}).json["execution_id"]
        second = api.post("/api/v1/run/other", {}).json["execution_id"]
        for execution_id in (first, retried, second):
            engine.wait(execution_id, timeout=20)
        got = only_other.until("execution.finished") + only_other.until("execution.finished")
        assert {event.data["workflow"] for event in got} == {"other"}
        assert [event.data["execution_id"] for event in got
                if event.event == "execution.finished"] == [first, second]
        seen = []
        while {e.data["execution_id"] for e in seen if e.event == "execution.finished"} != {
                first, retried, second}:
            seen.append(everything.next(20))
    ids = [event.id for event in seen]
    assert ids == sorted(ids)
    # Resuming the all-executions stream from its third event replays the rest, then ends at
    # the timeout.
    with open_stream(api.url, "/api/v1/events?timeout=500ms",
                     {"Last-Event-ID": str(seen[2].id)}) as stream:
        again = stream.rest(10)
    assert again[:len(seen) - 3] == seen[3:]


def test_an_idle_stream_sends_a_comment_every_keep_alive_interval(api, monkeypatch):
    monkeypatch.setattr(event_resources, "KEEPALIVE", 0.3)  # 15 s in production
    with open_stream(api.url, "/api/v1/events?timeout=2s") as stream:
        assert stream.rest(10) == []
    assert stream.comments[0] == "stream open"
    assert stream.comments.count("keep-alive") >= 3


def test_bad_stream_requests_are_refused(api):
    for path, headers, status, message in (
            ("/api/v1/executions/nope/events", {}, 404, 'execution "nope" not found'),
            (f"/api/v1/executions/{uuid.uuid4()}/events", {}, 404, None),
            ("/api/v1/events", {"Last-Event-ID": "abc"}, 400,
             "invalid Last-Event-ID header: must be an event id"),
            ("/api/v1/events?timeout=soon", {}, 400,
             "invalid timeout parameter: must be a positive duration such as 30s")):
        reply = api.get(path, headers=headers)
        assert reply.status == status, path
        if message:
            assert reply.json == {"error": message}


def test_streams_beyond_the_limit_are_refused_and_a_departed_client_frees_its_slot(
        engine, db, workflows):
    with served(engine, db, ApiSettings(max_event_streams=1)) as api:
        first = open_stream(api.url, "/api/v1/events")
        assert first.status == 200
        refused = api.get("/api/v1/events")
        assert (refused.status, refused.json) == (503, {
            "error": "too many event streams (limit 1)"})
        assert refused.headers["retry-after"] == "5"
        assert api.get("/api/v1/workflows").status == 200  # the API itself is not affected
        first.close()
        wait_until(lambda: api.runtime.hub.open_streams == 0, timeout=10,
                   message="the departed client's stream kept its slot")
        with open_stream(api.url, "/api/v1/events?timeout=100ms") as again:
            assert again.status == 200


def test_an_execution_run_by_another_process_is_streamed_from_the_database(
        tmp_path, engine, db, migrated_db_url, workflows):
    daemon = Daemon(tmp_path, migrated_db_url).start()
    try:
        # This test process owns the execution; the daemon only reads what it stores.
        execution_id = engine.run("held", {}).execution_id
        workflows.wait_for_hits("/hold", 1, timeout=10)
        with open_stream(daemon.url, f"/api/v1/executions/{execution_id}/events") as stream:
            assert stream.next(10).event == "execution.started"
            workflows.release("/hold")
            events = stream.rest(20)
        assert _kinds(events)[-1] == ("execution.finished", None)
        assert [kind for kind, _ in _kinds(events)].count("step.finished") == 4
    finally:
        daemon.stop()


def test_stopping_the_daemon_ends_open_streams(tmp_path, db, migrated_db_url):
    daemon = Daemon(tmp_path, migrated_db_url, args=("--shutdown-timeout", "20s")).start()
    stream = open_stream(daemon.url, "/api/v1/events")
    try:
        assert stream.status == 200
        started = time.monotonic()
        daemon.send(signal.SIGTERM)
        assert stream.rest(10) == []
        assert daemon.wait(10) == 0
        assert time.monotonic() - started < 10  # not held until the shutdown timeout
    finally:
        stream.close()
        daemon.stop()


def _mantle(cwd, database_url: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mantle", *args, "--database-url",
                             database_url], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO),
                                 "HOME": str(cwd)})


class _Lines:
    """A subprocess's stdout lines, read on a thread, awaited with deadlines."""

    def __init__(self, process: subprocess.Popen):
        self.lines: list[str] = []
        self._process = process
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self._process.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, line: str, timeout: float = 20.0) -> None:
        wait_until(lambda: line in self.lines, timeout=timeout,
                   message=f"never printed {line!r}: {self.lines}")

    def finish(self, timeout: float = 30.0) -> tuple[int, list[str], str]:
        code = self._process.wait(timeout)
        self._thread.join(5)
        return code, self.lines, self._process.stderr.read()


@pytest.mark.parametrize("through", ["database", "server"])
def test_mantle_logs_follow_prints_steps_as_they_finish_and_exits_at_the_end(
        through, tmp_path, engine, db, migrated_db_url, workflows):
    daemon = Daemon(tmp_path, migrated_db_url).start() if through == "server" else None
    try:
        execution_id = engine.run("held", {}).execution_id
        workflows.wait_for_hits("/hold", 1, timeout=10)
        extra = ("--server", daemon.url) if daemon else ()
        follower = _Lines(_mantle(tmp_path, migrated_db_url, "logs", "-f", execution_id,
                                  *extra))
        follower.wait_for("  first: completed")  # printed while the execution still runs
        assert len(follower.lines) == 1
        workflows.release("/hold")
        code, lines, stderr = follower.finish()
        assert (code, stderr) == (0, "")
        assert lines == ["  first: completed", "  wait: completed", "  last: completed",
                         "  notify (hook): completed", f"Execution {execution_id}: completed"]
        # A failed one: the same lines, exit 1 and the error, as ``mantle run``.
        failed = engine.run("retried", {}).execution_id
        code, lines, stderr = _Lines(_mantle(tmp_path, migrated_db_url, "logs", "-f", failed,
                                             *extra)).finish()
        assert code == 1
        assert lines == ["  call: failed", f"Execution {failed}: failed"]
        assert stderr.startswith('Error: step "call" failed: http/request: GET ')
        # Followed during its hooks: a step that never started (cancelled after the failure)
        # is printed with the main steps, before the hooks, as ``mantle run`` prints it.
        gated = engine.run("gated", {}).execution_id
        workflows.wait_for_hits("/gate", 1, timeout=10)
        follower = _Lines(_mantle(tmp_path, migrated_db_url, "logs", "-f", gated, *extra))
        follower.wait_for("  first-hook (hook): completed")
        workflows.release("/gate")
        code, lines, stderr = follower.finish()
        assert (code, stderr) == (1, 'Error: step "boom" failed: no\n')
        assert lines == ["  boom: failed", "  after: cancelled", "  first-hook (hook): completed",
                         "  gate (hook): completed", f"Execution {gated}: failed"]
    finally:
        if daemon:
            daemon.stop()


def test_mantle_logs_follow_of_an_unknown_execution_is_an_error(tmp_path, db, migrated_db_url):
    missing = str(uuid.uuid4())
    code, lines, stderr = _Lines(_mantle(tmp_path, migrated_db_url, "logs", "-f",
                                         missing)).finish()
    assert (code, lines, stderr) == (1, [], f'Error: execution "{missing}" not found\n')


def test_open_streams_hand_their_database_connections_back(backend, engine, db, workflows):
    if backend != "postgres":
        pytest.skip("SQLite connections are file handles, not server sessions")

    def sessions() -> int:
        return db.execute_sql("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                              "current_database()").fetchone()[0]

    done = engine.run("other", {}).execution_id
    assert engine.wait(done, timeout=10) == "completed"
    with served(engine, db, ApiSettings(max_event_streams=20), threads=2) as api:
        running = _held_run(api, workflows)
        before = sessions()
        streams = [open_stream(api.url, f"/api/v1/executions/{running}/events")
                   for _ in range(8)]
        streams += [open_stream(api.url, "/api/v1/events", {"Last-Event-ID": "1"})
                    for _ in range(8)]
        try:
            for stream in streams[:8]:
                assert stream.next(10).event == "execution.started"
            # 16 open streams have read history; the poller holds one session of its own.
            assert sessions() - before <= 2
        finally:
            workflows.release("/hold")
            for stream in streams:
                stream.close()


# --- rows committed out of id order (PostgreSQL) ---


LATER = """
    name: later
    steps: [{name: only, action: core/log, params: {message: x}}]
"""


class _HeldCancel:
    """A cancel from another node (``mantle.store.executions.cancel_execution``, what any
    process's ``POST /cancel`` commits) whose transaction has written its rows, so its
    ``execution.finished`` audit row already has its id, but has not committed yet: the
    window PostgreSQL gives every transaction between taking ids and becoming visible."""

    def __init__(self, db, execution_id: str):
        self._db = db
        self._id = execution_id
        self.written = threading.Event()
        self.commit = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self.written.wait(10), f"the cancel never wrote: {self.error!r}"

    def _run(self) -> None:
        try:
            with transaction(self._db):
                assert cancel_execution(self._id, "cli") is not None
                self.written.set()
                assert self.commit.wait(30)
        except BaseException as exc:  # reported by the test
            self.error = exc
            self.written.set()

    def release(self) -> None:
        self.commit.set()
        self._thread.join(10)
        assert self.error is None, repr(self.error)


def _held_running(api, http_target) -> str:
    execution_id = api.post("/api/v1/run/held", {}).json["execution_id"]
    http_target.wait_for_hits("/hold", 1, timeout=10)
    return execution_id


_POSTGRES = pytest.mark.parametrize("backend", ["postgres"], indirect=True)


def _finish_row_id(execution_id: str) -> int:
    return (AuditEvent.select(AuditEvent.id)
            .where(AuditEvent.action == "execution.finished",
                   AuditEvent.resource_id == execution_id).scalar() or 0)


@_POSTGRES
def test_a_finish_committed_after_a_stream_opened_on_an_idle_server_is_streamed_live(
        api, db, http_target):
    """SPEC 13.8: a stream of one execution goes live after its history and "ends after
    execution.finished"; docs/api.md: streams "see executions run by any process or host".

    On PostgreSQL a row's id is taken at insert and the row becomes visible at commit. The
    poller of an idle server started from ``MAX(id)``, so a finish whose transaction took
    its id before that maximum and committed after the stream opened was neither in the
    history (not visible yet) nor live (below the start): the stream did not end when the
    execution did, only at the 15 s keep-alive's status check. (SQLite commits one writer
    at a time, in id order.)"""
    execution_id = _held_running(api, http_target)
    cancel = _HeldCancel(db, execution_id)  # another node's cancel, mid-commit
    try:
        apply_yaml(LATER)  # any later audit row that commits first (workflow.applied)
        path = f"/api/v1/executions/{execution_id}/events"
        with open_stream(api.url, path) as stream:
            history = [stream.next(10) for _ in range(4)]
            assert [e.event for e in history][-1] == "step.started"
            cancel.release()
            assert _finish_row_id(execution_id) > 0  # committed: the execution is over
            assert "cancelled" == api.get(f"/api/v1/executions/{execution_id}").json["status"]
            started = time.monotonic()
            # The poller reads every 200 ms; give it 5 s (well under the 15 s keep-alive,
            # whose status check is the only other way out).
            try:
                event = stream.next(5)
            except AssertionError:
                event = None
            assert event is not None and event.event == "execution.finished", (
                f"no execution.finished within {time.monotonic() - started:.1f}s of the "
                f"commit (finish row {_finish_row_id(execution_id)}); got {event}")
    finally:
        cancel.commit.set()


@_POSTGRES
def test_the_stream_of_all_executions_gets_a_finish_committed_after_it_opened(
        api, db, http_target):
    """docs/api.md: ``GET /api/v1/events`` "follows every execution ... from now on". The
    execution ends (its cancel commits) after the stream opened: its ``execution.finished``
    arrives, where an idle server's poller used to begin after its row's id and lose it."""
    execution_id = _held_running(api, http_target)
    cancel = _HeldCancel(db, execution_id)
    try:
        apply_yaml(LATER)
        with open_stream(api.url, "/api/v1/events?workflow=held") as stream:
            assert stream.status == 200
            cancel.release()
            assert _finish_row_id(execution_id) > 0
            got = []
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline:
                try:
                    event = stream.next(max(0.05, deadline - time.monotonic()))
                except AssertionError:
                    break
                got.append(event)
                if event is None or event.event == "execution.finished":
                    break
            assert [e.event for e in got if e] == ["execution.finished"], (
                f"finish row {_finish_row_id(execution_id)} committed after the stream "
                f"opened, stream gave {got}")
    finally:
        cancel.commit.set()


def test_a_stream_of_all_executions_goes_on_after_retention_deleted_every_audit_event(
        api, engine):
    """SPEC 13.4/13.8: an audit retention sweep that finds every audit event expired (a
    server idle for longer than ``audit_days``) deletes them all; the events written after
    it still reach an open stream of all executions, with ids above those it gave before
    (which a client resumes from with ``Last-Event-ID``). On SQLite a table's next row id
    was the largest left plus one: after such a sweep the ids began again at 1, below where
    the open streams (and the poller feeding them) stood, and they never saw those rows."""
    with open_stream(api.url, "/api/v1/events?workflow=other") as stream:
        for _ in range(3):
            api.post("/api/v1/run/other", {})
        before = [stream.until("execution.finished", 20)[-1] for _ in range(3)]
        later = utcnow() + dt.timedelta(days=3)
        assert retention.sweep(retention.Retention(audit_days=1), now=later).audit > 0
        after = api.post("/api/v1/run/other", {}).json["execution_id"]
        got = stream.until("execution.finished", 10)
    assert got[-1].data["execution_id"] == after
    assert min(event.id for event in got) > max(event.id for event in before)


@_POSTGRES
def test_a_new_stream_of_all_executions_on_an_idle_server_gets_no_old_events(api, db):
    """docs/api.md: ``GET /api/v1/events`` follows every execution from now on. PostgreSQL
    leaves holes in the audit ids (a rolled-back transaction's, or rows retention deleted);
    the executions that ended before the stream opened are not streamed to it."""
    api.post("/api/v1/run/other", {})
    wait_until(lambda: AuditEvent.select().where(
        AuditEvent.action == "execution.finished").count() == 1)
    with transaction():  # rolled back: a hole in the ids
        AuditEvent.insert(timestamp=utcnow(), actor="cli", action="x", resource_type="x",
                          resource_id="x", metadata={}).execute()
        db.rollback()
    api.post("/api/v1/run/other", {})
    wait_until(lambda: AuditEvent.select().where(
        AuditEvent.action == "execution.finished").count() == 2)
    with open_stream(api.url, "/api/v1/events?timeout=5s") as stream:
        assert stream.rest(10) == []


def test_the_stream_of_a_finished_execution_whose_events_retention_deleted_ends_at_once(
        api, engine):
    """docs/api.md: an execution's stream "ends after execution.finished (at once for a
    finished execution)". ``retention.audit_days`` may be shorter than ``execution_days``:
    the execution stays while its audit rows, the stream's history, are gone. Its stream
    waited for the first keep-alive (15 s) to notice that the execution had ended; it now
    sends the finish from the execution's row at once and ends."""
    execution_id = api.post("/api/v1/run/other", {}).json["execution_id"]
    engine.wait(execution_id, timeout=10)
    # SQLite keeps the newest audit row of all: make it another execution's.
    engine.wait(api.post("/api/v1/run/other", {}).json["execution_id"], timeout=10)
    later = utcnow() + dt.timedelta(days=3)
    assert retention.sweep(retention.Retention(audit_days=1), now=later).audit > 0
    started = time.monotonic()
    with open_stream(api.url, f"/api/v1/executions/{execution_id}/events") as stream:
        got = stream.rest(10)
    assert [(event.event, event.data["status"]) for event in got] == \
        [("execution.finished", "completed")]
    assert time.monotonic() - started < 5
    assert got[0].data["time"] == api.get(f"/api/v1/executions/{execution_id}").json[
        "completed_at"]
    # Resumed after that finish (or from beyond it): nothing more, and the stream ends.
    for resume in (got[0].id, got[0].id + 100):
        with open_stream(api.url, f"/api/v1/executions/{execution_id}/events",
                         {"Last-Event-ID": str(resume)}) as stream:
            assert stream.rest(5) == []


def test_a_stream_of_all_executions_resumed_from_beyond_every_event_still_goes_live(
        api, engine):
    """docs/api.md: ``GET /api/v1/events`` follows every execution from now on, and a
    ``Last-Event-ID`` resumes right after that event. An id beyond every stored event (a
    client of a database since restored from a backup, or of another server) was taken as
    the stream's position: every later event, its id below it, was dropped and the stream
    stayed silent. Such an id now resumes from the newest event."""
    engine.wait(api.post("/api/v1/run/other", {}).json["execution_id"], timeout=10)
    with open_stream(api.url, "/api/v1/events?workflow=other",
                     {"Last-Event-ID": str(10**15)}) as stream:
        assert stream.status == 200
        later = api.post("/api/v1/run/other", {}).json["execution_id"]
        got = stream.until("execution.finished", 10)
    assert {event.data["execution_id"] for event in got} == {later}


def test_an_open_stream_ends_once_its_key_no_longer_opens_the_api(api, workflows):
    """docs/api.md: a key revoked by ``mantle keys`` applies within 1 s, an expired key is
    refused, and once a key exists every request needs one. A stream is one request that
    goes on for hours: streams opened with a key that was then revoked or expired, or
    opened while the API was open and keys then created, went on sending every event."""
    execution_id = _held_run(api, workflows)
    path = f"/api/v1/executions/{execution_id}/events"
    with open_stream(api.url, "/api/v1/events") as unauthenticated:
        assert unauthenticated.status == 200
        key = apikeys.create_key("watcher", role="viewer")
        assert unauthenticated.rest(10) == []  # ended, within the 10 s
    bearer = {"Authorization": f"Bearer {key}"}
    short = {"Authorization": f"Bearer {apikeys.create_key('short', expires_in=1)}"}
    with open_stream(api.url, "/api/v1/events", bearer) as revoked, \
            open_stream(api.url, path, short) as expiring:
        assert revoked.status == expiring.status == 200
        assert len([expiring.next(10) for _ in range(4)]) == 4  # its history
        apikeys.revoke_key("watcher")
        assert revoked.rest(10) == []
        assert expiring.rest(10) == []
    workflows.release("/hold")
