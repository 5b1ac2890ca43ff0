"""Every execution reaches a final state (issue 11; SPEC 10.3, 13.1 items 3 and 11): SIGTERM
starts nothing new, waits survive a SIGKILL, threads stay bounded under 300 HTTP steps, and
the daemon logs each step.

Black-box, like ``test_final_states.py``: a real ``mantle serve`` subprocess on SQLite and on
PostgreSQL, a real SIGKILL or SIGTERM, and a local HTTP server as the steps' target.
"""

from __future__ import annotations

import http.client
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

from mantle.db.models import StepExecution, WorkflowExecution
from tests.faults.support import (kill, rows, run, sleep_until, start_daemon, status,
                                  stays_false, step_status, steps_of)
from tests.web.support import apply_yaml, wait_until


# --- 7. SIGTERM stops starting steps at once (10.3) ----------------------------------------

TERM = """
    name: term
    steps:
      - {{name: a, action: core/sleep, params: {{duration: 2s}}}}
      - {{name: b, action: http/request, depends_on: [a], params: {{url: "{url}"}}}}
"""


def test_after_sigterm_no_step_starts_and_the_next_start_resumes_the_execution(
        bound, tmp_path, http_target):
    """A slow client keeps a request in flight, so the daemon's HTTP side is still draining
    when ``a`` finishes: the engine must already have stopped starting steps (``b``)."""
    http_target.route("/b", body="b ran")
    apply_yaml(TERM.format(url=http_target.url("/b")))
    daemon = start_daemon(tmp_path, bound, "--shutdown-timeout", "20s")
    execution_id = run(daemon, "term")
    wait_until(lambda: step_status(execution_id, "a") == "running")
    body = b'{"inputs": {}}'
    slow_client = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
    slow_client.sendall(b"POST /api/v1/run/term HTTP/1.1\r\nHost: x\r\nContent-Type: "
                        b"application/json\r\nContent-Length: " + str(len(body)).encode()
                        + b"\r\n\r\n" + body[:3])
    signalled = time.monotonic()
    daemon.send(signal.SIGTERM)
    try:
        daemon.wait_for_log("shutting down")
        wait_until(lambda: step_status(execution_id, "a") == "completed", timeout=10)
        stays_false(lambda: http_target.hits("/b") > 0, 1.0)  # a is done; b does not start
        slow_client.sendall(body[3:])
        assert slow_client.recv(65536).startswith(b"HTTP/1.1 503 ")
    finally:
        slow_client.close()
    assert daemon.wait(30) == 0
    assert time.monotonic() - signalled < 20 + 5  # within shutdown_timeout and a few seconds
    assert http_target.hits("/b") == 0
    assert rows(execution_id) == [("a", 1, "completed")]
    assert status(execution_id) == "running"

    again = start_daemon(tmp_path, bound)
    try:
        detail = again.wait_for_status(execution_id, timeout=30)
    finally:
        again.stop()
    assert detail["status"] == "completed", detail
    assert steps_of(detail)["b"]["output"]["body"] == "b ran"
    assert http_target.hits("/b") == 1
    assert rows(execution_id) == [("a", 1, "completed"), ("b", 1, "completed")]


