"""JSON errors for everything (SPEC 7.1), probes (7.5) and HTTP metrics (9.1)."""

from __future__ import annotations

import logging
import time
import uuid

import falcon.testing
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mantle import db as mantle_db
from mantle.daemon.readiness import Readiness
from mantle.db import migrations
from web.app import create_app, routes
from web.middleware import allowed_methods
from tests.web.served import served
from tests.web.support import apply_yaml, gone_database, wait_until

TOO_LARGE = {"error": "request body too large (limit 1048576 bytes)"}


def test_an_unknown_route_is_a_json_404(client):
    for path in ("/", "/api/v1", "/api/v2/executions", "/api/v1/executions/a/b", "/health"):
        reply = client.simulate_get(path)
        assert (reply.status_code, reply.json) == (404, {"error": "not found"}), path
        assert reply.headers["content-type"] == "application/json"


def test_a_wrong_method_is_405_with_allow_listing_the_routes_methods(client, engine,
                                                                    readiness):
    for template, resource in routes(engine, engine.metrics, readiness):
        path = (template.replace("{path:path}", "x/y").replace("{version}", "1")
                .replace("{", "").replace("}", ""))
        allowed = allowed_methods(resource)
        for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"):
            if method in allowed:
                continue
            reply = client.simulate_request(method, path)
            assert reply.status_code == 405, (method, path)
            assert reply.headers["allow"] == ", ".join(allowed)
            if method != "HEAD":
                assert reply.json == {"error": "method not allowed"}


def test_a_body_over_one_mebibyte_is_413(client):
    apply_yaml("""
        name: tiny
        steps: [{name: a, action: core/log, params: {message: x}}]
    """)
    big = b"{" + b" " * (1024 * 1024) + b"}"
    for path in ("/api/v1/run/tiny", "/hooks/anything", "/healthz"):
        method = "GET" if path == "/healthz" else "POST"
        reply = client.simulate_request(method, path, body=big)
        assert (reply.status_code, reply.json) == (413, TOO_LARGE), path
    exactly = b"{" + b" " * (1024 * 1024 - 2) + b"}"
    assert client.simulate_post("/api/v1/run/tiny", body=exactly).status_code == 202


def test_an_unexpected_fault_is_a_json_500_and_its_traceback_is_logged(app, caplog):
    class Broken:
        def on_get(self, req, resp):
            raise RuntimeError("kaboom")

    app.add_route("/api/v1/broken", Broken())
    with caplog.at_level(logging.ERROR, logger="mantle.http"):
        reply = falcon.testing.TestClient(app).simulate_get("/api/v1/broken")
    assert (reply.status_code, reply.json) == (500, {"error": "internal server error"})
    [record] = [r for r in caplog.records if r.getMessage() == "internal server error"]
    assert record.exc_info[0] is RuntimeError
    assert "kaboom" in logging.Formatter().formatException(record.exc_info)


def test_healthz_is_always_ok_and_readyz_follows_the_server_state(engine, db):
    readiness = Readiness(db).start()
    client = falcon.testing.TestClient(create_app(engine, engine.metrics, db, readiness))
    assert client.simulate_get("/healthz").json == {"status": "ok"}
    reply = client.simulate_get("/readyz")
    assert (reply.status_code, reply.json) == \
        (503, {"status": "unavailable", "details": {"server": "starting"}})
    readiness.mark_ready()
    reply = client.simulate_get("/readyz")
    assert (reply.status_code, reply.json) == (200, {"status": "ok"})
    readiness.mark_stopping()
    reply = client.simulate_get("/readyz")
    assert (reply.status_code, reply.json) == \
        (503, {"status": "unavailable", "details": {"server": "shutting down"}})
    assert client.simulate_get("/healthz").status_code == 200


def test_a_request_that_lands_after_the_engine_stopped_answers_503_shutting_down(engine, db):
    """SPEC 10.3: the daemon stops the engine, then serves its open connections once more
    before it closes them, so a request on a kept-alive connection can land on a stopped
    engine: a run and a cancel both answer 503 ``server is shutting down`` (a cancel
    answered 500 before). The same order in-process: the real engine shut down, the real
    app on a real socket."""

    apply_yaml("""
        name: w
        steps: [{name: only, action: core/log, params: {message: hi}}]
    """)
    with served(engine, db) as api:
        engine.shutdown(timeout=0)
        run = api.post("/api/v1/run/w", {})
        assert (run.status, run.json) == (503, {"error": "server is shutting down"})
        cancel = api.post(f"/api/v1/cancel/{uuid.uuid4()}", {})
        assert (cancel.status, cancel.json) == (503, {"error": "server is shutting down"}), (
            cancel.status, cancel.body)


def test_readyz_reports_pending_migrations(blank_db):
    readiness = Readiness(blank_db).start()
    readiness.mark_ready()
    assert readiness.check() == (False, {"migrations": "pending"})
    migrations.migrate(blank_db)
    wait_until(lambda: readiness.check() == (True, {}), timeout=5)
    readiness.stop()


