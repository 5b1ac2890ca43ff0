"""Credentials (SPEC 5.3): named secrets read from ``MANTLE_SECRET_<NAME>``."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

from mantle.connectors.base import ConnectorError

__all__ = ["resolve_credential", "credential_variable", "redact", "REDACTED"]

REDACTED = "[redacted]"


def credential_variable(name: str) -> str:
    """The environment variable holding credential ``name``: upper-cased, ``-`` -> ``_``."""
    return "MANTLE_SECRET_" + name.upper().replace("-", "_")


def resolve_credential(name: str, environ: Mapping[str, str] = os.environ) -> str:
    """Return the secret value; unset or empty is a non-retryable step failure."""
    variable = credential_variable(name)
    value = environ.get(variable, "")
    if not value:
        raise ConnectorError(
            f'credential "{name}" not found (set {variable})', retryable=False
        )
    return value


def redact(value: Any, secret: str | None) -> Any:
    """``value`` with every occurrence of ``secret`` in its strings replaced by ``[redacted]``.

    SPEC 5.3 promises that credentials never reach stored outputs or errors, yet a server or
    plugin may echo them back (an echo endpoint, a plugin printing its input). Map keys are
    left alone: renaming them could merge two keys.
    """
    if not secret:
        return value
    return _redact(value, _spellings(secret))


def _spellings(secret: str) -> tuple[str, ...]:
    """The secret as written and as JSON encoders escape it (``\\u00e9``, ``\\/``), longest
    first, so a response body that echoes it JSON-encoded is caught too."""
    forms = {secret}
    for ascii_only in (True, False):
        escaped = json.dumps(secret, ensure_ascii=ascii_only)[1:-1]
        forms.update({escaped, escaped.replace("/", "\\/")})
    return tuple(sorted(forms, key=len, reverse=True))


def _redact(value: Any, forms: tuple[str, ...]) -> Any:
    if isinstance(value, str):
        for form in forms:
            value = value.replace(form, REDACTED)
        return value
    if isinstance(value, dict):
        return {key: _redact(item, forms) for key, item in value.items()}
    if isinstance(value, list):
        return [_redact(item, forms) for item in value]
    return value
