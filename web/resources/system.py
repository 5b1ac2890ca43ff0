"""Probes, metrics and the API description: ``/healthz``, ``/readyz``, ``/metrics``,
``/api/v1/openapi.json`` (SPEC 7.5, 9.1)."""

from __future__ import annotations

from prometheus_client import generate_latest

from web.openapi import document

__all__ = ["Healthz", "Readyz", "MetricsResource", "OpenApiResource", "METRICS_CONTENT_TYPE"]

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Healthz:
    """Answers whenever the process does: no database, no engine."""

    def on_get(self, req, resp) -> None:
        resp.media = {"status": "ok"}


class Readyz:
    """200 when ``readiness.check()`` says so, else 503 with its details; checked per request,
    so it returns to 200 by itself after an outage."""

    def __init__(self, readiness):
        self._readiness = readiness

    def on_get(self, req, resp) -> None:
        ready, details = self._readiness.check()
        if ready:
            resp.media = {"status": "ok"}
        else:
            resp.status = 503
            resp.media = {"status": "unavailable", "details": details}


class MetricsResource:
    def __init__(self, registry):
        self._registry = registry

    def on_get(self, req, resp) -> None:
        resp.content_type = METRICS_CONTENT_TYPE
        resp.data = generate_latest(self._registry)


class OpenApiResource:
    def on_get(self, req, resp) -> None:
        resp.media = document()
