"""The OpenAPI 3.1 document served at ``/api/v1/openapi.json`` (SPEC 7.5, 13.8).

``tests/web/test_openapi.py`` keeps it true: every route and method of the app is documented
and nothing else, every status code the tests provoke is listed for its operation, and every
body they receive validates against the documented schema.

Besides the operations' own responses, any route answers 405 (``MethodNotAllowed``, with
``Allow``) for a method it lacks, and a path that matches no route answers 404 (``NotFound``).
"""

from __future__ import annotations

import copy
import functools

from mantle.queries import CURSOR_PATTERN
from web.openapi_components import (EXECUTION_STATUSES, common_responses, error,
                                    json_response as _json, ref, schemas)

__all__ = ["document", "OPEN_PATHS", "SINCE_PATTERN"]

# Paths that never need an API key.
OPEN_PATHS = ("/metrics", "/healthz", "/readyz")

# ``since`` (SPEC 7.4): ``<n>d``, or a duration (SPEC 2.3) with at least one non-zero digit,
# so that it is positive; what ``mantle.durations.parse_since`` accepts.
_NUMBER = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_NON_ZERO = r"(?:[0-9]*[1-9][0-9]*(?:\.[0-9]*)?|[0-9]*\.[0-9]*[1-9][0-9]*)"
_UNIT = "(?:ns|us|\u00b5s|\u03bcs|ms|s|m|h)"
SINCE_PATTERN = (rf"^(?:[1-9][0-9]*d|\+?(?:{_NUMBER}{_UNIT})*{_NON_ZERO}{_UNIT}"
                 rf"(?:{_NUMBER}{_UNIT})*)$")

def _operation(operation_id: str, summary: str, responses: dict, *, protected: bool = True,
               database: bool = True, parameters: list | None = None,
               request_body: dict | None = None, operator: bool = False) -> dict:
    """``protected``: needs a key while keys exist (401) and is rate limited (429);
    ``operator``: refused to a ``viewer`` key (403)."""
    responses = dict(responses)
    responses["413"] = {"$ref": "#/components/responses/TooLarge"}
    responses["500"] = {"$ref": "#/components/responses/Internal"}
    if protected:
        responses["401"] = {"$ref": "#/components/responses/Unauthorized"}
        responses.setdefault("429", {"$ref": "#/components/responses/RateLimited"})
    if operator:
        responses.setdefault("403", {"$ref": "#/components/responses/Forbidden"})
    if database:
        responses.setdefault("503", {"$ref": "#/components/responses/Unavailable"})
    operation = {"operationId": operation_id, "summary": summary,
                 "responses": dict(sorted(responses.items()))}
    if not protected:
        operation["security"] = []
    if parameters:
        operation["parameters"] = parameters
    if request_body:
        operation["requestBody"] = request_body
    return operation


def _path_param(name: str, description: str) -> dict:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"},
            "description": description}


def _query(name: str, description: str, schema: dict | None = None) -> dict:
    return {"name": name, "in": "query", "required": False,
            "schema": schema or {"type": "string"}, "description": description}


_LAST_EVENT_ID = {"name": "Last-Event-ID", "in": "header", "required": False,
                  "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"},
                  "description": "resume after this event id (EventSource sends it when it "
                                 "reconnects)"}
_TIMEOUT = {"name": "timeout", "in": "query", "required": False,
            "schema": {"type": "string", "pattern": SINCE_PATTERN.replace("[1-9][0-9]*d|", "")},
            "description": "end the stream after this duration (up to 24h; default: never "
                           "for /api/v1/events, at execution.finished for one execution)"}
_STREAM = {"description": "text/event-stream: each event has an id (increasing), an event "
                          "type and data (a JSON object); comment lines keep the stream alive",
           "content": {"text/event-stream": {"schema": ref("Event")}}}

