"""The OpenAPI document stays true to the app (SPEC 7.5).

1. Its paths and operations are exactly the app's routes and methods.
2. Requests provoke every status code it documents for every operation; each reply's status is
   documented for its operation (or is the common 405 / unmatched 404) and its body validates
   against the documented schema. The only code not provoked per operation is 500, whose
   shared response is checked on a deliberately broken route.
"""

from __future__ import annotations

import hmac
import json
import re

import falcon.testing
import pytest

from mantle import apikeys, db as mantle_db
from mantle.daemon.readiness import Readiness
from web.app import ApiRuntime, create_app, routes
from web.middleware import allowed_methods
from web.openapi import document
from web.settings import ApiSettings
from tests.web.support import apply_yaml, gone_database

DOC = document()

WORKFLOW = """
    name: wf
    max_parallel_executions: 1
    on_limit: reject
    triggers: [{type: webhook, path: /hooks/wf, secret: s}]
    inputs: {day: {type: string}}
    steps: [{name: nap, action: core/sleep, params: {duration: 30s}}]
"""
OPEN = """
    name: open
    triggers: [{type: webhook, path: /hooks/open}]
    steps: [{name: a, action: core/log, params: {message: x}}]
"""
BROKEN = """
    name: broken
    steps: [{name: boom, action: core/fail}]
"""
BIG = b"{" + b" " * (1024 * 1024) + b"}"


def _doc_path(template: str) -> str:
    return re.sub(r"\{(\w+):[^}]*\}", r"{\1}", template)


def _resolve(schema: dict) -> dict:
    while "$ref" in schema:
        node = DOC
        for part in schema["$ref"].lstrip("#/").split("/"):
            node = node[part]
        schema = node
    return schema


_TYPES = {"object": dict, "array": list, "string": str, "null": type(None), "boolean": bool}


def _type_ok(value, kind: str) -> bool:
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _TYPES[kind])


def validate(value, schema: dict, where: str = "$") -> None:
    """The subset of JSON Schema the document uses; AssertionError naming the first misfit."""
    schema = _resolve(schema)
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else kinds
        assert any(_type_ok(value, kind) for kind in kinds), f"{where}: {value!r} not {kinds}"
    if "enum" in schema:
        assert value in schema["enum"], f"{where}: {value!r} not in {schema['enum']}"
    if "minimum" in schema and isinstance(value, (int, float)):
        assert value >= schema["minimum"], where
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        for name in schema.get("required", []):
            assert name in value, f"{where}: missing {name}"
        extra = schema.get("additionalProperties", True)
        for name, item in value.items():
            if name in properties:
                validate(item, properties[name], f"{where}.{name}")
            elif extra is False:
                raise AssertionError(f"{where}: undocumented field {name}")
            elif isinstance(extra, dict):
                validate(item, extra, f"{where}.{name}")
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            validate(item, schema["items"], f"{where}[{index}]")


def _operation_for(method: str, path: str):
    """(documented path, operation or None) for a request path; (None, None) if unmatched."""
    for template, item in DOC["paths"].items():
        pattern = re.escape(template).replace(r"\{path\}", ".+")
        pattern = re.sub(r"\\\{\w+\\\}", "[^/]+", pattern)
        if re.fullmatch(pattern, path):
            return template, item.get(method.lower())
    return None, None


class Recorder:
    """Sends requests, checks each reply against the document, remembers what was seen."""

    def __init__(self, client):
        self.client = client
        self.seen: set[tuple[str, str, str]] = set()

    def __call__(self, method: str, path: str, expected: int, **kwargs):
        reply = self.client.simulate_request(method, path, **kwargs)
        assert reply.status_code == expected, (method, path, reply.status_code, reply.text)
        template, operation = _operation_for(method, path.split("?")[0])
        if template is None:
            response = DOC["components"]["responses"]["NotFound"]
        elif operation is None:
            response = DOC["components"]["responses"]["MethodNotAllowed"]
            assert reply.headers["allow"] == ", ".join(
                sorted(m.upper() for m in DOC["paths"][template]))
        else:
            code = str(reply.status_code)
            assert code in operation["responses"], (method, template, code)
            response = _resolve(operation["responses"][code])
            self.seen.add((template, method.lower(), code))
        response = _resolve(response) if "$ref" in response else response
        self._check_body(reply, response)
        return reply

    @staticmethod
    def _check_body(reply, response: dict) -> None:
        content = response.get("content", {})
        if "application/json" in content:
            assert reply.headers["content-type"] == "application/json"
            validate(json.loads(reply.text), content["application/json"]["schema"])
        elif "text/plain" in content:
            assert reply.headers["content-type"].startswith("text/plain")
        elif "text/event-stream" in content:
            assert reply.headers["content-type"] == "text/event-stream"
            assert reply.text.startswith((":", "id: "))