def test_a_request_begun_while_running_steps_finish_after_sigterm_is_answered(
        bound, tmp_path, http_target):
    """SIGTERM drains HTTP, then lets running steps finish; open connections are served
    meanwhile. A request begun on one then (here a slow client's run, after the drain, while
    ``a`` still sleeps) is answered before the connections close, not cut when ``a`` ends."""
    http_target.route("/b", body="b ran")
    apply_yaml(TERM.format(url=http_target.url("/b")))
    daemon = start_daemon(tmp_path, bound, "--shutdown-timeout", "20s")
    execution_id = run(daemon, "term")
    wait_until(lambda: step_status(execution_id, "a") == "running")
    client = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10)
    try:
        client.request("GET", "/healthz")  # the connection is open, served and idle
        assert client.getresponse().read()
        daemon.send(signal.SIGTERM)
        daemon.wait_for_log("shutting down")
        # a sleeps about two seconds more: the drain of requests in flight is long over
        stays_false(lambda: step_status(execution_id, "a") == "completed", 0.5)
        body = b'{"inputs": {}}'
        client.sock.sendall(b"POST /api/v1/run/term HTTP/1.1\r\nHost: x\r\nContent-Type: "
                            b"application/json\r\nContent-Length: "
                            + str(len(body)).encode() + b"\r\n\r\n" + body[:3])
        wait_until(lambda: step_status(execution_id, "a") == "completed", timeout=10)
        stays_false(lambda: _closed_by_peer(client.sock), 1.0)  # the engine has stopped
        client.sock.sendall(body[3:])
        assert client.sock.recv(65536).startswith(b"HTTP/1.1 503 ")
    finally:
        client.close()
    assert daemon.wait(30) == 0
    assert http_target.hits("/b") == 0


def _closed_by_peer(sock: socket.socket) -> bool:
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
    finally:
        sock.settimeout(timeout)


# --- 8. durable waits (13.1.11) -------------------------------------------------------------

SLEEPY = """
    name: sleepy
    steps:
      - {name: nap, action: core/sleep, params: {duration: 6s}}
"""


def test_a_sleep_killed_halfway_finishes_on_time_after_the_restart(bound, tmp_path):
    apply_yaml(SLEEPY)
    daemon = start_daemon(tmp_path, bound)
    execution_id = run(daemon, "sleepy")
    began = time.monotonic()
    wait_until(lambda: step_status(execution_id, "nap") == "running")
    sleep_until(began + 3)
    kill(daemon)
    assert rows(execution_id) == [("nap", 1, "running")]
    again = start_daemon(tmp_path, bound)
    try:
        detail = again.wait_for_status(execution_id, timeout=20)
        ended = time.monotonic()
    finally:
        again.stop()
    assert detail["status"] == "completed", detail
    assert 5.8 <= ended - began <= 7.0, f"6 s sleep took {ended - began:.2f} s"  # not 9
    row = StepExecution.get(StepExecution.execution_id == execution_id)
    assert row.attempt == 1
    stored = (row.completed_at - row.started_at).total_seconds()
    assert 5.8 <= stored <= 7.0, stored


BACKOFF = """
    name: backing-off
    steps:
      - {{name: call, action: http/request, retry: {{max_attempts: 4, backoff: exponential}},
         params: {{url: "{url}"}}}}
"""


def test_a_retry_back_off_killed_midway_starts_the_next_attempt_at_its_original_due_time(
        bound, tmp_path, http_target):
    http_target.route("/call", status=500, body="not yet")
    apply_yaml(BACKOFF.format(url=http_target.url("/call")))
    daemon = start_daemon(tmp_path, bound)
    execution_id = run(daemon, "backing-off")
    http_target.wait_for_hits("/call", 3, timeout=20)  # attempts at 0, 1 s, 3 s
    third = http_target.requests("/call")[2].at
    wait_until(lambda: ("call", 4, "running") in rows(execution_id), timeout=5)
    sleep_until(third + 1.0)  # in the 4 s wait before attempt 4
    kill(daemon)
    http_target.route("/call", body="at last")
    again = start_daemon(tmp_path, bound)
    try:
        detail = again.wait_for_status(execution_id, timeout=30)
    finally:
        again.stop()
    assert detail["status"] == "completed", detail
    assert steps_of(detail)["call"]["attempt"] == 4
    assert http_target.hits("/call") == 4
    fourth = http_target.requests("/call")[3].at
    assert abs(fourth - (third + 4.0)) <= 1.0, f"attempt 4 came {fourth - third:.2f} s " \
        "after attempt 3 (due 4 s after)"


# --- 9. bounded threads under 300 concurrent HTTP steps (issue 11.9) ------------------------

HELD = """
    name: many
    steps:
      - {{name: call, action: http/request, params: {{url: "{url}"}}}}
"""


