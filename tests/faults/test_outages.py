"""Database outages under a running daemon (issue 6; SPEC 4.11, 7.5, 10.2).

``MANTLE_OUTAGE_EXECUTIONS`` (50) executions of ``first`` (http/request to a local counting
server) -> ``nap`` (core/sleep) -> ``second`` (http/request) -> ``done`` (core/log) are started
over REST, and the database goes away while every one of them is in ``nap``; the naps end during
the outage, so each execution has a checkpoint waiting. During the outage the daemon stays up,
``/healthz`` answers 200 and ``/readyz`` 503 ``{"database": "unreachable"}``; afterwards every
execution is ``completed`` with one attempt per step, no step attempt failed, ``second`` started
only after the outage, and the counting server saw every call exactly once.

PostgreSQL: the test's own cluster is stopped (``pg_ctl stop -m fast``) for
``MANTLE_OUTAGE_PG_SECONDS`` (20) and started again on the same port. Every DB-backed call
(list, detail, workflows, run, cancel) answers 503 ``{"error": "database unavailable"}``.

SQLite: another process holds the write lock (``BEGIN EXCLUSIVE`` plus an UPDATE) for
``MANTLE_OUTAGE_SQLITE_SECONDS`` (10). What such a lock does to the daemon (WAL mode):

- It blocks writers only. In WAL mode ``BEGIN EXCLUSIVE`` is the same lock as ``BEGIN
  IMMEDIATE``; readers go on reading the last committed state, so list, detail and workflows
  answer 200 throughout (only ``PRAGMA locking_mode=EXCLUSIVE`` in the other process would
  lock readers out as well).
- The journal's commits wait in SQLite's busy handler (10 s) instead of failing, so a lock
  shorter than that logs no "database unavailable"; the waiting checkpoints commit the moment
  the lock goes and the executions carry on.
- ``/readyz``: a read succeeds, so the probe also takes the write lock (waiting 1.5 s at most)
  and answers 503 while it cannot. Before that fix it answered 200 through the lock.
- ``POST /run`` and ``/cancel`` go through the journal. Once a commit has waited 2 s the
  journal counts as unhealthy and they answer 503 at once; a run already queued when its
  caller gave up (10 s) is dropped, not created later, so retrying it makes no duplicate.
  Before those fixes they waited up to 10 s and a run answered 503 was created anyway; the
  two regression tests at the end pin both.
- While a daemon has the file open, another process cannot take ``locking_mode=EXCLUSIVE``
  ("database is locked"), so in practice only writers can be locked out.

Each outage prints a summary table. CI runs the defaults: about 25 s on PostgreSQL and 15 s on
SQLite; the whole file, with the regression tests, about a minute.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import parse_qs, urlsplit

import psycopg
import pytest

from mantle import db as mantle_db
from mantle import store
from mantle.daemon.readiness import Readiness
from mantle.db import migrations, transaction
from mantle.db.fields import utcnow
from mantle.db.models import StepExecution, WorkflowExecution
from tests.web.support import Daemon, apply_yaml, call, wait_until
from tests.helpers.database import bound_database
from tests.helpers.pgproxy import CommitCutter
from tests.pg import PausableCluster, started_or_skip

EXECUTIONS = int(os.environ.get("MANTLE_OUTAGE_EXECUTIONS", "50"))
PG_SECONDS = float(os.environ.get("MANTLE_OUTAGE_PG_SECONDS", "20"))
SQLITE_SECONDS = float(os.environ.get("MANTLE_OUTAGE_SQLITE_SECONDS", "10"))
STEPS = ("first", "nap", "second", "done")

OK = {"status": "ok"}
NOT_READY = {"status": "unavailable", "details": {"database": "unreachable"}}
UNAVAILABLE = {"error": "database unavailable"}
AFTER = """
    name: after
    steps: [{name: only, action: core/log, params: {message: after}}]
