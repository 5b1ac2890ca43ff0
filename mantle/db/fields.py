"""Column types shared by the models: UTC timestamps and compact JSON text."""

from __future__ import annotations

import datetime as dt
import json

import peewee

from mantle.db.connect import is_sqlite

__all__ = ["utcnow", "to_utc_naive", "UtcDateTimeField", "JSONField", "dump_json",
           "SQLITE_DATETIME_FORMAT", "sqlite_text", "MAX_INTEGER", "storable"]

# Always six fractional digits: SQLite compares the stored text, and "12:00:00" would sort
# before "12:00:00.000000" although both are the same instant.
SQLITE_DATETIME_FORMAT = "%Y-%m-%d %H:%M:%S.%f"


def sqlite_text(value: dt.datetime) -> str:
    """``value`` in SQLITE_DATETIME_FORMAT (isoformat: the same text at a fifth of strftime's
    cost, and every checkpoint writes one or two)."""
    return value.isoformat(sep=" ", timespec="microseconds")


# The largest value an INTEGER column holds on both databases (PostgreSQL's int4): a larger
# version number cannot exist, and sending one fails the query instead of matching nothing.
MAX_INTEGER = 2**31 - 1


def storable(text: str) -> bool:
    """False for text no column can hold (PostgreSQL refuses NUL): a lookup by it matches
    nothing, and sending it to the database would fail the query instead."""
    return "\x00" not in text


def utcnow() -> dt.datetime:
    """The current time as a naive UTC datetime (how every timestamp is stored)."""
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def to_utc_naive(value: dt.datetime) -> dt.datetime:
    """Aware datetimes are converted to UTC; naive ones are taken to be UTC already."""
    if value.tzinfo is not None:
        value = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return value


def dump_json(value) -> str:
    """Compact JSON, non-ASCII kept as is (what the JSON columns store)."""
    return _dump(value)


# One encoder for every call (``json.dumps`` with options builds one per call); ``encode``
# keeps no state between calls, so threads may share it.
_dump = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


class UtcDateTimeField(peewee.DateTimeField):
    """Naive UTC datetime with microseconds; fixed-width text on SQLite, TIMESTAMP on PG."""

    def db_value(self, value):
        if value is None:
            return None
        if isinstance(value, str):
            value = self.adapt(value)
            if isinstance(value, str):
                raise ValueError(f"not a datetime: {value!r}")
        if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
            value = dt.datetime(value.year, value.month, value.day)
        if not isinstance(value, dt.datetime):
            return value  # an SQL expression (e.g. fn.MAX(...)) passes through
        value = to_utc_naive(value)
        if is_sqlite(self.model._meta.database):
            return sqlite_text(value)
        return value

    def python_value(self, value):
        value = super().python_value(value)
        if isinstance(value, dt.datetime):
            value = to_utc_naive(value)
        return value


class JSONField(peewee.TextField):
    """Any JSON-able value stored as compact JSON text; Python None is SQL NULL."""

    def db_value(self, value):
        if value is None:
            return None
        return dump_json(value)

    def python_value(self, value):
        if value is None:
            return None
        return json.loads(value)
