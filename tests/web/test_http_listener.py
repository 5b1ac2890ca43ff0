"""The daemon's HTTP listener (``mantle.daemon.http.HttpServer``) over a real socket."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import urllib.request

import pytest
from waitress import wasyncore

from mantle.daemon.http import MAX_BODY_BYTES, HttpServer
from tests.helpers.waiting import wait_until

_HOLD = 0.3  # how long the test's request keeps a write "in progress"


def _thread_cpu_seconds(native_id: int) -> float:
    fields = open(f"/proc/self/task/{native_id}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.alone
def test_the_event_loop_does_not_spin_while_a_worker_thread_writes_a_response():
    """A worker writing a response holds its connection's output lock from adding the bytes
    until it has sent them. waitress's loop saw the connection writable meanwhile and went
    round without waiting, a third of the daemon's CPU under load (bench/README.md, item 23).
    Here the app keeps such a write pending for 0.3 s and wakes the loop: the loop must wait
    (well under 0.1 s of CPU), then the response arrives whole."""
    seen = {}

    def app(environ, start_response):
        channel = environ["waitress.client_disconnected"].__self__
        with channel.outbuf_lock:  # what write_soon holds while a write is under way
            channel.total_outbufs_len += 1
            try:
                channel.server.pull_trigger()  # the loop looks at the connection again
                before = _thread_cpu_seconds(seen["loop"])
                time.sleep(_HOLD)
                seen["loop_cpu"] = _thread_cpu_seconds(seen["loop"]) - before
            finally:
                channel.total_outbufs_len -= 1
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
        return [b"ok"]

    server = HttpServer(app, "127.0.0.1:0", threads=2)
    address = server.bind()
    seen["loop"] = server._thread.native_id
    try:
        with urllib.request.urlopen(f"http://{address}/", timeout=10) as response:
            assert response.read() == b"ok"
    finally:
        server.stop()
    assert seen["loop_cpu"] < 0.1, f"the event loop used {seen['loop_cpu']:.2f} s of CPU"


def test_a_response_larger_than_the_socket_buffer_arrives_whole():
    """Bytes a worker could not send at once (the client reads slowly) are sent by the loop."""
    body = os.urandom(8 * 1024 * 1024)

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("Content-Length", str(len(body)))])
        return [body[i:i + 65536] for i in range(0, len(body), 65536)]

    server = HttpServer(app, "127.0.0.1:0", threads=2)
    address = server.bind()
    try:
        with urllib.request.urlopen(f"http://{address}/", timeout=30) as response:
            received = bytearray()
            while chunk := response.read(4096):
                received += chunk
        assert bytes(received) == body
    finally:
        server.stop()


class _LoopHold(wasyncore.dispatcher):
    """Holds waitress's event loop still, once per byte poked into it, until released: the
    test decides what the loop has done when the server under test looks at it."""

    def __init__(self, server: HttpServer):
        self._poke, theirs = socket.socketpair()
        super().__init__(theirs, map=server._server._map)
        self._trigger = server._server.trigger
        self._releases = threading.Semaphore(0)
        self.held = threading.Event()

    def hold(self, times: int) -> None:
        self._poke.send(b"h" * times)

    def handle_read(self):
        self.recv(1)  # one byte: still readable for the next round when more were poked
        self.held.set()
        self._releases.acquire(timeout=10)
        self.held.clear()

    def writable(self):
        return False

    def release_when_the_server_queues_work(self) -> threading.Thread:
        """Release the hold (once) when HttpServer asks the loop for something new."""
        stale = {id(thunk) for thunk in list(self._trigger.thunks)}

        def release():
            try:
                wait_until(lambda: any(id(thunk) not in stale
                                       for thunk in list(self._trigger.thunks)), timeout=3)
            except AssertionError:
                return  # the server never asked: the test's assertions say so
            self._releases.release()

        thread = threading.Thread(target=release, daemon=True)
        thread.start()
        return thread

    def let_go(self) -> None:
        self._releases.release(10)
        self._poke.close()


def test_a_request_sent_before_the_listener_closes_counts_as_in_flight_until_answered():
    """SPEC 10.3 step 2: close the listener, in-flight requests complete. A client whose
    connection the kernel has accepted and whose request bytes have arrived is in flight,
    even when waitress's loop has not got round to accepting or reading it: closing the
    listener must not drop the connection, and draining must wait for the request. The loop
    is held here so that it has done neither when the listener closes (CI once saw the
    daemon cut such a request at SIGTERM)."""
    def app(environ, start_response):
        body = environ["wsgi.input"].read(int(environ["CONTENT_LENGTH"]))
        start_response("200 OK", [("Content-Type", "text/plain"),
                                  ("Content-Length", str(len(body)))])
        return [body]

    server = HttpServer(app, "127.0.0.1:0", threads=2)
    host, port = server.bind().rsplit(":", 1)
    hold = _LoopHold(server)
    client = None
    try:
        hold.hold(2)  # before the listener closes, and in the round that closes it
        wait_until(hold.held.is_set, timeout=5)
        client = socket.create_connection((host, int(port)), timeout=10)
        client.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhe")

        hold.release_when_the_server_queues_work()
        server.close_listener()
        hold.release_when_the_server_queues_work()
        assert not server.wait_idle(time.monotonic() + 0.5), "a request in flight was missed"

        client.sendall(b"llo")
        assert server.wait_idle(time.monotonic() + 10)
        assert client.recv(65536).startswith(b"HTTP/1.1 200 ")
    finally:
        hold.let_go()
        if client is not None:
            client.close()
        server.stop()


def test_a_body_too_large_for_waitress_is_the_apis_own_413():
    """A body over 1 MiB is 413 ``request body too large (limit 1048576 bytes)`` (SPEC 7.1),
    whatever its size. From 16 MiB on (``MAX_BODY_BYTES``: declared, or sent chunked) waitress
    refuses it before the app sees it, and answered its own words instead: ``request entity
    too large: exceeds max_body of 16777216``."""
    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
        return [b"ok"]

    server = HttpServer(app, "127.0.0.1:0", threads=2)
    host, port = server.bind().rsplit(":", 1)
    chunk = MAX_BODY_BYTES // 4
    chunked = (b"%x\r\n" % chunk + b" " * chunk + b"\r\n") * 4 + b"1\r\n \r\n0\r\n\r\n"
    requests = [
        b"POST /api/v1/run/x HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
        % MAX_BODY_BYTES,
        b"POST /hooks/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked,
    ]
    try:
        for request in requests:
            with socket.create_connection((host, int(port)), timeout=10) as sock:
                sock.sendall(request)
                answer = b""
                while part := sock.recv(65536):
                    answer += part
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.split(b" ")[1] == b"413", (request[:60], answer[:200])
            assert b"\r\nContent-Type: application/json\r\n" in head, head
            assert json.loads(body) == {
                "error": "request body too large (limit 1048576 bytes)"}, body
    finally:
        server.stop()


def test_a_request_waitress_cannot_parse_is_answered_with_its_error_as_json():
    """A malformed request (a method in lower case, a control character or a space in a
    header, a Content-Length that is not a number) is answered by waitress itself with its
    400. The listener's dispatcher looked at the parsed request's method to route probes to
    their own threads; a request that failed to parse has none, so the dispatcher raised and
    the connection was closed without any answer. And that answer was plain text, where
    every mantle error is ``{"error": ...}`` (docs/api.md). A Transfer-Encoding other than
    chunked is waitress's 501, which was worded ``internal server error`` like a fault of the
    server's own (SPEC 7.1's 500), though the request names what the server lacks."""
    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
        return [b"ok"]

    server = HttpServer(app, "127.0.0.1:0", threads=2)
    host, port = server.bind().rsplit(":", 1)
    requests = {
        b"get /healthz HTTP/1.1\r\nHost: x\r\n\r\n": b"400",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Bad: a\x01b\r\n\r\n": b"400",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX Bad: v\r\n\r\n": b"400",
        b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: x\r\n\r\n": b"400",
        b"POST /hooks/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n":
            b"501",
    }
    words = {b"400": "bad request: ",
             b"501": "not implemented: Transfer-Encoding requested is not supported"}
    try:
        for request, status in requests.items():
            with socket.create_connection((host, int(port)), timeout=10) as sock:
                sock.sendall(request)
                answer = b""
                while chunk := sock.recv(65536):
                    answer += chunk
            assert answer.split(b" ")[1:2] == [status], (request[:40], answer[:200])
            head, _, body = answer.partition(b"\r\n\r\n")
            assert b"\r\nContent-Type: application/json\r\n" in head, head
            error = json.loads(body)["error"]
            assert error.startswith(words[status]), error
    finally:
        server.stop()
