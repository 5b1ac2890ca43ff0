"""The Prometheus metrics of SPEC 9.1 and 13.6, built on a registry passed in (STYLE habit 8)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["Metrics"]


class Metrics:
    """Every mantle metric, registered on ``registry`` (a fresh one per app and per test)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.executions = Counter("mantle_workflow_executions_total",
                                  "Executions that reached a final status",
                                  ["workflow", "status"], registry=r)
        self.steps = Counter("mantle_step_executions_total",
                             "Main steps that reached a final status",
                             ["workflow", "step", "status"], registry=r)
        self.step_duration = Histogram("mantle_step_duration_seconds",
                                       "Main step duration, started_at to completed_at",
                                       ["workflow", "step", "action"], registry=r)
        self.connector_duration = Histogram("mantle_connector_duration_seconds",
                                            "Duration of each connector invocation",
                                            ["action"], registry=r)
        self.active = Gauge("mantle_active_executions",
                            "Executions running in this process", registry=r)
        self.http_requests = Counter("mantle_http_requests_total", "HTTP requests",
                                     ["method", "route", "status"], registry=r)
        self.http_duration = Histogram("mantle_http_request_duration_seconds",
                                       "HTTP request duration", ["method", "route"], registry=r)
        # SPEC 13.6: ``model`` is the requested model, ``status`` the HTTP status or "error".
        self.ai_tokens = Counter("mantle_ai_tokens_total", "Tokens used by AI steps",
                                 ["model", "kind"], registry=r)
        self.ai_requests = Counter("mantle_ai_requests_total",
                                   "Requests of AI steps to their model server",
                                   ["model", "status"], registry=r)
        self.ai_request_duration = Histogram("mantle_ai_request_duration_seconds",
                                             "Duration of each AI model request", ["model"],
                                             registry=r)
        self.retention_deleted = Counter("mantle_retention_deleted_total",
                                         "Rows deleted by the retention sweep (SPEC 13.4)",
                                         ["kind"], registry=r)
        for kind in ("execution", "audit"):
            self.retention_deleted.labels(kind=kind)
