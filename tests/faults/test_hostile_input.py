"""Hostile input against a running ``mantle serve`` (issue 6): run-time values that look like
templates, odd webhook bodies, oversized headers, slow and numerous clients, huge or deeply
nested JSON, plugin action names that try to leave the plugin directory. After each case the
daemon answers ``/healthz`` and still runs a workflow to completion.

The cases exercise the HTTP layer and the engine, not the storage, so they run on SQLite only
(the crash soak and the secrets tests cover both databases).
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.helpers.database import bound_database
from tests.helpers.http_target import HttpTarget
from tests.web.support import Daemon, apply_yaml, wait_until

BAD_ACTIONS = ["../evil/run", "/evil/run", "evil/../../evil", "../../../bin/true",
               "./evil/run", "..", "tell/../evil"]
EVIL = f"#!{sys.executable}\nimport pathlib; pathlib.Path('{{marker}}').write_text('ran')\n"


@pytest.fixture(scope="module")
def target():
    with HttpTarget() as server:
        yield server


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, target):
    cwd = tmp_path_factory.mktemp("hostile")
    url = f"sqlite:///{cwd / 'mantle.db'}"
    with bound_database(url, migrate=True):
        yield from _serve(cwd, url, target)


def _serve(cwd, url, target):
    target.route("/inject", body="{{ 1 + 1 }}")
    target.route("/inject-json", json={"text": "{{ inputs }}"})
    apply_yaml("""
        name: normal
        steps: [{name: nap, action: core/sleep, params: {duration: 10ms}}]
    """)
    apply_yaml(f"""
        name: injected
        steps:
          - {{name: fetch, action: http/request, params: {{url: "{target.url('/inject')}"}}}}
          - {{name: fetch-json, action: http/request,
             params: {{url: "{target.url('/inject-json')}"}}}}
          - name: whole
            action: core/log
            params: {{message: "{{{{ steps.fetch.output.body }}}}"}}
          - name: mixed
            action: core/log
            params: {{message: "got {{{{ steps.fetch.output.body }}}} and {{{{ steps['fetch-json'].output.json.text }}}}"}}
          - name: passed-on
            action: http/request
            params: {{url: "{target.url('/inject')}", method: POST,
                      body: "{{{{ steps.fetch.output.body }}}}"}}
    """)
    apply_yaml("""
        name: hooked
        triggers: [{type: webhook, path: /hooks/raw}]
        steps: [{name: show, action: core/log, params: {message: "{{ trigger.payload }}"}}]
    """)
    for index, action in enumerate(BAD_ACTIONS):
        apply_yaml(f"""
            name: escape-{index}
            steps: [{{name: try, action: "{action}"}}]
        """)
    # Executables where a path-escaping action name would find them.
    folders = (cwd / "evil", cwd / ".mantle" / "plugins", cwd / ".mantle", cwd)
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("evil", "run", "true"):
            path = folder / name
            if not path.exists():
                path.write_text(EVIL.format(marker=cwd / "escaped"))
                path.chmod(0o755)
    process = Daemon(cwd, url).start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(autouse=True)
def still_healthy(daemon):
    """After each case: /healthz answers and a normal run completes."""
    yield
    assert daemon.get("/healthz").status == 200
    run = daemon.post("/api/v1/run/normal", {})
    assert run.status == 202, run.body
    assert daemon.wait_for_status(run.json["execution_id"])["status"] == "completed"


def _run(daemon, workflow: str) -> dict:
    reply = daemon.post(f"/api/v1/run/{workflow}", {})
    assert reply.status == 202, reply.body
    return daemon.wait_for_status(reply.json["execution_id"])


def _raw(daemon, data: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes on a fresh connection; return what comes back until close or timeout."""
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (TimeoutError, ConnectionResetError):
            pass
        return b"".join(chunks)


