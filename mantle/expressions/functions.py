"""mantle's CEL functions beyond the standard library (SPEC 3.4).

Every function takes and returns celpy values. A failure is returned as a ``CELEvalError``
rather than raised, so that ``||``, ``&&``, ``?:`` and ``default()`` can absorb it as CEL
requires, and so the message stays ours instead of celpy's generic "no such overload".
``default()`` is not here: it must see its argument's error, which celpy never passes to a
function, so the evaluator handles it (see ``evaluate.py``).
"""

from __future__ import annotations

import datetime
import functools
import math
import re
from typing import Any, Callable

from celpy import celtypes
from celpy.evaluation import CELEvalError

from mantle.connectors.base import parse_json
from mantle.expressions.values import (
    MAX_VALUE_SIZE,
    ExpressionError,
    compact_json,
    format_duration,
    format_timestamp_rfc3339,
    from_cel,
    render_text,
    size_error,
    to_cel,
)

__all__ = ["CALL_OVERRIDES", "FUNCTIONS", "MAX_JSON_DECODE_BYTES", "MAX_OBJ_PAIRS", "type_name"]

MAX_JSON_DECODE_BYTES = 1_048_576
MAX_OBJ_PAIRS = 5

_INT_TEXT = re.compile(r"[+-]?[0-9]+")
_FLOAT_TEXT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?"
    r"(?:([Zz])|([+-])(\d{2}):(\d{2}))"
)
_DATE = re.compile(r"(\d{4})-(\d{2})-(\d{2})")
_DATE_TIME = re.compile(r"(\d{4})-(\d{2})-(\d{2}) (\d{2}):(\d{2}):(\d{2})")


