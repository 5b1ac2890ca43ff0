"""Timestamps as users see them: RFC 3339 UTC with ``Z`` (SPEC 7.1)."""

from __future__ import annotations

import datetime as dt

__all__ = ["rfc3339", "rfc3339_seconds", "table_time"]


def _utc(value: dt.datetime) -> dt.datetime:
    if value.tzinfo is not None:
        value = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return value


def rfc3339(value: dt.datetime | None) -> str | None:
    """``2026-03-18T09:00:00.412Z`` (milliseconds), or None."""
    if value is None:
        return None
    # isoformat truncates to milliseconds like microsecond // 1000, at a fifth of strftime's cost
    # (list pages format two per row).
    return _utc(value).isoformat(timespec="milliseconds") + "Z"


def rfc3339_seconds(value: dt.datetime) -> str:
    """``2026-03-18T09:00:00Z``."""
    return _utc(value).strftime("%Y-%m-%dT%H:%M:%SZ")


def table_time(value: dt.datetime | None) -> str:
    """``2026-03-18 09:00:00`` for CLI tables, ``-`` when unset."""
    return "-" if value is None else _utc(value).strftime("%Y-%m-%d %H:%M:%S")