def test_a_template_in_a_value_produced_at_run_time_stays_literal(daemon, target):
    detail = _run(daemon, "injected")
    steps = {step["name"]: step for step in detail["steps"]}
    assert detail["status"] == "completed", detail
    assert steps["whole"]["output"] == {"message": "{{ 1 + 1 }}"}
    assert steps["mixed"]["output"] == {"message": "got {{ 1 + 1 }} and {{ inputs }}"}
    assert target.requests("/inject")[-1].body == b"{{ 1 + 1 }}"


@pytest.mark.parametrize("body", [b"not json {", b"\xff\xfe\x00 invalid utf-8 \xc3\x28", b""],
                         ids=["non-json", "invalid-utf8", "empty"])
def test_webhook_bodies_that_are_not_json_are_accepted_as_text(daemon, body):
    reply = daemon.request("POST", "/hooks/raw", body)
    assert reply.status == 202, reply.body
    detail = daemon.wait_for_status(reply.json["execution_id"])
    assert detail["status"] == "completed", detail


def test_oversized_request_headers_are_refused_without_a_server_error(daemon):
    header = b"X-Big: " + b"a" * 1_000_000 + b"\r\n"
    answer = _raw(daemon, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n")
    assert not answer.startswith(b"HTTP/1.1 5"), answer[:200]
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(20000))
    answer = _raw(daemon, b"GET /api/v1/workflows HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
    assert not answer.startswith(b"HTTP/1.1 5"), answer[:200]


def test_slow_clients_holding_half_requests_do_not_stop_the_daemon(daemon):
    # More half-sent requests than the daemon has worker threads (8).
    sockets = []
    try:
        for _ in range(20):
            sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
            sock.sendall(b"POST /api/v1/run/normal HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Length: 100\r\n\r\n{\"inp")
            sockets.append(sock)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:  # keeps answering others meanwhile
            assert daemon.get("/healthz").status == 200
        assert _run(daemon, "normal")["status"] == "completed"
    finally:
        for sock in sockets:
            sock.close()


def test_two_hundred_concurrent_connections_are_all_answered(daemon):
    start = threading.Barrier(200, timeout=30)

    def one(index):
        start.wait()
        if index % 2:
            return daemon.get("/healthz").status
        return daemon.post("/api/v1/run/normal", {}).status

    with ThreadPoolExecutor(200) as pool:
        statuses = list(pool.map(one, range(200)))
    assert sorted(set(statuses)) == [200, 202], statuses
    wait_until(lambda: daemon.get("/api/v1/executions?workflow=normal&status=running&limit=1000")
               .json["executions"] == [] and
               daemon.get("/api/v1/executions?workflow=normal&status=pending&limit=1000")
               .json["executions"] == [], timeout=60)


@pytest.mark.parametrize("body", [
    b"[" * 200_000 + b"]" * 200_000,
    b'{"inputs": ' + b'{"a": ' * 100_000 + b"1" + b"}" * 100_000 + b"}",
    b'{"inputs": {"a": "' + b"x" * 2_000_000 + b'"}}',
    b'{"inputs": {' + b",".join(b'"k%d": 1' % i for i in range(60_000)) + b"}}",
], ids=["nested-array", "nested-object", "huge-string", "many-keys"])
def test_huge_or_deeply_nested_run_bodies_are_client_errors(daemon, body):
    reply = daemon.request("POST", "/api/v1/run/normal", body,
                           {"Content-Type": "application/json"})
    assert reply.status in (400, 413), (reply.status, reply.body[:300])
    assert "error" in reply.json


@pytest.mark.parametrize("index", range(len(BAD_ACTIONS)), ids=BAD_ACTIONS)
def test_plugin_action_names_escaping_the_plugin_directory_are_unknown(daemon, index):
    detail = _run(daemon, f"escape-{index}")
    step = detail["steps"][0]
    assert step["status"] == "failed"
    assert step["error"] == f'unknown action "{BAD_ACTIONS[index]}"'
    assert not (daemon.cwd / "escaped").exists()
