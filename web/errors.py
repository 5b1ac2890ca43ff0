"""Every failure as JSON ``{"error": ...}`` (SPEC 7.1), mapped to HTTP in one place.

Resources raise ``ApiError`` for request problems and let domain errors (``mantle.errors``)
propagate; the handlers installed by ``install`` turn both, falcon's own errors (unknown
route, wrong method), database outages and unexpected faults into the contract's bodies.
"""

from __future__ import annotations

import logging
from typing import Any

import falcon
import pykka

from mantle.db import OUTAGE_ERRORS, reset_connection
from mantle.errors import (EngineSaturated, ExecutionFinished, ExecutionNotFound,
                           InvalidInput, JournalStopped, LimitReached, MantleError,
                           ShuttingDown, VersionNotFound, WorkflowNotFound)
from mantle.queries import StepNotFound
from mantle.retries import NotFailed, StillRunning, UnknownStep

__all__ = ["ApiError", "install", "BODY_LIMIT", "OUTAGE_ERRORS", "reset_connection",
           "NOT_FOUND", "METHOD_NOT_ALLOWED", "TOO_LARGE", "UNAVAILABLE", "INTERNAL"]

log = logging.getLogger("mantle.http")

BODY_LIMIT = 1024 * 1024
NOT_FOUND = "not found"
METHOD_NOT_ALLOWED = "method not allowed"
TOO_LARGE = f"request body too large (limit {BODY_LIMIT} bytes)"
UNAVAILABLE = "database unavailable"
INTERNAL = "internal server error"

_STATUS_FOR: tuple[tuple[type[MantleError], int], ...] = (
    (WorkflowNotFound, 404),
    (VersionNotFound, 404),
    (ExecutionNotFound, 404),
    (StepNotFound, 404),
    (ExecutionFinished, 409),
    (StillRunning, 409),
    (NotFailed, 409),
    (UnknownStep, 400),
    (LimitReached, 429),
    (InvalidInput, 400),
    (ShuttingDown, 503),
    (EngineSaturated, 503),
)
# Messages for falcon's own errors, which carry only a title.
_FALCON_MESSAGES = {404: NOT_FOUND, 405: METHOD_NOT_ALLOWED, 413: TOO_LARGE}


class ApiError(Exception):
    """A response other than success: status, ``{"error": message, **extra}``, headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None,
                 **extra: Any):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}
        self.extra = extra


def _respond(resp: falcon.Response, status: int, body: dict,
             headers: dict[str, str] | None = None) -> None:
    resp.status = status
    resp.media = body
    resp.content_type = falcon.MEDIA_JSON
    for name, value in (headers or {}).items():
        resp.set_header(name, value)


def install(app: falcon.App, database) -> None:
    """Register the error handlers on ``app`` (most specific class wins, as in falcon)."""

    def api_error(req, resp, ex: ApiError, params):
        _respond(resp, ex.status, {"error": ex.message, **ex.extra}, ex.headers)

    def http_error(req, resp, ex: falcon.HTTPError, params):
        message = _FALCON_MESSAGES.get(ex.status_code) or ex.description or ex.title.lower()
        _respond(resp, ex.status_code, {"error": message}, dict(ex.headers or {}))

    def mantle_error(req, resp, ex: MantleError, params):
        for kind, status in _STATUS_FOR:
            if isinstance(ex, kind):
                extra = ({"status": ex.status}
                         if isinstance(ex, (ExecutionFinished, StillRunning, NotFailed)) else {})
                _respond(resp, status, {"error": str(ex), **extra})
                return
        unexpected(req, resp, ex, params)

    def outage(req, resp, ex: Exception, params):
        reset_connection(database)
        _respond(resp, 503, {"error": UNAVAILABLE})

    def stopped(req, resp, ex: Exception, params):
        _respond(resp, 503, {"error": str(ShuttingDown())})

    def unexpected(req, resp, ex: Exception, params):
        log.error("internal server error", exc_info=ex,
                  extra={"method": req.method, "path": req.path})
        _respond(resp, 500, {"error": INTERNAL})

    app.add_error_handler(Exception, unexpected)
    app.add_error_handler(MantleError, mantle_error)
    app.add_error_handler(falcon.HTTPError, http_error)
    app.add_error_handler(ApiError, api_error)
    app.add_error_handler(JournalStopped, stopped)
    # The engine answers through its journal: no answer in time means the database is stuck.
    app.add_error_handler(pykka.Timeout, outage)
    for kind in OUTAGE_ERRORS:
        app.add_error_handler(kind, outage)
