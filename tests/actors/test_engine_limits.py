"""The engine's own failures and limits, in process (issue 11 items 6 and 9; SPEC 10.4, 13.1).

- No single bad message stops the Supervisor; if it is stopped anyway, ``/readyz`` names the
  engine, an ERROR line is logged and the systemd watchdog goes quiet.
- Resources stay bounded: cancelled timers are freed at once, ``POST /run`` answers 503 while
  the journal's backlog is over its limit, and slow ``if`` conditions are evaluated off the
  threads that deliver a cancel.

The composition root (``mantle.daemon.daemon.Daemon``) is started in this process where its
wiring is the point; everything runs on the parametrised database (SQLite and PostgreSQL).
"""

from __future__ import annotations

import datetime as dt
import gc
import logging
import socket
import sys
import threading
import time
import weakref

import falcon.testing
import pytest

from actors import messages as m
from actors.engine import EVALUATION_THREADS, Engine
from mantle import store
from mantle.config import load_config
from mantle.daemon.daemon import SWITCH_INTERVAL
from mantle.daemon.daemon import Daemon as ServeDaemon
from mantle.daemon.readiness import Readiness
from mantle.db import connect, is_postgres, transaction
from mantle.db.fields import utcnow
from mantle.db.models import Node, StepExecution, WorkflowDefinition, WorkflowExecution
from mantle.metrics import Metrics
from mantle.services import journal as journal_module
from mantle.services.channel import channel_name
from mantle.services.timers import Timers
from mantle.store import executions as store_executions
from tests.actors.conftest import apply, finish, wait_until
from tests.helpers.database import lock_waiters
from tests.web.support import call
from web.app import create_app

HELLO = """
    name: hello
    steps: [{name: greet, action: core/log, params: {message: hi}}]
"""
NAPPER = """
    name: napper
    steps: [{name: nap, action: core/sleep, params: {duration: 60s}}]
"""
# Runs until CEL's 1 s evaluation limit stops it (100^3 comparisons).
SLOW = "inputs.xs.all(a, inputs.xs.all(b, inputs.xs.all(c, a + b + c >= 0)))"
PONDER = f"""
    name: ponder
    inputs:
      xs: {{description: numbers}}
    steps: [{{name: think, action: core/log, if: "{SLOW}", params: {{message: done}}}}]
"""


# --- 6. the Supervisor -----------------------------------------------------------------------

def _malformed() -> list:
    """Messages of the Supervisor's own types whose contents make its handlers raise."""
    return [m.Promoted(promoted=None), m.Claimed(claimed=(("no-epoch",),)),
            m.CancelsFound(execution_ids=42)]


def test_a_message_that_makes_a_supervisor_handler_raise_does_not_stop_it(
        engine, db, caplog):
    apply(HELLO)
    supervisor = engine._supervisor
    with caplog.at_level(logging.ERROR, logger="mantle.engine"):
        for message in _malformed():
            supervisor.tell(message)
        assert engine.live_count() == 0  # handled in order: every bad message came first
    assert supervisor.is_alive() and engine.problem() is None
    assert engine.responsive(timeout=2)
    assert len([r for r in caplog.records if r.getMessage() == "supervisor error"]) == 3
    detail = finish(engine, engine.run("hello").execution_id)
    assert detail["status"] == "completed", detail


