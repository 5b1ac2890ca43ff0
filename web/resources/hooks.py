"""``POST /hooks/{path}``: webhook triggers (SPEC 8, 7.5, 3.1; issue 15).

Triggers are read from the database on every request, so ``apply`` and ``rollback`` take
effect at once. The owning workflow's current version runs with input defaults only.

Signed webhooks may carry a timestamp (replay protection, docs/workflows.md): with
``X-Webhook-Timestamp: <unix seconds>`` the signature covers ``<timestamp>.<body>`` and the
request is refused once the timestamp is more than the trigger's ``max_age`` (default 5m) away
from the server's clock; a trigger that sets ``max_age`` requires the timestamp.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time

from mantle import queries
from mantle.db.fields import storable
from mantle.db.models import WorkflowTrigger
from mantle.durations import parse_duration
from web.errors import ApiError
from web.parsing import NotJson, parse_json, read_body
from web.resources.runs import accept_run, idempotency_key
from web.settings import DROPPED_HEADERS

__all__ = ["WebhookResource", "payload_of", "signature_valid", "check_signature",
           "SIGNATURE_HEADERS", "TIMESTAMP_HEADER", "DEFAULT_MAX_AGE"]

SIGNATURE_HEADERS = ("X-Hub-Signature-256", "X-Signature-256")
TIMESTAMP_HEADER = "X-Webhook-Timestamp"
DEFAULT_MAX_AGE = "5m"
BAD_SIGNATURE = "invalid or missing webhook signature"
_TIMESTAMP = re.compile(r"[0-9]{1,12}")


def payload_of(raw: bytes):
    """Parsed JSON; the raw text when the body is not JSON; None when it is empty."""
    if not raw:
        return None
    try:
        return parse_json(raw)
    except NotJson:
        return raw.decode("utf-8", errors="replace")


def signature_valid(secret: str, raw: bytes, headers: list[str | None]) -> bool:
    """True when one of the signature headers is ``sha256=<hex HMAC-SHA256 of raw>``."""
    expected = hmac.new(secret.encode("utf-8"), raw, hashlib.sha256).hexdigest()
    valid = False
    for value in headers:
        if value is None:
            continue
        scheme, _, digest = value.strip().partition("=")
        if scheme.lower() == "sha256" and hmac.compare_digest(
                digest.strip().lower().encode("ascii", "replace"), expected.encode()):
            valid = True
    return valid


def _max_age(trigger: WorkflowTrigger) -> str | None:
    """The ``max_age`` the trigger's version declares for its path (as written), if any."""
    model = queries.workflow_version_model(trigger.workflow_name, trigger.version)
    for declared in model.triggers:
        if declared.type == "webhook" and declared.path == trigger.path:
            return declared.max_age
    return None


def check_signature(req, trigger: WorkflowTrigger, raw: bytes, now: float) -> None:
    """403 unless the request is signed with the trigger's secret (and, with a timestamp,
    recent enough); see the module docstring."""
    signatures = [req.get_header(name) for name in SIGNATURE_HEADERS]
    stamp = req.get_header(TIMESTAMP_HEADER)
    declared = _max_age(trigger)
    if stamp is None:
        if declared is not None:
            raise ApiError(403, f"missing {TIMESTAMP_HEADER} header (the webhook sets max_age)")
        if not signature_valid(trigger.secret, raw, signatures):
            raise ApiError(403, BAD_SIGNATURE)
        return
    stamp = stamp.strip()
    if not _TIMESTAMP.fullmatch(stamp):
        raise ApiError(403, f"invalid {TIMESTAMP_HEADER} header: must be Unix time in seconds")
    if not signature_valid(trigger.secret, stamp.encode() + b"." + raw, signatures):
        raise ApiError(403, BAD_SIGNATURE)
    max_age = declared or DEFAULT_MAX_AGE
    if abs(now - int(stamp)) > parse_duration(max_age):
        raise ApiError(403, f"webhook timestamp is not within {max_age} of the server's time")


class WebhookResource:
    """``dropped``: lower-case names of request headers never stored in ``trigger.headers``
    (credentials: ``web.settings.DROPPED_HEADERS`` plus ``webhooks.drop_headers``)."""

    def __init__(self, engine, dropped: frozenset[str] = frozenset(DROPPED_HEADERS)):
        self._engine = engine
        self._dropped = dropped

    def on_post(self, req, resp, path: str) -> None:
        trigger = WorkflowTrigger.get_or_none(WorkflowTrigger.type == "webhook",
                                              WorkflowTrigger.path == req.path
                                              ) if storable(req.path) else None
        if trigger is None:
            raise ApiError(404, "no webhook registered for path")
        key = idempotency_key(req)
        raw = read_body(req)
        if trigger.secret:
            check_signature(req, trigger, raw, time.time())
        headers = {name.lower(): value for name, value in req.headers.items()
                   if name.lower() not in self._dropped}
        accept_run(self._engine, resp, trigger.workflow_name, None, None,
                   {"type": "webhook", "path": req.path, "payload": payload_of(raw),
                    "headers": headers}, "webhook", key)
