"""Duration text (``500ms``, ``1m30s``, ``1.5h``, ``0``) to seconds and back."""

from __future__ import annotations

import re

__all__ = ["parse_duration", "parse_since", "since_filter", "format_seconds"]

_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_GROUP = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_SINCE_DAYS = re.compile(r"([1-9]\d*)d")
# A "since" of about 950 years: no row is older, and much further back than that (year 1),
# ``now - since`` cannot be computed.
_SINCE_FOREVER = 3e10


def parse_duration(text: str) -> float:
    """Return the duration in seconds; raise ValueError when ``text`` is not a duration.

    Grammar (SPEC 2.3): an optional sign, then one or more ``<decimal><unit>`` groups; the bare
    token ``0`` is zero.
    """
    if not isinstance(text, str):
        raise ValueError(f"not a duration: {text!r}")
    body = text
    sign = 1.0
    if body[:1] in "+-" and body:
        sign = -1.0 if body[0] == "-" else 1.0
        body = body[1:]
    if body == "0":
        return 0.0
    if not body:
        raise ValueError(f"not a duration: {text!r}")
    total = 0.0
    pos = 0
    while pos < len(body):
        match = _GROUP.match(body, pos)
        if match is None:
            raise ValueError(f"not a duration: {text!r}")
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    return sign * total


def parse_since(text: str) -> float:
    """Parse a ``since`` filter: a positive duration or ``<positive integer>d``; seconds,
    ``inf`` for more days than a float holds (so "since" reaches back beyond everything,
    never an OverflowError or Python's 4,300-digit limit on ``int``)."""
    match = _SINCE_DAYS.fullmatch(text or "")
    if match:
        return float(match.group(1)) * 86400.0
    seconds = parse_duration(text)
    if seconds <= 0:
        raise ValueError(f"not a positive duration: {text!r}")
    return seconds


def since_filter(text: str | None) -> float | None:
    """A ``since`` filter's seconds, or None when there is none or it reaches back so far
    that it filters nothing; ValueError as :func:`parse_since`."""
    if text is None:
        return None
    seconds = parse_since(text)
    return None if seconds >= _SINCE_FOREVER else seconds


def format_seconds(seconds: float) -> str:
    """Human form used by ``mantle logs``: ``1.2s`` from one second up, else ``15ms``."""
    if seconds >= 1:
        return f"{seconds:.1f}s"
    return f"{int(seconds * 1000)}ms"
