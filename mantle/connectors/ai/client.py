"""The HTTP side of the AI connectors: one JSON POST to an OpenAI-compatible server.

Every exchange goes through ``mantle.connectors.http.send``, the client ``http/request`` uses,
rather than an SDK: a cancel closes the connection at once (SPEC 4.6, 13.7), and the TLS,
redirect and 10 MiB size rules are the same for every connector. Runs on the step's thread.

HTTP 429 and 5xx are retried inside the attempt (SPEC 13.6): at most ``MAX_TRIES`` tries,
waiting ``Retry-After`` (capped at 30 s) or else 1 s then 2 s; the waits end at once on cancel.
Each try is counted in the ``mantle_ai_*`` metrics under the requested model.
"""

from __future__ import annotations

import email.utils
import http
import json
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from mantle import __version__
from mantle.connectors.base import ConnectorError, ConnectorInterrupted, Invocation, as_text
from mantle.connectors.credentials import redact
from mantle.connectors.http import MAX_BODY_BYTES, HttpFailure, credential_headers, send

__all__ = ["Client", "DEFAULT_BASE_URL", "MAX_TRIES", "MAX_RETRY_AFTER", "BACKOFF",
           "REQUEST_LIMIT", "base_url_of", "param_error"]

DEFAULT_BASE_URL = "https://api.openai.com/v1"
MAX_TRIES = 3
MAX_RETRY_AFTER = 30.0
BACKOFF = (1.0, 2.0)  # waits after the first and second failed try without Retry-After
# A model request without a step timeout may still not hang forever; local models on a CPU can
# take minutes for one answer, so the limit is generous. The step ``timeout`` bounds the loop.
REQUEST_LIMIT = 600.0
REQUEST_LIMIT_TEXT = "10m"
# With a step timeout the engine's timer must be the one that ends the attempt (its error is
# ``step timed out after <timeout>``), so requests get this much longer than the step.
_TIMER_GRACE = 1.0
_MESSAGE_LIMIT = 500


def param_error(message: str) -> ConnectorError:
    """A bad param: the same on every attempt, so not retried."""
    return ConnectorError(message, retryable=False)


def base_url_of(action: str, params: dict) -> str:
    """``base_url`` without its trailing slash; an absolute http(s) URL or a param error."""
    raw = params.get("base_url")
    if raw is None:
        return DEFAULT_BASE_URL
    if not isinstance(raw, str) or not _is_http_url(raw):
        raise param_error(f'{action}: invalid base_url "{as_text(raw)}"')
    return raw.rstrip("/")


def _is_http_url(text: str) -> bool:
    """An absolute http(s) URL with a host, no spaces or control characters, no query."""
    if not text or any(ch <= " " or ch == "\x7f" for ch in text):
        return False
    try:
        parts = urlsplit(text)
        parts.port  # raises ValueError on a bad port
    except ValueError:
        return False
    return (parts.scheme.lower() in ("http", "https") and bool(parts.hostname)
            and not parts.query and not parts.fragment)


