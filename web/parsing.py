"""Reading requests: bounded bodies, strict JSON, query parameters (SPEC 7.1, 7.2, 7.4)."""

from __future__ import annotations

import json
import math
import re
import sys
import urllib.parse
from typing import Any

import falcon

from web.errors import BODY_LIMIT, TOO_LARGE, ApiError

__all__ = ["read_body", "parse_json", "json_object_body", "query_params", "NotJson"]

# A surrogate code point left after decoding is an unpaired ``\ud800``-style escape: valid
# JSON syntax, but not text (no database or encoder can store it).
_SURROGATE = re.compile("[\ud800-\udfff]")
_LARGEST_DOUBLE = sys.float_info.max


class NotJson(ValueError):
    """The bytes are not one JSON document (strict: see ``parse_json``)."""


def read_body(req: falcon.Request) -> bytes:
    """The raw body, at most BODY_LIMIT bytes (413 beyond, even without Content-Length)."""
    data = req.bounded_stream.read(BODY_LIMIT + 1)
    if len(data) > BODY_LIMIT:
        raise ApiError(413, TOO_LARGE)
    return data


def _reject_constant(name: str):
    raise NotJson(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400: it would be stored and served back as Infinity
        raise NotJson(f"{text} is out of range")
    return value


def _within_double(text: str) -> int:
    value = int(text)
    if abs(value) > _LARGEST_DOUBLE:  # 1 and 400 zeros: no expression can hold it
        raise NotJson(f"{text[:20]}... is out of range")
    return value


def _has_lone_surrogate(value: Any) -> bool:
    stack = [value]  # iterative: the document may be nested as deep as the parser allows
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def parse_json(raw: bytes) -> Any:
    """Decode one JSON document; NotJson when it is not valid UTF-8 JSON.

    Stricter than ``json.loads``: no NaN or Infinity, no number beyond a double (written as
    an integer too), no unpaired surrogate escape. Integers with more digits than Python
    converts are refused too.
    """
    try:
        value = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant,
                           parse_float=_finite, parse_int=_within_double)
    except (ValueError, RecursionError) as exc:  # JSON, UTF-8 and int-digit-limit errors
        raise NotJson(str(exc)) from None
    if _has_lone_surrogate(value):
        raise NotJson("unpaired surrogate escape")
    return value


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
