"""Reading requests: bounded bodies, strict JSON, query parameters (SPEC 7.1, 7.2, 7.4)."""

from __future__ import annotations

import json
import urllib.parse
from typing import Any

import falcon

from web.errors import BODY_LIMIT, TOO_LARGE, ApiError

__all__ = ["read_body", "parse_json", "json_object_body", "query_params", "NotJson"]


class NotJson(ValueError):
    """The bytes are not one JSON document (strict: no NaN or Infinity)."""


def read_body(req: falcon.Request) -> bytes:
    """The raw body, at most BODY_LIMIT bytes (413 beyond, even without Content-Length)."""
    data = req.bounded_stream.read(BODY_LIMIT + 1)
    if len(data) > BODY_LIMIT:
        raise ApiError(413, TOO_LARGE)
    return data


def _reject_constant(name: str):
    raise NotJson(f"{name} is not JSON")


def parse_json(raw: bytes) -> Any:
    """Decode one JSON document; NotJson when it is not valid UTF-8 JSON."""
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise NotJson(str(exc)) from None


def json_object_body(req: falcon.Request) -> dict:
    """The body as a JSON object; an empty (or blank) body is ``{}``."""
    raw = read_body(req)
    if not raw.strip():
        return {}
    try:
        body = parse_json(raw)
    except NotJson:
        raise ApiError(400, "request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


def query_params(req: falcon.Request) -> dict[str, str]:
    """Query parameters; a repeated one keeps its last value (SPEC 7.4)."""
    return dict(urllib.parse.parse_qsl(req.query_string or "", keep_blank_values=True))
