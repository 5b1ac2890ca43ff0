"""The HTTP listener: waitress serving the WSGI app, with a graceful close (SPEC 10.2, 10.3).

We bind the socket ourselves, so port 0 works, the bound address can be logged, and a bind
failure gives the contract's message. waitress runs its event loop on a thread of its own and
hands requests to a pool of ``threads`` workers. Closing happens in three steps: stop
accepting, wait for requests in flight, then close every connection and stop the workers.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import waitress
from waitress import wasyncore
from waitress.channel import HTTPChannel
from waitress.task import ErrorTask, ThreadedTaskDispatcher

from mantle.config import parse_address
from mantle.errors import MantleError

__all__ = ["HttpServer", "ListenError", "format_address", "listen", "MAX_BODY_BYTES"]

# waitress refuses bodies of this size or more itself (``_JsonErrorTask`` answers the API's
# 413), so it is well above the API's 1 MiB limit, which the app enforces; it only bounds what
# waitress buffers.
MAX_BODY_BYTES = 16 * 1024 * 1024
# Probes are answered from memory, on threads of their own (``_Dispatcher``).
PROBE_PATHS = frozenset({"/healthz", "/readyz"})
PROBE_THREADS = 2


class ListenError(MantleError):
    def __init__(self, address: str, reason: str):
        super().__init__(f"cannot listen on {address}: {reason}")


def format_address(sockname) -> str:
    host, port = sockname[0], sockname[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listen(address: str, count: int = 1) -> list[socket.socket]:
    """``count`` listening sockets on ``address`` (``host:port``); ListenError when they
    cannot bind. Several share the port with SO_REUSEPORT (``serve --workers``): the kernel
    spreads new connections evenly over them, where one socket shared by several accepting
    processes hands most connections to whichever process polls first.

    The port is first taken without SO_REUSEPORT, which fails like one process's bind when
    anyone listens there already (a socket with SO_REUSEPORT would silently share the port
    with another server that set it too, e.g. another ``serve --workers``); then it is let go
    and the group binds it."""
    first = _bind(address)
    if count == 1:
        return [first]
    host, _ = parse_address(address)
    port = first.getsockname()[1]  # port 0 picked one: the group takes it
    first.close()
    group = f"{'[' + host + ']' if ':' in host else host}:{port}"
    return [_bind(group, reuse_port=True) for _ in range(count)]


def _bind(address: str, reuse_port: bool = False) -> socket.socket:
    """A listening socket for ``host:port``; an empty host means every interface (IPv6 and
    IPv4 when the host has IPv6, else IPv4)."""
    host, port = parse_address(address)
    options = {"backlog": 1024, "reuse_port": reuse_port}
    try:
        if not host:
            if socket.has_dualstack_ipv6():
                try:
                    return socket.create_server(("::", port), family=socket.AF_INET6,
                                                dualstack_ipv6=True, **options)
                except OSError:  # IPv6 present but unusable (e.g. disabled in a container)
                    pass
            return socket.create_server(("0.0.0.0", port), **options)
        family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        return socket.create_server(sockaddr[:2], family=family, **options)
    except OSError as exc:
        # create_server appends "(while attempting to bind on address ...)" to strerror.
        reason = (exc.strerror or str(exc)).split(" (while attempting")[0]
        raise ListenError(address, reason) from None


class _JsonErrorTask(ErrorTask):
    """waitress's own answer to a request it could not read (malformed, headers too large),
    in the form of every other mantle error: ``{"error": "<reason>: <detail>"}``
    (docs/api.md), where waitress writes plain text. A body of ``MAX_BODY_BYTES`` or more,
    which waitress refuses before the app sees it, is any body over 1 MiB to a client: the
    API's own 413 (SPEC 7.1)."""

    def execute(self):
        from web.errors import TOO_LARGE  # the API's words; core imports web only lazily

        error = self.request.error
        if error.code == 413:
            message = TOO_LARGE
        elif error.code == 500:  # a fault of the app's (waitress's body may be a traceback)
            message = "internal server error"
        else:
            message = f"{error.reason.lower()}: {error.body}"
        body = json.dumps({"error": message}).encode()
        self.status = f"{error.code} {error.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class _Channel(HTTPChannel):
    """waitress's connection, without its event loop spinning while a response is written.

    A worker thread writing a response holds the connection's output lock from adding the
    bytes until they are sent, and sends them itself. waitress's loop meanwhile finds the
    connection ``writable`` (bytes are waiting, the socket can take them), so ``select``
    returns at once, the loop cannot take the lock, and it goes round again: 35 rounds per
    ``POST /run``, a third of the daemon's CPU, and each round takes the interpreter lock
    from the thread it is waiting for (bench/README.md, item 23). While another thread holds
    the lock the loop leaves the connection out: that thread sends what it wrote and wakes
    the loop (``pull_trigger``) whenever it leaves bytes unsent or finishes the request."""

    error_task_class = _JsonErrorTask

    def writable(self):
        if self.will_close or self.close_when_flushed:
            return True
        if not self.total_outbufs_len:
            return False
        if not self.requests:  # no worker writes to it: the loop sends what is left
            return True
        lock = self.outbuf_lock
        if lock.acquire(False):
            lock.release()
            return True
        return False


