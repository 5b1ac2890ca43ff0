"""The components of the OpenAPI document (``web.openapi``): schemas and shared responses."""

from __future__ import annotations

from mantle.events import KINDS

__all__ = ["schemas", "common_responses", "ref", "json_response", "error", "EXECUTION_STATUSES"]

STEP_STATUSES = ["pending", "running", "completed", "failed", "skipped", "cancelled"]
EXECUTION_STATUSES = ["pending", "running", "completed", "failed", "cancelled"]


def ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(required: list[str], properties: dict, additional=False) -> dict:
    return {"type": "object", "required": required, "properties": properties,
            "additionalProperties": additional}


def _time(nullable: bool = False) -> dict:
    return {"type": ["string", "null"] if nullable else "string", "format": "date-time"}


def schemas() -> dict:
    step = {"name": {"type": "string"}, "status": {"type": "string", "enum": STEP_STATUSES},
            "attempt": {"type": "integer", "minimum": 0}, "started_at": _time(True),
            "completed_at": _time(True), "error": {"type": ["string", "null"]},
            "output": {"description": "connector output; null if none or skipped; "
                                      '{"truncated": true, "size": <bytes>} when its JSON '
                                      "is over 64 KiB (GET .../steps/{step}/output has it)"}}
    summary = {"id": {"type": "string", "format": "uuid"}, "workflow": {"type": "string"},
               "version": {"type": "integer", "minimum": 1},
               "status": {"type": "string", "enum": EXECUTION_STATUSES},
               "started_at": _time(), "completed_at": _time(True),
               "parent_execution_id": {"type": ["string", "null"], "format": "uuid",
                                       "description": "the execution whose workflow/run step "
                                                      "started this one (sub-workflows)"},
               "parent_step": {"type": ["string", "null"],
                               "description": "that workflow/run step's name"}}
    summary_fields = list(summary)
    child = {"id": {"type": "string", "format": "uuid"}, "workflow": {"type": "string"},
             "status": {"type": "string", "enum": EXECUTION_STATUSES},
             "parent_step": {"type": "string"}}
    return {
        "Error": _obj(["error"], {"error": {"type": "string"}}),
        "CancelConflict": _obj(["error", "status"], {
            "error": {"type": "string"},
            "status": {"type": "string", "enum": ["completed", "failed", "cancelled"]}}),
        "RunRequest": {"type": "object", "properties": {
            "inputs": {"type": ["object", "null"],
                       "description": "values of declared inputs; null is the same as none"},
            "version": {"type": ["integer", "null"], "minimum": 1,
                        "description": "version to run; default (or null): the current one. "
                                       "A number with a zero fraction (2.0) is that integer"}},
            "description": "optional; other fields are ignored"},
        "RetryRequest": {"type": "object", "properties": {
            "from_step": {"type": ["string", "null"],
                          "description": "main step to retry from; default (or null): the "
                                         "first that failed without continue_on_error"}},
            "description": "optional; other fields are ignored"},
        "RetryAccepted": _obj(["execution_id", "workflow", "version", "from_step", "reused"], {
            "execution_id": {"type": "string", "format": "uuid"},
            "workflow": {"type": "string"}, "version": {"type": "integer", "minimum": 1},
            "from_step": {"type": "string", "description": "the retry point"},
            "reused": {"type": "array", "items": {"type": "string"},
                       "description": "steps whose results were copied, not run again"}}),
        "RetryConflict": _obj(["error", "status"], {
            "error": {"type": "string"},
            "status": {"type": "string", "enum": EXECUTION_STATUSES}}),
        "RunAccepted": _obj(["execution_id", "workflow", "version"], {
            "execution_id": {"type": "string", "format": "uuid"},
            "workflow": {"type": "string"}, "version": {"type": "integer", "minimum": 1}}),
        "CancelResult": _obj(["execution_id", "status"], {
            "execution_id": {"type": "string", "format": "uuid"},
            "status": {"type": "string", "enum": ["cancelled"]}}),
        "ExecutionSummary": _obj(summary_fields, summary),
        "ExecutionList": _obj(["executions", "next_cursor"], {
            "executions": {"type": "array", "items": ref("ExecutionSummary")},
            "next_cursor": {"type": ["string", "null"],
                            "description": "pass as ?cursor= for the next page; null on the "
                                           "last page"}}),
        "Step": _obj(list(step), step),
        "HookStep": _obj([*step, "block"], {**step, "block": {
            "type": "string", "enum": ["on_success", "on_failure", "on_finish"]}}),
        "ExecutionDetail": _obj([*summary_fields, "inputs", "error", "steps", "hooks",
                                 "children"], {
            **summary, "inputs": {"type": "object"}, "error": {"type": ["string", "null"]},
            "steps": {"type": "array", "items": ref("Step")},
            "hooks": {"type": "array", "items": ref("HookStep")},
            "children": {"type": "array", "items": _obj(list(child), child),
                         "description": "the sub-workflow executions this one started, "
                                        "oldest first"}}),
        "WorkflowSummary": _obj(["name", "latest_version", "created_at", "updated_at"], {
            "name": {"type": "string"}, "latest_version": {"type": "integer", "minimum": 1},
            "created_at": _time(), "updated_at": _time()}),
        "WorkflowList": _obj(["workflows"], {
            "workflows": {"type": "array", "items": ref("WorkflowSummary")}}),
        "WorkflowVersion": _obj(["name", "version", "definition"], {
            "name": {"type": "string"}, "version": {"type": "integer", "minimum": 1},
            "definition": {"type": "object", "description": "the version as JSON"}}),
        "VersionSummary": _obj(["version", "content_hash", "created_at"], {
            "version": {"type": "integer", "minimum": 1},
            "content_hash": {"type": "string", "description": "SHA-256 hex of the YAML"},
            "created_at": _time()}),
        "VersionList": _obj(["name", "current_version", "versions"], {
            "name": {"type": "string"}, "current_version": {"type": "integer", "minimum": 1},
            "versions": {"type": "array", "items": ref("VersionSummary")}}),
        "Event": _obj(["id", "event", "data"], {
            "id": {"type": "string", "pattern": "^[0-9]+$",
                   "description": "increasing along a stream; send it back as Last-Event-ID"},
            "event": {"type": "string", "enum": list(KINDS)},
            "data": {"type": "string", "contentMediaType": "application/json",
                     "description": "JSON: execution_id, workflow, time; version "
                                    "(execution.started); step, attempt (main steps) or block "
                                    "(hooks); status (step.finished, execution.finished); "
                                    "error (failed and retrying steps, failed executions)"}}),
        "Health": _obj(["status"], {"status": {"type": "string", "enum": ["ok"]}}),
        "Readiness": _obj(["status"], {
            "status": {"type": "string", "enum": ["ok", "unavailable"]},
            "details": {"type": "object", "additionalProperties": {"type": "string"},
                        "description": 'e.g. {"database": "unreachable"}, '
                                       '{"migrations": "pending"}, {"server": "starting"}, '
                                       '{"server": "shutting down"}'}}),
    }


