"""The daemon's HTTP listener (``mantle.daemon.http.HttpServer``) over a real socket."""

from __future__ import annotations

import os
import time
import urllib.request

from mantle.daemon.http import HttpServer

_HOLD = 0.3  # how long the test's request keeps a write "in progress"


def _thread_cpu_seconds(native_id: int) -> float:
    fields = open(f"/proc/self/task/{native_id}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
