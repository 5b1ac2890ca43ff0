"""``POST /hooks/{path}``: webhook triggers (SPEC 8, 7.5, 3.1).

Triggers are read from the database on every request, so ``apply`` and ``rollback`` take
effect at once. The owning workflow's current version runs with input defaults only.
"""

from __future__ import annotations

import hashlib
import hmac

from mantle.db.fields import storable
from mantle.db.models import WorkflowTrigger
from web.errors import ApiError
from web.parsing import NotJson, parse_json, read_body
from web.resources.runs import accept_run, idempotency_key

__all__ = ["WebhookResource", "payload_of", "signature_valid", "SIGNATURE_HEADERS"]

SIGNATURE_HEADERS = ("X-Hub-Signature-256", "X-Signature-256")
# Never copied into ``trigger.headers``: it carries the API key, which is stored nowhere.
_PRIVATE_HEADERS = {"authorization"}


def payload_of(raw: bytes):
    """Parsed JSON; the raw text when the body is not JSON; None when it is empty."""
    if not raw:
        return None
    try:
        return parse_json(raw)
    except NotJson:
        return raw.decode("utf-8", errors="replace")


def signature_valid(secret: str, raw: bytes, headers: list[str | None]) -> bool:
    """True when one of the signature headers is ``sha256=<hex HMAC-SHA256 of the body>``."""
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


class WebhookResource:
    def __init__(self, engine):
        self._engine = engine

    def on_post(self, req, resp, path: str) -> None:
        trigger = WorkflowTrigger.get_or_none(WorkflowTrigger.type == "webhook",
                                              WorkflowTrigger.path == req.path
                                              ) if storable(req.path) else None
        if trigger is None:
            raise ApiError(404, "no webhook registered for path")
        key = idempotency_key(req)
        raw = read_body(req)
        if trigger.secret and not signature_valid(
                trigger.secret, raw, [req.get_header(name) for name in SIGNATURE_HEADERS]):
            raise ApiError(403, "invalid or missing webhook signature")
        headers = {name.lower(): value for name, value in req.headers.items()
                   if name.lower() not in _PRIVATE_HEADERS}
        accept_run(self._engine, resp, trigger.workflow_name, None, None,
                   {"type": "webhook", "path": req.path, "payload": payload_of(raw),
                    "headers": headers}, "webhook", key)
