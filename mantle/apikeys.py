"""API keys (SPEC 6.3, 7.1, 13.8): created and revoked by the CLI, checked by the REST API.

A key is ``mk_`` + 64 hex digits; only its SHA-256 (hex) is stored, with a short prefix for
people to tell keys apart. Each key has a role (``admin``, ``operator``, ``viewer``) and may
expire. The API requires a key while at least one key is not revoked: an expired key is refused
like a wrong one, but it does not open the API again when it was the last one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import hmac
import re
import secrets
import threading
import time
import weakref

import peewee

from mantle.db import audit, database_proxy, is_sqlite, unwrap, write_transaction
from mantle.db.connect import SQLITE_BUSY_TIMEOUT_MS
from mantle.db.fields import utcnow
from mantle.db.models import ApiKey
from mantle.durations import parse_since
from mantle.errors import InvalidInput, MantleError
from mantle.timefmt import rfc3339

__all__ = ["ActiveKey", "KeyNotFound", "KeyExists", "create_key", "list_keys", "revoke_key",
           "active_keys", "current_keys", "KEYS_FRESH_FOR", "match_key", "touch_key", "hash_key",
           "parse_expiry", "TOUCH_EVERY", "ROLES"]

# Weakest first: each role may do what the ones before it may (SPEC 13.8).
ROLES = ("viewer", "operator", "admin")

_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
# ``last_used_at`` is rewritten at most this often per key, so that authenticated traffic does
# not turn every API request into a database write.
TOUCH_EVERY = dt.timedelta(seconds=30)
# How long that write waits for another writer's SQLite lock: it is bookkeeping on the path of
# a request that may only read (reads are not blocked by the lock, so they answer at once).
TOUCH_LOCK_WAIT_MS = 100
# How long the API uses the keys it read before reading them again (``current_keys``): the
# longest a key created or revoked by another process (``mantle keys``) waits to apply.
KEYS_FRESH_FOR = 1.0
_ACTIVE_SQL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# An expiry further away than this (about 1000 years) is refused rather than overflowing.
_MAX_EXPIRY = 1000 * 365 * 86400.0


class KeyExists(MantleError):
    def __init__(self, name: str):
        super().__init__(f'API key "{name}" already exists')


class KeyNotFound(MantleError):
    def __init__(self, name: str):
        super().__init__(f'API key "{name}" not found')


@dataclasses.dataclass(slots=True)
class ActiveKey:
    name: str
    key_hash: str
    last_used_at: dt.datetime | None
    role: str = "admin"
    expires_at: dt.datetime | None = None

    def expired(self, now: dt.datetime) -> bool:
        return self.expires_at is not None and now >= self.expires_at


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def parse_expiry(text: str) -> float:
    """``--expires``: a positive duration (SPEC 2.3) or ``<n>d``, in seconds."""
    try:
        seconds = parse_since(text)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < _MAX_EXPIRY:
        raise InvalidInput(f'invalid --expires value "{text}": must be a positive duration '
                           "such as 12h or 30d")
    return seconds


def create_key(name: str, actor: str = "cli", role: str = "admin",
               expires_in: float | None = None) -> str:
    """Store a new key named ``name`` and return its text (shown once, never stored).

    ``expires_in``: seconds from now after which the key is refused (None: never).
    """
    if not _NAME.fullmatch(name or ""):
        raise InvalidInput(f'invalid key name "{name}"')
    if role not in ROLES:
        raise InvalidInput(f'invalid role "{role}": must be one of admin, operator, viewer')
    key = "mk_" + secrets.token_hex(32)
    now = utcnow()
    expires_at = None if expires_in is None else now + dt.timedelta(seconds=expires_in)
    with write_transaction():
        if ApiKey.get_or_none(ApiKey.name == name) is not None:
            raise KeyExists(name)
        try:
            ApiKey.create(name=name, prefix=key[:9], key_hash=hash_key(key), created_at=now,
                          role=role, expires_at=expires_at)
        except peewee.IntegrityError:  # created meanwhile (PostgreSQL: the name is unique)
            raise KeyExists(name) from None
        metadata = {"role": role}
        if expires_at is not None:
            metadata["expires_at"] = rfc3339(expires_at)
        audit.record_audit(actor, "apikey.created", "api_key", name, metadata)
    _forget_keys()
    return key


def list_keys() -> list[ApiKey]:
    """Every key, active and revoked, in creation order."""
    return list(ApiKey.select().order_by(ApiKey.created_at, ApiKey.id))


def revoke_key(name: str, actor: str = "cli") -> int:
    """Revoke ``name`` (again revoking a revoked key changes nothing); return how many active
    keys remain."""
    with write_transaction():
        row = ApiKey.get_or_none(ApiKey.name == name)
        if row is None:
            raise KeyNotFound(name)
        # Only a key not revoked meanwhile: a revoke at once whose commit this UPDATE
        # waited for (PostgreSQL) revoked and audited it already.
        if row.revoked_at is None and ApiKey.update(revoked_at=utcnow()).where(
                ApiKey.id == row.id, ApiKey.revoked_at.is_null()).execute():
            audit.record_audit(actor, "apikey.revoked", "api_key", name)
        remaining = ApiKey.select().where(ApiKey.revoked_at.is_null()).count()
    _forget_keys()
    return remaining


class _KeyCache:
    """The active keys of each database as this process last read them, and when."""

    def __init__(self):
        self.lock = threading.Lock()
        self.read: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.changes = 0  # local changes so far: a read that raced one is not kept


_CACHE = _KeyCache()


def current_keys() -> list[ActiveKey]:
    """``active_keys`` as read at most ``KEYS_FRESH_FOR`` ago, for the API's every request.

    Reading them per request was a database round trip per request: on PostgreSQL a fifth of
    the daemon's CPU under W1 (bench/README.md). A change made in this process (``create_key``,
    ``revoke_key``) applies at once; one made by another process (``mantle keys`` next to a
    running daemon, another node) within ``KEYS_FRESH_FOR``."""
    database = unwrap(database_proxy)
    now = time.monotonic()
    with _CACHE.lock:
        cached, changes = _CACHE.read.get(database), _CACHE.changes
    if cached is not None and now - cached[0] < KEYS_FRESH_FOR:
        return cached[1]
    keys = active_keys()
    with _CACHE.lock:
        if _CACHE.changes == changes:
            _CACHE.read[database] = (now, keys)
    return keys


def _forget_keys() -> None:
    with _CACHE.lock:
        _CACHE.read.clear()
        _CACHE.changes += 1


def active_keys() -> list[ActiveKey]:
    """The keys not revoked, expired ones included, as the database holds them now. While
    this is not empty the API requires a key; the caller refuses expired ones.

    The API runs it at least once a second (``current_keys``), so its SQL is built once per
    database: building it with peewee each time cost several times what the database spends
    answering it.
    """
    database = unwrap(database_proxy)
    statement = _ACTIVE_SQL.get(database)
    if statement is None:
        query = (ApiKey.select(ApiKey.name, ApiKey.key_hash, ApiKey.last_used_at, ApiKey.role,
                               ApiKey.expires_at)
                 .where(ApiKey.revoked_at.is_null()))
        sql, params = query.sql()
        statement = _ACTIVE_SQL[database] = (sql, tuple(params))
    convert = ApiKey.last_used_at.python_value
    return [ActiveKey(name, key_hash, convert(last_used), role, convert(expires))
            for name, key_hash, last_used, role, expires
            in database.execute_sql(*statement).fetchall()]


def match_key(presented: str, keys: list[ActiveKey]) -> ActiveKey | None:
    """The key whose hash equals the presented key's, compared in constant time against every
    active key (no early exit), or None."""
    digest = hash_key(presented).encode()
    found = None
    for key in keys:
        if hmac.compare_digest(digest, key.key_hash.encode()):
            found = key
    return found


def touch_key(key: ActiveKey, now: dt.datetime | None = None) -> None:
    """Record a use of ``key`` unless one was recorded within TOUCH_EVERY. On SQLite it
    waits at most TOUCH_LOCK_WAIT_MS for the write lock, then raises the "database is
    locked" OperationalError (a later request records the use)."""
    now = now or utcnow()
    if key.last_used_at is not None and now - key.last_used_at < TOUCH_EVERY:
        return
    with _lock_wait(unwrap(database_proxy), TOUCH_LOCK_WAIT_MS):
        ApiKey.update(last_used_at=now).where(ApiKey.name == key.name).execute()
    key.last_used_at = now  # the cached key (``current_keys``) knows it was just recorded


@contextlib.contextmanager
def _lock_wait(database, milliseconds: int):
    """This thread's SQLite connection waits at most ``milliseconds`` for the write lock
    inside the block (the busy timeout of every connection is SQLITE_BUSY_TIMEOUT_MS)."""
    if not is_sqlite(database):
        yield
        return
    connection = database.connection()
    connection.execute(f"PRAGMA busy_timeout = {milliseconds}")
    try:
        yield
    finally:
        connection.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
