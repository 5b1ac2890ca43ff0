"""The encrypted credential store (SPEC 13.2) and where a step's credential comes from (13.1.5).

Each credential's fields are encrypted as one JSON document with AES-256-GCM: a fresh 12-byte
nonce per value and the credential's name as associated data, so a ciphertext copied onto
another name does not decrypt. A row holds only the ciphertext, the nonce (both base64) and a
key id: a short digest of the key that tells which key encrypted it, never the key itself.

The key comes from the configuration (``encryption.key`` / ``MANTLE_ENCRYPTION_KEY``); the
composition roots hand it over once with ``configure_key`` (the engine resolves credentials
deep inside, where no config object reaches).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import os
import re
import secrets
from collections.abc import Mapping

import peewee
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from mantle.connectors.base import ConnectorError
from mantle.connectors.credentials import TYPES, Credential, resolve_credential
from mantle.db import (OUTAGE_ERRORS, audit, database_proxy, is_postgres, unwrap,
                       write_transaction)
from mantle.db.fields import storable, utcnow
from mantle.db.models import Credential as CredentialRow
from mantle.errors import ConfigError, InvalidInput, MantleError

__all__ = ["KEY_VARIABLE", "CredentialExists", "CredentialNotFound", "CannotDecrypt",
           "KeyMismatch",
           "StoredCredential", "parse_key", "new_key", "key_id", "configure_key",
           "configured_key", "typed_fields", "check_name", "create", "list_credentials",
           "delete", "rotate", "read", "resolve"]

KEY_VARIABLE = "MANTLE_ENCRYPTION_KEY"
_NAME = re.compile(r"[a-z][a-z0-9-]*")  # the workflow name rule (2.6)
_MAX_NAME = 255  # the column's width
_KEY_ID_CONTEXT = b"mantle credential key id\x00"
_UNSET = object()
_configured: object = _UNSET  # the key text from the configuration, once configure_key ran


class CredentialExists(MantleError):
    def __init__(self, name: str):
        super().__init__(f'credential "{name}" already exists')


class CredentialNotFound(MantleError):
    def __init__(self, name: str):
        super().__init__(f'credential "{name}" not found')


class KeyMismatch(MantleError):
    def __init__(self):
        super().__init__("the stored credentials are encrypted with another key — set "
                         "MANTLE_ENCRYPTION_KEY to the key they were rotated to")


class CannotDecrypt(MantleError):
    def __init__(self, name: str):
        super().__init__(f'credential "{name}" cannot be decrypted with the configured key')


@dataclasses.dataclass(frozen=True, slots=True)
class StoredCredential:
    """What ``secrets list`` shows: never a value."""

    name: str
    type: str
    created_at: object  # datetime, naive UTC


# --- keys ---

def parse_key(text: str | None) -> bytes:
    """The 32-byte key from its 64 hex characters; ConfigError with the SPEC's words."""
    text = (text or "").strip()
    if not text:
        raise ConfigError(f"encryption key is not configured — set {KEY_VARIABLE}")
    if not re.fullmatch(r"[0-9A-Fa-f]{64}", text):
        raise ConfigError("invalid encryption key: must be 64 hex characters")
    return binascii.unhexlify(text)


def new_key() -> str:
    """A fresh random key as 64 lowercase hex characters."""
    return secrets.token_hex(32)


def key_id(key: bytes) -> str:
    """16 hex characters naming ``key`` (a digest: the key cannot be recovered from it)."""
    return hashlib.sha256(_KEY_ID_CONTEXT + key).hexdigest()[:16]


def configure_key(text: str | None) -> None:
    """Remember the configured key text for this process (``""``: none configured).

    Called by the composition roots after loading the configuration; until then
    ``configured_key`` falls back to the ``MANTLE_ENCRYPTION_KEY`` of the environment given.
    """
    global _configured
    _configured = text or ""


def configured_key(environ: Mapping[str, str] | None = None) -> str:
    if _configured is not _UNSET:
        return _configured  # type: ignore[return-value]
    return (os.environ if environ is None else environ).get(KEY_VARIABLE, "")


def _encrypt(key: bytes, name: str, fields: Mapping[str, str]) -> tuple[str, str]:
    nonce = os.urandom(12)
    plain = json.dumps(dict(fields), separators=(",", ":")).encode()
    sealed = AESGCM(key).encrypt(nonce, plain, name.encode())
    return base64.b64encode(sealed).decode(), base64.b64encode(nonce).decode()


def _decrypt(key: bytes, row: CredentialRow) -> dict[str, str]:
    """The fields of ``row``; CannotDecrypt when ``key`` is not the one that sealed it."""
    if row.key_id != key_id(key):
        raise CannotDecrypt(row.name)
    try:
        plain = AESGCM(key).decrypt(base64.b64decode(row.nonce),
                                    base64.b64decode(row.ciphertext), row.name.encode())
        fields = json.loads(plain)
    except (InvalidTag, ValueError, binascii.Error):
        raise CannotDecrypt(row.name) from None
    if not isinstance(fields, dict):
        raise CannotDecrypt(row.name)
    return {str(k): str(v) for k, v in fields.items()}


# --- fields ---

