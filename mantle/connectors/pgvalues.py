"""SQL text and values for ``postgres/query`` (SPEC 13.5).

``placeholders`` numbers each use of a ``$n`` parameter on its own, in order (``$2 + $1 +
$2`` is sent as ``$1 + $2 + $3`` with three values, so each use gets the type its place asks
for, as a driver's ``%s`` would), skipping the places where ``$1`` is not a parameter: string
literals, quoted identifiers, dollar-quoted bodies, comments and identifiers such as ``a$1``.
``to_json`` maps result values to JSON the way the SPEC says: numbers beyond a double's exact
range and decimals as strings, timestamps RFC 3339, bytea base64.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import math
import re
import uuid
from typing import Any

from mantle.connectors.base import without_surrogates

__all__ = ["placeholders", "to_json", "MAX_EXACT_INT"]

MAX_EXACT_INT = 2 ** 53  # beyond it a JSON number read as a double loses digits
_DOLLAR_TAG = re.compile(r"\$([A-Za-z_\x80-\uffff][A-Za-z0-9_\x80-\uffff]*)?\$")
_PARAM = re.compile(r"\$([0-9]+)")
_IDENT_CHAR = re.compile(r"[A-Za-z0-9_$\x80-\uffff]")


def placeholders(sql: str) -> tuple[str, list[int]]:
    """``(text with each use numbered in order, the user's parameter numbers in order of
    use)``; the numbers are 1-based and may repeat."""
    out: list[str] = []
    used: list[int] = []
    i, n = 0, len(sql)
    while i < n:
        end = _skip(sql, i)
        if end > i:
            out.append(sql[i:end])
            i = end
            continue
        char = sql[i]
        match = _PARAM.match(sql, i) if char == "$" else None
        if match and not (i and _IDENT_CHAR.match(sql[i - 1])):
            used.append(int(match.group(1)))
            out.append(f"${len(used)}")
            i = match.end()
            continue
        out.append(char)
        i += 1
    return "".join(out), used


def _skip(sql: str, i: int) -> int:
    """The end of the literal, quoted identifier or comment starting at ``i`` (``i`` when
    none starts there). Unterminated ones run to the end: the server reports them."""
    char, nxt = sql[i], sql[i + 1:i + 2]
    if char == "'":
        escapes = i and sql[i - 1] in "eE" and not (i > 1 and _IDENT_CHAR.match(sql[i - 2]))
        return _quoted(sql, i, "'", backslash=bool(escapes))
    if char == '"':
        return _quoted(sql, i, '"', backslash=False)
    if char == "-" and nxt == "-":
        end = sql.find("\n", i)
        return len(sql) if end < 0 else end + 1
    if char == "/" and nxt == "*":
        return _block_comment(sql, i)
    if char == "$" and not (i and _IDENT_CHAR.match(sql[i - 1])):
        tag = _DOLLAR_TAG.match(sql, i)
        if tag:
            end = sql.find(tag.group(0), tag.end())
            return len(sql) if end < 0 else end + len(tag.group(0))
    return i


def _quoted(sql: str, i: int, quote: str, backslash: bool) -> int:
    j = i + 1
    while j < len(sql):
        if backslash and sql[j] == "\\":
            j += 2
            continue
        if sql[j] == quote:
            if sql[j + 1:j + 2] == quote:  # doubled: part of the text
                j += 2
                continue
            return j + 1
        j += 1
    return len(sql)


def _block_comment(sql: str, i: int) -> int:
    depth, j = 0, i
    while j < len(sql):
        pair = sql[j:j + 2]
        if pair == "/*":
            depth, j = depth + 1, j + 2
        elif pair == "*/":
            depth, j = depth - 1, j + 2
            if depth == 0:
                return j
        else:
            j += 1
    return len(sql)


def to_json(value: Any) -> Any:
    """One result value as JSON (recursively for arrays and json/jsonb documents)."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):  # json keeps "\ud800" escapes as written: see without_surrogates
        return without_surrogates(value)
    if isinstance(value, int):
        return value if -MAX_EXACT_INT <= value <= MAX_EXACT_INT else str(value)
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, dt.datetime):
        return _timestamp(value)
    if isinstance(value, (dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return _interval(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, (list, tuple)):
        return [to_json(item) for item in value]
    if isinstance(value, dict):
        return {to_json(str(key)): to_json(item) for key, item in value.items()}
    if isinstance(value, uuid.UUID):
        return str(value)
    return str(value)  # inet, ranges, enums...: their text form


def _timestamp(value: dt.datetime) -> str:
    """``timestamptz`` in UTC with ``Z``; a ``timestamp`` (no zone) as stored, no offset."""
    if value.tzinfo is not None:
        value = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
        return value.isoformat() + "Z"
    return value.isoformat()


def _interval(value: dt.timedelta) -> str:
    """An ISO 8601 duration: ``P1DT2H3M4.5S``, ``-PT30S``."""
    sign = "-" if value < dt.timedelta(0) else ""
    value = abs(value)
    hours, rest = divmod(value.seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    text = f"P{value.days}D" if value.days else "P"
    clock = ""
    if hours:
        clock += f"{hours}H"
    if minutes:
        clock += f"{minutes}M"
    if seconds or value.microseconds or not (value.days or clock):
        whole = f"{seconds}.{value.microseconds:06d}".rstrip("0").rstrip(".")
        clock += f"{whole}S"
    return sign + text + ("T" + clock if clock else "")