@dataclass
class Client:
    """Posts to one endpoint for one attempt of one step; ``started`` is the monotonic time
    the attempt began (the step timeout counts from there)."""

    inv: Invocation
    action: str  # "ai/completion" or "ai/embed": the prefix of every error
    url: str
    model: str
    started: float

    def post(self, payload: dict) -> dict:
        """The decoded JSON object of a 2xx answer; ConnectorError for anything else."""
        body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json",
                   "User-Agent": f"mantle/{__version__}",
                   **credential_headers(self.action, self.inv.credential)}
        for try_number in range(1, MAX_TRIES + 1):
            if self.inv.cancel.is_set():
                raise ConnectorInterrupted()
            response = self._exchange(headers, body)
            status = response["status"]
            if 200 <= status < 300:
                return self._decoded(response)
            if not (status == 429 or status >= 500) or try_number == MAX_TRIES:
                # Redacted before provider_message cuts it: a cut inside an echoed
                # credential would leave its beginning, which run_action no longer knows.
                said = provider_message(redact(response, self.inv.credential))
                raise ConnectorError(f"{self.action}: {status} {said}")
            if self.inv.cancel.wait(retry_delay(response, try_number)):
                raise ConnectorInterrupted()
        raise AssertionError("unreachable")

    def _exchange(self, headers: dict, body: bytes) -> dict:
        seconds, limit_text = self._limit()
        clock = time.monotonic()
        try:
            response = send("POST", self.url, headers, body, seconds, self.inv.cancel)
        except HttpFailure as exc:
            self._count("error", clock)
            if exc.too_large:
                raise ConnectorError(
                    f"{self.action}: response body exceeds {MAX_BODY_BYTES} bytes") from None
            if exc.timed_out:
                raise ConnectorError(
                    f"{self.action}: POST {self.url} timed out after {limit_text}") from None
            raise ConnectorError(f"{self.action}: POST {self.url}: {exc.reason}") from None
        self._count(str(response["status"]), clock)
        return response

    def _limit(self) -> tuple[float, str]:
        """Seconds this request may take, and how a timeout is worded."""
        timeout = self.inv.step_timeout
        if not timeout:
            return REQUEST_LIMIT, REQUEST_LIMIT_TEXT
        left = self.started + timeout + _TIMER_GRACE - time.monotonic()
        return max(left, 0.001), f"{timeout:g}s"

    def _count(self, status: str, clock: float) -> None:
        metrics = self.inv.metrics
        if metrics is not None:
            metrics.ai_requests.labels(self.model, status).inc()
            metrics.ai_request_duration.labels(self.model).observe(time.monotonic() - clock)

    def count_tokens(self, usage: dict) -> None:
        """Add one answer's tokens to ``mantle_ai_tokens_total``."""
        metrics = self.inv.metrics
        if metrics is None:
            return
        for kind in ("prompt", "completion"):
            tokens = usage.get(f"{kind}_tokens", 0)
            if tokens:
                metrics.ai_tokens.labels(self.model, kind).inc(tokens)

    def _decoded(self, response: dict) -> dict:
        if "json" not in response:
            raise self.invalid("the body is not JSON")
        if not isinstance(response["json"], dict):
            raise self.invalid("the body is not a JSON object")
        return response["json"]

    def invalid(self, reason: str) -> ConnectorError:
        """A 200 that is not a valid answer (not retried inside the attempt, SPEC 13.6)."""
        return ConnectorError(f"{self.action}: invalid response: {reason}")


def retry_delay(response: dict, try_number: int) -> float:
    """``Retry-After`` in seconds (delta or HTTP date, at most 30 s), else 1 s then 2 s."""
    raw = response["headers"].get("retry-after")
    if isinstance(raw, list):
        raw = raw[0]
    seconds = None
    if isinstance(raw, str) and raw.strip():
        text = raw.strip()
        try:
            seconds = float(text)
        except ValueError:
            try:
                seconds = email.utils.parsedate_to_datetime(text).timestamp() - time.time()
            except (TypeError, ValueError, IndexError):
                seconds = None
    if seconds is None or seconds != seconds or seconds < 0:
        return BACKOFF[min(try_number, len(BACKOFF)) - 1]
    return min(seconds, MAX_RETRY_AFTER)


def provider_message(response: dict) -> str:
    """What the server said about the failure, on one line: OpenAI's ``error.message``,
    Ollama's ``error`` string, vLLM's ``message``, else the body text, else the status
    phrase."""
    found: Any = None
    decoded = response.get("json")
    if isinstance(decoded, dict):
        error = decoded.get("error")
        if isinstance(error, dict):
            found = error.get("message")
        elif isinstance(error, str):
            found = error
        if not found:
            found = decoded.get("message") or decoded.get("detail")
    text = as_text(found) if found else response.get("body", "")
    text = " ".join(text.split())
    if not text:
        try:
            text = http.HTTPStatus(response["status"]).phrase
        except ValueError:
            text = "error"
    return text if len(text) <= _MESSAGE_LIMIT else text[:_MESSAGE_LIMIT] + "..."
