"""What every connector shares: the invocation, the two errors, and small helpers.

A connector is a plain function ``(Invocation) -> dict`` (the step output). It runs on the
engine's worker thread; the engine interrupts it from another thread by setting
``Invocation.cancel`` and expects it to give up within 100 ms.
"""

from __future__ import annotations

import json
import math
import re
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from mantle.errors import MantleError
from mantle.text import LONE_SURROGATE

__all__ = [
    "CancelToken",
    "Invocation",
    "Connector",
    "ConnectorError",
    "ConnectorInterrupted",
    "TICK",
    "MAX_OUTPUT_BYTES",
    "as_text",
    "json_size",
    "output_too_large",
    "parse_json",
    "without_surrogates",
    "params_of",
    "wait_for",
]

# How often a connector waiting on its own I/O looks at ``cancel`` and its deadline. Ten
# milliseconds keeps cancellation well inside the 100 ms target for a negligible CPU cost.
TICK = 0.01


class CancelToken(threading.Event):
    """The ``cancel`` event of an attempt, which can also run callbacks when set.

    A connector blocked in I/O registers how to break it (``add_callback(conn.abort)``), so a
    cancel closes the connection at once from the cancelling thread instead of the connector
    polling the event. Callbacks run on the thread that calls ``set`` and must be quick.
    """

    def __init__(self) -> None:
        super().__init__()
        self._callbacks: list[Callable[[], None]] = []
        self._callback_lock = threading.Lock()

    def add_callback(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Run ``callback`` when the token is set (at once if it already is); returns a
        function that removes it again."""
        with self._callback_lock:
            if not self.is_set():
                self._callbacks.append(callback)
                return lambda: self._remove(callback)
        callback()
        return lambda: None

    def _remove(self, callback) -> None:
        with self._callback_lock:
            if callback in self._callbacks:
                self._callbacks.remove(callback)

    def set(self) -> None:
        with self._callback_lock:
            super().set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception:  # a failed abort must not stop the others
                pass

    @classmethod
    def following(cls, event: threading.Event, done: threading.Event) -> "CancelToken":
        """A token set when ``event`` (a plain Event, from a direct caller) is set, watched
        by a helper thread until ``done`` is set."""
        token = cls()

        def watch():
            while not done.is_set():
                if event.wait(TICK):
                    token.set()
                    return

        threading.Thread(target=watch, name="cancel-watch", daemon=True).start()
        return token


@dataclass(frozen=True, slots=True)
class Invocation:
    """One attempt of one step, as the engine hands it to ``run_action``.

    ``cancel`` is set by the engine on cancellation, step timeout or shutdown deadline;
    ``credential`` is the resolved ``mantle.connectors.credentials.Credential`` (or None) and
    its values must never be logged or stored.

    ``progress`` is what this attempt last passed to ``checkpoint`` before a crash (None on a
    fresh attempt). ``checkpoint(value)`` stores a JSON-able progress value durably and returns
    once it is committed; it raises ConnectorInterrupted when the attempt must stop (cancel,
    lost ownership). A connector whose work has steps that must not repeat after a crash (AI
    tool rounds) checkpoints after each. ``run_tool(action, params, credential=None,
    call_id=None)`` runs another action and returns its output (raises ConnectorError): with
    the named credential resolved as a step's is (13.1.5) — never this step's own — and, for a
    ``workflow/run``, one child per ``call_id`` of this attempt, also across crashes. Both are
    None when the caller offers no such service (direct calls, tests).
    """

    action: str
    params: Any
    cancel: threading.Event
    credential: Any = None  # mantle.connectors.credentials.Credential | None
    step_timeout: float | None = None
    plugins_dir: str = ".mantle/plugins"
    workflow: str = ""
    execution_id: str = ""
    step: str = ""
    attempt: int = 1
    progress: Any = None
    checkpoint: Callable[[Any], None] | None = None
    run_tool: Callable[[str, Any], dict] | None = None
    metrics: Any = None  # mantle.metrics.Metrics of the process, when there is one

    def log_context(self) -> dict[str, str]:
        """The SPEC 9.2 context keys that are known, for ``logging``'s ``extra``."""
        context = {"workflow": self.workflow, "execution_id": self.execution_id,
                   "step": self.step}
        return {key: value for key, value in context.items() if value}


Connector = Callable[[Invocation], dict]


class ConnectorError(MantleError):
    """The attempt failed; ``message`` is the step ``error`` (SPEC 4.5, §5).

    ``output`` is the partial output kept on the failed step (or None). ``retryable`` is
    False only for failures a retry cannot change (unknown action, missing credential).
    """

    def __init__(self, message: str, output: dict | None = None, retryable: bool = True):
        super().__init__(message)
        self.output = output
        self.retryable = retryable


class ConnectorInterrupted(MantleError):
    """The attempt stopped because ``cancel`` was set; the engine knows why and words it."""

    def __init__(self, message: str = "interrupted"):
        super().__init__(message)


MAX_OUTPUT_BYTES = 1024 * 1024  # a step output, as compact JSON in UTF-8 (SPEC 5)


def json_size(value: Any) -> int:
    """The bytes of ``value`` as compact JSON in UTF-8: how a step output is measured."""
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))