def type_name(value: Any) -> str:
    """The CEL name of a value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool | celtypes.BoolType):
        return "bool"
    for kind, name in (
        (celtypes.UintType, "uint"),
        (int, "int"),
        (float, "double"),
        (str, "string"),
        (bytes, "bytes"),
        (list, "list"),
        (dict, "map"),
        (datetime.datetime, "timestamp"),
        (datetime.timedelta, "duration"),
    ):
        if isinstance(value, kind):
            return name
    return type(value).__name__


class _Failure(Exception):
    """Raised inside a function body; becomes the CELEvalError the function returns."""


def _cel_function(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Turn failures of a function body into CEL error values named after the function."""

    def decorate(body: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(body)
        def wrapper(*args: Any) -> Any:
            try:
                return body(*args)
            except (_Failure, ExpressionError) as failure:
                return CELEvalError(f"{name}: {failure}")
            except TypeError:
                types = ", ".join(type_name(arg) for arg in args)
                return CELEvalError(f"{name}: no overload for ({types})")
            except (ValueError, OverflowError, RecursionError) as failure:
                return CELEvalError(f"{name}: {failure}")

        wrapper.__name__ = name
        return wrapper

    return decorate


def _string(value: Any, what: str = "argument") -> str:
    if not isinstance(value, str):
        raise _Failure(f"{what} must be a string, got {type_name(value)}")
    return str(value)


@_cel_function("toLower")
def to_lower(text: Any) -> Any:
    return celtypes.StringType(_string(text).lower())


@_cel_function("toUpper")
def to_upper(text: Any) -> Any:
    return celtypes.StringType(_string(text).upper())


@_cel_function("trim")
def trim(text: Any) -> Any:
    return celtypes.StringType(_string(text).strip())


@_cel_function("replace")
def replace(text: Any, old: Any, new: Any) -> Any:
    text, old, new = _string(text), _string(old), _string(new)
    if len(new) > len(old):  # the result's length, known before it is built
        count = len(text) + 1 if old == "" else text.count(old)
        if len(text) + count * (len(new) - len(old)) > MAX_VALUE_SIZE:
            raise _Failure(size_error())
    return celtypes.StringType(text.replace(old, new))


@_cel_function("split")
def split(text: Any, separator: Any) -> Any:
    text, separator = _string(text), _string(separator)
    parts = list(text) if separator == "" else text.split(separator)
    return celtypes.ListType([celtypes.StringType(part) for part in parts])


@_cel_function("parseInt")
def parse_int(value: Any) -> Any:
    if isinstance(value, celtypes.IntType):
        return value
    text = _string(value)
    if not _INT_TEXT.fullmatch(text):
        raise _Failure(f"invalid integer {text!r}")
    number = int(text)
    if not -(2**63) <= number < 2**63:
        raise _Failure(f"integer {text!r} out of range")
    return celtypes.IntType(number)


@_cel_function("parseFloat")
def parse_float(value: Any) -> Any:
    if isinstance(value, int | float) and not isinstance(value, bool | celtypes.BoolType):
        return celtypes.DoubleType(float(value))
    text = _string(value)
    if not _FLOAT_TEXT.fullmatch(text):
        raise _Failure(f"invalid number {text!r}")
    number = float(text)
    if not math.isfinite(number):  # "1e400": beyond a double, as parseInt checks int64
        raise _Failure(f"number {text!r} out of range")
    return celtypes.DoubleType(number)


@_cel_function("toString")
def to_string(value: Any) -> Any:
    return celtypes.StringType(render_text(from_cel(value)))


@_cel_function("string")
def string(value: Any) -> Any:
    """CEL's ``string()``, fixing celpy's Python spellings of bools, timestamps, durations."""
    if isinstance(value, str):
        return celtypes.StringType(value)
    if isinstance(value, bool | celtypes.BoolType):
        return celtypes.StringType("true" if value else "false")
    if isinstance(value, int | float):
        return celtypes.StringType(compact_json(from_cel(value)))
    if isinstance(value, bytes):
        return celtypes.StringType(value.decode("utf-8"))
    if isinstance(value, datetime.datetime):
        return celtypes.StringType(format_timestamp_rfc3339(value))
    if isinstance(value, datetime.timedelta):
        return celtypes.StringType(format_duration(value))
    raise _Failure(f"cannot convert {type_name(value)} to string")


@_cel_function("obj")
def obj(*args: Any) -> Any:
    if len(args) % 2:
        raise _Failure("needs key/value pairs (an even number of arguments)")
    if len(args) > 2 * MAX_OBJ_PAIRS:
        raise _Failure(f"takes at most {MAX_OBJ_PAIRS} key/value pairs, got {len(args) // 2}")
    result = celtypes.MapType()
    for key, value in zip(args[::2], args[1::2]):
        result[celtypes.StringType(_string(key, "key"))] = value
    return result


@_cel_function("flatten")
def flatten(items: Any) -> Any:
    if not isinstance(items, list):
        raise _Failure(f"argument must be a list, got {type_name(items)}")
    if sum(len(item) if isinstance(item, list) else 1 for item in items) > MAX_VALUE_SIZE:
        raise _Failure(size_error())
    result = celtypes.ListType()
    for item in items:
        if isinstance(item, list):
            result.extend(item)
        else:
            result.append(item)
    return result


@_cel_function("jsonEncode")
def json_encode(value: Any) -> Any:
    return celtypes.StringType(compact_json(from_cel(value)))


@_cel_function("jsonDecode")
def json_decode(text: Any) -> Any:
    text = _string(text)
    size = len(text.encode("utf-8"))
    if size > MAX_JSON_DECODE_BYTES:
        raise _Failure(f"input is {size} bytes, limit is {MAX_JSON_DECODE_BYTES}")
    try:  # as connectors decode JSON from outside: "\ud83d" (cut inside an emoji) is U+FFFD
        value = parse_json(text)
    except ValueError as error:  # not JSON, NaN, or a number beyond a double
        raise _Failure(f"invalid JSON: {error}") from None
    return to_cel(value)


def _utc(*fields: str) -> datetime.datetime:
    return datetime.datetime(*map(int, fields), tzinfo=datetime.timezone.utc)


def _parse_timestamp_text(text: str) -> datetime.datetime:
    """RFC 3339 (any fraction length, offset kept), ``YYYY-MM-DD`` or ``YYYY-MM-DD HH:MM:SS``."""
    if match := _RFC3339.fullmatch(text):
        year, month, day, hour, minute, second, fraction, zulu, sign, off_h, off_m = match.groups()
        zone = datetime.timezone.utc
        if not zulu:
            offset = datetime.timedelta(hours=int(off_h), minutes=int(off_m))
            zone = datetime.timezone(-offset if sign == "-" else offset)
        micro = int((fraction or "0")[:6].ljust(6, "0"))
        return datetime.datetime(
            *map(int, (year, month, day, hour, minute, second)), micro, tzinfo=zone
        )
    if match := _DATE_TIME.fullmatch(text):
        return _utc(*match.groups())
    if match := _DATE.fullmatch(text):
        return _utc(*match.groups())
    raise _Failure(
        f"cannot parse {text!r} (expected RFC 3339, YYYY-MM-DD or YYYY-MM-DD HH:MM:SS)"
    )


@_cel_function("parseTimestamp")
def parse_timestamp(text: Any) -> Any:
    return celtypes.TimestampType(_parse_timestamp_text(_string(text)))


def _zone_abbreviation(moment: datetime.datetime) -> str:
    offset = moment.utcoffset()
    if not offset:
        return "UTC"
    minutes = int(offset.total_seconds()) // 60
    sign = "+" if minutes >= 0 else "-"
    return f"{sign}{abs(minutes) // 60:02d}{abs(minutes) % 60:02d}"  # Go's form for unnamed zones


# Longest tokens first so that "January" is not read as "Jan" + "uary".
_LAYOUT_TOKENS: tuple[tuple[str, Callable[[datetime.datetime], str]], ...] = (
    ("January", lambda t: t.strftime("%B")),
    ("Monday", lambda t: t.strftime("%A")),
    ("Z07:00", lambda t: format_timestamp_rfc3339(t.replace(microsecond=0))[19:]),
    (".000000", lambda t: f".{t.microsecond:06d}"),
    (".000", lambda t: f".{t.microsecond // 1000:03d}"),
    ("2006", lambda t: f"{t.year:04d}"),
    ("Jan", lambda t: t.strftime("%b")),
    ("Mon", lambda t: t.strftime("%a")),
    ("MST", _zone_abbreviation),
    ("01", lambda t: f"{t.month:02d}"),
    ("02", lambda t: f"{t.day:02d}"),
    ("15", lambda t: f"{t.hour:02d}"),
    ("04", lambda t: f"{t.minute:02d}"),
    ("05", lambda t: f"{t.second:02d}"),
)
_LAYOUT = re.compile("|".join(re.escape(token) for token, _ in _LAYOUT_TOKENS))
_LAYOUT_FORMATTERS = dict(_LAYOUT_TOKENS)


@_cel_function("formatTimestamp")
def format_timestamp(moment: Any, layout: Any) -> Any:
    """Go-style layout formatting; a string ``moment`` is parsed as by ``parseTimestamp``."""
    if isinstance(moment, str):
        moment = _parse_timestamp_text(moment)
    if not isinstance(moment, datetime.datetime):
        raise _Failure(f"first argument must be a timestamp, got {type_name(moment)}")
    layout = _string(layout, "layout")
    text = _LAYOUT.sub(lambda match: _LAYOUT_FORMATTERS[match.group()](moment), layout)
    return celtypes.StringType(text)


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "toLower": to_lower,
    "toUpper": to_upper,
    "trim": trim,
    "replace": replace,
    "split": split,
    "parseInt": parse_int,
    "parseFloat": parse_float,
    "toString": to_string,
    "obj": obj,
    "flatten": flatten,
    "jsonEncode": json_encode,
    "jsonDecode": json_decode,
    "parseTimestamp": parse_timestamp,
    "formatTimestamp": format_timestamp,
}

# Replace what a call to these names does while leaving the names themselves bound to celpy's
# types, so that ``type(x) == string`` keeps working.
CALL_OVERRIDES: dict[str, Callable[..., Any]] = {"string": string}
