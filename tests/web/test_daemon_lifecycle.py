"""The daemon's lifecycle as a real process (SPEC 10): systemd notifications, graceful
shutdown and resume, the second signal, startup failures, cron in the running daemon."""

from __future__ import annotations

import datetime as dt
import http.client
import json
import signal
import socket
import time
import uuid

import pytest

from mantle import db as mantle_db
from mantle.db.models import StepExecution, WorkflowExecution
from tests.web.support import Daemon, apply_yaml, cli, free_port, wait_until

TWO_STEPS = """
    name: two-steps
    inputs:
      pause: {type: string, default: 1500ms}
    steps:
      - {name: first, action: core/sleep, params: {duration: "{{ inputs.pause }}"}}
      - {name: second, action: core/log, depends_on: [first], params: {message: done}}
"""
HELLO = """
    name: hello
    steps: [{name: greet, action: core/log, params: {message: hi}}]
"""


def _rows(execution_id: str) -> dict[str, tuple[str, int]]:
    return {row.step_name: (row.status, row.attempt) for row in StepExecution.select().where(
        StepExecution.execution_id == execution_id).order_by(StepExecution.id)}


def _step_running(execution_id: str, step: str) -> bool:
    return _rows(execution_id).get(step, ("", 0))[0] == "running"


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_systemd_gets_ready_watchdog_and_stopping_and_the_daemon_exits_0(kind, tmp_path,
                                                                        sqlite_url):
    if kind == "path":
        address = notify = str(tmp_path / "notify.sock")
    else:
        name = f"mantle-test-{uuid.uuid4().hex}"
        address, notify = "\0" + name, "@" + name
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        sock.settimeout(10)
        daemon = Daemon(tmp_path, sqlite_url, env={"NOTIFY_SOCKET": notify,
                                                  "WATCHDOG_USEC": "200000"}).start(ready=False)
        try:
            assert sock.recv(64) == b"READY=1"
            listening = daemon.wait_for_log("server listening")
            daemon.wait_for_log("cron scheduler started")
            daemon.port = int(listening["address"].rsplit(":", 1)[1])
            assert daemon.get("/readyz").status == 200
            assert sock.recv(64) == b"WATCHDOG=1"
            assert sock.recv(64) == b"WATCHDOG=1"
            daemon.send(signal.SIGTERM)
            received = sock.recv(64)
            while received == b"WATCHDOG=1":
                received = sock.recv(64)
            assert received == b"STOPPING=1"
            assert daemon.wait() == 0
        finally:
            daemon.stop()
    messages = daemon.messages()
    assert messages.index("shutting down") < messages.index("server stopped")
    assert messages[-1] == "server stopped"
    assert daemon.stderr == ""


def test_sigterm_lets_the_running_step_checkpoint_and_the_next_start_resumes(tmp_path,
                                                                             sqlite_url):
    apply_yaml(TWO_STEPS)
    daemon = Daemon(tmp_path, sqlite_url, args=("--shutdown-timeout", "20s")).start()
    execution_id = daemon.post("/api/v1/run/two-steps", {}).json["execution_id"]
    wait_until(lambda: _step_running(execution_id, "first"))
    started = time.monotonic()
    daemon.send(signal.SIGTERM)
    assert daemon.wait() == 0
    assert time.monotonic() - started < 10  # it left once nothing was in flight
    assert _rows(execution_id) == {"first": ("completed", 1)}  # second never started
    assert WorkflowExecution.get_by_id(execution_id).status == "running"
    first_done = StepExecution.get(StepExecution.step_name == "first").completed_at

    again = Daemon(tmp_path, sqlite_url).start()
    try:
        assert again.wait_for_log("execution resumed", execution_id=execution_id)
        detail = again.wait_for_status(execution_id)
        assert detail["status"] == "completed"
        assert _rows(execution_id) == {"first": ("completed", 1), "second": ("completed", 1)}
        # The completed step was not run again.
        assert StepExecution.get(StepExecution.step_name == "first").completed_at == first_done
    finally:
        assert again.stop() == 0


@pytest.mark.parametrize("how", ["deadline", "second signal"])
def test_at_the_deadline_or_a_second_signal_running_attempts_stop_and_stay_running(
        how, tmp_path, sqlite_url):
    apply_yaml(TWO_STEPS)
    timeout = "1s" if how == "deadline" else "60s"
    daemon = Daemon(tmp_path, sqlite_url, args=("--shutdown-timeout", timeout)).start()
    execution_id = daemon.post("/api/v1/run/two-steps",
                               {"inputs": {"pause": "60s"}}).json["execution_id"]
    wait_until(lambda: _step_running(execution_id, "first"))
    started = time.monotonic()
    daemon.send(signal.SIGTERM)
    if how == "second signal":
        daemon.wait_for_log("shutting down")
        daemon.send(signal.SIGINT)
    assert daemon.wait(timeout=15) == 0
    assert time.monotonic() - started < 8
    assert _rows(execution_id) == {"first": ("running", 1)}
    assert daemon.messages()[-1] == "server stopped"

    again = Daemon(tmp_path, sqlite_url).start()
    try:
        assert again.wait_for_log("execution resumed", execution_id=execution_id)
        wait_until(lambda: _step_running(execution_id, "first"))
        assert _rows(execution_id) == {"first": ("running", 1)}  # same attempt number
        assert again.post(f"/api/v1/cancel/{execution_id}").status == 200
        again.wait_for_status(execution_id, ("cancelled",))
    finally:
        assert again.stop() == 0