def output_too_large(size: int, more: bool = False) -> str:
    """SPEC 5's error for an output over MAX_OUTPUT_BYTES; ``more``: ``size`` bytes were
    read when the action stopped, and the whole output would have been larger."""
    return (f"step output exceeds {MAX_OUTPUT_BYTES} byte limit "
            f"({'more than ' if more else ''}{size} bytes)")


def as_text(value: Any) -> str:
    """A string as-is, anything else as compact JSON (the SPEC 3.2 rendering)."""
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


# A JSON escape of a UTF-16 surrogate: the only way a lone one gets into decoded text.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def parse_json(text: str) -> Any:
    """JSON text from outside (a response body, a plugin's stdout) as a value that can be
    stored: ValueError (or RecursionError) when it is not JSON, NaN and Infinity included,
    and so is a number beyond a double (``1e999`` would decode as inf and be stored and
    served as ``Infinity``); lone surrogates replaced as ``without_surrogates`` does."""
    value = json.loads(text, parse_constant=_not_json, parse_float=_finite,
                       parse_int=_within_double)
    return without_surrogates(value) if _SURROGATE_ESCAPE.search(text) else value


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} is out of range")
    return value


def _within_double(text: str) -> int:
    value = int(text)
    if abs(value) > sys.float_info.max:  # no float (no expression, no vector) holds it
        raise ValueError(f"{text[:20]}... is out of range")
    return value


def without_surrogates(value: Any) -> Any:
    """``value`` with each lone UTF-16 surrogate in its strings (map keys too) replaced by
    U+FFFD, as invalid UTF-8 is. JSON's ``"\\ud800"`` (a string cut inside an emoji) decodes
    to one, and no database, JSON document or HTTP body can carry it."""
    if isinstance(value, str):
        return LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {without_surrogates(key): without_surrogates(item)
                for key, item in value.items()}
    if isinstance(value, list):
        return [without_surrogates(item) for item in value]
    return value


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # NaN and Infinity: the output could not be stored


def params_of(inv: Invocation) -> dict:
    """The params map of a built-in action (``null`` counts as ``{}``)."""
    if inv.params is None:
        return {}
    if not isinstance(inv.params, dict):
        raise ConnectorError(f"{inv.action}: params must be a map")
    return inv.params


def wait_for(done: threading.Event, cancel: threading.Event, deadline: float | None) -> str:
    """Block until ``done``, ``cancel`` or the monotonic ``deadline``; say which came first.

    Returns ``"done"``, ``"cancel"`` or ``"timeout"``. ``done`` wins a tie: a result that is
    already there is worth keeping. ``cancel`` is polled every ``TICK`` because an Event
    cannot be waited on together with another.
    """
    while not done.wait(TICK):
        if cancel.is_set():
            return "cancel"
        if deadline is not None and time.monotonic() >= deadline:
            return "timeout"
    return "done"
