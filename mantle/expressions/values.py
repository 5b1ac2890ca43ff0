"""Conversions between plain JSON-able Python values and celpy's CEL values."""

from __future__ import annotations

import base64
import datetime
import json
import math
from typing import Any

from celpy import celtypes

from mantle.errors import MantleError
from mantle.text import LONE_SURROGATE

__all__ = [
    "ExpressionError",
    "MAX_VALUE_SIZE",
    "compact_json",
    "size_error",
    "format_duration",
    "format_timestamp_rfc3339",
    "from_cel",
    "render_text",
    "to_cel",
]


class ExpressionError(MantleError):
    """A CEL expression or template failed to evaluate; the message is the detail text."""


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

# The most characters (of a string), bytes or items (of a list) a value built by an expression
# may hold, and the most characters plus items of one result and of one step's params together.
# Above an HTTP response body (10 MiB, as text and parsed) and an API request (16 MiB): a few
# steps of replace(), flatten() or ``+``, or references to one value repeated, would otherwise
# ask for gigabytes, in single calls that the evaluation's time limit cannot interrupt.
MAX_VALUE_SIZE = 32 * 1024 * 1024



def size_error() -> str:
    return f"value exceeds the size limit of {MAX_VALUE_SIZE} characters or items"


# celpy's constructors run type checks and build closures on every call; values decoded from
# JSON need none of that, and conversion dominates evaluation time for large step outputs.
_new_str = str.__new__
_new_int = int.__new__
_new_float = float.__new__
_dict_update = dict.update
_String, _Int, _Double, _Bool = (
    celtypes.StringType,
    celtypes.IntType,
    celtypes.DoubleType,
    celtypes.BoolType,
)
_Map, _List = celtypes.MapType, celtypes.ListType


def to_cel(value: Any) -> Any:
    """Convert decoded JSON (plus datetimes) to CEL values; ints stay ints, floats doubles."""
    kind = type(value)
    if kind is str:
        return _new_str(_String, value)
    if kind is dict:
        result = _Map()
        _dict_update(
            result,
            {
                _new_str(_String, k) if type(k) is str else _String(str(k)): to_cel(v)
                for k, v in value.items()
            },
        )
        return result
    if kind is list:
        return _List([to_cel(item) for item in value])
    if kind is int:
        if _INT64_MIN <= value <= _INT64_MAX:
            return _new_int(_Int, value)
        return _new_float(_Double, value)  # JSON integers beyond int64 lose precision, as in Go
    if kind is bool:
        return _new_int(_Bool, value)
    if kind is float:
        return _new_float(_Double, value)
    if value is None:
        return None
    return _to_cel_slow(value)


def _to_cel_slow(value: Any) -> Any:
    """Subclasses of the JSON types (celpy's own among them) and datetimes."""
    if isinstance(value, celtypes.BoolType | celtypes.IntType | celtypes.DoubleType):
        return value
    if isinstance(value, bool):
        return celtypes.BoolType(value)
    if isinstance(value, int):
        return to_cel(int(value))
    if isinstance(value, float):
        return celtypes.DoubleType(value)
    if isinstance(value, str):
        return celtypes.StringType(value)
    if isinstance(value, dict):
        return to_cel(dict(value))
    if isinstance(value, list | tuple):
        return _List([to_cel(item) for item in value])
    if isinstance(value, datetime.datetime):
        return celtypes.TimestampType(value)
    if isinstance(value, datetime.timedelta):
        return celtypes.DurationType(value)
    raise ExpressionError(f"cannot use a {type(value).__name__} value in an expression")


def format_timestamp_rfc3339(value: datetime.datetime) -> str:
    """RFC 3339 with as many fractional digits as needed, ``Z`` for UTC (Go's RFC3339Nano)."""
    text = value.strftime("%Y-%m-%dT%H:%M:%S")
    if value.microsecond:
        text += f".{value.microsecond:06d}".rstrip("0")
    offset = value.utcoffset()
    if not offset:
        return text + "Z"
    minutes = int(offset.total_seconds()) // 60
    sign = "+" if minutes >= 0 else "-"
    hours, minutes = divmod(abs(minutes), 60)
    return f"{text}{sign}{hours:02d}:{minutes:02d}"


