"""Credentials as connectors see them (SPEC 5.3, 13.1.5, 13.2): a typed set of secret fields.

Where a credential comes from (the encrypted store, then ``MANTLE_SECRET_<NAME>``) is decided
by the engine; connectors get a resolved ``Credential`` and use ``auth_headers`` and
``redact``. Every field value is a secret: it never reaches CEL, logs or stored outputs.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

from mantle.connectors.base import ConnectorError, without_surrogates

__all__ = ["Credential", "TYPES", "resolve_credential", "environment_credential",
           "credential_variable", "not_found", "auth_headers", "AUTH_HEADERS", "redact",
           "longest_secret", "REDACTED"]

REDACTED = "********"  # SPEC 13.8: the one redaction marker

# type -> (required fields, optional fields)  (SPEC 13.2)
TYPES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "generic": (("key",), ()),
    "bearer": (("token",), ()),
    "openai": (("api_key",), ("org_id",)),
    "basic": (("username", "password"), ()),
    "postgres": (("url",), ()),
}


@dataclasses.dataclass(frozen=True, slots=True)
class Credential:
    """A resolved credential: its ``type`` (a key of ``TYPES``) and field values."""

    name: str
    type: str
    fields: Mapping[str, str]

    def secrets(self) -> tuple[str, ...]:
        """Every non-empty field value, and for ``basic`` the Basic token of the pair (what
        ``redact`` hides)."""
        values = tuple(value for value in self.fields.values() if value)
        if self.type == "basic":
            values += (_basic_token(self.fields),)
        return values

    def __repr__(self) -> str:  # never print the values by accident
        return f"Credential(name={self.name!r}, type={self.type!r})"


def credential_variable(name: str) -> str:
    """The environment variable holding credential ``name``: upper-cased, ``-`` -> ``_``."""
    return "MANTLE_SECRET_" + name.upper().replace("-", "_")


def not_found(name: str) -> ConnectorError:
    return ConnectorError(f'credential "{name}" not found (set {credential_variable(name)})',
                          retryable=False)


def environment_credential(name: str, environ: Mapping[str, str] = os.environ
                           ) -> Credential | None:
    """``MANTLE_SECRET_<NAME>`` as a ``generic`` credential (field ``key``), or None."""
    value = environ.get(credential_variable(name), "")
    return Credential(name, "generic", {"key": value}) if value else None


def resolve_credential(name: str, environ: Mapping[str, str] = os.environ) -> Credential:
    """The credential from the environment; unset or empty is a non-retryable failure.

    The engine looks in the credential store first (13.1.5) and calls this as the fallback.
    """
    credential = environment_credential(name, environ)
    if credential is None:
        raise not_found(name)
    return credential


# Every header ``auth_headers`` may add: each carries a credential value, so none of them
# follows a redirect to another origin.
AUTH_HEADERS = ("Authorization", "OpenAI-Organization")


def auth_headers(credential: Credential | None) -> dict[str, str]:
    """The HTTP headers a credential adds to a request (13.2): Bearer for ``bearer``,
    ``generic`` and ``openai`` (plus ``OpenAI-Organization``), Basic for ``basic``."""
    if credential is None:
        return {}
    fields = credential.fields
    if credential.type == "basic":
        return {"Authorization": "Basic " + _basic_token(fields)}
    token = {"bearer": "token", "generic": "key", "openai": "api_key"}.get(credential.type)
    if token is None or not fields.get(token):
        return {}
    headers = {"Authorization": f"Bearer {fields[token]}"}
    if credential.type == "openai" and fields.get("org_id"):
        headers["OpenAI-Organization"] = fields["org_id"]
    return headers


def _basic_token(fields: Mapping[str, str]) -> str:
    pair = f"{fields.get('username', '')}:{fields.get('password', '')}"
    return base64.b64encode(pair.encode()).decode()


def redact(value: Any, credential: Credential | str | None) -> Any:
    """``value`` with every occurrence of the credential's secrets in its strings replaced by
    ``********``.

    SPEC 5.3 promises that credentials never reach stored outputs or errors, yet a server or
    plugin may echo them back (an echo endpoint, a plugin printing its input). Map keys are
    left alone: renaming them could merge two keys. A plain string is one secret.
    """
    if not credential:
        return value
    secrets = (credential,) if isinstance(credential, str) else credential.secrets()
    forms = _spellings(secrets)
    return _redact(value, forms) if forms else value


def longest_secret(credential: Credential | None) -> int:
    """The length in UTF-8 bytes of the longest form of a secret ``redact`` hides (0 without
    a credential). A text cut at an arbitrary point may begin with the end of a secret,
    shorter than this, which no longer reads as the secret and so escapes ``redact``.
    A value read from the OS with bytes that are not UTF-8 holds lone surrogates: each
    counts as the three bytes a UTF-8 encoder that lets it through writes."""
    if not credential:
        return 0
    return max((len(form.encode("utf-8", "surrogatepass"))
                for form in _spellings(credential.secrets())), default=0)


def _spellings(secrets: tuple[str, ...]) -> tuple[str, ...]:
    """Each secret as written and as JSON encoders escape it (``\\u00e9``, ``\\/``), longest
    first, so a response body that echoes it JSON-encoded is caught too; a secret with lone
    surrogates (bytes that are not UTF-8, read from the OS) also as an echo of it reads
    back: each one U+FFFD (``without_surrogates``, undecodable bytes decoded)."""
    forms = set()
    for secret in secrets + tuple(without_surrogates(secret) for secret in secrets):
        forms.add(secret)
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
