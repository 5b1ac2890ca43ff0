"""TCP proxies in front of PostgreSQL that misbehave at one chosen moment.

- ``CommitCutter``: what a network blip or a server restart does at the worst moment. Once
  ``armed``, the first transaction that sent a statement containing ``mark`` has its
  connection cut at its COMMIT, either after the COMMIT reached the server (``lose="answer"``:
  the server commits, the client never hears so) or before (``lose="commit"``: the server
  never sees it and rolls back). Client and server each see the connection close. With
  ``refuse=True`` the database then stays out of reach: new connections are closed at once
  until ``refusing`` is cleared.
- ``LateCommit``: a message held up in the network while the connection breaks. Once
  ``armed``, the first message containing ``mark`` and COMMIT is held: the client's side is
  cut at once (``cut``), and the message reaches the server, on the server connection it
  was sent on, only once ``deliver`` is set; that connection closes once ``finish`` is set.
- ``QueryDelayer``: a slow network on the way to the server. A message containing ``mark``
  reaches the server ``delay`` seconds after the client sent it (``seen`` is set when it
  leaves the client); a cancel request sent meanwhile, on a connection of its own, arrives
  first.
- ``Blackhole``: a network that swallows packets. While ``open`` is clear, nothing a client
  sends reaches the server, and the client waits for an answer (until its own timeouts).

Every other connection and message is passed through as it is.
"""

from __future__ import annotations

import socket
import threading
import time
import urllib.parse

__all__ = ["Blackhole", "CommitCutter", "LateCommit", "QueryDelayer"]

_SSL_REQUEST, _GSS_REQUEST = 80877103, 80877104
_QUERIES = (b"Q", b"P", b"B", b"E")


class _Proxy:
    def __init__(self, url: str):
        parts = urllib.parse.urlsplit(url)
        self._upstream = (parts.hostname, parts.port)
        self._server = socket.create_server(("127.0.0.1", 0))
        port = self._server.getsockname()[1]
        user = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
        self.url = urllib.parse.urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{port}"))
        self._closing = False
        self.refusing = threading.Event()  # while set, new connections are closed at once
        threading.Thread(target=self._accept, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._closing = True
        self._server.close()

    def _message(self, kind: bytes, message: bytes, upstream: socket.socket,
                 state: dict) -> bool:
        """Pass one client message on; False ends the connection."""
        upstream.sendall(message)
        return True

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            if self.refusing.is_set():
                self._close(client)
                continue
            upstream = socket.create_connection(self._upstream)
            state = {"drop": False}
            threading.Thread(target=self._down, args=(upstream, client, state),
                             daemon=True).start()
            threading.Thread(target=self._up, args=(client, upstream, state),
                             daemon=True).start()

    @staticmethod
    def _read(sock: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise OSError("closed")
            data += chunk
        return data

    @staticmethod
    def _close(*socks: socket.socket) -> None:
        """Close ``socks`` for good, also while another thread waits in ``recv`` on one
        (which a plain close leaves open until the wait ends)."""
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _down(self, upstream, client, state) -> None:
        """Server to client, until either side closes; dropped once ``state["drop"]``."""
        try:
            while True:
                data = upstream.recv(65536)
                if not data:
                    break
                if not state["drop"]:  # dropped: the server's answers are read, not passed
                    client.sendall(data)
        except OSError:
            pass
        finally:
            self._close(client, upstream)

    def _up(self, client, upstream, state) -> None:
        """Client to server, message by message."""
        try:
            while True:  # untyped start-up packets: SSL/GSS requests, then the start-up
                header = self._read(client, 8)
                length = int.from_bytes(header[:4], "big")
                code = int.from_bytes(header[4:], "big")
                upstream.sendall(header + self._read(client, length - 8))
                if code not in (_SSL_REQUEST, _GSS_REQUEST):
                    break
            while True:
                kind = self._read(client, 1)
                size = self._read(client, 4)
                message = kind + size + self._read(client, int.from_bytes(size, "big") - 4)
                if not self._message(kind, message, upstream, state):
                    break
        except OSError:
            pass
        self._close(client, upstream)


class CommitCutter(_Proxy):
    def __init__(self, url: str, mark: bytes, lose: str = "answer", refuse: bool = False):
        assert lose in ("answer", "commit")
        self._mark = mark
        self._lose = lose
        self._refuse = refuse
        self.armed = threading.Event()
        self.cut = threading.Event()
        super().__init__(url)

    def _message(self, kind, message, upstream, state) -> bool:
        if kind in _QUERIES:
            state["marked"] = state.get("marked") or self._mark in message
            commits = b"COMMIT" in message.upper()
            if commits and state["marked"] and self.armed.is_set() and not self.cut.is_set():
                if self._refuse:
                    self.refusing.set()
                self.cut.set()
                if self._lose == "answer":
                    state["drop"] = True  # the outcome never reaches the client
                    upstream.sendall(message)
                    time.sleep(0.3)  # the server commits meanwhile
                return False
            if commits:
                state["marked"] = False
        upstream.sendall(message)
        return True


class LateCommit(_Proxy):
    def __init__(self, url: str, mark: bytes):
        self._mark = mark
        self.armed = threading.Event()
        self.cut = threading.Event()
        self.deliver = threading.Event()
        self.finish = threading.Event()
        super().__init__(url)

    def _up(self, client, upstream, state) -> None:
        state["client"] = client
        super()._up(client, upstream, state)

    def _message(self, kind, message, upstream, state) -> bool:
        if (kind == b"Q" and self.armed.is_set() and not self.cut.is_set()
                and self._mark in message and b"COMMIT" in message.upper()):
            self.cut.set()
            state["drop"] = True
            try:
                state["client"].shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.deliver.wait(30)
            try:
                upstream.sendall(message)
            except OSError:
                pass
            self.finish.wait(30)
            return False
        upstream.sendall(message)
        return True


class QueryDelayer(_Proxy):
    def __init__(self, url: str, mark: bytes, delay: float):
        self._mark = mark
        self._delay = delay
        self.seen = threading.Event()
        super().__init__(url)

    def _message(self, kind, message, upstream, state) -> bool:
        if kind in _QUERIES and self._mark in message:
            self.seen.set()
            time.sleep(self._delay)
        upstream.sendall(message)
        return True


class Blackhole(_Proxy):
    def __init__(self, url: str):
        super().__init__(url)
        self.open = threading.Event()
        self.open.set()

    def _message(self, kind, message, upstream, state) -> bool:
        self.open.wait()
        upstream.sendall(message)
        return True
