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
from actors.engine import EVALUATION_THREADS
from mantle.config import load_config
from mantle.daemon.daemon import SWITCH_INTERVAL
from mantle.daemon.daemon import Daemon as ServeDaemon
from mantle.daemon.readiness import Readiness
from mantle.db.models import StepExecution
from mantle.services import journal as journal_module
from mantle.services.timers import Timers
from tests.actors.conftest import apply, finish, wait_until
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


def test_slow_if_conditions_do_not_hold_up_the_cancel_of_another_execution(
        engine, db, daemon_switch_interval):
    """Before issue 11.9 conditions were evaluated on the actors' dispatcher threads, and
    eight slow ones held all eight of them for a second: a cancel waited for them."""
    took = _cancel_latencies(engine, 3)
    assert max(took) < 0.5, [f"{t * 1000:.0f} ms" for t in took]


def test_eight_slow_if_conditions_delay_the_cancel_of_another_execution_by_under_100_ms(
        engine, db, daemon_switch_interval):
    took = _cancel_latencies(engine, 5)
    assert max(took) < 0.1, [f"{t * 1000:.0f} ms" for t in took]