def test_every_route_and_method_of_the_app_is_documented_and_nothing_else(engine, readiness):
    app_paths = {_doc_path(template): {m.lower() for m in allowed_methods(resource)}
                 for template, resource in routes(engine, engine.metrics, readiness)}
    doc_paths = {path: set(item) for path, item in DOC["paths"].items()}
    assert doc_paths == app_paths
    assert DOC["openapi"].startswith("3.")


def test_every_documented_status_code_is_what_the_app_answers(client, engine, db, request,
                                                               backend, tmp_path):
    apply_yaml(WORKFLOW)
    apply_yaml(OPEN)
    apply_yaml(BROKEN)
    check = Recorder(client)
    signature = "sha256=" + hmac.new(b"s", b"{}", "sha256").hexdigest()

    # --- run ---
    run = check("POST", "/api/v1/run/wf", 202, json={"inputs": {"day": "d"}},
                headers={"Idempotency-Key": "k"})
    running = run.json["execution_id"]
    check("POST", "/api/v1/run/wf", 200, json={}, headers={"Idempotency-Key": "k"})
    check("POST", "/api/v1/run/wf", 400, body="[]")
    check("POST", "/api/v1/run/nope", 404)
    check("POST", "/api/v1/run/wf", 429, json={"inputs": {"day": "d"}})
    # --- hooks ---
    check("POST", "/hooks/wf", 403, body="{}")
    check("POST", "/hooks/wf", 429, body="{}", headers={"X-Hub-Signature-256": signature})
    hook = check("POST", "/hooks/open", 202, body="{}", headers={"Idempotency-Key": "h"})
    check("POST", "/hooks/open", 200, body="{}", headers={"Idempotency-Key": "h"})
    check("POST", "/hooks/open", 400, body="{}", headers={"Idempotency-Key": ""})
    check("POST", "/hooks/none/such", 404, body="{}")
    engine.wait(hook.json["execution_id"], timeout=10)
    # --- executions ---
    check("GET", "/api/v1/executions", 200)
    check("GET", "/api/v1/executions?limit=0", 400)
    check("GET", f"/api/v1/executions/{running}", 200)
    check("GET", f"/api/v1/executions/{hook.json['execution_id']}", 200)
    check("GET", "/api/v1/executions/nope", 404)
    hooked = hook.json["execution_id"]
    check("GET", f"/api/v1/executions/{hooked}/steps/a/output", 200)
    check("GET", f"/api/v1/executions/{hooked}/steps/nope/output", 404)
    check("GET", f"/api/v1/executions/{hooked}/events", 200)
    check("GET", f"/api/v1/executions/{hooked}/events", 400, headers={"Last-Event-ID": "x"})
    check("GET", "/api/v1/executions/nope/events", 404)
    check("GET", "/api/v1/events?timeout=50ms", 200)
    check("GET", "/api/v1/events?timeout=0s", 400)
    # --- retry ---
    failed = check("POST", "/api/v1/run/broken", 202).json["execution_id"]
    engine.wait(failed, timeout=10)
    check("POST", f"/api/v1/retry/{failed}", 202, json={"from_step": "boom"})
    check("POST", f"/api/v1/retry/{failed}", 400, json={"from_step": "nope"})
    check("POST", f"/api/v1/retry/{running}", 409)
    check("POST", "/api/v1/retry/nope", 404)
    # --- cancel ---
    check("POST", f"/api/v1/cancel/{running}", 200)
    check("POST", f"/api/v1/cancel/{running}", 409)
    check("POST", "/api/v1/cancel/nope", 404)
    engine.wait(running, timeout=5)
    # --- workflows ---
    check("GET", "/api/v1/workflows", 200)
    check("GET", "/api/v1/workflows/wf", 200)
    check("GET", "/api/v1/workflows/nope", 404)
    check("GET", "/api/v1/workflows/wf/versions", 200)
    check("GET", "/api/v1/workflows/nope/versions", 404)
    check("GET", "/api/v1/workflows/wf/versions/1", 200)
    check("GET", "/api/v1/workflows/wf/versions/0", 400)
    check("GET", "/api/v1/workflows/wf/versions/2", 404)
    # --- the rest ---
    check("GET", "/api/v1/openapi.json", 200)
    check("GET", "/metrics", 200)
    check("GET", "/healthz", 200)
    check("GET", "/readyz", 200)
    readiness = Readiness(db)  # not marked ready: "starting"
    starting = falcon.testing.TestClient(create_app(engine, engine.metrics, db, readiness))
    reply = starting.simulate_get("/readyz")
    assert reply.status_code == 503
    validate(reply.json, DOC["paths"]["/readyz"]["get"]["responses"]["503"]["content"][
        "application/json"]["schema"])
    check.seen.add(("/readyz", "get", "503"))
    # --- common: 405, unmatched 404, 413 everywhere, 401 on protected paths ---
    check("DELETE", "/api/v1/executions", 405)
    check("GET", "/no/such/route", 404)
    samples = {"/api/v1/run/{workflow}": "/api/v1/run/wf",
               "/api/v1/cancel/{execution}": f"/api/v1/cancel/{running}",
               "/api/v1/retry/{execution}": f"/api/v1/retry/{failed}",
               "/api/v1/executions/{id}": f"/api/v1/executions/{running}",
               "/api/v1/executions/{id}/steps/{step}/output":
                   f"/api/v1/executions/{hooked}/steps/a/output",
               "/api/v1/executions/{id}/events": f"/api/v1/executions/{hooked}/events",
               "/api/v1/workflows/{name}": "/api/v1/workflows/wf",
               "/api/v1/workflows/{name}/versions": "/api/v1/workflows/wf/versions",
               "/api/v1/workflows/{name}/versions/{version}": "/api/v1/workflows/wf/versions/1",
               "/hooks/{path}": "/hooks/open"}
    operations = [(template, method, samples.get(template, template))
                  for template, item in DOC["paths"].items() for method in item]
    for template, method, path in operations:
        check(method.upper(), path, 413, body=BIG)
    apikeys.create_key("probe")
    for template, method, path in operations:
        if "401" in DOC["paths"][template][method]["responses"] and template != "/metrics":
            check(method.upper(), path, 401)
    # A viewer key may GET only; /metrics behind a key with metrics.require_key.
    viewer = {"Authorization": "Bearer " + apikeys.create_key("viewer", role="viewer")}
    for template, method, path in operations:
        if "403" in DOC["paths"][template][method]["responses"]:
            check(method.upper(), path, 403, headers=viewer)
    guarded = Recorder(falcon.testing.TestClient(create_app(
        engine, engine.metrics, db, readiness_ok(db),
        ApiRuntime(db, ApiSettings(metrics_require_key=True)))))
    guarded("GET", "/metrics", 401)
    guarded("GET", "/metrics", 200, headers=viewer)
    apikeys.revoke_key("probe")
    apikeys.revoke_key("viewer")
    # The rate limit: one request per address, then 429 everywhere it applies.
    limited = Recorder(falcon.testing.TestClient(create_app(
        engine, engine.metrics, db, readiness_ok(db),
        ApiRuntime(db, ApiSettings(rate_limit=0.001, rate_burst=1)))))
    limited("GET", "/api/v1/workflows", 200)
    for template, method, path in operations:
        if "429" in DOC["paths"][template][method]["responses"]:
            reply = limited(method.upper(), path, 429, body="{}" if method == "post" else None)
            assert int(reply.headers["retry-after"]) >= 1
    check.seen |= guarded.seen | limited.seen

    # --- 503: the database goes away ---
    gone = gone_database(backend, request, tmp_path)
    try:
        ready = Readiness(gone).start()
        ready.mark_ready()
        outage = Recorder(falcon.testing.TestClient(create_app(engine, engine.metrics, gone,
                                                               ready)))
        for template, method, path in operations:
            if "503" in DOC["paths"][template][method]["responses"]:
                outage(method.upper(), path, 503, body="{}" if method == "post" else None)
    finally:
        mantle_db.bind(db)
    documented = {(template, method, code) for template, item in DOC["paths"].items()
                  for method, operation in item.items() for code in operation["responses"]
                  if code != "500"}
    assert documented - (check.seen | outage.seen) == set()


def readiness_ok(db) -> Readiness:
    ready = Readiness(db)
    ready.mark_ready()
    return ready


def test_the_shared_500_response_is_what_an_unexpected_fault_answers(app):
    class Broken:
        def on_get(self, req, resp):
            raise ValueError("bug")

    app.add_route("/broken", Broken())
    reply = falcon.testing.TestClient(app).simulate_get("/broken")
    assert reply.status_code == 500
    validate(reply.json, _resolve(DOC["components"]["responses"]["Internal"])["content"][
        "application/json"]["schema"])
    assert all("500" in operation["responses"] for item in DOC["paths"].values()
               for operation in item.values())


@pytest.mark.parametrize("name", sorted(DOC["components"]["schemas"]))
def test_every_schema_reference_resolves(name):
    text = json.dumps(DOC)
    for ref in set(re.findall(r'"\$ref": "([^"]+)"', text)):
        assert _resolve({"$ref": ref})
    assert f'"#/components/schemas/{name}"' in text
