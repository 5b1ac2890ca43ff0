"""``http/request`` (SPEC 5.1) on the standard library: http.client, ssl with verification.

The exchange (connect, redirects, body) runs on the calling thread (the engine's step pool).
A cancel, and the whole-request deadline (a timer on a shared thread), shut the socket down
from another thread, so a blocked connect, TLS handshake or read returns at once (the socket
is made here, not by http.client, so it can be reached before it is connected); only DNS
resolution cannot be broken and ends with its own timeout. No thread per request: one pool
thread per request in flight.
"""

from __future__ import annotations

import functools
import http.client
import json
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import SplitResult, quote, urljoin, urlsplit

from mantle import __version__
from mantle.connectors.base import (
    ConnectorError,
    CancelToken,
    ConnectorInterrupted,
    Invocation,
    as_text,
    params_of,
    parse_json,
)
from mantle.connectors.credentials import AUTH_HEADERS, Credential, auth_headers
from mantle.durations import parse_duration
from mantle.services.timers import Timers

__all__ = ["request", "send", "credential_headers", "HttpFailure", "METHODS", "MAX_BODY_BYTES",
           "MAX_REDIRECTS", "DEFAULT_TIMEOUT", "LONGEST_TIMEOUT"]

METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
MAX_BODY_BYTES = 10 * 1024 * 1024
MAX_REDIRECTS = 10
DEFAULT_TIMEOUT = "30s"
# A longer timeout is one no socket can wait for (OverflowError): it counts as this, 31 years.
LONGEST_TIMEOUT = 1e9
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_BODY_HEADERS = frozenset({"content-type", "content-length", "transfer-encoding"})
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HEADER_VALUE_BAD = re.compile(r"[\r\n\x00]")
_URL_BAD = re.compile(r"[\x00-\x20\x7f]")
_CHUNK = 64 * 1024


@dataclass(frozen=True, slots=True)
class _Request:
    method: str
    url: str
    headers: dict[str, str]  # names as the user wrote them; unique case-insensitively
    body: bytes | None


class _Failure(Exception):
    """A network-level failure; the text is the ``<reason>`` of the step error."""


class _TooLarge(Exception):
    pass