def typed_fields(kind: str, given: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """The fields type ``kind`` uses, and the names of the given ones it ignores.

    Raises InvalidInput for an unknown type or a missing (or empty) required field.
    """
    if kind not in TYPES:
        raise InvalidInput(f'unknown credential type "{kind}": must be one of '
                           + ", ".join(TYPES))
    required, optional = TYPES[kind]
    for field in required:
        if not given.get(field):
            raise InvalidInput(f'field "{field}" is required for credential type "{kind}"')
    fields = {field: given[field] for field in required + optional if given.get(field)}
    ignored = [field for field in given if field not in required + optional]
    return fields, ignored


def check_name(name: str) -> None:
    if not _NAME.fullmatch(name or ""):
        raise InvalidInput(f'invalid credential name "{name}": must match ^[a-z][a-z0-9-]*$')
    if len(name) > _MAX_NAME:
        raise InvalidInput(f'invalid credential name "{name}": '
                           f"must be at most {_MAX_NAME} characters")


# --- the store (all on the bound database) ---

def create(name: str, kind: str, fields: Mapping[str, str], key: bytes,
           actor: str = "cli") -> None:
    """Encrypt and store a new credential; audit ``credential.created``."""
    check_name(name)
    ciphertext, nonce = _encrypt(key, name, fields)
    now = utcnow()
    with write_transaction():
        _lock_table()  # a rotation under way commits first; then this one sees its key
        if CredentialRow.get_or_none(CredentialRow.name == name) is not None:
            raise CredentialExists(name)
        stored = {row.key_id for row in CredentialRow.select(CredentialRow.key_id).distinct()}
        if stored and key_id(key) not in stored:  # rotated to another key: unreadable later
            raise KeyMismatch()
        try:
            CredentialRow.insert(name=name, type=kind, ciphertext=ciphertext, nonce=nonce,
                                 key_id=key_id(key), created_at=now, updated_at=now).execute()
        except peewee.IntegrityError:  # created by another process since the check
            raise CredentialExists(name) from None
        audit.record_audit(actor, "credential.created", "credential", name)


def list_credentials() -> list[StoredCredential]:
    """Every credential by name: names, types and creation times only."""
    query = (CredentialRow.select(CredentialRow.name, CredentialRow.type,
                                  CredentialRow.created_at).order_by(CredentialRow.name))
    return [StoredCredential(row.name, row.type, row.created_at) for row in query]


def delete(name: str, actor: str = "cli") -> None:
    """Delete ``name``; CredentialNotFound when there is none. Audit ``credential.deleted``."""
    with write_transaction():
        deleted = 0
        if storable(name):
            deleted = CredentialRow.delete().where(CredentialRow.name == name).execute()
        if not deleted:
            raise CredentialNotFound(name)
        audit.record_audit(actor, "credential.deleted", "credential", name)


def rotate(old: bytes, new: bytes, actor: str = "cli") -> int:
    """Re-encrypt every credential with ``new`` in one transaction; how many there were.

    Nothing is written unless every credential decrypts (with ``old``, or already with
    ``new`` after an earlier rotation), and all rows change in the same commit: a crash at any
    point leaves every credential readable with exactly one of the two keys. Concurrent
    ``create``s wait for the commit (PostgreSQL: a table lock; SQLite: the write lock), then
    refuse to store a credential under the old key (KeyMismatch).
    """
    new_id = key_id(new)
    with write_transaction():
        _lock_table()
        rows = list(CredentialRow.select().order_by(CredentialRow.name))
        plain = [(row, _decrypt(new if row.key_id == new_id else old, row)) for row in rows]
        now = utcnow()
        for row, fields in plain:
            ciphertext, nonce = _encrypt(new, row.name, fields)
            CredentialRow.update(ciphertext=ciphertext, nonce=nonce, key_id=new_id,
                                 updated_at=now).where(CredentialRow.name == row.name).execute()
            audit.record_audit(actor, "credential.key_rotated", "credential", row.name)
    return len(rows)


def _lock_table() -> None:
    """Keep new credentials out until the rotation commits (PostgreSQL only: SQLite's write
    transaction already excludes every other writer)."""
    database = unwrap(database_proxy)
    if is_postgres(database):
        database.execute_sql("LOCK TABLE credentials IN SHARE ROW EXCLUSIVE MODE")


def read(name: str, key: bytes) -> Credential | None:
    """The decrypted credential ``name``, or None when the store has none by that name."""
    if not storable(name):
        return None
    row = CredentialRow.get_or_none(CredentialRow.name == name)
    if row is None:
        return None
    return Credential(name, row.type, _decrypt(key, row))


def resolve(name: str, environ: Mapping[str, str] | None = None) -> Credential:
    """A step's ``credential: <name>`` (13.1.5): the store first, then
    ``MANTLE_SECRET_<NAME>`` from ``environ``; raises a non-retryable ConnectorError worded
    as the step error (not found, cannot be decrypted, store unreadable).

    Runs on the engine thread that prepares the step; it reads the bound database (one
    primary-key lookup) only for steps that name a credential.
    """
    environ = os.environ if environ is None else environ
    try:
        row = CredentialRow.get_or_none(CredentialRow.name == name) if storable(name) else None
    except OUTAGE_ERRORS:
        raise  # the caller waits the outage out
    except peewee.PeeweeException:
        raise ConnectorError(f'credential "{name}" cannot be read: database unavailable',
                             retryable=False) from None
    if row is None:
        return resolve_credential(name, environ)
    try:
        key = parse_key(configured_key(environ))
        return Credential(name, row.type, _decrypt(key, row))
    except ConfigError as exc:
        raise ConnectorError(f'credential "{name}" cannot be decrypted: {exc}',
                             retryable=False) from None
    except CannotDecrypt as exc:
        raise ConnectorError(str(exc), retryable=False) from None
