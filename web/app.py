"""``create_app``: the Falcon application of SPEC 7 and 13.8, wired from the dependencies passed
in.

Queries read the database through the peewee models (bound by the caller); runs, cancels and
retries are commands to the engine. Nothing here is a module-level global: the parts that live
as long as the app (the event poller, the ``auth.failed`` writer, the rate-limit buckets) are
an ``ApiRuntime`` that the daemon closes at shutdown.
"""

from __future__ import annotations

import falcon
from falcon.routing import CompiledRouter

from mantle.db import release_connection
from mantle.metrics import Metrics
from web import errors
from web.auth import Authentication, AuthFailures, RoleCheck
from web.events import EventHub
from web.middleware import BodyLimit, MethodCheck, RequestMetrics, RouteLabels
from web.ratelimit import RateLimit, TokenBuckets
from web.resources.events import AllEvents, ExecutionEvents
from web.resources.executions import ExecutionCollection, ExecutionItem, StepOutput
from web.resources.hooks import WebhookResource
from web.resources.runs import CancelResource, RetryResource, RunResource
from web.resources.system import Healthz, MetricsResource, OpenApiResource, Readyz
from web.resources.workflows import (VersionCollection, VersionItem, WorkflowCollection,
                                     WorkflowItem)
from web.settings import ApiSettings

__all__ = ["create_app", "routes", "ApiRuntime"]


class ApiRuntime:
    """The API's long-lived parts for one app, from its settings; ``close()`` ends the event
    streams and writes the pending ``auth.failed`` counts (daemon shutdown)."""

    def __init__(self, database, settings: ApiSettings | None = None):
        self.settings = settings or ApiSettings()
        self.failures = AuthFailures(database, self.settings.auth_audit_interval)
        self.hub = EventHub(database, self.settings.max_event_streams)
        self.buckets = (TokenBuckets(self.settings.rate_limit, self.settings.rate_burst)
                        if self.settings.rate_limit > 0 else None)

    def close(self) -> None:
        self.hub.close()
        self.failures.close()


def routes(engine, metrics: Metrics, readiness,
           runtime: ApiRuntime | None = None) -> list[tuple[str, object]]:
    """Every route of the API: (falcon URI template, resource)."""
    runtime = runtime or ApiRuntime(None)
    return [
        ("/api/v1/run/{workflow}", RunResource(engine)),
        ("/api/v1/cancel/{execution}", CancelResource(engine)),
        ("/api/v1/retry/{execution}", RetryResource(engine)),
        ("/api/v1/executions", ExecutionCollection()),
        ("/api/v1/executions/{id}", ExecutionItem()),
        ("/api/v1/executions/{id}/steps/{step}/output", StepOutput()),
        ("/api/v1/executions/{id}/events", ExecutionEvents(runtime.hub)),
        ("/api/v1/events", AllEvents(runtime.hub)),
        ("/api/v1/workflows", WorkflowCollection()),
        ("/api/v1/workflows/{name}", WorkflowItem()),
        ("/api/v1/workflows/{name}/versions", VersionCollection()),
        ("/api/v1/workflows/{name}/versions/{version}", VersionItem()),
        ("/api/v1/openapi.json", OpenApiResource()),
        ("/hooks/{path:path}", WebhookResource(engine, runtime.settings.dropped_headers)),
        ("/metrics", MetricsResource(metrics.registry)),
        ("/healthz", Healthz()),
        ("/readyz", Readyz(readiness)),
    ]


class NodeHeader:
    """``X-Mantle-Node``: the node (process) that answered, so an operator or a benchmark can
    tell ``serve --workers`` and several daemons apart (docs/api.md)."""

    def __init__(self, node_id: str):
        self._node_id = node_id

    def process_response(self, req, resp, resource, req_succeeded) -> None:
        resp.set_header("X-Mantle-Node", self._node_id)


class ReleaseConnection:
    """Give the request thread's PostgreSQL connection back to the process's pool when the
    request is answered, so the pool, not the number of HTTP threads, bounds what one
    process holds of the server's ``max_connections`` (``release_connection``)."""

    def __init__(self, database):
        self._database = database

    def process_response(self, req, resp, resource, req_succeeded) -> None:
        release_connection(self._database)


def create_app(engine, metrics: Metrics, database, readiness,
               runtime: ApiRuntime | None = None) -> falcon.App:
    """The WSGI app.

    ``engine``: an started ``actors.engine.Engine`` (run, cancel, journal health);
    ``metrics``: the process's ``Metrics`` (HTTP metrics are recorded there, ``/metrics``
    exposes its registry); ``database``: the peewee database the models are bound to (used to
    drop a thread's connection after an outage); ``readiness``: an object whose ``check()``
    returns ``(ready, details)`` for ``/readyz``; ``runtime``: the settings and long-lived
    parts (default: an ``ApiRuntime`` with default settings, never closed).
    """
    runtime = runtime or ApiRuntime(database)
    router = CompiledRouter()
    labels = RouteLabels(router)
    middleware = [
        ReleaseConnection(database),  # first, so its process_response runs last
        NodeHeader(engine.runner),
        RequestMetrics(metrics, labels),  # first, so it also times refused requests
        BodyLimit(),
        Authentication(database, labels, runtime.failures,
                       runtime.settings.metrics_require_key),
    ]
    if runtime.buckets is not None:
        middleware.append(RateLimit(runtime.buckets))
    middleware += [MethodCheck(), RoleCheck(labels)]
    app = falcon.App(router=router, middleware=middleware)
    errors.install(app, database)
    for template, resource in routes(engine, metrics, readiness, runtime):
        app.add_route(template, resource)
    return app
