"""``create_app``: the Falcon application of SPEC 7, wired from the dependencies passed in.

Queries read the database through the peewee models (bound by the caller); runs and cancels
are commands to the engine's Supervisor. Nothing here is a module-level global.
"""

from __future__ import annotations

import falcon
from falcon.routing import CompiledRouter

from mantle.metrics import Metrics
from web import errors
from web.middleware import (Authentication, BodyLimit, MethodCheck, RequestMetrics,
                            RouteLabels)
from web.resources.executions import ExecutionCollection, ExecutionItem
from web.resources.hooks import WebhookResource
from web.resources.runs import CancelResource, RunResource
from web.resources.system import Healthz, MetricsResource, OpenApiResource, Readyz
from web.resources.workflows import (VersionCollection, VersionItem, WorkflowCollection,
                                     WorkflowItem)

__all__ = ["create_app", "routes"]


def routes(engine, metrics: Metrics, readiness) -> list[tuple[str, object]]:
    """Every route of the API: (falcon URI template, resource)."""
    return [
        ("/api/v1/run/{workflow}", RunResource(engine)),
        ("/api/v1/cancel/{execution}", CancelResource(engine)),
        ("/api/v1/executions", ExecutionCollection()),
        ("/api/v1/executions/{id}", ExecutionItem()),
        ("/api/v1/workflows", WorkflowCollection()),
        ("/api/v1/workflows/{name}", WorkflowItem()),
        ("/api/v1/workflows/{name}/versions", VersionCollection()),
        ("/api/v1/workflows/{name}/versions/{version}", VersionItem()),
        ("/api/v1/openapi.json", OpenApiResource()),
        ("/hooks/{path:path}", WebhookResource(engine)),
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


def create_app(engine, metrics: Metrics, database, readiness) -> falcon.App:
    """The WSGI app.

    ``engine``: an started ``actors.engine.Engine`` (run, cancel, journal health);
    ``metrics``: the process's ``Metrics`` (HTTP metrics are recorded there, ``/metrics``
    exposes its registry); ``database``: the peewee database the models are bound to (used to
    drop a thread's connection after an outage); ``readiness``: an object whose ``check()``
    returns ``(ready, details)`` for ``/readyz``.
    """
    router = CompiledRouter()
    labels = RouteLabels(router)
    app = falcon.App(router=router, middleware=[
        NodeHeader(engine.runner),
        RequestMetrics(metrics, labels),  # first, so it also times refused requests
        BodyLimit(),
        Authentication(database, labels),
        MethodCheck(),
    ])
    errors.install(app, database)
    for template, resource in routes(engine, metrics, readiness):
        app.add_route(template, resource)
    return app