def json_response(schema: str, description: str) -> dict:
    return {"description": description,
            "content": {"application/json": {"schema": ref(schema)}}}


def error(description: str) -> dict:
    return json_response("Error", description)


def common_responses() -> dict:
    unauthorized = error('no valid key while keys exist: "missing Authorization header", '
                          '"Authorization header must use Bearer scheme" or "invalid API key"')
    unauthorized["headers"] = {"WWW-Authenticate": {"schema": {"type": "string",
                                                               "enum": ["Bearer"]}}}
    not_allowed = error('"method not allowed"')
    not_allowed["headers"] = {"Allow": {"schema": {"type": "string"},
                                        "description": "the methods the path implements"}}
    limited = error('"rate limit exceeded" (api.rate_limit)')
    limited["headers"] = {"Retry-After": {"schema": {"type": "string"},
                                          "description": "seconds until a request is allowed"}}
    return {
        "Unauthorized": unauthorized,
        "RateLimited": limited,
        "Forbidden": error('API key role "<role>" cannot <METHOD> <route>'),
        "NotFound": error('no such route: "not found"'),
        "MethodNotAllowed": not_allowed,
        "TooLarge": error('"request body too large (limit 1048576 bytes)"'),
        "Unavailable": error('"database unavailable" (or "server is shutting down")'),
        "Internal": error('"internal server error"; the traceback is logged'),
    }
