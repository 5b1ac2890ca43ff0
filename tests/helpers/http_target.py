"""A real HTTP server on 127.0.0.1 for tests that need something to call.

``HttpTarget`` runs a ``ThreadingHTTPServer`` on a free port in a thread. Routes are set per
path (query ignored) with ``route(...)``; unknown paths answer 404. Every request is recorded
(method, target, headers, body, arrival time) and counted, and tests wait on those counts with
a deadline instead of sleeping. ``peak(path)`` is the most requests to a path that were being
answered at once (limits such as a step's ``max_parallel``). Example::

    with HttpTarget() as target:
        target.route("/slow", hold=True)              # blocks until target.release("/slow")
        target.route("/data", json={"ok": True})
        target.route("/old", status=302, redirect_to="/data")
        target.url("/data")  -> "http://127.0.0.1:<port>/data"
"""

from __future__ import annotations

import json as jsonlib
import select
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

__all__ = ["HttpTarget", "Route", "Received"]


@dataclass
class Route:
    """How one path answers. ``hold`` blocks before the status line until released (or
    ``delay`` seconds pass, or the client closes the connection); ``hold_body`` sends the
    headers first, then blocks.
    ``stream`` sends that many bytes chunked, with no Content-Length.
    ``echo`` answers a JSON description of the request received. ``fail_first`` answers
    the first that many requests to each distinct target (path and query) with 500 at once,
    without holding or delaying them."""

    status: int = 200
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    delay: float = 0.0
    hold: bool = False
    hold_body: bool = False
    stream: int = 0
    echo: bool = False
    fail_first: int = 0
    gate: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class Received:
    """One request as the server saw it."""

    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    at: float = 0.0  # time.monotonic() when the request arrived

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (any case), or None."""
        values = self.header_values(name)
        return values[0] if values else None

    def header_values(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name.lower()]

    def json(self) -> Any:
        return jsonlib.loads(self.body)


class HttpTarget:
    """The server; also a context manager that closes it (releasing held requests)."""

    def __init__(self, host: str = "127.0.0.1"):
        self._routes: dict[str, Route] = {}
        self._received: list[Received] = []
        # path -> {id of a request being answered now: its connection}
        self._active: dict[str, dict[int, socket.socket]] = {}
        self._peak: dict[str, int] = {}  # path -> the most answered at once
        self._changed = threading.Condition()
        self._closed = threading.Event()
        self._server = _Server((host, 0), _handler_for(self))
        self._server.daemon_threads = True
        self.host = host
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
            name=f"http-target-{self.port}", daemon=True,
        )
        self._thread.start()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def url(self, path: str = "/") -> str:
        return self.base_url + path

    def route(self, path: str, *, status: int = 200, body: bytes | str = b"",
              json: Any = None, content_type: str | None = None,
              headers: list[tuple[str, str]] | None = None, delay: float = 0.0,
              hold: bool = False, hold_body: bool = False, stream: int = 0,
              redirect_to: str | None = None, echo: bool = False,
              fail_first: int = 0) -> Route:
        """Set how ``path`` answers; ``redirect_to`` may be a path or an absolute URL."""
        extra = list(headers or [])
        if json is not None:
            body, content_type = jsonlib.dumps(json).encode(), content_type or "application/json"
        elif isinstance(body, str):
            body, content_type = body.encode(), content_type or "text/plain; charset=utf-8"
        if content_type:
            extra.append(("Content-Type", content_type))
        if redirect_to is not None:
            extra.append(("Location", redirect_to))
        route = Route(status, body, extra, delay, hold, hold_body, stream, echo, fail_first)
        self._routes[path] = route
        return route

    def release(self, path: str | None = None) -> None:
        """Let held requests on ``path`` (all paths when None) go on."""
        for key, route in list(self._routes.items()):
            if path is None or key == path:
                route.gate.set()

    def requests(self, path: str | None = None) -> list[Received]:
        with self._changed:
            return [r for r in self._received if path is None or r.path == path]

    def hits(self, path: str) -> int:
        return len(self.requests(path))

    def peak(self, path: str) -> int:
        """The most requests to ``path`` that were in progress at the same moment (from
        arrival until the answer starts, or the request fails)."""
        with self._changed:
            return self._peak.get(path, 0)

    def in_progress(self, path: str) -> int:
        with self._changed:
            return len(self._active.get(path, {}))

    def wait_for_hits(self, path: str, count: int = 1, timeout: float = 5.0) -> None:
        """Block until ``path`` was requested ``count`` times; AssertionError at the deadline."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while sum(1 for r in self._received if r.path == path) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"{path} not requested {count} time(s) in {timeout}s")
                self._changed.wait(remaining)

    def close(self) -> None:
        self._closed.set()
        self.release()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> "HttpTarget":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # --- called from handler threads -------------------------------------------------------

    def _record(self, received: Received, connection: socket.socket) -> Route | None:
        with self._changed:
            self._received.append(received)
            active = self._active.setdefault(received.path, {})
            # A held request whose client has closed its connection is over, even when its
            # handler thread has not woken to see it yet (a busy CPU): a client that closes
            # one request and then sends the next must not be counted as overlapping them.
            for key, other in list(active.items()):
                if _closed_by_client(other):
                    del active[key]
            active[id(received)] = connection
            self._peak[received.path] = max(self._peak.get(received.path, 0), len(active))
            self._changed.notify_all()
        return self._routes.get(received.path)

    def _seen(self, received: Received) -> int:
        """How many requests to exactly this target (path and query) arrived so far."""
        with self._changed:
            return sum(1 for r in self._received if r.target == received.target)

    def _done(self, received: Received) -> bool:
        with self._changed:
            self._active[received.path].pop(id(received), None)
            self._changed.notify_all()
        return True

    def _wait(self, route: Route, connection: socket.socket) -> None:
        """Hold or delay a request; a held one ends (ConnectionResetError) as soon as its
        client closes the connection, so it no longer counts as in progress."""
        if route.hold:
            until = time.monotonic() + route.delay if route.delay else None
            while not route.gate.is_set():
                if until is not None and time.monotonic() >= until:
                    return
                # Wakes at once when the client closes; looks at the gate every 10 ms.
                if _closed_by_client(connection, 0.01):
                    raise ConnectionResetError("the client closed the connection")
        elif route.delay:
            self._closed.wait(route.delay)