_IDEMPOTENCY = {"name": "Idempotency-Key", "in": "header", "required": False,
                "schema": {"type": "string", "minLength": 1, "maxLength": 255},
                "description": "a repeat for the same workflow answers 200 with the original "
                               "execution's body; a key beginning with mantle-child: (the "
                               "engine's keys for sub-workflows) is 400"}


def _workflow_links() -> dict:
    """Links from a response naming a workflow (and version) to what can be read about it."""
    name, version = "$response.body#/workflow", "$response.body#/version"
    return {"GetWorkflow": {"operationId": "getWorkflow", "parameters": {"name": name},
                            "description": "the workflow's current version"},
            "ListVersions": {"operationId": "listVersions", "parameters": {"name": name},
                             "description": "the workflow's versions"},
            "GetVersion": {"operationId": "getVersion",
                           "parameters": {"name": name, "version": version},
                           "description": "the version that runs"},
            "ListExecutions": {"operationId": "listExecutions",
                               "parameters": {"workflow": name},
                               "description": "the workflow's executions"},
            "GetEvents": {"operationId": "getEvents",
                          "parameters": {"workflow": name, "timeout": "1s"},
                          "description": "the workflow's events for a second"}}


def _links(field: str, step: bool = False, workflow: bool = True) -> dict:
    """OpenAPI links from a response carrying an execution id to what can be done with it
    (stateful API tests follow them: run -> detail -> cancel -> retry, events, outputs, and
    the workflow it runs)."""
    value = f"$response.body#/{field}"
    links = {"GetExecution": {"operationId": "getExecution", "parameters": {"id": value},
                              "description": "the execution's detail"},
             "CancelExecution": {"operationId": "cancelExecution",
                                 "parameters": {"execution": value},
                                 "description": "cancel the execution"},
             "RetryExecution": {"operationId": "retryExecution",
                                "parameters": {"execution": value},
                                "description": "retry the execution once it failed"},
             "GetExecutionEvents": {"operationId": "getExecutionEvents",
                                    "parameters": {"id": value, "timeout": "1s"},
                                    "description": "the execution's events"}}
    if workflow:
        links.update(_workflow_links())
    if step:
        links["GetStepOutput"] = {
            "operationId": "getStepOutput",
            "parameters": {"id": value, "step": "$response.body#/steps/0/name"},
            "description": "the whole output of the first step"}
    return links


def _linked(response: dict, field: str, step: bool = False, workflow: bool = True) -> dict:
    return {**response, "links": _links(field, step, workflow)}