class HttpFailure(Exception):
    """``send`` could not get a response: ``reason`` is short lower-case text (SPEC 5.1's
    ``<reason>``); ``timed_out`` and ``too_large`` tell the two failures worded apart."""

    def __init__(self, reason: str, timed_out: bool = False, too_large: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.timed_out = timed_out
        self.too_large = too_large


def send(method: str, url: str, headers: dict[str, str], body: bytes | None,
         seconds: float, cancel: threading.Event) -> dict:
    """One HTTP exchange for any connector: redirects followed (credentials only to the
    first origin), TLS verified, the body capped at MAX_BODY_BYTES, the whole exchange within
    ``seconds``. Returns the http/request output (``status``, ``headers``, ``body``, ``json``
    when it parses) whatever the status; raises ConnectorInterrupted when ``cancel`` is set
    and HttpFailure when there is no response. ``url`` must be an absolute http(s) URL.

    ``cancel`` is a ``CancelToken`` in the engine; a plain ``threading.Event`` (direct callers)
    is watched by a helper thread."""
    seconds = min(seconds, LONGEST_TIMEOUT)
    exchange = _Exchange(_Request(method, url, headers, body), time.monotonic() + seconds)
    finished = threading.Event()
    token = cancel if isinstance(cancel, CancelToken) else CancelToken.following(cancel,
                                                                                 finished)
    remove = token.add_callback(lambda: exchange.abort("cancel"))
    timer = _deadlines().schedule(seconds, lambda: exchange.abort("timeout"))
    try:
        exchange.run()
    finally:
        finished.set()
        remove()
        timer.cancel()
    if exchange.aborted == "cancel":
        raise ConnectorInterrupted()
    if exchange.aborted == "timeout":
        raise HttpFailure("timed out", timed_out=True)
    error = exchange.error
    if isinstance(error, _TooLarge):
        raise HttpFailure(f"response body exceeds {MAX_BODY_BYTES} bytes", too_large=True)
    if isinstance(error, TimeoutError):
        raise HttpFailure("timed out", timed_out=True)
    if error is not None:
        raise HttpFailure(_reason(error))
    return exchange.result


def request(inv: Invocation) -> dict:
    """Send one HTTP request (following redirects) and return status, headers, body, json."""
    params = params_of(inv)
    req, timeout_text, seconds = _parse(params, inv.credential)
    label = f"{req.method} {params['url']}"
    try:
        output = send(req.method, req.url, req.headers, req.body, seconds, inv.cancel)
    except HttpFailure as exc:
        if exc.too_large:
            raise ConnectorError(f"http/request: {exc.reason}") from None
        if exc.timed_out:
            raise ConnectorError(f"http/request: {label} timed out after {timeout_text}"
                                 ) from None
        raise ConnectorError(f"http/request: {label}: {exc.reason}") from None
    if output["status"] >= 400:
        raise ConnectorError(f"http/request: {label} returned {output['status']}", output=output)
    return output


# --- params -----------------------------------------------------------------------------------

def _parse(params: dict, credential: Credential | None) -> tuple[_Request, str, float]:
    url = params.get("url")
    if url is None or url == "":
        raise ConnectorError("http/request: url is required")
    if not isinstance(url, str) or _split(url) is None:
        raise ConnectorError(f'http/request: invalid url "{as_text(url)}"')
    method = params.get("method", "GET")
    if not isinstance(method, str) or method.upper() not in METHODS:
        raise ConnectorError(f'http/request: unsupported method "{as_text(method)}"')
    timeout_text, seconds = _timeout(params.get("timeout", DEFAULT_TIMEOUT))
    body, content_type = _body(params.get("body"))
    headers = {"User-Agent": f"mantle/{__version__}"}
    if content_type:
        headers["Content-Type"] = content_type
    headers.update(credential_headers("http/request", credential))
    for name, value in _user_headers(params.get("headers")).items():
        _drop(headers, name)
        if value is not None:
            headers[name] = value
    return _Request(method.upper(), url, headers, body), timeout_text, seconds


def credential_headers(action: str, credential: Credential | None) -> dict[str, str]:
    """``auth_headers(credential)`` for a request of ``action``; a value that cannot go out
    as a header value fails the step without retry, without quoting it (http.client's
    refusal would, in a spelling ``redact`` does not know)."""
    headers = auth_headers(credential)
    for name, value in headers.items():
        if not _sendable(value):
            raise ConnectorError(f'{action}: credential "{credential.name}" cannot be sent in '
                                 f"the {name} header (line break, NUL or a character outside "
                                 "Latin-1)", retryable=False)
    return headers


def _timeout(raw: Any) -> tuple[str, float]:
    try:
        seconds = parse_duration(raw)
    except ValueError:
        seconds = 0.0
    if seconds <= 0:
        raise ConnectorError(f'http/request: invalid timeout "{as_text(raw)}"')
    return raw, seconds


def _body(raw: Any) -> tuple[bytes | None, str | None]:
    if raw is None:
        return None, None
    if isinstance(raw, str):
        return raw.encode("utf-8", "replace"), "text/plain; charset=utf-8"
    text = json.dumps(raw, separators=(",", ":"), ensure_ascii=False)
    return text.encode("utf-8", "replace"), "application/json"


def _sendable(value: str) -> bool:
    """Whether ``value`` can go out as a header value (HTTP/1.1 header text is Latin-1)."""
    if _HEADER_VALUE_BAD.search(value):
        return False
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True


def _user_headers(raw: Any) -> dict[str, str | None]:
    """Header map from params: values as text; ``null`` removes a default header."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConnectorError("http/request: headers must be a map")
    headers: dict[str, str | None] = {}
    for name, value in raw.items():
        text = None if value is None else as_text(value)
        if not _HEADER_NAME.fullmatch(name) or (text and not _sendable(text)):
            raise ConnectorError(f'http/request: invalid header "{name}"')
        headers[name] = text
    return headers


def _drop(headers: dict[str, Any], name: str) -> None:
    for key in [key for key in headers if key.lower() == name.lower()]:
        del headers[key]


def _split(url: str) -> SplitResult | None:
    """The parts of an absolute http(s) URL, or None when it is not one."""
    if _URL_BAD.search(url):
        return None
    try:
        parts = urlsplit(url)
        parts.port  # raises ValueError on a bad port
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        return None
    return parts


def _origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, parts.hostname or "", parts.port or (443 if scheme == "https" else 80)


# --- the exchange (helper thread) -------------------------------------------------------------

class _Exchange:
    """One request and its redirects. ``run`` on the calling thread; ``abort`` from any other
    (the cancelling thread, the deadline timer)."""

    def __init__(self, req: _Request, deadline: float):
        self.req = req
        self.deadline = deadline
        self.result: dict | None = None
        self.error: BaseException | None = None
        self.aborted: str | None = None  # "cancel" | "timeout", the first abort's reason
        self._lock = threading.Lock()
        self._conn: http.client.HTTPConnection | None = None
        self._sock: socket.socket | None = None  # the socket in use, from before its connect

    def run(self) -> None:
        try:
            self.result = self._follow()
        except Exception as exc:  # reported by send()
            self.error = exc
        finally:
            self._close()

    def abort(self, reason: str) -> None:
        """Break the in-flight exchange: shut the socket so a blocked read returns now."""
        with self._lock:
            if self.aborted is None:
                self.aborted = reason
            sock = self._sock
        if sock is not None:
            try:
                # The plain-socket method: SSLSocket.shutdown would tear TLS state down under
                # the helper thread's feet.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass

    def _follow(self) -> dict:
        req = self.req
        origin = _origin(req.url)
        for _ in range(MAX_REDIRECTS + 1):
            response = self._send(req)
            location = _header_text(response.getheader("Location"))
            if response.status not in _REDIRECTS or not location:
                return self._read(response)
            req = _redirected(req, response.status, urljoin(req.url, location), origin)
            self._close()
        raise _Failure(f"stopped after {MAX_REDIRECTS} redirects")

    def _send(self, req: _Request) -> http.client.HTTPResponse:
        parts = _split(req.url)
        remaining = max(self.deadline - time.monotonic(), 0.001)
        https = parts.scheme.lower() == "https"
        if https:
            conn = http.client.HTTPSConnection(
                parts.hostname, parts.port, timeout=remaining, context=_tls_context()
            )
        else:
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=remaining)
        with self._lock:
            if self.aborted:
                raise _Failure("aborted")
            self._conn = conn
        conn.sock = self._connect(conn.host, conn.port, remaining, https)  # http.client's own
        conn.request(req.method, _target(parts), body=req.body, headers=req.headers)
        return conn.getresponse()

    def _connect(self, host: str, port: int, timeout: float, https: bool) -> socket.socket:
        """socket.create_connection (and the TLS handshake) with each socket made visible to
        ``abort`` before it blocks: shutting down a connecting socket ends its connect."""
        error: OSError | None = None
        for family, kind, proto, _, address in socket.getaddrinfo(host, port, 0,
                                                                  socket.SOCK_STREAM):
            sock = self._use(socket.socket(family, kind, proto))
            try:
                sock.settimeout(timeout)
                sock.connect(address)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if https:
                    sock = self._use(_tls_context().wrap_socket(
                        sock, server_hostname=host, do_handshake_on_connect=False))
                    sock.do_handshake()
                return sock
            except OSError as exc:
                sock.close()
                with self._lock:
                    if self.aborted:
                        raise _Failure("aborted") from None
                error = exc
        raise error or OSError(f"no address for {host}")

    def _use(self, sock: socket.socket) -> socket.socket:
        """Make ``sock`` the one ``abort`` shuts down; after an abort, close it and stop."""
        with self._lock:
            if not self.aborted:
                self._sock = sock
                return sock
        sock.close()
        raise _Failure("aborted")

    def _read(self, response: http.client.HTTPResponse) -> dict:
        if (response.length or 0) > MAX_BODY_BYTES:
            raise _TooLarge()
        chunks, size = [], 0
        while chunk := response.read(_CHUNK):
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise _TooLarge()
            chunks.append(chunk)
        return _output(response, b"".join(chunks))

    def _close(self) -> None:
        with self._lock:
            conn, self._conn, self._sock = self._conn, None, None
        if conn is not None:
            conn.close()


def _redirected(req: _Request, status: int, url: str, origin: tuple) -> _Request:
    """The next hop: method and body per RFC 9110 practice, credentials only to ``origin``."""
    if _split(url) is None:
        raise _Failure(f'redirect to invalid url "{url}"')
    headers = dict(req.headers)
    method, body = req.method, req.body
    if (status == 303 and method != "HEAD") or (status in (301, 302) and method == "POST"):
        method, body = "GET", None
        for name in _BODY_HEADERS:
            _drop(headers, name)
    if _origin(url) != origin:
        for name in AUTH_HEADERS:
            _drop(headers, name)
    return replace(req, method=method, url=url, headers=headers, body=body)


def _header_text(value: str | None) -> str | None:
    """A header value as the server meant it: http.client reads header bytes as Latin-1, but
    a server sending non-ASCII (a Location to ``/café``) sends UTF-8, as browsers read it."""
    if value is None or value.isascii():
        return value
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:  # not UTF-8: Latin-1 it is
        return value


def _target(parts: SplitResult) -> str:
    target = quote(parts.path or "/", safe="/%!$&'()*+,;=:@-._~")
    if parts.query:
        target += "?" + quote(parts.query, safe="/?%!$&'()*+,;=:@-._~")
    return target


def _output(response: http.client.HTTPResponse, data: bytes) -> dict:
    headers: dict[str, str | list[str]] = {}
    for name, value in response.getheaders():
        key, value = name.lower(), _header_text(value)
        if key not in headers:
            headers[key] = value
        elif isinstance(headers[key], list):
            headers[key].append(value)
        else:
            headers[key] = [headers[key], value]
    text = data.decode("utf-8", "replace")
    output: dict[str, Any] = {"status": response.status, "headers": headers, "body": text}
    try:
        # A leading byte order mark is not part of the JSON text (RFC 8259 lets parsers
        # ignore it); ``body`` keeps it.
        output["json"] = parse_json(text[1:] if text.startswith("\ufeff") else text)
    except (ValueError, RecursionError):
        pass
    return output


_deadline_timers: Timers | None = None
_deadline_lock = threading.Lock()


def _deadlines() -> Timers:
    """The process's one thread for request deadlines, started on first use (under a lock:
    the first requests of a burst arrive together)."""
    global _deadline_timers
    with _deadline_lock:
        if _deadline_timers is None:
            _deadline_timers = Timers("mantle-http-deadlines")
        return _deadline_timers


@functools.lru_cache(maxsize=1)
def _tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()


def _reason(exc: BaseException) -> str:
    """Short, lower-case text for a network failure."""
    if isinstance(exc, _Failure):
        return str(exc)
    if isinstance(exc, ssl.SSLCertVerificationError):
        text = f"certificate verify failed: {exc.verify_message}"
    elif isinstance(exc, ssl.SSLError):
        text = f"tls error: {exc.reason or exc}"
    elif isinstance(exc, http.client.IncompleteRead):
        text = "incomplete response body"
    elif isinstance(exc, http.client.RemoteDisconnected):
        text = "server closed the connection without a response"
    elif isinstance(exc, http.client.HTTPException):
        text = f"malformed response ({type(exc).__name__})"
    elif isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
    else:
        text = str(exc) or type(exc).__name__
    return text[:1].lower() + text[1:]
