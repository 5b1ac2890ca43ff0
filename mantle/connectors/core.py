"""The ``core/*`` actions (SPEC 5.2): sleep, log, fail."""

from __future__ import annotations

import logging

from mantle.connectors.base import (
    ConnectorError,
    ConnectorInterrupted,
    Invocation,
    as_text,
    params_of,
)
from mantle.connectors.credentials import redact
from mantle.durations import parse_duration

__all__ = ["sleep", "sleep_seconds", "sleep_output", "log", "fail", "DEFAULT_FAIL_MESSAGE",
           "MAX_SLEEP_SECONDS"]

DEFAULT_FAIL_MESSAGE = "failed by core/fail"
# The longest sleep (about 31 years): a longer one's due time (stored, SPEC 13.1.11) is past
# what a timestamp holds, and no thread can wait that long.
MAX_SLEEP_SECONDS = 1e9
_steps_log = logging.getLogger("mantle.steps")


def sleep_seconds(inv: Invocation) -> float:
    """The validated ``duration`` of a ``core/sleep`` step, in seconds."""
    params = params_of(inv)
    raw = params.get("duration")
    if raw is None:
        raise ConnectorError("core/sleep: duration is required")
    try:
        seconds = parse_duration(raw)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= MAX_SLEEP_SECONDS:
        raise ConnectorError(f'core/sleep: invalid duration "{as_text(raw)}"')
    return seconds


def sleep_output(seconds: float) -> dict:
    return {"duration_ms": round(seconds * 1000)}


def sleep(inv: Invocation) -> dict:
    """Wait ``duration`` (duration text, >= 0) unless cancelled first.

    The engine runs ``core/sleep`` on its timer thread instead (no thread per sleeping step);
    this blocking form serves direct callers of ``run_action``.
    """
    seconds = sleep_seconds(inv)
    if inv.cancel.wait(seconds):
        raise ConnectorInterrupted()
    return sleep_output(seconds)


def log(inv: Invocation) -> dict:
    """Log ``message`` at INFO on ``mantle.steps`` with the step's context; echo it back."""
    params = params_of(inv)
    if "message" not in params:
        raise ConnectorError("core/log: message is required")
    message = params["message"]
    text = redact(as_text(message), inv.credential)
    _steps_log.info(text, extra=inv.log_context())
    return {"message": message}


def fail(inv: Invocation) -> dict:
    """Always fail, with ``message`` as the step error."""
    message = params_of(inv).get("message")
    raise ConnectorError(DEFAULT_FAIL_MESSAGE if message is None else as_text(message))