class _Dispatcher(ThreadedTaskDispatcher):
    """waitress's worker threads, plus ``PROBE_THREADS`` of their own for ``GET /healthz`` and
    ``/readyz``. Those never touch the database, but on the shared threads they waited behind
    requests that do: with the database blackholed, every worker waits on it (up to its
    timeouts), and the probes with them (SPEC 13.7: ``/healthz`` never waits on it)."""

    def __init__(self, threads: int):
        super().__init__()
        self.set_thread_count(threads)
        self.probes = ThreadedTaskDispatcher()
        self.probes.set_thread_count(PROBE_THREADS)

    def add_task(self, channel) -> None:
        """Called for the connection's first waiting request (waitress serves one request
        per task and adds the connection again for the next). A request waitress could not
        parse has no method or path: it goes to the shared threads, which answer its error."""
        request = channel.requests[0] if channel.requests else None
        if (request is not None and request.error is None
                and getattr(request, "command", None) == "GET"
                and getattr(request, "path", None) in PROBE_PATHS):
            self.probes.add_task(channel)
        else:
            super().add_task(channel)

    def shutdown(self, cancel_pending: bool = True, timeout: float = 5) -> bool:
        self.probes.shutdown(cancel_pending, timeout)
        return super().shutdown(cancel_pending, timeout)

    @property
    def busy(self) -> bool:
        """Whether a request waits for a thread."""
        return bool(self.queue or self.probes.queue)


class HttpServer:
    """``threads`` workers for the API plus one per allowed event stream (``streams``), which
    holds its worker while open; the connection limit leaves room for both."""

    def __init__(self, app, address: str, threads: int = 8, streams: int = 0):
        self._app = app
        self._address = address
        self._threads = threads
        self._streams = streams
        self._server = None
        self._thread: threading.Thread | None = None

    def bind(self, sock: socket.socket | None = None) -> str:
        """Bind (or take ``sock``, already listening: a ``serve --workers`` worker) and start
        serving; return the bound ``host:port``. Raises ListenError."""
        sock = sock if sock is not None else _bind(self._address)
        self._server = waitress.create_server(
            self._app, sockets=[sock], _dispatcher=_Dispatcher(self._threads + self._streams),
            ident="mantle",
            max_request_body_size=MAX_BODY_BYTES, clear_untrusted_proxy_headers=False,
            connection_limit=1000 + self._streams,
            # Keep reading a connection while its request runs, so that an event stream
            # sees its client leave (waitress.client_disconnected). Small writes (events)
            # are sent at once: waitress's send_bytes is 1 by default.
            channel_request_lookahead=1)
        self._server.channel_class = _Channel
        self._thread = threading.Thread(target=self._server.run, name="mantle-http",
                                        daemon=True)
        self._thread.start()
        return format_address(sock.getsockname())

    def _in_loop(self, thunk, timeout: float = 5.0) -> None:
        """Run ``thunk`` on the event loop thread (the loop's sockets are not thread-safe)."""
        trigger = self._server.trigger
        if trigger._closed or self._thread is None or not self._thread.is_alive():
            thunk()  # the loop has ended (waitress closes a server whose accept failed)
            return
        done = threading.Event()

        def run():
            try:
                thunk()
            finally:
                done.set()

        trigger.pull_trigger(run)
        done.wait(timeout)

    def close_listener(self) -> None:
        """Stop accepting connections; open ones keep being served, and so are those the
        kernel had already accepted for us (their clients may have sent a request): closing
        the socket would reset them."""
        if self._server is not None:
            self._in_loop(self._accept_waiting_then_close)

    def _accept_waiting_then_close(self) -> None:
        server = self._server
        while server.accepting and len(server._map) < server.adj.connection_limit:
            open_before = len(server._map)
            server.handle_accept()  # one connection, or none when none is waiting
            if len(server._map) == open_before:
                break
        wasyncore.dispatcher.close(server)

    def wait_idle(self, deadline: float, hurry: threading.Event | None = None) -> bool:
        """Wait (until the monotonic ``deadline``) for requests in flight to be answered:
        those being served, and those whose bytes had arrived when this was called."""
        for _ in range(2):  # the loop's first round may run our thunk before its reads
            self._in_loop(lambda: None, timeout=max(0.0, min(5.0, deadline - time.monotonic())))
        while time.monotonic() < deadline and not (hurry and hurry.is_set()):
            if self._idle():
                return True
            time.sleep(0.02)
        return self._idle()

    def _idle(self) -> bool:
        if self._server is None:
            return True
        if self._server.task_dispatcher.busy:
            return False
        for channel in list(self._server.active_channels.values()):
            if channel.requests or channel.request is not None or channel.total_outbufs_len:
                return False
        return True

    def stop(self) -> None:
        """Close every connection, end the loop and the worker threads."""
        if self._server is None:
            return
        server = self._server
        trigger = server.trigger

        def close_connections():
            for dispatcher in list(server._map.values()):
                if dispatcher is server:  # its own close() would close the trigger too
                    wasyncore.dispatcher.close(server)
                elif dispatcher is not trigger:
                    dispatcher.close()

        # Connections first, so that a worker still writing to one fails and ends; the
        # trigger (a pipe the workers write to when they finish) stays open until no worker
        # is left: closed earlier, its number could be reused by another file.
        self._in_loop(close_connections)
        dispatcher = server.task_dispatcher
        dispatcher.shutdown(cancel_pending=True, timeout=2)
        # a worker stuck past the timeout: leave the pipe open
        if dispatcher.threads or dispatcher.probes.threads:
            self._in_loop(trigger.del_channel)
        else:
            self._in_loop(trigger.close)
        if self._thread is not None:
            self._thread.join(5)
        self._server = None