def test_shutdown_refuses_new_connections_reports_not_ready_and_finishes_requests(
        tmp_path, sqlite_url):
    """SIGTERM: the engine starts nothing from the signal on (10.3, issue 11.7), so a run
    still arriving while HTTP drains is answered, with 503, and creates nothing."""
    apply_yaml(HELLO)
    daemon = Daemon(tmp_path, sqlite_url).start()
    keep_alive = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10)
    keep_alive.request("GET", "/readyz")
    assert keep_alive.getresponse().read() == b'{"status": "ok"}'
    body = b'{"inputs": {}}'
    partial = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
    partial.sendall(b"POST /api/v1/run/hello HTTP/1.1\r\nHost: x\r\nContent-Length: "
                    + str(len(body)).encode() + b"\r\n\r\n" + body[:3])
    daemon.send(signal.SIGTERM)
    daemon.wait_for_log("shutting down")
    keep_alive.request("GET", "/readyz")
    reply = keep_alive.getresponse()
    assert (reply.status, json.loads(reply.read())) == \
        (503, {"status": "unavailable", "details": {"server": "shutting down"}})
    with pytest.raises(ConnectionRefusedError):
        wait_until(lambda: socket.create_connection(("127.0.0.1", daemon.port), 1).close()
                   and False, timeout=5)
    partial.sendall(body[3:])
    response = b""
    while not response.endswith(b"}"):
        response += partial.recv(65536)
    assert response.startswith(b"HTTP/1.1 503 ")
    assert response.endswith(b'{"error": "server is shutting down"}')
    partial.close()
    keep_alive.close()
    assert daemon.wait() == 0
    assert WorkflowExecution.select().count() == 0


def test_startup_failures_print_an_error_line_and_exit_1(tmp_path, sqlite_url):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli(tmp_path, sqlite_url, "serve", "--api-address", f"127.0.0.1:{port}")
    assert result.returncode == 1
    assert result.stderr == f"Error: cannot listen on 127.0.0.1:{port}: Address already in use\n"
    assert all(json.loads(line) for line in result.stdout.splitlines())

    bad_address = cli(tmp_path, sqlite_url, "serve", "--api-address", "localhost")
    assert (bad_address.returncode, bad_address.stdout, bad_address.stderr) == \
        (1, "", 'Error: invalid API address "localhost": expected host:port\n')

    down = cli(tmp_path, f"postgresql://nobody@127.0.0.1:{free_port()}/mantle", "serve",
               "--api-address", "127.0.0.1:0")
    assert down.returncode == 1
    assert down.stderr.startswith("Error: failed to connect to database: ")
    assert down.stdout == ""


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_a_database_that_refuses_the_nodes_row_at_startup_is_an_error_line(tmp_path,
                                                                          read_only_url):
    """SPEC 10.2 step 2: migrations that could not run ended as ``Error: failed to connect to
    database: <detail>``, but a database that failed the engine's first write (its node row:
    a read-only role here; on SQLite a write lock held past the busy timeout) printed a
    Python traceback; ``serve --workers`` the same, exit 1."""
    result = cli(tmp_path, read_only_url, "serve", "--api-address", "127.0.0.1:0", timeout=30)
    workers = cli(tmp_path, read_only_url, "serve", "--workers", "2", "--api-address",
                  "127.0.0.1:0", timeout=20)
    assert result.returncode == 1
    assert result.stderr.startswith("Error: failed to connect to database: "), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    # with workers the parent restarted them once a second for good, each failing the same
    # way (a traceback logged), and never exited: now their failure is the start's, said once
    # by the parent (each worker printing its own, unbuffered, two lines came out interleaved
    # as 'Error: ... nodesError: ... nodes')
    assert workers.returncode == 1, workers.stdout[-2000:]
    assert workers.stderr == result.stderr


def test_a_cron_trigger_fires_in_the_running_daemon(tmp_path, sqlite_url):
    apply_yaml("""
        name: every-minute
        triggers: [{type: cron, schedule: "* * * * *"}]
        steps: [{name: tick, action: core/log, params: {message: "{{ trigger.schedule }}"}}]
    """)
    daemon = Daemon(tmp_path, sqlite_url).start()
    try:
        # Fires within 30 s of a minute: now if this minute is young enough, else next minute.
        row = wait_until(lambda: WorkflowExecution.get_or_none(
            WorkflowExecution.workflow_name == "every-minute"), timeout=70, interval=0.2)
        detail = daemon.wait_for_status(row.id)
        assert detail["steps"][0]["output"] == {"message": "* * * * *"}
        assert row.trigger == {"type": "cron", "schedule": "* * * * *", "payload": None}
        started = row.started_at
        assert started.second < 31
        fired = mantle_db.database_proxy.execute_sql(
            "SELECT last_fired_at FROM workflow_triggers").fetchone()[0]
        assert fired.startswith(started.replace(second=0, microsecond=0).strftime(
            "%Y-%m-%d %H:%M:00"))
        minute = started.replace(second=0, microsecond=0)
        assert WorkflowExecution.select().where(
            WorkflowExecution.workflow_name == "every-minute",
            WorkflowExecution.started_at >= minute,
            WorkflowExecution.started_at < minute + dt.timedelta(minutes=1)).count() == 1
    finally:
        assert daemon.stop() == 0