@pytest.mark.alone
def test_readyz_never_waits_on_the_database_and_names_a_dead_engine(db):
    """The answer comes from the last background probe, at once (13.7); a dead engine actor
    makes it 503 naming the engine (issue 11.6)."""
    readiness = Readiness(db).start()
    readiness.mark_ready()
    problem = [None]
    readiness.watch(lambda: problem[0])
    started = time.monotonic()
    for _ in range(50):
        assert readiness.check() == (True, {})
    assert time.monotonic() - started < 0.05
    problem[0] = "supervisor stopped"
    assert readiness.check() == (False, {"engine": "supervisor stopped"})
    readiness.stop()


def test_a_database_outage_makes_db_backed_endpoints_answer_503(backend, request, tmp_path,
                                                                 engine):
    database = gone_database(backend, request, tmp_path)
    try:
        readiness = Readiness(database).start()
        readiness.mark_ready()
        client = falcon.testing.TestClient(create_app(engine, engine.metrics, database,
                                                      readiness))
        for path in ("/api/v1/executions", "/api/v1/workflows",
                     "/api/v1/executions/5c0f8a52-3b7e-4c1e-9a43-0d2b7f0e6a11"):
            reply = client.simulate_get(path)
            assert (reply.status_code, reply.json) == \
                (503, {"error": "database unavailable"}), path
        reply = client.simulate_post("/hooks/x", body="{}")
        assert (reply.status_code, reply.json) == (503, {"error": "database unavailable"})
        reply = client.simulate_get("/readyz")
        assert (reply.status_code, reply.json) == \
            (503, {"status": "unavailable", "details": {"database": "unreachable"}})
        assert client.simulate_get("/healthz").status_code == 200
        assert client.simulate_get("/metrics").status_code == 200
    finally:
        mantle_db.database_proxy.initialize(None)


def _sample(client, name: str, **labels) -> float:
    text = client.simulate_get("/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


def test_metrics_expose_every_metric_and_label_requests_by_route_template(client, engine):
    apply_yaml("""
        name: tiny
        steps: [{name: a, action: core/log, params: {message: x}}]
    """)
    execution_id = client.simulate_post("/api/v1/run/tiny").json["execution_id"]
    engine.wait(execution_id, timeout=10)
    client.simulate_get(f"/api/v1/executions/{execution_id}")
    client.simulate_get(f"/api/v1/executions/{execution_id}")
    client.simulate_get("/no/such/path")
    client.simulate_get("/api/v1/run/tiny")
    client.simulate_post("/hooks/deploy/x")
    reply = client.simulate_get("/metrics")
    assert reply.status_code == 200
    assert reply.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    for name in ("mantle_workflow_executions_total", "mantle_step_executions_total",
                 "mantle_step_duration_seconds", "mantle_connector_duration_seconds",
                 "mantle_active_executions", "mantle_http_requests_total",
                 "mantle_http_request_duration_seconds"):
        assert f"# TYPE {name} " in reply.text, name
    counter = "mantle_http_requests_total"
    assert _sample(client, counter, method="GET", route="/api/v1/executions/{id}",
                   status="200") == 2
    assert _sample(client, counter, method="POST", route="/api/v1/run/{workflow}",
                   status="202") == 1
    assert _sample(client, counter, method="GET", route="unmatched", status="404") == 1
    assert _sample(client, counter, method="GET", route="/api/v1/run/{workflow}",
                   status="405") == 1
    assert _sample(client, counter, method="POST", route="/hooks/{path}", status="404") == 1
    assert _sample(client, "mantle_http_request_duration_seconds_count", method="GET",
                   route="/api/v1/executions/{id}") == 2
    assert _sample(client, "mantle_workflow_executions_total", workflow="tiny",
                   status="completed") == 1
    assert execution_id not in reply.text


@pytest.mark.filterwarnings("ignore:Unknown REQUEST_METHOD")  # the test client validates
def test_request_metrics_keep_a_bounded_set_of_method_labels(client):
    """SPEC 9.1: labels are never raw values (``route`` is a template). The ``method`` label
    took the request's method as sent, so every new made-up method (``XA``, ``XB``, ...,
    any client, authenticated or not) added a counter and a histogram to the process for
    good and a series to every scrape. Methods outside HTTP's own count as ``other``."""
    made_up = [f"X{index:04d}" for index in range(200)]
    for method in made_up:
        assert client.simulate_request(method, "/api/v1/executions").status_code == 405
    client.simulate_request("PUT", "/api/v1/executions")
    client.simulate_get("/api/v1/executions")
    methods = set()
    for family in text_string_to_metric_families(client.simulate_get("/metrics").text):
        if family.name.startswith("mantle_http_request"):
            methods.update(sample.labels["method"] for sample in family.samples)
    assert methods == {"GET", "PUT", "other"}
    assert _sample(client, "mantle_http_requests_total", method="other",
                   route="/api/v1/executions", status="405") == len(made_up)


def test_each_request_is_logged_at_debug_with_its_route_and_status(client, caplog):
    with caplog.at_level(logging.DEBUG, logger="mantle.http"):
        client.simulate_get("/api/v1/executions/abc")
    [record] = [r for r in caplog.records if r.getMessage() == "http request"]
    assert (record.method, record.route, record.status) == \
        ("GET", "/api/v1/executions/{id}", 404)
    assert record.duration_ms >= 0