def _threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    raise AssertionError("no Threads line")


def test_300_concurrent_http_steps_add_at_most_the_step_pool_to_the_daemons_threads(
        bound, tmp_path, http_target):
    # The idle daemon's own threads (API workers, event-stream workers, journal, timers...)
    # are fixed at start; 300 held HTTP steps may add the step pool's 256 and a few
    # threads started on first use (actor dispatchers, evaluation, HTTP deadlines), never a
    # thread (or two) per request.
    http_target.route("/held", hold=True, body="ok")
    apply_yaml(HELD.format(url=http_target.url("/held")))
    daemon = start_daemon(tmp_path, bound)
    try:
        idle = _threads(daemon.process.pid)
        with ThreadPoolExecutor(8) as pool:
            ids = list(pool.map(lambda _: run(daemon, "many"), range(300)))
        http_target.wait_for_hits("/held", 256, timeout=60)
        most = 0
        for _ in range(10):  # while the 256 requests are held
            most = max(most, _threads(daemon.process.pid))
            time.sleep(0.05)
        assert most - idle <= 256 + 16, f"{most} threads, {idle} before the runs"
        http_target.release("/held")
        wait_until(lambda: WorkflowExecution.select().where(
            WorkflowExecution.status == "completed").count() == 300, timeout=60,
            message="not every execution completed")
        assert http_target.hits("/held") == 300
    finally:
        http_target.release("/held")
        daemon.stop()
    assert len(set(ids)) == 300


# --- 10. step lines in the daemon's log (13.1.3) --------------------------------------------

LOGGED = """
    name: logged
    steps:
      - {{name: fetch, action: http/request, params: {{url: "{ok}"}}}}
    hooks:
      on_finish:
        - {{name: notify, action: http/request, retry: {{max_attempts: 2}},
           params: {{url: "{broken}"}}}}
"""


def test_the_daemon_logs_step_started_finished_and_retrying_for_steps_and_hooks(
        bound, tmp_path, http_target):
    http_target.route("/ok", body="fine")
    http_target.route("/broken", status=503, body="down")
    apply_yaml(LOGGED.format(ok=http_target.url("/ok"), broken=http_target.url("/broken")))
    daemon = start_daemon(tmp_path, bound)
    try:
        execution_id = run(daemon, "logged")
        assert daemon.wait_for_status(execution_id)["status"] == "completed"
        daemon.wait_for_log("execution finished", execution_id=execution_id)
    finally:
        daemon.stop()
    ours = {"workflow": "logged", "execution_id": execution_id}

    def lines(msg: str, step: str) -> list[dict]:
        return [line for line in daemon.lines if line.get("msg") == msg
                and line.get("step") == step and all(line.get(k) == v for k, v in ours.items())]

    assert [(l["level"], l["attempt"]) for l in lines("step started", "fetch")] == [("INFO", 1)]
    [finished] = lines("step finished", "fetch")
    assert (finished["level"], finished["status"]) == ("INFO", "completed")
    assert isinstance(finished["duration_ms"], int) and finished["duration_ms"] >= 0
    assert "error" not in finished

    assert [(l["level"], l["attempt"]) for l in lines("step started", "notify")] == \
        [("INFO", 1), ("INFO", 2)]
    [retrying] = lines("step retrying", "notify")
    assert (retrying["level"], retrying["attempt"], retrying["delay_ms"]) == ("WARN", 1, 1000)
    [failed] = lines("step finished", "notify")
    assert (failed["level"], failed["status"]) == ("INFO", "failed")
    assert failed["error"].startswith("http/request: ") and "503" in failed["error"]
    assert isinstance(failed["duration_ms"], int)
    messages = [line["msg"] for line in daemon.lines
                if line.get("step") in ("fetch", "notify") and line.get("msg", "").startswith(
                    "step ")]
    assert messages == ["step started", "step finished", "step started", "step retrying",
                        "step started", "step finished"]
