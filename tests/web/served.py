"""The real app over a real socket in the test process: ``served(engine, db, settings)``.

``mantle serve``'s own listener (``mantle.daemon.http.HttpServer``: waitress with the
daemon's settings, stream workers included) on 127.0.0.1 and a free port, serving
``create_app`` with an ``ApiRuntime`` built from ``settings``. Tests that need the daemon's
configuration path or another process use ``tests.web.support.Daemon`` instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator

from mantle.daemon.http import HttpServer
from mantle.daemon.readiness import Readiness
from tests.web.support import Reply, call
from web.app import ApiRuntime, create_app
from web.settings import ApiSettings

__all__ = ["Served", "served"]


@dataclasses.dataclass
class Served:
    url: str
    runtime: ApiRuntime

    def request(self, method: str, path: str, body=None, headers=None) -> Reply:
        return call(self.url, method, path, body, headers)

    def get(self, path: str, headers=None) -> Reply:
        return self.request("GET", path, headers=headers)

    def post(self, path: str, payload=None, headers=None, body=None) -> Reply:
        if payload is not None:
            body = json.dumps(payload)
            headers = {"Content-Type": "application/json", **(headers or {})}
        return self.request("POST", path, body, headers)


@contextlib.contextmanager
def served(engine, db, settings: ApiSettings | None = None,
           threads: int = 4) -> Iterator[Served]:
    settings = settings or ApiSettings()
    readiness = Readiness(db)
    readiness.mark_ready()
    runtime = ApiRuntime(db, settings)
    server = HttpServer(create_app(engine, engine.metrics, db, readiness, runtime),
                        "127.0.0.1:0", threads, streams=settings.max_event_streams)
    address = server.bind()
    try:
        yield Served(f"http://{address}", runtime)
    finally:
        runtime.close()
        server.stop()
