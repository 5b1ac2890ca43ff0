"""A tiny Server-Sent Events client for the tests: one connection, events parsed as they
arrive, every read bounded by a deadline (no sleep-and-hope)."""

from __future__ import annotations

import dataclasses
import http.client
import json
import socket
import time
import urllib.parse

__all__ = ["Sse", "SseEvent", "open_stream"]


@dataclasses.dataclass(frozen=True)
class SseEvent:
    id: int
    event: str
    data: dict


class Sse:
    """``next(timeout)`` returns the next event, or None at the end of the stream; comment
    lines are kept in ``comments``."""

    def __init__(self, base: str, path: str, headers: dict[str, str] | None = None):
        parts = urllib.parse.urlsplit(base)
        self._conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        self._conn.request("GET", path, headers=headers or {})
        self._sock = self._conn.sock  # the connection lets go of it once the response is read
        self.response = self._conn.getresponse()
        self.status = self.response.status
        self.headers = {k.lower(): v for k, v in self.response.getheaders()}
        self.comments: list[str] = []
        self.ended = False

    @property
    def socket(self) -> socket.socket:
        return self._sock

    def json(self):
        return json.loads(self.response.read())

    def next(self, timeout: float = 20.0) -> SseEvent | None:
        deadline = time.monotonic() + timeout
        fields: dict[str, str] = {}
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no event within {timeout}s")
            self._sock.settimeout(left)
            try:
                raw = self.response.readline()
            except (socket.timeout, TimeoutError):
                raise AssertionError(f"no event within {timeout}s") from None
            if not raw:
                self.ended = True
                return None
            line = raw.decode("utf-8").rstrip("\r\n")
            if line.startswith(":"):
                self.comments.append(line[1:].strip())
            elif line:
                name, _, value = line.partition(":")
                fields[name] = value[1:] if value.startswith(" ") else value
            elif "event" in fields:
                return SseEvent(int(fields["id"]), fields["event"], json.loads(fields["data"]))

    def until(self, kind: str, timeout: float = 20.0) -> list[SseEvent]:
        """Events up to and including the first of ``kind``."""
        got = []
        deadline = time.monotonic() + timeout
        while True:
            event = self.next(max(0.01, deadline - time.monotonic()))
            if event is None:
                raise AssertionError(f"stream ended before {kind}: {got}")
            got.append(event)
            if event.event == kind:
                return got

    def rest(self, timeout: float = 20.0) -> list[SseEvent]:
        """Every event until the stream ends."""
        got = []
        deadline = time.monotonic() + timeout
        while (event := self.next(max(0.01, deadline - time.monotonic()))) is not None:
            got.append(event)
        return got

    def close(self) -> None:
        """Hang up; a thread blocked reading this stream returns at once (shut down first:
        closing the response would wait for that thread's read)."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:  # already closed by the server
            pass
        self.response.close()
        self._conn.close()
        self._sock.close()

    def __enter__(self) -> Sse:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_stream(base: str, path: str, headers: dict[str, str] | None = None) -> Sse:
    return Sse(base, path, headers)
