"""Connectors: the actions steps run (SPEC §5).

``run_action(inv)`` is the one entry point for the engine. Built-in actions live in
``BUILTIN``; adding one is a function ``(Invocation) -> dict`` in a module plus one line there.
Any other ``<plugin>/<action>`` runs the executable ``<plugins_dir>/<plugin>`` (5.4).
"""

from __future__ import annotations

from mantle.connectors import ai, core, http, postgres
from mantle.connectors.base import (
    CancelToken,
    Connector,
    ConnectorError,
    ConnectorInterrupted,
    Invocation,
)
from mantle.connectors.credentials import redact, resolve_credential
from mantle.connectors.plugins import plugin_path, run_plugin

__all__ = [
    "CancelToken",
    "Invocation",
    "Connector",
    "ConnectorError",
    "ConnectorInterrupted",
    "BUILTIN",
    "RESERVED",
    "run_action",
    "resolve_credential",
    "unknown_action",
]

BUILTIN: dict[str, Connector] = {
    "http/request": http.request,
    "core/sleep": core.sleep,
    "core/log": core.log,
    "core/fail": core.fail,
    "ai/completion": ai.completion,
    "ai/embed": ai.embed,
    "postgres/query": postgres.query,
}
# Connector names that never resolve to a plugin, even for actions they do not have.
RESERVED = frozenset({"http", "core"})


def run_action(inv: Invocation) -> dict:
    """Run one attempt; return its output or raise ConnectorError / ConnectorInterrupted.

    Called on the engine's worker thread; blocks until the action ends, or until
    ``inv.cancel`` is set (then ConnectorInterrupted within ~100 ms). The credential value
    is scrubbed from the output and from error texts and partial outputs.
    """
    if inv.cancel.is_set():
        raise ConnectorInterrupted()
    connector = _resolve(inv)
    try:
        output = connector(inv)
    except ConnectorError as exc:
        if not inv.credential:
            raise
        raise ConnectorError(
            redact(exc.message, inv.credential), redact(exc.output, inv.credential),
            exc.retryable,
        ) from None
    return redact(output, inv.credential)


def unknown_action(action: str) -> ConnectorError:
    return ConnectorError(f'unknown action "{action}"', retryable=False)


def _resolve(inv: Invocation) -> Connector:
    """The function for ``inv.action``; plugins are looked up afresh on every attempt."""
    action = inv.action
    if action in BUILTIN:
        return BUILTIN[action]
    plugin, slash, name = action.partition("/") if isinstance(action, str) else ("", "", "")
    if not slash or not name or "/" in name or plugin in RESERVED:
        raise unknown_action(action)
    path = plugin_path(inv.plugins_dir, plugin)
    if path is None:
        raise unknown_action(action)
    return lambda invocation: run_plugin(invocation, plugin, path)
