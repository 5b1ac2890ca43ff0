"""Middleware: HTTP metrics and request logs, the body limit, the method check.

API keys are ``web.auth``, the rate limit ``web.ratelimit``.
"""

from __future__ import annotations

import logging
import re
import time

import falcon

from mantle.metrics import Metrics
from web.errors import BODY_LIMIT, METHOD_NOT_ALLOWED, TOO_LARGE, ApiError

__all__ = ["RouteLabels", "RequestMetrics", "BodyLimit", "MethodCheck", "allowed_methods"]

log = logging.getLogger("mantle.http")

_CONVERTER = re.compile(r"\{(\w+):[^}]*\}")
# The methods of HTTP itself (RFC 9110, PATCH); any other a client makes up is ``other`` in
# the metrics, whose label sets must stay few (SPEC 9.1: never a raw value).
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE",
                      "PATCH"})


class RouteLabels:
    """The route template of a request (``/hooks/{path}``), never its raw path (SPEC 9.1).

    Middleware that runs before routing (authentication) and requests that never reached a
    resource still get their template by asking the router directly.
    """

    def __init__(self, router):
        self._router = router
        self._labels: dict[str, str] = {}  # template -> label; as many as there are routes

    def __call__(self, req: falcon.Request) -> str:
        template = req.uri_template
        if template is None:
            found = self._router.find(req.path)
            template = found[3] if found else None
        if template is None:
            return "unmatched"
        label = self._labels.get(template)
        if label is None:
            label = self._labels[template] = _CONVERTER.sub(r"{\1}", template)
        return label


class RequestMetrics:
    """Counts and times every request by method, route template and status; debug log line."""

    def __init__(self, metrics: Metrics, labels: RouteLabels):
        self._metrics = metrics
        self._labels = labels
        # Each label set's counter and histogram, looked up once: ``labels()`` validates and
        # locks on every call, twice per request. As many as the counter has label sets.
        self._series: dict[tuple[str, str, int], tuple] = {}

    def process_request(self, req, resp) -> None:
        req.context.started = time.perf_counter()

    def process_response(self, req, resp, resource, req_succeeded) -> None:
        elapsed = time.perf_counter() - req.context.get("started", time.perf_counter())
        route = self._labels(req)
        status = falcon.http_status_to_code(resp.status)
        method = req.method if req.method in _METHODS else "other"
        key = (method, route, status)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = (
                self._metrics.http_requests.labels(method, route, str(status)),
                self._metrics.http_duration.labels(method, route))
        series[0].inc()
        series[1].observe(elapsed)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("http request", extra={"method": req.method, "route": route,
                                              "status": status,
                                              "duration_ms": round(elapsed * 1000, 3)})


class BodyLimit:
    """413 for a declared body over 1 MiB before anything reads it (resources also stop
    reading at the limit, for bodies without Content-Length)."""

    def process_request(self, req, resp) -> None:
        if req.content_length is not None and req.content_length > BODY_LIMIT:
            raise ApiError(413, TOO_LARGE)


def allowed_methods(resource) -> list[str]:
    """The methods a resource implements (its ``on_<method>`` responders)."""
    return sorted(name[3:].upper() for name in dir(resource)
                  if name.startswith("on_") and callable(getattr(resource, name)))


class MethodCheck:
    """405 with ``Allow`` listing exactly the implemented methods.

    falcon would answer OPTIONS itself (200, no body) and list OPTIONS in ``Allow``; the API
    has no OPTIONS, so every method a resource lacks is refused here, before routing to it.
    """

    def process_resource(self, req, resp, resource, params) -> None:
        if not hasattr(resource, "on_" + req.method.lower()):
            raise ApiError(405, METHOD_NOT_ALLOWED,
                           headers={"Allow": ", ".join(allowed_methods(resource))})