"""


def _nap(outage: float) -> float:
    """Long enough for all executions to be in ``nap`` when the outage begins, short enough
    to end during it."""
    return max(1.0, min(5.0, outage / 2))


def _workflows(target, nap: float) -> None:
    params = "{url: \"%s?e={{ execution.id }}\"}"  # calls counted per execution
    apply_yaml(f"""
        name: outage
        steps:
          - {{name: first, action: http/request, params: {params % target.url('/first')}}}
          - {{name: nap, action: core/sleep, depends_on: [first], params: {{duration: {nap}s}}}}
          - {{name: second, action: http/request, depends_on: [nap],
             params: {params % target.url('/second')}}}
          - {{name: done, action: core/log, depends_on: [second], params: {{message: done}}}}
    """)
    apply_yaml(AFTER)


def _stamp(moment) -> str:
    """A UTC datetime the way the API prints it, so the two compare as text."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f")[:23] + "Z"


class SqliteLock:
    """Another process holding the SQLite write lock until ``end()`` (or until the test dies:
    it lets go when its stdin closes)."""

    SCRIPT = textwrap.dedent("""
        import sqlite3, sys
        conn = sqlite3.connect(sys.argv[1], isolation_level=None)
        conn.execute("BEGIN EXCLUSIVE")
        conn.execute("UPDATE nodes SET lease_expires_at = lease_expires_at")  # a writer mid-work
        print("locked", flush=True)
        sys.stdin.readline()
        conn.execute("ROLLBACK")
        print("released", flush=True)
    """)

    def __init__(self, path):
        self.path = str(path)
        self.process: subprocess.Popen | None = None

    def begin(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", self.SCRIPT, self.path],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True)
        assert self.process.stdout.readline().strip() == "locked"

    def end(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.stdin.write("\n")
        self.process.stdin.close()
        assert self.process.stdout.readline().strip() == "released"
        self.process.wait(10)
        self.process.stdout.close()


class Run:
    """One outage: the daemon, the executions, what was answered and when."""

    def __init__(self, backend: str, daemon: Daemon, url: str, target):
        self.backend, self.daemon, self.url, self.target = backend, daemon, url, target
        self.ids: list[str] = []
        self.seen: Counter = Counter()  # call name -> 503 answers during the outage
        self.began = self.ended = None  # UTC datetimes
        self.seconds = 0.0
        self.started = time.monotonic()

    def submit(self) -> None:
        def one(_):
            return self.daemon.post("/api/v1/run/outage", {})

        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(one, range(EXECUTIONS)))
        assert [r.status for r in replies] == [202] * EXECUTIONS, replies[0].body
        self.ids = [r.json["execution_id"] for r in replies]

    def wait_all_napping(self) -> None:
        """Every execution ``running`` with its ``nap`` running and none finished."""
        with bound_database(self.url):
            def napping():
                return StepExecution.select().where(StepExecution.step_name == "nap",
                                                    StepExecution.status == "running"
                                                    ).count() == EXECUTIONS

            wait_until(napping, timeout=60, interval=0.05,
                       message="the executions never all reached their nap")
            statuses = Counter(e.status for e in WorkflowExecution.select())
            assert statuses == {"running": EXECUTIONS}, statuses

    def outage(self, begin, end, seconds: float, checks) -> None:
        """``begin()``, then ``checks`` again and again for ``seconds``, then ``end()``."""
        self.began = utcnow()
        until = time.monotonic() + seconds
        begin()
        try:
            wait_until(lambda: self.daemon.get("/readyz").json == NOT_READY, timeout=10,
                       interval=0.1, message="/readyz never turned 503")
            # A round may take a probe's 2 s: stop early enough to end within the outage.
            while time.monotonic() < until - 2.5:
                self._round(checks)
                time.sleep(0.25)  # pacing only: the outage's own duration is the wait
            time.sleep(max(0.0, until - time.monotonic()))  # the rest of the outage
            assert self.target.hits("/second") == 0, "a step started during the outage"
        finally:
            self.ended = utcnow()
            end()
            self.seconds = (self.ended - self.began).total_seconds()

    def _round(self, checks) -> None:
        assert self.daemon.process.poll() is None, self.daemon.output()
        for name, method, path, status, body in checks:
            reply = self.daemon.request(method, path, "{}" if method == "POST" else None,
                                        {"Content-Type": "application/json"})
            answer = reply.json if body is not None else None
            assert (reply.status, answer) == (status, body), (name, reply.status, reply.body)
            if reply.status == 503:
                self.seen[name] += 1

    def finish(self) -> dict[str, dict]:
        """Wait for every execution to end after the outage; their details by id."""
        wait_until(lambda: self.daemon.get("/readyz").status == 200, timeout=30,
                   message="/readyz did not return to 200 after the outage")

        def ended():
            listed = self.daemon.get("/api/v1/executions?workflow=outage&limit=1000").json
            return all(e["status"] != "running" for e in listed["executions"])

        wait_until(ended, timeout=60, interval=0.2, message="executions did not finish")
        return {i: self.daemon.get(f"/api/v1/executions/{i}").json for i in self.ids}


def _pg_checks(execution_id: str) -> list[tuple]:
    return [
        ("healthz", "GET", "/healthz", 200, OK),
        ("readyz", "GET", "/readyz", 503, NOT_READY),
        ("list", "GET", "/api/v1/executions", 503, UNAVAILABLE),
        ("detail", "GET", f"/api/v1/executions/{execution_id}", 503, UNAVAILABLE),
        ("workflows", "GET", "/api/v1/workflows", 503, UNAVAILABLE),
        ("run", "POST", "/api/v1/run/outage", 503, UNAVAILABLE),
        ("cancel", "POST", f"/api/v1/cancel/{uuid.uuid4()}", 503, UNAVAILABLE),
    ]


def _sqlite_checks(execution_id: str) -> list[tuple]:
    # Reads keep working under another process's write lock in WAL mode. Run and cancel
    # answer 503 only once a checkpoint has waited 2 s, which the regression tests at the
    # end check on an idle daemon; here they would race the executions' own checkpoints.
    return [
        ("healthz", "GET", "/healthz", 200, OK),
        ("readyz", "GET", "/readyz", 503, NOT_READY),
        ("list", "GET", "/api/v1/executions", 200, None),
        ("detail", "GET", f"/api/v1/executions/{execution_id}", 200, None),
        ("workflows", "GET", "/api/v1/workflows", 200, None),
    ]


def _verify(run: Run, details: dict[str, dict], capsys) -> None:
    """Every execution completed once, each step once, nothing started during the outage."""
    hits = Counter()
    for path in ("/first", "/second"):
        for received in run.target.requests(path):
            hits[(parse_qs(urlsplit(received.target).query)["e"][0], path)] += 1
    with bound_database(run.url):
        rows = Counter(r.status for r in StepExecution.select())
        executions = WorkflowExecution.select().where(WorkflowExecution.workflow_name == "outage")
        created = {e.id for e in executions}
    statuses = Counter(d.get("status", "lost") for d in details.values())
    lost = EXECUTIONS - len(created & set(run.ids))
    reruns = sum(n - 1 for n in hits.values() if n > 1) + sum(rows.values()) - 4 * EXECUTIONS
    naps = [s for d in details.values() for s in d.get("steps", []) if s["name"] == "nap"]
    held = sum(1 for s in naps if _stamp(run.began) < s["completed_at"] < _stamp(run.ended))
    with capsys.disabled():
        print(f"\ndatabase outage [{run.backend}] {time.monotonic() - run.started:.1f}s\n"
              f"  {'executions':<18}{EXECUTIONS}\n"
              f"  {'completed':<18}{statuses['completed']}\n"
              f"  {'failed':<18}{statuses['failed']}\n"
              f"  {'lost':<18}{lost}\n"
              f"  {'steps re-run':<18}{reruns}\n"
              f"  {'outage seconds':<18}{run.seconds:.1f}\n"
              f"  {'checkpoints held':<18}{held}\n"
              f"  {'503s seen':<18}{sum(run.seen.values())} "
              f"({', '.join(f'{k} {v}' for k, v in sorted(run.seen.items()))})")
    assert statuses == {"completed": EXECUTIONS} and lost == 0
    assert created == set(run.ids), "an execution was created that no 202 announced"
    assert rows == {"completed": 4 * EXECUTIONS}, rows  # one attempt per step, none failed
    assert reruns == 0 and set(hits.values()) == {1} and len(hits) == 2 * EXECUTIONS
    assert held == EXECUTIONS, "a nap ended outside the outage: its checkpoint never waited"
    outage_ended = _stamp(run.ended)
    for detail in details.values():
        steps = {s["name"]: s for s in detail["steps"]}
        assert [steps[n]["status"] for n in STEPS] == ["completed"] * 4, detail
        assert [steps[n]["attempt"] for n in STEPS] == [1] * 4, detail
        assert steps["nap"]["completed_at"] < outage_ended < steps["second"]["started_at"]


def _run_after_recovery(daemon: Daemon) -> None:
    reply = daemon.post("/api/v1/run/after", {})
    assert reply.status == 202, reply.body
    assert daemon.wait_for_status(reply.json["execution_id"])["status"] == "completed"


@pytest.fixture
def cluster():
    """A cluster of the test's own (the session's is shared), which it may stop."""
    started = started_or_skip(PausableCluster())
    yield started
    started.stop()


@pytest.mark.postgres
def test_postgres_stopped_under_running_executions_pauses_them_and_all_complete(
        cluster, http_target, tmp_path, capsys):
    url = cluster.create_database("mantle")
    http_target.route("/first", body="one")
    http_target.route("/second", body="two")
    with bound_database(url) as database:
        migrations.migrate(database)
        _workflows(http_target, _nap(PG_SECONDS))
    daemon = Daemon(tmp_path, url).start()
    run = Run("postgres", daemon, url, http_target)
    try:
        run.submit()
        run.wait_all_napping()

        def begin():
            cluster.pause()
            # The journal must have noticed before a run can be refused without waiting.
            daemon.wait_for_log("database unavailable", timeout=10)

        run.outage(begin, cluster.resume, PG_SECONDS, _pg_checks(run.ids[0]))
        details = run.finish()
        _verify(run, details, capsys)
        # the daemon's log lines are written by a thread of their own: wait for it
        daemon.wait_for_log("database available again")
        assert daemon.messages().count("database unavailable") == 1
        _run_after_recovery(daemon)
    finally:
        assert daemon.stop() == 0, daemon.output()


def test_sqlite_write_lock_under_running_executions_pauses_them_and_all_complete(
        http_target, tmp_path, capsys):
    path = tmp_path / "mantle.db"
    url = f"sqlite:///{path}"
    http_target.route("/first", body="one")
    http_target.route("/second", body="two")
    with bound_database(url) as database:
        migrations.migrate(database)
        _workflows(http_target, _nap(SQLITE_SECONDS))
    daemon = Daemon(tmp_path, url).start()
    run = Run("sqlite", daemon, url, http_target)
    lock = SqliteLock(path)
    try:
        run.submit()
        run.wait_all_napping()
        run.outage(lock.begin, lock.end, SQLITE_SECONDS, _sqlite_checks(run.ids[0]))
        details = run.finish()
        _verify(run, details, capsys)
        _run_after_recovery(daemon)
    finally:
        lock.end()
        assert daemon.stop() == 0, daemon.output()


# --- regressions -------------------------------------------------------------------------


def test_readiness_reports_a_sqlite_write_lock_held_elsewhere_and_holds_none_itself(tmp_path):
    path = tmp_path / "ready.db"
    with bound_database(f"sqlite:///{path}") as database:
        migrations.migrate(database)
        readiness = Readiness(database).start()
        readiness.mark_ready()
        assert readiness.check() == (True, {})
        other = sqlite3.connect(path, isolation_level=None, timeout=0)
        try:
            other.execute("BEGIN EXCLUSIVE")
            assert other.execute("SELECT count(*) FROM workflow_executions").fetchone() == (0,)
            wait_until(lambda: readiness.check() == (False, {"database": "unreachable"}),
                       timeout=10)
            other.execute("ROLLBACK")
            wait_until(lambda: readiness.check() == (True, {}), timeout=10)
            other.execute("BEGIN IMMEDIATE")  # timeout 0: fails if the probe kept the lock
            other.execute("ROLLBACK")
        finally:
            other.close()
            readiness.stop()  # else its thread probes on, logging, through later tests


def _lock_idle_daemon(tmp_path):
    path = tmp_path / "mantle.db"
    url = f"sqlite:///{path}"
    with bound_database(url) as database:
        migrations.migrate(database)
        apply_yaml(AFTER)
    return Daemon(tmp_path, url).start(), SqliteLock(path), url


def _post_in_background(daemon: Daemon, path: str) -> threading.Thread:
    thread = threading.Thread(target=daemon.post, args=(path, {}))
    thread.start()
    return thread


def _accepted(reply):
    assert reply.status in (202, 503), reply.body
    return reply if reply.status == 202 else None


def test_a_run_during_a_sqlite_write_lock_answers_503_at_once(tmp_path):
    daemon, lock, _ = _lock_idle_daemon(tmp_path)
    try:
        lock.begin()
        waiting = _post_in_background(daemon, "/api/v1/run/after")  # the journal blocks
        wait_until(lambda: daemon.get("/readyz").status == 503, timeout=10)
        time.sleep(2.5)  # still the outage: past the 2 s a commit may wait before it counts
        for path in ("/api/v1/run/after", f"/api/v1/cancel/{uuid.uuid4()}"):
            reply = call(daemon.url, "POST", path, "{}", timeout=2.0)  # not the 10 s it waits
            assert (reply.status, reply.json) == (503, UNAVAILABLE), path
        lock.end()
        waiting.join(15)
    finally:
        lock.end()
        assert daemon.stop() == 0, daemon.output()


def test_a_run_answered_503_is_not_created_after_the_lock_goes(tmp_path):
    daemon, lock, url = _lock_idle_daemon(tmp_path)
    try:
        lock.begin()
        refused = daemon.post("/api/v1/run/after", {})  # waits for the engine's 10 s timeout
        assert (refused.status, refused.json) == (503, UNAVAILABLE)
        lock.end()
        # The journal is first in, first out: once a later run is written, the earlier one
        # has been dealt with. Until the journal has caught up, runs are refused at once.
        later = wait_until(lambda: _accepted(daemon.post("/api/v1/run/after", {})), timeout=20)
        with bound_database(url):
            ids = [e.id for e in WorkflowExecution.select()]
        assert ids == [later.json["execution_id"]]
    finally:
        lock.end()
        assert daemon.stop() == 0, daemon.output()


LIMITED = """
    name: limited
    max_parallel_executions: 5
    on_limit: queue
    steps: [{name: only, action: core/log, params: {message: hi}}]
"""


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_a_run_answered_503_is_not_created_after_a_row_lock_goes(bound, tmp_path):
    """docs/api.md: a run whose request got a 503 is never created afterwards. On PostgreSQL
    a run can wait inside its transaction, on a row lock (here the workflow's, which every
    run of a workflow with ``max_parallel_executions`` takes), past the 10 s its caller
    waits. The run is then rolled back when it would commit (the journal's gate), not
    created and started after its caller was answered 503, as it was before."""
    apply_yaml(LIMITED)
    daemon = Daemon(tmp_path, bound).start(timeout=60)
    lock = psycopg.connect(bound, autocommit=False)
    try:
        lock.execute("SELECT name FROM workflows WHERE name = 'limited' FOR UPDATE")
        started = time.monotonic()
        refused = call(daemon.url, "POST", "/api/v1/run/limited", "{}", timeout=30)
        assert (refused.status, refused.json) == (503, UNAVAILABLE), refused.body
        assert time.monotonic() - started >= 8  # the engine's wait, not "journal unhealthy"
        lock.rollback()
        # The journal is first in, first out: once a later run is written, the earlier one
        # has been dealt with.
        later = wait_until(lambda: _accepted(daemon.post("/api/v1/run/limited", {})),
                           timeout=30)
        ids = [e.id for e in WorkflowExecution.select()]
        assert ids == [later.json["execution_id"]], f"a run answered 503 was created: {ids}"
    finally:
        lock.close()
        assert daemon.stop() == 0, daemon.output()


@pytest.mark.parametrize("key", [None, "delivery-1"], ids=["no-key", "key"])
@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_a_run_whose_commit_answer_is_lost_is_created_once_and_answered_202(
        bound, tmp_path, key):
    """SPEC 7.2: one ``POST /run`` creates one execution and answers 202 (200 only for a
    key already used). The connection breaks after the COMMIT that created the execution
    reached the server: the journal asks the database whether it committed instead of
    writing the batch again, which created a second execution (no key) or answered the one
    request 200 as a repeat and left its execution unstarted for 30 s (key)."""
    apply_yaml("""
        name: once
        steps: [{name: only, action: core/log, params: {message: hi}}]
    """)
    with CommitCutter(bound, b"INSERT INTO workflow_executions") as proxy:
        daemon = Daemon(tmp_path, proxy.url, env={"MANTLE_LEASE_TTL": "3s"}).start(timeout=60)
        try:
            proxy.armed.set()
            reply = call(daemon.url, "POST", "/api/v1/run/once", "{}", timeout=30,
                         headers={"Idempotency-Key": key} if key else None)
            assert proxy.cut.is_set(), "the proxy never saw the run's COMMIT"
            assert reply.status == 202, (reply.status, reply.body)
            accepted = reply.json["execution_id"]
            assert daemon.wait_for_status(accepted, timeout=10)["status"] == "completed"
            daemon.wait_for_log("database commit confirmed after its answer was lost")
            # A second execution would be started by the owner's reconciliation, every
            # 2 x the 3 s lease: wait past it.
            reconciled = time.monotonic() + 8
            wait_until(lambda: time.monotonic() > reconciled
                       or WorkflowExecution.select().count() > 1, timeout=15)
            rows = {e.id: e.status for e in WorkflowExecution.select()}
            assert rows == {accepted: "completed"}, rows
        finally:
            assert daemon.stop() == 0, daemon.output()


@pytest.mark.parametrize("key", [None, "delivery-2"], ids=["no-key", "key"])
@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_a_run_answered_503_while_its_commit_was_in_doubt_never_runs_a_step(
        bound, tmp_path, key):
    """docs/api.md: a run answered 503 is safe to retry. Here the connection breaks once
    the run's COMMIT reached the server, and the database stays out of reach past the
    request's 10 s: the answer is 503, and the journal learns only later that the run was
    committed. Without a key that run is cancelled before it starts (WARN ``run
    abandoned``), so the client's retry does not run its steps twice; before, it ran. With
    a key it runs, and the retry with that key answers 200 with it."""
    apply_yaml("""
        name: once
        steps: [{name: only, action: core/log, params: {message: hi}}]
    """)
    headers = {"Idempotency-Key": key} if key else None
    with CommitCutter(bound, b"INSERT INTO workflow_executions", refuse=True) as proxy:
        daemon = Daemon(tmp_path, proxy.url, env={"MANTLE_LEASE_TTL": "3s"}).start(timeout=60)
        try:
            proxy.armed.set()
            reply = call(daemon.url, "POST", "/api/v1/run/once", "{}", timeout=30,
                         headers=headers)
            assert proxy.cut.is_set(), "the proxy never saw the run's COMMIT"
            assert (reply.status, reply.json) == (503, UNAVAILABLE), reply.body
            proxy.refusing.clear()
            daemon.wait_for_log("database commit confirmed after its answer was lost")
            created, = [e.id for e in WorkflowExecution.select()]
            if key is None:
                daemon.wait_for_log("run abandoned", execution_id=created)
                assert daemon.wait_for_status(created, timeout=10)["status"] == "cancelled"
                assert not StepExecution.select().where(
                    StepExecution.execution_id == created).exists()
            else:
                again = wait_until(lambda: _answered(call(
                    daemon.url, "POST", "/api/v1/run/once", "{}", timeout=30,
                    headers=headers)), timeout=20)
                assert (again.status, again.json["execution_id"]) == (200, created)
                assert daemon.wait_for_status(created, timeout=10)["status"] == "completed"
            assert [e.id for e in WorkflowExecution.select()] == [created]
        finally:
            assert daemon.stop() == 0, daemon.output()


def _answered(reply):
    assert reply.status in (200, 503), reply.body
    return reply if reply.status == 200 else None


def _listeners(url: str) -> set[int]:
    """The server processes of the cancel listeners' connections (SPEC 13.7): their last
    statement is the LISTEN, or the look for cancels missed that follows it."""
    with psycopg.connect(url, autocommit=True) as conn:
        return {row[0] for row in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE query = 'LISTEN mantle_cancel' "
            "OR query LIKE 'SELECT DISTINCT s.execution_id FROM step_executions s %'")}


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_a_cancel_sent_while_the_listener_reconnects_and_the_journal_waits_reaches_the_owner(
        bound, tmp_path, http_target):
    """SPEC 13.7 "Cancel anywhere" and 4.6: the owner interrupts a cancelled execution's
    running attempt even when it did not hear the cancel's NOTIFY, its listening connection
    being broken at that moment (a restarted server, a cut connection), while its journal
    waits (here a checkpoint of another execution waits on a row lock; likewise while it
    backs off after an outage). The owner looked for missed cancels only in the journal, so
    the attempt ran on as long as the journal waited; now the listener, once connected again,
    looks for the cancelled executions this node owns whose steps still run."""
    http_target.route("/held", hold=True)
    http_target.route("/gate", hold=True)
    for name, path in (("held", "/held"), ("stuck", "/gate")):
        url = http_target.url(path)
        apply_yaml(f"""
            name: {name}
            steps: [{{name: call, action: http/request, params: {{url: "{url}"}}}}]
        """)
    daemon = Daemon(tmp_path, bound).start(timeout=60)
    lock = psycopg.connect(bound, autocommit=False)
    try:
        held = daemon.post("/api/v1/run/held", {}).json["execution_id"]
        stuck = daemon.post("/api/v1/run/stuck", {}).json["execution_id"]
        http_target.wait_for_hits("/held")
        http_target.wait_for_hits("/gate")
        lock.execute("SELECT id FROM workflow_executions WHERE id = %s FOR UPDATE", (stuck,))
        http_target.release("/gate")  # its step's end now waits for the lock: so does the journal
        with psycopg.connect(bound, autocommit=True) as conn:
            wait_until(lambda: conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND query LIKE '%FOR SHARE%'").fetchone()[0] == 1, timeout=10,
                message="the journal does not wait on the row lock")
            broken = _listeners(bound)
            assert len(broken) == 1
            conn.execute("SELECT pg_terminate_backend(%s)", (broken.pop(),))
        wait_until(lambda: not (_listeners(bound) & broken), timeout=5)
        with transaction(mantle_db.database_proxy):  # the cancel, from another node
            assert store.cancel_execution(held, "api").previous == "running"
        sent = time.monotonic()
        wait_until(lambda: http_target.in_progress("/held") == 0, timeout=5, interval=0.01,
                   message="the owner did not interrupt the cancelled execution's attempt")
        assert time.monotonic() - sent < 2.5  # the listener reconnects within a second
        lock.rollback()
        wait_until(lambda: [s.status for s in StepExecution.select().where(
            StepExecution.execution_id == held)] == ["cancelled"], timeout=10)
        assert WorkflowExecution.get_by_id(held).status == "cancelled"
        wait_until(lambda: WorkflowExecution.get_by_id(stuck).status == "completed", timeout=10)
    finally:
        lock.close()
        http_target.release()
        assert daemon.stop() == 0, daemon.output()