def _listen(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    return sock


def _quiet_for(sock: socket.socket, seconds: float) -> list[bytes]:
    """Every datagram that arrives within ``seconds``."""
    received, deadline = [], time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            received.append(sock.recv(64))
        except socket.timeout:
            break
    return received


@pytest.fixture
def serving(db, tmp_path, monkeypatch):
    """``mantle serve``'s composition root started in this process (no signal handlers):
    engine, readiness, HTTP on a free port, scheduler and the systemd watchdog every 0.1 s
    to a real datagram socket. Yields (daemon, base URL, notify socket)."""
    path = str(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    config = load_config({"api_address": "127.0.0.1:0",
                          "plugins_dir": str(tmp_path / "plugins")}, environ={}, cwd=tmp_path)
    with _listen(path) as sock:
        daemon = ServeDaemon(config, db, shutdown_timeout=1.0)
        records: list[logging.LogRecord] = []
        handler, logger = _Collect(records), logging.getLogger("mantle")
        level = logger.level
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        try:
            daemon._start()
            address = next(r.address for r in records if r.getMessage() == "server listening")
            yield daemon, f"http://{address}", sock, records
        finally:
            daemon._shutdown(time.monotonic() + 1.0)
            logger.removeHandler(handler)
            logger.setLevel(level)


class _Collect(logging.Handler):
    def __init__(self, records: list):
        super().__init__(logging.DEBUG)
        self._records = records

    def emit(self, record: logging.LogRecord) -> None:
        self._records.append(record)


def test_a_stopped_supervisor_makes_readyz_name_the_engine_and_silences_the_watchdog(
        serving):
    daemon, base, sock, _records = serving
    assert sock.recv(64) == b"READY=1"
    assert sock.recv(64) == b"WATCHDOG=1"
    assert call(base, "GET", "/readyz").status == 200
    daemon._engine._supervisor.stop()
    wait_until(lambda: call(base, "GET", "/readyz").status == 503, timeout=5)
    reply = call(base, "GET", "/readyz")
    assert (reply.status, reply.json) == (503, {"status": "unavailable",
                                                "details": {"engine": "supervisor stopped"}})
    _quiet_for(sock, 0.3)  # a ping already under way may still arrive
    assert _quiet_for(sock, 1.0) == []  # ten intervals without WATCHDOG=1


def test_a_stopped_supervisor_is_logged_as_an_error(serving):
    daemon, base, _sock, records = serving
    daemon._engine._supervisor.stop()
    wait_until(lambda: call(base, "GET", "/readyz").status == 503, timeout=5)
    wait_until(lambda: [r for r in records if r.levelno >= logging.ERROR], timeout=3,
               message="no ERROR line after the Supervisor stopped")


# --- 9. bounded resources ----------------------------------------------------------------

class _Payload:
    """Something a timer's callback holds (an actor ref, a message)."""


def test_a_thousand_cancelled_long_timers_are_freed_at_once():
    timers = Timers()
    try:
        held, handles = [], []
        for _ in range(1000):
            payload = _Payload()
            held.append(weakref.ref(payload))
            handles.append(timers.schedule(3600.0, lambda p=payload: p))
        del payload
        for handle in handles:
            handle.cancel()
        gc.collect()
        assert sum(ref() is not None for ref in held) == 0  # nothing kept for an hour
        assert len(timers) < 64
        fired = threading.Event()
        timers.schedule(0.01, fired.set)
        assert fired.wait(5)  # and the timers still work
    finally:
        timers.stop()


def test_a_timer_due_later_than_a_thread_can_wait_leaves_the_timer_thread_running():
    # Waiting 10^12 s raised OverflowError on the timer thread and ended it: no timer of the
    # process fired again.
    timers = Timers()
    try:
        far = timers.schedule(1e12, lambda: None)
        for _ in range(3):  # after each, the far one is the next due again
            fired = threading.Event()
            timers.schedule(0.05, fired.set)
            assert fired.wait(5)
        far.cancel()
    finally:
        timers.stop()


@pytest.mark.alone
def test_run_answers_503_engine_is_saturated_while_the_journal_backlog_is_over_its_limit(
        engine, db, monkeypatch):
    apply(HELLO)
    monkeypatch.setattr(journal_module, "SATURATED_BACKLOG", 5)
    readiness = Readiness(db).start()
    readiness.mark_ready()
    client = falcon.testing.TestClient(create_app(engine, engine.metrics, db, readiness))
    gate = threading.Event()
    safety = threading.Timer(5.0, gate.set)  # never leave the journal blocked
    safety.start()
    try:
        inside = threading.Event()
        engine.journal.submit(lambda: (inside.set(), gate.wait(10)))
        assert inside.wait(5)  # the journal thread is busy with that one
        for _ in range(10):
            engine.journal.submit(lambda: None)
        started = time.monotonic()
        reply = client.simulate_post("/api/v1/run/hello", json={})
        assert time.monotonic() - started < 1.0  # refused at once, not queued
        assert (reply.status_code, reply.json) == (
            503, {"error": "engine is saturated, retry later"})
        gate.set()
        wait_until(lambda: engine.journal.backlog == 0, timeout=10)
        reply = client.simulate_post("/api/v1/run/hello", json={})
        assert reply.status_code == 202, reply.text
        assert finish(engine, reply.json["execution_id"])["status"] == "completed"
    finally:
        gate.set()
        safety.cancel()
        readiness.stop()


@pytest.fixture
def daemon_switch_interval():
    """The GIL switch interval ``mantle serve`` runs with (mantle.daemon.daemon)."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL)
    yield
    sys.setswitchinterval(before)


def _cancel_latencies(engine, count: int) -> list[float]:
    """Start ``count`` executions of ``napper``; once their sleeps run, start eight slow
    ``if`` conditions (a second each, as many at a time as there are evaluation threads) and cancel
    the nappers one by one while those are evaluated. Returns the seconds from each cancel
    request until its execution ended ``cancelled`` in this process."""
    apply(NAPPER)
    apply(PONDER)
    nappers = [engine.run("napper").execution_id for _ in range(count)]
    wait_until(lambda: StepExecution.select().where(
        StepExecution.execution_id.in_(nappers),
        StepExecution.status == "running").count() == count)
    pondering = [engine.run("ponder", {"xs": list(range(100))}).execution_id
                 for _ in range(8)]
    # Every evaluation thread is busy with a condition that takes a second.
    wait_until(lambda: engine._context.evaluation.threads == EVALUATION_THREADS, timeout=5)
    took = []
    for napper in nappers:
        started = time.monotonic()
        assert engine.cancel(napper) == "running"
        assert engine.wait(napper, timeout=5) == "cancelled"
        took.append(time.monotonic() - started)
    for execution_id in pondering:
        detail = finish(engine, execution_id)
        assert detail["steps"][0]["error"] == \
            "evaluating if condition: evaluation took longer than 1s", detail
    return took


@pytest.mark.alone
def test_slow_if_conditions_do_not_hold_up_the_cancel_of_another_execution(
        engine, db, daemon_switch_interval):
    """Before issue 11.9 conditions were evaluated on the actors' dispatcher threads, and
    eight slow ones held all eight of them for a second: a cancel waited for them."""
    took = _cancel_latencies(engine, 3)
    assert max(took) < 0.5, [f"{t * 1000:.0f} ms" for t in took]


@pytest.mark.alone
def test_eight_slow_if_conditions_delay_the_cancel_of_another_execution_by_under_100_ms(
        engine, db, daemon_switch_interval):
    took = _cancel_latencies(engine, 5)
    assert max(took) < 0.1, [f"{t * 1000:.0f} ms" for t in took]


# --- 4.9 the queue of max_parallel_executions ------------------------------------------------

_MANUAL = {"type": "manual", "payload": None}


def _status(execution_id: str) -> str:
    return WorkflowExecution.get_by_id(execution_id).status


def _running(workflow: str) -> int:
    return WorkflowExecution.select().where(WorkflowExecution.workflow_name == workflow,
                                            WorkflowExecution.status == "running").count()


def _live_node(node_id: str, kind: str, alive: bool = True) -> None:
    now = utcnow()
    Node.create(id=node_id, hostname=node_id, pid=1, kind=kind, host_key=node_id,
                started_at=now, lease_expires_at=now + dt.timedelta(hours=1 if alive else -1))


def _queued_row(workflow: str, owner: str, execution_id: str) -> str:
    """A queued execution of ``workflow``'s version 1 created by the node ``owner``."""
    WorkflowExecution.create(id=execution_id, workflow_name=workflow, version=1,
                             status="pending", inputs={}, trigger=_MANUAL,
                             started_at=utcnow() - dt.timedelta(seconds=1), owner=owner)
    return execution_id


def _cancel_all(engine, execution_ids) -> None:
    for execution_id in execution_ids:
        try:
            engine.cancel(execution_id)
        except Exception:  # already final
            pass


def test_a_new_run_queues_behind_an_older_queued_execution_when_a_slot_frees(engine):
    """SPEC 4.9: queued executions are "started FIFO when a slot frees". Between a slot
    freeing (a finish or cancel commits) and the next promotion (a node's tick, up to 0.5 s
    later), a new run used to be created ``running`` and take the slot, so that under a
    steady stream of runs a queued execution could wait for ever. The older queued execution
    here belongs to another live ``mantle run``, which would start it at its next look: that
    freezes the window."""
    apply("""
        name: fifo
        max_parallel_executions: 1
        steps: [{name: nap, action: core/sleep, params: {duration: 60s}}]
    """)
    _live_node("other-run", "run")
    first = engine.run("fifo").execution_id
    assert _status(first) == "running"
    with transaction():  # what the other ``mantle run`` process writes for its run
        older = store.create_execution("fifo", {}, None, None, "other-run", "cli")
    assert older.queued
    engine.cancel(first)  # the slot frees
    assert _running("fifo") == 0
    newer = engine.run("fifo")
    try:
        assert _status(older.execution["id"]) == "pending"
        assert newer.queued, "a new run started ahead of an older queued execution"
    finally:
        _cancel_all(engine, (newer.execution_id, older.execution["id"]))


def test_a_queued_execution_nobody_alive_will_start_does_not_hold_back_a_new_run(engine):
    """SPEC 4.9 with 13.7: a queued execution whose ``mantle run`` is gone waits for a daemon
    (docs/engine.md); with none running, nobody will start it, so a new run with a free slot
    starts at once instead of queueing behind it for ever."""
    apply("""
        name: orphaned
        max_parallel_executions: 1
        steps: [{name: say, action: core/log, params: {message: hi}}]
    """)
    _live_node("gone-run", "run", alive=False)
    gone = _queued_row("orphaned", "gone-run", "00000000-0000-4000-8000-0000000000d1")
    newer = engine.run("orphaned")
    assert not newer.queued
    assert finish(engine, newer.execution_id)["status"] == "completed"
    assert _status(gone) == "pending"


def test_an_in_process_run_waits_behind_a_dead_runs_queued_execution_while_a_daemon_runs(
        engine):
    """SPEC 4.9 FIFO, 13.1.10: while a daemon runs, it starts any node's queued executions,
    a dead ``mantle run``'s too; an in-process run then keeps its FIFO place behind them
    instead of starting its own ahead of them."""
    apply("""
        name: mixed
        max_parallel_executions: 1
        steps: [{name: say, action: core/log, params: {message: hi}}]
    """)
    _live_node("gone-run", "run", alive=False)
    gone = _queued_row("mixed", "gone-run", "00000000-0000-4000-8000-0000000000d2")
    _live_node("a-daemon", "serve")  # it would start the dead run's execution at its tick
    own = engine.run("mixed")
    try:
        assert own.queued
        time.sleep(1.0)  # two promotion ticks of this process
        assert (_status(gone), _status(own.execution_id)) == ("pending", "pending")
    finally:
        _cancel_all(engine, (own.execution_id, gone))


def _fragile_queued(owner: str, started_at: dt.datetime) -> str:
    """A queued execution of a version this code cannot read (edited by hand, or written by
    another release: the cases docs/engine.md says end ``failed``)."""
    apply("""
        name: fragile
        max_parallel_executions: 1
        steps: [{name: say, action: core/log, params: {message: hi}}]
    """)
    WorkflowDefinition.insert(workflow_name="fragile", version=2, raw_yaml="?",
                              definition={"name": "fragile", "steps": "unreadable"},
                              content_hash="0" * 64, created_at=utcnow()).execute()
    execution_id = "00000000-0000-4000-8000-0000000000a2"
    WorkflowExecution.create(id=execution_id, workflow_name="fragile", version=2,
                             status="pending", inputs={}, trigger=_MANUAL,
                             started_at=started_at, owner=owner)
    return execution_id


def test_a_queued_execution_of_an_unreadable_version_ends_failed_and_every_queue_goes_on(
        db, http_target):
    """SPEC 4.9, 13.1.10 and 13.1.12: one node's promotion is one journal operation over
    every workflow with a queue. A queue head whose version this code cannot read used to
    make it raise, every tick, for ever: no queue of any workflow moved on that node, and
    the unreadable execution never ended. It ends ``failed`` with ``internal error:
    <reason>`` and every queue, its own included, goes on."""
    fragile = _fragile_queued("gone-node", utcnow() - dt.timedelta(minutes=1))
    http_target.route("/gate", hold=True)  # the first holds the slot until the second queued
    apply(f"""
        name: steady
        max_parallel_executions: 1
        steps: [{{name: call, action: http/request,
                 params: {{url: "{http_target.url('/gate')}"}}}}]
    """)
    engine = Engine(db, metrics=Metrics(), resume_orphans=True).start()
    try:
        first = engine.run("steady").execution_id
        second = engine.run("steady")
        assert second.queued
        http_target.release("/gate")
        assert finish(engine, first)["status"] == "completed"
        assert finish(engine, second.execution_id, timeout=10)["status"] == "completed"
        wait_until(lambda: _status(fragile) == "failed", timeout=10,
                   message="the unreadable queued execution never ended")
        error = WorkflowExecution.get_by_id(fragile).error
        assert error.startswith("internal error: cannot read workflow 'fragile' version 2: ")
        assert engine.metrics.registry.get_sample_value(
            "mantle_workflow_executions_total", {"workflow": "fragile", "status": "failed"}) == 1
        behind = engine.run("fragile")  # its own queue goes on too
        assert finish(engine, behind.execution_id)["status"] == "completed"
    finally:
        engine.shutdown(timeout=1)


def test_a_queue_head_whose_version_is_missing_ends_failed_and_never_lifts_the_limit(db):
    """SPEC 4.9 and 13.1.12: at most ``max_parallel_executions`` executions run. The
    promotion takes the limit from the queue head's version; a missing version used to read
    as limit 0, "unlimited", and every queued execution of the workflow was started at
    once. That head ends ``failed`` with ``internal error: <reason>``, and the next one
    heads the queue, its version's limit with it."""
    apply("""
        name: capped
        max_parallel_executions: 1
        steps: [{name: nap, action: core/sleep, params: {duration: 60s}}]
    """)
    engine = Engine(db, metrics=Metrics(), resume_orphans=True).start()
    headless = "00000000-0000-4000-8000-0000000000b7"
    ids = []
    try:
        first = engine.run("capped").execution_id
        ids.append(first)
        assert _status(first) == "running"
        with transaction():  # a queued execution whose version row is gone
            WorkflowExecution.create(id=headless, workflow_name="capped", version=7,
                                     status="pending", inputs={}, trigger=_MANUAL,
                                     started_at=utcnow() - dt.timedelta(minutes=1),
                                     owner="gone-node")
        ids.append(headless)
        queued = [engine.run("capped") for _ in range(2)]
        ids += [q.execution_id for q in queued]
        assert all(q.queued for q in queued)
        most = 0

        def headless_ended() -> bool:
            nonlocal most
            most = max(most, _running("capped"))
            return _status(headless) not in ("pending", "running")

        wait_until(headless_ended, timeout=10,
                   message="the queued execution with a missing version never ended")
        time.sleep(0.6)  # a promotion tick more: those promoted with it would run 60 s
        most = max(most, _running("capped"))
        assert _status(first) == "running"
        assert most <= 1, (f"{most} executions of 'capped' running at once (limit 1): "
                           f"{[(i, _status(i)) for i in ids]}")
        assert WorkflowExecution.get_by_id(headless).error == (
            'internal error: workflow "capped" version 7 not found')
        assert [_status(q.execution_id) for q in queued] == ["pending", "pending"]
    finally:
        _cancel_all(engine, ids)
        engine.shutdown(timeout=1)


def test_the_queue_order_is_the_databases_time_not_the_creating_hosts_clock(db):
    """SPEC 4.9 FIFO with 13.7: "Clock differences between hosts never decide anything".
    The queue is ordered by ``started_at``, which the creating node used to take from its
    own host's clock: a run queued later on a host whose clock is an hour behind went ahead
    of every run queued earlier elsewhere. Here that host creates its run through the same
    code, its clock an hour behind and its estimate of the database's time (``db_now``:
    its clock corrected by the offset its lease renewals measure) right."""
    apply("""
        name: ordered
        max_parallel_executions: 1
        steps: [{name: nap, action: core/sleep, params: {duration: 60s}}]
    """)
    _live_node("skewed-host", "serve")
    engine = Engine(db, metrics=Metrics(), resume_orphans=True).start()
    ids = []
    try:
        first = engine.run("ordered").execution_id
        earlier = engine.run("ordered").execution_id
        ids += [first, earlier]
        assert _status(earlier) == "pending"
        behind = utcnow() - dt.timedelta(hours=1)
        with pytest.MonkeyPatch.context() as patch, transaction():
            patch.setattr(store_executions, "utcnow", lambda: behind)
            later = store.create_execution("ordered", {}, None, None, "skewed-host", "api",
                                           now=engine.node.db_now())
        ids.append(later.execution["id"])
        assert later.queued
        engine.cancel(first)  # one slot frees
        wait_until(lambda: _running("ordered") == 1, timeout=10)
        assert (_status(earlier), _status(later.execution["id"])) == ("running", "pending"), (
            "the run queued later on a host with a slow clock started first")
    finally:
        _cancel_all(engine, ids)
        engine.shutdown(timeout=1)


def test_a_cancel_heard_while_a_promoted_execution_is_loading_keeps_it_from_starting(
        engine, monkeypatch):
    """SPEC 13.7 "Cancel anywhere" and 4.9: a promoted execution starts from a snapshot that
    its node reads in a journal operation of its own. A cancel from another node can commit
    after that read, and its notice reach the Supervisor before the snapshot does: no actor
    runs yet, and the stale snapshot says ``running``. The execution used to be started
    anyway, its steps running until the once-a-second look caught the cancel. Here the
    snapshot read commits the other node's cancel and delivers its notice itself, which
    freezes that window."""
    apply("""
        name: raced
        max_parallel_executions: 1
        steps: [{name: nap, action: core/sleep, params: {duration: 60s}}]
    """)
    first = engine.run("raced").execution_id
    queued = engine.run("raced")
    assert queued.queued
    loads = []
    real = store.execution_snapshot

    def stale_snapshot(execution_id: str):
        snapshot = real(execution_id)
        if execution_id == queued.execution_id:
            loads.append(execution_id)
            WorkflowExecution.update(status="cancelled", completed_at=utcnow()).where(
                WorkflowExecution.id == execution_id).execute()  # the other node's cancel
            engine._supervisor.tell(m.CancelNotified(execution_id))  # its notice, first
        return snapshot

    monkeypatch.setattr(store, "execution_snapshot", stale_snapshot)
    engine.cancel(first)  # the slot frees: the queued one is promoted and loaded
    try:
        wait_until(lambda: loads, timeout=5, message="the queued execution was not promoted")
        engine.journal.call(lambda: None)  # the snapshot's batch committed and was reported
        # An actor started from the stale snapshot writes its step, then runs until the
        # once-a-second look ends it: once no actor runs, its writes are all committed.
        wait_until(lambda: engine.live_count() == 0, timeout=10)
        steps = StepExecution.select().where(
            StepExecution.execution_id == queued.execution_id).count()
        assert (_status(queued.execution_id), steps) == ("cancelled", 0)
        assert engine.wait(queued.execution_id, timeout=1) == "cancelled"
    finally:
        _cancel_all(engine, (queued.execution_id,))


def test_a_cancel_heard_before_a_new_execution_reaches_the_supervisor_keeps_it_from_starting(
        engine, monkeypatch):
    """SPEC 4.6 ("nothing new starts") and 13.7 "Cancel anywhere": a new execution is
    started from the row its creation returned, which the journal thread tells the
    Supervisor after the commit, behind the callbacks of the rest of its batch. A cancel
    from another node can commit right after the creation (a parent's cancel that waited for
    the lock its child's creation held cascades to the new child at once) and its notice
    reach the Supervisor first. The notice found no actor and was dropped, and the execution
    was then started from its stale row: its steps ran (a call made, a row written) until
    the once-a-second look ended it. Here the creation commits the other node's cancel and
    delivers its notice itself, which freezes that window."""
    apply("""
        name: outrun
        steps: [{name: first, action: core/log, params: {message: one}}]
    """)
    real = store.create_execution

    def cancelled_at_once(workflow, *args, **kwargs):
        created = real(workflow, *args, **kwargs)
        if workflow == "outrun" and created.execution is not None:
            execution_id = created.execution["id"]
            store.cancel_execution(execution_id, "api")  # the other node's cancel
            engine._supervisor.tell(m.CancelNotified(execution_id))  # its notice, first
        return created

    monkeypatch.setattr(store, "create_execution", cancelled_at_once)
    execution_id = engine.run("outrun").execution_id
    engine.journal.call(lambda: None)  # the creation's batch was reported to the Supervisor
    # An actor started from the stale row writes its step and ends: once no actor runs, its
    # writes are all committed.
    wait_until(lambda: engine.live_count() == 0, timeout=10)
    steps = StepExecution.select().where(StepExecution.execution_id == execution_id).count()
    assert (_status(execution_id), steps) == ("cancelled", 0)
    assert engine.wait(execution_id, timeout=1) == "cancelled"


@pytest.mark.alone
def test_cancel_notices_for_a_frozen_node_of_this_host_never_hold_up_the_supervisor(engine):
    """SPEC 13.7 "Cancel anywhere" and docs/engine.md (a node paused past its lease): a node
    of this host that is frozen (SIGSTOP, a frozen VM) keeps its cancel channel's socket but
    reads nothing. Once that socket's queue is full (``net.unix.max_dgram_qlen``), each
    further notice to it blocked the sending node's Supervisor for the channel socket's
    half-second timeout, holding up every cancel, promotion, slot and takeover of that node
    behind it (the frozen node's executions it should take over among them). A notice that
    cannot be queued at once is dropped instead: the owner's once-a-second look finds the
    cancel when it runs again."""
    apply(NAPPER)
    with open("/proc/sys/net/unix/max_dgram_qlen") as handle:
        count = int(handle.read()) + 8
    frozen, now = "frozen-node", utcnow()
    name = channel_name(frozen)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name[1:])  # the frozen node's channel: nobody reads it
        Node.create(id=frozen, hostname="frozen", pid=1, kind="serve",
                    host_key=engine.node.host_key, channel=name, started_at=now,
                    lease_expires_at=now + dt.timedelta(hours=1))
        ids = [f"00000000-0000-4000-8000-{index:012d}" for index in range(count)]
        for execution_id in ids:
            WorkflowExecution.create(id=execution_id, workflow_name="napper", version=1,
                                     status="running", inputs={}, trigger=_MANUAL,
                                     started_at=now, running_since=now, owner=frozen, epoch=1)
        started = time.monotonic()
        for execution_id in ids:
            assert engine.cancel(execution_id) == "running"
        assert engine.live_count() == 0  # the Supervisor has dealt with every cancel
        elapsed = time.monotonic() - started
    assert elapsed < 2.0, f"{count} cancels held the Supervisor up for {elapsed:.1f} s"


@pytest.mark.alone
def test_a_deadlock_between_two_nodes_is_written_again_at_once_not_taken_for_an_outage(
        db, migrated_db_url, caplog):
    """SPEC 4.9, 13.7: each run of a workflow with ``max_parallel_executions`` locks the
    workflow's row for its limit check until its journal transaction commits, and a
    transaction carries every operation queued meanwhile. One node's transaction held
    ``wa`` and waited for ``wb`` while another's held ``wb`` and waited for ``wa``:
    PostgreSQL ended one after a second (``deadlock detected``), and its journal, taking
    that for an outage, logged ERROR ``database unavailable``, reported itself unhealthy and
    held all of its writes back for half a second more. A conflict the database resolved by
    rolling one transaction back is now written again at once (WARN ``database write
    retried after a conflict``). Here both transactions are made to start together: a third
    session holds ``wc`` (each node's first transaction) and then ``wa`` and ``wb``."""
    if not is_postgres(db):
        pytest.skip("holds row locks from another session (SQLite has a single writer)")
    for name in ("wa", "wb", "wc"):
        apply(f"""
            name: {name}
            max_parallel_executions: 5
            steps: [{{name: say, action: core/log, params: {{message: hi}}}}]
        """)
    nodes = [Engine(db, metrics=Metrics()).start() for _ in range(2)]
    first, second, watcher = (connect(migrated_db_url) for _ in range(3))
    created: dict[str, object] = {}
    threads = []

    def run(node: Engine, workflow: str, backlog: int) -> None:
        def create():
            try:
                created[f"{workflow}{nodes.index(node)}"] = node.run(workflow).execution_id
            except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                created[f"{workflow}{nodes.index(node)}"] = exc

        threads.append(threading.Thread(target=create))
        threads[-1].start()
        wait_until(lambda: node.journal.backlog == backlog)  # queued behind the first

    caplog.set_level(logging.INFO, logger="mantle")
    try:
        second.execute_sql("BEGIN")
        second.execute_sql("SELECT 1 FROM workflows WHERE name IN ('wa', 'wb') FOR UPDATE")
        first.execute_sql("BEGIN")
        first.execute_sql("SELECT 1 FROM workflows WHERE name = 'wc' FOR UPDATE")
        for index, order in enumerate((("wa", "wb"), ("wb", "wa"))):
            run(nodes[index], "wc", 0)
            wait_until(lambda: lock_waiters(watcher) == index + 1)  # its transaction waits
            for backlog, workflow in enumerate(order, start=1):
                run(nodes[index], workflow, backlog)
        first.execute_sql("ROLLBACK")  # both nodes' next transactions begin, and wait
        wait_until(lambda: "wc0" in created and "wc1" in created, timeout=10)
        wait_until(lambda: lock_waiters(watcher) == 2, timeout=10)
        released = time.monotonic()
        second.execute_sql("ROLLBACK")
        for thread in threads:
            thread.join(30)
        elapsed = time.monotonic() - released
    finally:
        for session in (first, second, watcher):
            session.close()
        for node in nodes:
            node.shutdown(timeout=1)
    problems = [record.getMessage() for record in caplog.records
                if record.levelno >= logging.WARNING]
    assert sorted(created) == ["wa0", "wa1", "wb0", "wb1", "wc0", "wc1"]
    assert all(isinstance(value, str) for value in created.values()), created
    # PostgreSQL ends a deadlock after its deadlock_timeout (1 s); the rest is the retry.
    assert problems in ([], ["database write retried after a conflict"]), problems
    assert elapsed < 2.0, elapsed