def format_duration(value: datetime.timedelta) -> str:
    """Seconds with a fraction only when needed (``90s``, ``1.5s``), the protobuf JSON form."""
    micros = (value.days * 86_400 + value.seconds) * 1_000_000 + value.microseconds
    sign = "-" if micros < 0 else ""
    whole, fraction = divmod(abs(micros), 1_000_000)
    if fraction:
        return f"{sign}{whole}.{fraction:06d}".rstrip("0") + "s"
    return f"{sign}{whole}s"


_TYPE_NAMES = {
    celtypes.BoolType: "bool",
    celtypes.BytesType: "bytes",
    celtypes.DoubleType: "double",
    celtypes.DurationType: "google.protobuf.Duration",
    celtypes.IntType: "int",
    celtypes.ListType: "list",
    celtypes.MapType: "map",
    type(None): "null_type",
    celtypes.StringType: "string",
    celtypes.TimestampType: "google.protobuf.Timestamp",
    celtypes.UintType: "uint",
}


def from_cel(value: Any, budget: list[int] | None = None) -> Any:
    """Convert a CEL result to plain JSON-able Python.

    Timestamps and durations become their RFC 3339 / ``<n>s`` strings, bytes become base64 (the
    protobuf JSON mapping), non-string map keys their JSON text. Infinite and NaN doubles have no
    JSON form and raise ExpressionError. Every string character and every value counts against
    ``budget`` (``[remaining]``, shared by the calls given it; one of MAX_VALUE_SIZE if none):
    a list may hold one large value many times over, which must not be written out unbounded.
    """
    return _plain(value, budget if budget is not None else [MAX_VALUE_SIZE])


def _plain(value: Any, budget: list[int]) -> Any:
    budget[0] -= len(value) + 1 if isinstance(value, str | bytes) else 1
    if budget[0] < 0:
        raise ExpressionError(size_error())
    if value is None:
        return None
    if isinstance(value, bool | celtypes.BoolType):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ExpressionError(f"result {float(value)} is not a finite number")
        return float(value)
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, dict):
        return {_key_text(k): _plain(v, budget) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(item, budget) for item in value]
    if isinstance(value, datetime.datetime):
        return format_timestamp_rfc3339(value)
    if isinstance(value, datetime.timedelta):
        return format_duration(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, type):
        return _TYPE_NAMES.get(value, value.__name__)
    raise ExpressionError(f"result of type {type(value).__name__} has no JSON form")


def _text(value: str) -> str:
    """A string that UTF-8 (every column, JSON document and HTTP body) can carry: a lone
    surrogate, from a CEL escape (``'\\ud800'``) or an undecodable environment variable
    (Python's surrogateescape), is an expression error rather than a failed write."""
    if not value.isascii() and (surrogate := LONE_SURROGATE.search(value)):
        raise ExpressionError(f"result holds a lone UTF-16 surrogate "
                              f"(U+{ord(surrogate.group()):04X}), which is not a character")
    return str(value)


def _key_text(key: Any) -> str:
    """A map key as JSON text: CEL's key types are string, bool, int and uint; any other
    (celpy builds maps keyed by bytes, doubles or types too) is an expression error."""
    if isinstance(key, str):
        return _text(key)
    if isinstance(key, bool | celtypes.BoolType):
        return "true" if key else "false"
    if isinstance(key, int):  # IntType and UintType are ints
        return str(int(key))
    raise ExpressionError(f"map key of type {_TYPE_NAMES.get(type(key), type(key).__name__)} "
                          "has no JSON form")


def compact_json(value: Any) -> str:
    """Compact JSON of a plain value (``{"a":1}``), key order kept, non-ASCII unescaped."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def render_text(value: Any) -> str:
    """A plain value as interpolated text: strings verbatim, anything else compact JSON."""
    if isinstance(value, str):
        return value
    return compact_json(value)
