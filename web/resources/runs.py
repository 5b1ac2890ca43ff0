"""Commands to the engine: ``POST /api/v1/run/{workflow}``, ``/api/v1/cancel/{execution}`` and
``/api/v1/retry/{execution}`` (SPEC 7.2, 7.3, 13.8)."""

from __future__ import annotations

from typing import Any

import falcon

from mantle import queries
from mantle.errors import ExecutionNotFound
from mantle.retries import plan_retry
from mantle.store import CHILD_KEY_PREFIX
from web.errors import UNAVAILABLE, ApiError
from web.parsing import json_object_body

__all__ = ["RunResource", "CancelResource", "RetryResource", "accept_run", "idempotency_key",
           "MANUAL", "ENGINE_TIMEOUT"]

MANUAL = {"type": "manual", "payload": None}
# How long a request waits for the engine to create an execution (one journal commit).
ENGINE_TIMEOUT = 10.0


def idempotency_key(req: falcon.Request) -> str | None:
    """The ``Idempotency-Key`` header (1-255 characters), or None; never one of the form
    the engine gives sub-workflow children (``CHILD_KEY_PREFIX``)."""
    key = req.get_header("Idempotency-Key")
    if key is not None and not 1 <= len(key) <= 255:
        raise ApiError(400, "Idempotency-Key must be 1 to 255 characters")
    if key is not None and key.startswith(CHILD_KEY_PREFIX):
        raise ApiError(400, f'Idempotency-Key must not begin with "{CHILD_KEY_PREFIX}"')
    return key


def accept_run(engine, resp: falcon.Response, workflow: str, inputs: dict | None,
               version: int | None, trigger: dict, actor: str, key: str | None) -> None:
    """Ask the engine for an execution and answer 202 (200 for a repeated Idempotency-Key).

    The engine answers once the row exists and the execution has been handed to its actor, so
    the response never waits for the execution itself.
    """
    if not engine.journal.healthy:  # its writes are stuck until the database returns
        raise ApiError(503, UNAVAILABLE)
    result = engine.run(workflow, inputs, version=version, trigger=trigger, actor=actor,
                        idempotency_key=key, timeout=ENGINE_TIMEOUT)
    resp.status = 200 if result.existing else 202
    resp.media = result.body()


def _version(body: dict) -> int | None:
    """A positive integer; written with a fraction of zero too (``2.0``), since JSON (and the
    OpenAPI document's ``integer``) does not tell the two apart (issue 15)."""
    version = body.get("version")
    if version is None:
        return None
    if isinstance(version, float) and version.is_integer():
        version = int(version)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ApiError(400, '"version" must be a positive integer')
    return version


def _inputs(body: dict) -> dict[str, Any]:
    inputs = body.get("inputs")
    if inputs is None:
        return {}
    if not isinstance(inputs, dict):
        raise ApiError(400, '"inputs" must be a JSON object')
    return inputs


class RunResource:
    def __init__(self, engine):
        self._engine = engine

    def on_post(self, req, resp, workflow: str) -> None:
        key = idempotency_key(req)
        body = json_object_body(req)
        accept_run(self._engine, resp, workflow, _inputs(body), _version(body), MANUAL,
                   req.context.actor, key)


class CancelResource:
    def __init__(self, engine):
        self._engine = engine

    def on_post(self, req, resp, execution: str) -> None:
        if not queries.is_uuid(execution):
            raise ExecutionNotFound(execution)
        if not self._engine.journal.healthy:
            raise ApiError(503, UNAVAILABLE)
        self._engine.cancel(execution, req.context.actor, timeout=ENGINE_TIMEOUT)
        resp.media = {"execution_id": execution, "status": "cancelled"}


class RetryResource:
    """A new execution of a failed one, from a step (``mantle.retries`` holds the rules)."""

    def __init__(self, engine):
        self._engine = engine

    def on_post(self, req, resp, execution: str) -> None:
        body = json_object_body(req)
        from_step = body.get("from_step")
        if from_step is not None and not isinstance(from_step, str):
            raise ApiError(400, '"from_step" must be a string')
        plan = plan_retry(execution, from_step)
        if not self._engine.journal.healthy:
            raise ApiError(503, UNAVAILABLE)
        result = self._engine.run(plan.workflow, plan.inputs, version=plan.version,
                                  trigger=plan.trigger, actor=req.context.actor,
                                  retry_of=plan.original_id, from_step=plan.from_step,
                                  reuse=plan.reuse, timeout=ENGINE_TIMEOUT)
        resp.status = 202
        resp.media = {**result.body(), "from_step": plan.from_step, "reused": plan.reused}