def _paths() -> dict:
    workflow = _path_param("workflow", "workflow name")
    name = _path_param("name", "workflow name")
    run_responses = {
        "200": _linked(_json("RunAccepted", "Idempotency-Key seen before: the original"),
                       "execution_id"),
        "202": _linked(_json("RunAccepted", "accepted; the execution runs afterwards"),
                       "execution_id"),
        "429": {**error("over max_parallel_executions with on_limit: reject, or the rate "
                         "limit"),
                "headers": {"Retry-After": {"schema": {"type": "string"},
                                            "description": "with the rate limit: seconds "
                                                           "until a request is allowed"}}}}
    return {
        "/api/v1/run/{workflow}": {"post": _operation(
            "runWorkflow", "Start an execution of a workflow", {
                **run_responses,
                "400": error("bad JSON, body, inputs, version or Idempotency-Key"),
                "404": error('workflow "<name>" not found / workflow "<name>" version <n> '
                              "not found")},
            parameters=[workflow, _IDEMPOTENCY], operator=True,
            request_body={"required": False,
                          "description": "optional: an empty or blank body is {}",
                          "content": {"application/json": {"schema": ref("RunRequest")}}})},
        "/api/v1/cancel/{execution}": {"post": _operation(
            "cancelExecution", "Cancel a pending or running execution", {
                "200": _linked(_json("CancelResult", "cancelled"), "execution_id",
                               workflow=False),
                "404": error('execution "<id>" not found'),
                "409": _json("CancelConflict", "already final; status is the actual one")},
            parameters=[_path_param("execution", "execution id")], operator=True)},
        "/api/v1/retry/{execution}": {"post": _operation(
            "retryExecution", "Retry a failed execution from a step (a new execution)", {
                "202": {**_json("RetryAccepted", "the new execution, accepted"),
                        "links": {key: value for key, value in _links("execution_id").items()
                                  if key != "RetryExecution"}},
                "400": error('bad JSON or body; step "<s>" not found in workflow "<w>"'),
                "404": error('execution "<id>" not found'),
                "409": _json("RetryConflict", "execution <id> is still <status> / execution "
                                              "<id> is not in a failed state (status: "
                                              "<status>)."),
                "429": run_responses["429"]},
            parameters=[_path_param("execution", "execution id")], operator=True,
            request_body={"required": False,
                          "description": "optional: an empty or blank body is {}",
                          "content": {"application/json": {"schema": ref("RetryRequest")}}})},
        "/api/v1/executions": {"get": _operation(
            "listExecutions", "List executions, newest first", {
                "200": _json("ExecutionList", "executions"),
                "400": error("bad status, since, limit or cursor")},
            parameters=[_query("workflow", "workflow name"),
                        _query("status", "execution status",
                               {"type": "string", "enum": EXECUTION_STATUSES}),
                        _query("since", "positive duration (90s, 1h30m) or <n>d",
                               {"type": "string", "pattern": SINCE_PATTERN}),
                        _query("limit", "1 to 1000, default 20",
                               {"type": "integer", "minimum": 1, "maximum": 1000}),
                        _query("cursor", "next_cursor of the page before",
                               {"type": "string",
                                "pattern": f"^{CURSOR_PATTERN.pattern}$"})])},
        "/api/v1/executions/{id}": {"get": _operation(
            "getExecution", "One execution with its steps and hooks", {
                "200": _linked(_json("ExecutionDetail", "the execution"), "id", step=True),
                "404": error('execution "<id>" not found')},
            parameters=[_path_param("id", "execution id")])},
        "/api/v1/executions/{id}/steps/{step}/output": {"get": _operation(
            "getStepOutput", "The whole stored output of a step's latest attempt", {
                "200": {"description": "the output (any JSON value; null when none)",
                        "content": {"application/json": {"schema": {}}}},
                "404": error('execution "<id>" not found / step "<step>" not found')},
            parameters=[_path_param("id", "execution id"),
                        _path_param("step", "main step name (else a hook step's)")])},
        "/api/v1/executions/{id}/events": {"get": _operation(
            "getExecutionEvents", "One execution's events: its history, then live, until "
                                  "execution.finished", {
                "200": _STREAM,
                "400": error("bad Last-Event-ID or timeout"),
                "404": error('execution "<id>" not found'),
                "503": error('"too many event streams (limit <n>)" or "database '
                              'unavailable"')},
            parameters=[_path_param("id", "execution id"), _LAST_EVENT_ID, _TIMEOUT])},
        "/api/v1/events": {"get": _operation(
            "getEvents", "Events of every execution (or one workflow's), live", {
                "200": _STREAM,
                "400": error("bad Last-Event-ID or timeout"),
                "503": error('"too many event streams (limit <n>)" or "database '
                              'unavailable"')},
            parameters=[_query("workflow", "only this workflow's executions"),
                        _LAST_EVENT_ID, _TIMEOUT])},
        "/api/v1/workflows": {"get": _operation(
            "listWorkflows", "Workflows by name", {"200": _json("WorkflowList", "workflows")})},
        "/api/v1/workflows/{name}": {"get": _operation(
            "getWorkflow", "The current version of a workflow", {
                "200": _json("WorkflowVersion", "current version"),
                "404": error('workflow "<name>" not found')}, parameters=[name])},
        "/api/v1/workflows/{name}/versions": {"get": _operation(
            "listVersions", "Versions of a workflow, newest first", {
                "200": _json("VersionList", "versions"),
                "404": error('workflow "<name>" not found')}, parameters=[name])},
        "/api/v1/workflows/{name}/versions/{version}": {"get": _operation(
            "getVersion", "One version of a workflow", {
                "200": _json("WorkflowVersion", "the version"),
                "400": error('"invalid version number"'),
                "404": error('workflow "<name>" not found / workflow "<name>" version <n> '
                              "not found")},
            parameters=[name, {"name": "version", "in": "path", "required": True,
                               "schema": {"type": "integer", "minimum": 1},
                               "description": "positive integer (digits only)"}])},
        "/api/v1/openapi.json": {"get": _operation(
            "getOpenApi", "This document", {"200": {
                "description": "OpenAPI 3.1 document",
                "content": {"application/json": {"schema": {"type": "object"}}}}})},
        "/hooks/{path}": {"post": _operation(
            "triggerWebhook", "Webhook trigger: run the owning workflow's current version", {
                **run_responses,
                "400": error("bad Idempotency-Key"),
                "403": error('"invalid or missing webhook signature", a timestamp too old '
                              "or missing, or the key's role"),
                "404": error('"no webhook registered for path"')},
            parameters=[_path_param("path", "the rest of the registered path"), _IDEMPOTENCY,
                        {"name": "X-Hub-Signature-256", "in": "header", "required": False,
                         "schema": {"type": "string"},
                         "description": "sha256=<hex HMAC-SHA256 of the raw body, or of "
                                        "<timestamp>.<body> with X-Webhook-Timestamp>, needed "
                                        "when the trigger has a secret (or X-Signature-256)"},
                        {"name": "X-Webhook-Timestamp", "in": "header", "required": False,
                         "schema": {"type": "string"},
                         "description": "Unix time in seconds, signed with the body; refused "
                                        "beyond the trigger's max_age (default 5m)"}],
            operator=True, request_body={"required": False, "description": "JSON becomes trigger.payload; "
                          "other text is passed as a string; empty is null",
                          "content": {"*/*": {"schema": {}}}})},
        "/metrics": {"get": _operation(
            "getMetrics", "Prometheus metrics", {"200": {
                "description": "text exposition format 0.0.4",
                "content": {"text/plain": {"schema": {"type": "string"}}}},
                "401": {"$ref": "#/components/responses/Unauthorized"}},
            protected=False, database=False)},
        "/healthz": {"get": _operation("getHealth", "Liveness", {"200": _json("Health", "alive")},
                                       protected=False, database=False)},
        "/readyz": {"get": _operation(
            "getReadiness", "Readiness: started, database answering, migrations at head", {
                "200": _json("Readiness", "ready"),
                "503": _json("Readiness", "not ready, with details")},
            protected=False, database=False)},
    }


@functools.lru_cache(maxsize=1)
def _document() -> dict:
    return {
        "openapi": "3.1.0",
        "info": {"title": "mantle", "version": "1",
                 "description": "REST API of mantle serve. Errors are JSON {\"error\": ...}. "
                                "Any path answers 405 (MethodNotAllowed) for a method it does "
                                "not implement; unknown paths answer 404 (NotFound). Keys have "
                                "a role: viewer (every GET), operator (also run, cancel, retry "
                                "and webhooks), admin (everything)."},
        "components": {
            "schemas": schemas(),
            "responses": common_responses(),
            "securitySchemes": {"bearerAuth": {
                "type": "http", "scheme": "bearer",
                "description": "required on /api/v1 and /hooks while an active key exists"}},
        },
        # Either a key, or none at all when no key is active.
        "security": [{"bearerAuth": []}, {}],
        "paths": _paths(),
    }


def document() -> dict:
    """A fresh copy of the document (callers may not change the cached one)."""
    return copy.deepcopy(_document())
