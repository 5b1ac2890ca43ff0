"""JSON log lines (SPEC 9.2): one object per line, ``time``, ``level``, ``msg``, then context."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import TextIO

__all__ = ["JsonFormatter", "setup_logging", "LEVELS"]

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
          "error": logging.ERROR}
_LEVEL_NAMES = {logging.DEBUG: "DEBUG", logging.INFO: "INFO", logging.WARNING: "WARN",
                logging.ERROR: "ERROR", logging.CRITICAL: "ERROR"}
# Context keys first, in this order; anything else passed through ``extra`` follows.
_CONTEXT = ("workflow", "execution_id", "step")
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime"}
_encode = json.JSONEncoder(default=str, ensure_ascii=False, separators=(",", ":")).encode


class JsonFormatter(logging.Formatter):
    """Formats a record as one compact JSON object.

    The daemon writes three lines per execution at ``info``, so this sits on the hot path:
    the second-resolution part of the timestamp is formatted once per second.
    """

    def __init__(self) -> None:
        super().__init__()
        self._cached = (-1, "")  # (second, its text), replaced as one value: thread-safe

    def _stamp(self, record: logging.LogRecord) -> str:
        # Rounded to the microsecond first, as datetime.fromtimestamp does: 0.412 is stored as
        # 0.41199..., which truncating straight to milliseconds would print as .411.
        second, micros = divmod(round(record.created * 1_000_000), 1_000_000)
        cached_second, prefix = self._cached
        if second != cached_second:
            prefix = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second))
            self._cached = (second, prefix)
        return f"{prefix}{micros // 1000:03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        fields = record.__dict__
        line = {"time": self._stamp(record),
                "level": _LEVEL_NAMES.get(record.levelno, record.levelname),
                "msg": record.getMessage()}
        for key in _CONTEXT:
            if key in fields:
                line[key] = fields[key]
        for key, value in fields.items():
            if key not in _STANDARD and key not in line and not key.startswith("_"):
                line[key] = value
        if record.exc_info and "error" not in line:
            line["error"] = self.formatException(record.exc_info)
        return _encode(line)


def setup_logging(level: str, stream: TextIO | None = None) -> logging.Handler:
    """Send all mantle logs as JSON lines to ``stream`` (stderr by default) at ``level``."""
    # None of these record attributes is ever written out; collecting them costs a stack
    # walk and three lookups per line (the logging HOWTO's "Optimization" section).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(LEVELS[level])
    return handler
