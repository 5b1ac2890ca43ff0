"""API keys on the REST API: authentication (SPEC 7.1), roles (13.8), refusals audited in
bulk (issue 15).

``Authentication`` runs before routing (401 for a missing, wrong, revoked or expired key),
``RoleCheck`` after it (403 when the key's role may not use the route). ``AuthFailures``
turns a flood of 401s into at most one ``auth.failed`` row per route and interval, written by
a thread of its own, so that no refused request waits for (or takes) the database's write
lock.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time

from mantle import apikeys
from mantle.db import audit, transaction
from mantle.db.connect import backend_ended, backend_identity
from mantle.db.fields import utcnow
from mantle.db.models import AuditEvent
from mantle.timefmt import rfc3339
from web.errors import OUTAGE_ERRORS, ApiError, reset_connection

__all__ = ["Authentication", "RoleCheck", "AuthFailures", "role_allows", "OPERATOR_ROUTES",
           "PROTECTED"]

log = logging.getLogger("mantle.http")

# Paths that need a key while keys exist (SPEC 7.1); /metrics too with metrics.require_key.
PROTECTED = ("/api/v1", "/hooks")
# What an ``operator`` may do beyond every GET (SPEC 13.8); ``admin`` may do everything.
OPERATOR_ROUTES = frozenset({
    ("POST", "/api/v1/run/{workflow}"), ("POST", "/api/v1/cancel/{execution}"),
    ("POST", "/api/v1/retry/{execution}"), ("POST", "/hooks/{path}")})
# Addresses kept per route and interval in an auth.failed row (the busiest ones).
_ADDRESSES = 20
# Addresses counted per route between two rows, at most: past it only the busiest half is
# kept, so a flood from ever new addresses (an IPv6 /64 has 2**64) cannot grow the count
# without bound, between two rows or through an outage, and the busy ones stay exact.
_ADDRESSES_COUNTED = 1000


def _under(path: str, prefixes) -> bool:
    return any(path == prefix or path.startswith(prefix + "/") for prefix in prefixes)


def role_allows(role: str, method: str, route: str) -> bool:
    if role == "admin":
        return True
    if method in ("GET", "HEAD"):
        return role in ("viewer", "operator")
    return role == "operator" and (method, route) in OPERATOR_ROUTES


class Authentication:
    """Bearer API keys on ``/api/v1`` and ``/hooks`` (and ``/metrics`` when asked) while a key
    that is not revoked exists.

    Keys are read through ``apikeys.current_keys``: a running daemon sees ``mantle keys
    create``/``revoke`` within ``apikeys.KEYS_FRESH_FOR`` (1 s). Sets ``req.context.actor``
    (``api`` or ``apikey:<name>``) for the audit trail and ``req.context.key`` (the
    ``ActiveKey`` or None) for the rate limit.
    """

    def __init__(self, database, labels, failures: AuthFailures, metrics_require_key: bool):
        self._database = database
        self._labels = labels
        self._failures = failures
        self._prefixes = PROTECTED + (("/metrics",) if metrics_require_key else ())

    def process_request(self, req, resp) -> None:
        req.context.actor = "api"
        req.context.key = None
        if not _under(req.path, self._prefixes):
            return
        keys = self._active_keys()
        if not keys:
            return
        header = (req.get_header("Authorization") or "").strip()
        if not header:
            self._refuse(req, "missing Authorization header")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer":
            self._refuse(req, "Authorization header must use Bearer scheme")
        key = apikeys.match_key(token.strip(), keys)
        now = utcnow()
        if key is None or key.expired(now):
            self._refuse(req, "invalid API key")
        req.context.actor = f"apikey:{key.name}"
        req.context.key = key
        try:
            apikeys.touch_key(key, now)
        except OUTAGE_ERRORS:  # bookkeeping only: the request itself may still succeed
            reset_connection(self._database)

    def _active_keys(self) -> list[apikeys.ActiveKey]:
        # When the keys are due to be read again this is the request's first query: a
        # connection left dead by an earlier outage fails once here, and a fresh one decides.
        try:
            return apikeys.current_keys()
        except OUTAGE_ERRORS:
            reset_connection(self._database)
            return apikeys.current_keys()

    def _refuse(self, req, message: str):
        self._failures.record(self._labels(req), req.method, req.remote_addr, message)
        raise ApiError(401, message, headers={"WWW-Authenticate": "Bearer"})


class RoleCheck:
    """403 when the key's role may not use the route; after routing and the method check, so
    an unknown path stays 404 and a missing method 405 whatever the role."""

    def __init__(self, labels):
        self._labels = labels

    def process_resource(self, req, resp, resource, params) -> None:
        key = req.context.get("key")
        if key is None:
            return
        route = self._labels(req)
        if not role_allows(key.role, req.method, route):
            raise ApiError(403, f'API key role "{key.role}" cannot {req.method} {route}')


@dataclasses.dataclass
class _Tally:
    """Refusals of one route since its last row."""

    first_at: object
    first_error: str
    first_method: str
    first_address: str | None
    count: int = 0
    last_at: object = None
    written_at: object = None  # the timestamp of its row, once a write of it was tried
    errors: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    addresses: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def absorb(self, later: "_Tally") -> None:
        """Add the refusals of ``later``, counted after these, to this tally."""
        self.count += later.count
        self.last_at = later.last_at
        self.errors.update(later.errors)
        self.addresses.update(later.addresses)
        self._bound_addresses()

    def count_address(self, address: str) -> None:
        self.addresses[address] += 1
        self._bound_addresses()

    def _bound_addresses(self) -> None:
        if len(self.addresses) > _ADDRESSES_COUNTED:
            self.addresses = collections.Counter(
                dict(self.addresses.most_common(_ADDRESSES_COUNTED // 2)))

    def metadata(self) -> dict:
        return {"count": self.count, "error": self.first_error, "method": self.first_method,
                "remote_addr": self.first_address, "first_at": rfc3339(self.first_at),
                "last_at": rfc3339(self.last_at), "errors": dict(self.errors),
                "addresses": dict(self.addresses.most_common(_ADDRESSES))}


class AuthFailures:
    """``auth.failed`` audit rows, at most one per route per ``interval`` seconds.

    Request threads only count (``record``); the ``mantle-auth-audit`` thread writes. The
    first refusal after a quiet interval is written at once, in a row of its own however late
    the writer gets to it; the ones after it are summed into the row written when the
    interval has passed (metadata ``count``, ``errors``, ``addresses``, ``first_at``,
    ``last_at``). ``close()`` writes what is left.

    A row whose COMMIT was sent when the connection broke may have committed, or commit yet:
    it is written again only once the server process it was sent to has ended (PostgreSQL),
    and only if no row of its route carries its timestamp (``_Tally.written_at``).
    """

    def __init__(self, database, interval: float = 60.0):
        self._database = database
        self._interval = interval
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._ready: list[tuple[str, _Tally]] = []  # first refusals, each to be written alone
        self._unsure: list[tuple[str, _Tally]] = []  # rows whose COMMIT's outcome was lost
        self._backend = None  # the PostgreSQL server process their COMMIT was sent to
        self._pending: dict[str, _Tally] = {}
        self._written: dict[str, float] = {}  # route -> monotonic time its interval began
        self._thread: threading.Thread | None = None
        self._closed = False

    def record(self, route: str, method: str, address: str | None, error: str) -> None:
        now = utcnow()
        with self._lock:
            if self._closed:
                return
            tally = self._pending.get(route)
            if tally is None:
                tally = _Tally(now, error, method, address)
                began = time.monotonic()
                if self._left(route, began) <= 0:  # quiet
                    self._written[route] = began
                    self._ready.append((route, tally))
                else:
                    self._pending[route] = tally
            tally.count += 1
            tally.last_at = now
            tally.errors[error] += 1
            if address is not None:
                tally.count_address(address)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="mantle-auth-audit",
                                                daemon=True)
                self._thread.start()
            self._wake.notify()

    def close(self, timeout: float = 5.0) -> None:
        """Write every pending count now and stop the thread (daemon shutdown)."""
        with self._lock:
            self._closed = True
            self._wake.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _run(self) -> None:
        """The writer thread: waits for refusals, writes the routes that are due."""
        while True:
            with self._lock:
                due, wait = self._take_due()
                if not due and not self._unsure and not self._closed:
                    self._wake.wait(wait)
                    continue
                closed = self._closed
            due, self._unsure = self._unsure + due, []
            if due and not self._write(due):
                if closed:
                    return
                time.sleep(1.0)  # an outage: keep the counts and try again
            elif closed and not self._pending and not self._ready:
                return

    def _take_due(self) -> tuple[list[tuple[str, _Tally]], float | None]:
        """(rows to write now, seconds until the next one is due); under the lock."""
        now = time.monotonic()
        due, wait = self._ready, None
        self._ready = []
        for route, tally in list(self._pending.items()):
            left = self._left(route, now)
            if left <= 0 or self._closed:
                due.append((route, self._pending.pop(route)))
                self._written[route] = now
            else:
                wait = left if wait is None else min(wait, left)
        return due, wait

    def _left(self, route: str, now: float) -> float:
        """Seconds until the route's interval is over (<= 0: over, or never begun)."""
        return self._written.get(route, -1e18) + self._interval - now

    def _put_back(self, due: list[tuple[str, _Tally]]) -> None:
        """After an outage: the counts go back to wait for the next row of their route."""
        back: dict[str, _Tally] = {}
        for route, tally in due:  # oldest first
            if route in back:
                back[route].absorb(tally)
            else:
                back[route] = tally
        with self._lock:
            for route, tally in back.items():
                newer = self._pending.get(route)
                if newer is not None:
                    tally.absorb(newer)
                self._pending[route] = tally

    def _write(self, due: list[tuple[str, _Tally]]) -> bool:
        """Write ``due`` in one transaction; False after an outage, the counts kept."""
        tried = [tally.written_at is not None for _, tally in due]
        committing, backend = False, None
        try:
            if self._backend is not None and not backend_ended(self._database, self._backend):
                return self._keep(due, tried)  # it was asked to end: its COMMIT may land yet
            self._backend = None
            with transaction(self._database):
                backend = backend_identity(self._database)
                for route, tally in due:
                    if tally.written_at is not None and _written(route, tally.written_at):
                        continue  # its COMMIT's answer was lost, but it committed
                    tally.written_at = tally.written_at or utcnow()
                    audit.record_audit("api", "auth.failed", "http_request", route,
                                       tally.metadata(), timestamp=tally.written_at)
                committing = True
            return True
        except OUTAGE_ERRORS:
            reset_connection(self._database)
            if not committing:
                return self._keep(due, tried)
            self._unsure, self._backend = due, backend
            return False
        except Exception:  # never let the writer die: the counts are only bookkeeping
            log.exception("auth.failed audit write failed")
            self._backend = None
            return True

    def _keep(self, due: list[tuple[str, _Tally]], tried: list[bool]) -> bool:
        """After a write of ``due`` that did not commit: the rows whose COMMIT was sent
        before (``tried``) stay as they are, the others go back to their routes' counts."""
        for (_, tally), unsure in zip(due, tried):
            tally.written_at = tally.written_at if unsure else None  # rolled back
        self._unsure = [row for row, unsure in zip(due, tried) if unsure]
        self._put_back([row for row, unsure in zip(due, tried) if not unsure])
        return False


def _written(route: str, timestamp) -> bool:
    """An ``auth.failed`` row of ``route`` stamped ``timestamp`` exists."""
    return AuditEvent.select().where(
        AuditEvent.timestamp == timestamp, AuditEvent.action == "auth.failed",
        AuditEvent.resource_id == route).exists()