def _closed_by_client(connection: socket.socket, wait: float = 0.0) -> bool:
    """Whether the client has closed (or reset) the connection, waiting up to ``wait``
    seconds for it; no data is consumed."""
    try:
        readable, _, _ = select.select([connection], [], [], wait)
        return bool(readable) and connection.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


class _Server(ThreadingHTTPServer):
    # socketserver's default listen backlog is 5: a burst of connections from three nodes'
    # steps overflowed it, and a dropped SYN is retried by the client's kernel after 1, 3,
    # 7, 15 s, so a step of a 0.3 s route sometimes took 17 or 31 s (its 30 s timeout).
    request_queue_size = 1024

    def handle_error(self, request, client_address) -> None:
        """A client that went away (a killed daemon's keep-alive connection) is not an error
        worth a traceback on stderr; anything else still gets one."""
        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            super().handle_error(request, client_address)


def _handler_for(target: HttpTarget) -> type[BaseHTTPRequestHandler]:
    class Handler(_Handler):
        owner = target

    return Handler


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: HttpTarget

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        received = Received(self.command, self.path, list(self.headers.items()), body,
                            time.monotonic())
        route = self.owner._record(received, self.connection)
        answering = False
        try:
            if route is None:
                answering = self.owner._done(received)
                self._send(404, [("Content-Type", "text/plain")], b"not found")
                return
            failing = bool(route.fail_first) and self.owner._seen(received) <= route.fail_first
            if not failing:
                self.owner._wait(route, self.connection)
            # No longer "in progress" before the first byte of the answer leaves: a client
            # that reacts to the answer at once must not be counted as overlapping this one.
            answering = self.owner._done(received)
            if failing:
                self._send(500, [("Content-Type", "text/plain")], b"try again")
            elif route.echo:
                echo = {"method": received.method, "target": received.target,
                        "headers": received.headers, "body": body.decode("utf-8", "replace")}
                self._send(route.status, [("Content-Type", "application/json")],
                           jsonlib.dumps(echo).encode())
            elif route.stream:
                self._stream(route)
            else:
                self._send(route.status, route.headers, route.body, route)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            if not answering:
                self.owner._done(received)

    def _send(self, status: int, headers: list[tuple[str, str]], body: bytes,
              route: Route | None = None) -> None:
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if route is not None and route.hold_body:
            self.wfile.flush()
            route.gate.wait(route.delay or None)
        if self.command != "HEAD":
            self.wfile.write(body)

    def _stream(self, route: Route) -> None:
        self.send_response(route.status)
        for name, value in route.headers:
            self.send_header(name, value)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        chunk = b"x" * 65536
        left = route.stream
        while left > 0:
            piece = chunk[: min(left, len(chunk))]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            left -= len(piece)
        self.wfile.write(b"0\r\n\r\n")

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _handle

    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        pass
