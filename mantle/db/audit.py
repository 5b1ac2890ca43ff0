"""Append-only audit records (SPEC 9.3)."""

from __future__ import annotations

import datetime as dt

from mantle.db.fields import utcnow
from mantle.db.models import AuditEvent

__all__ = ["record_audit"]


def record_audit(actor: str, action: str, resource_type: str, resource_id: str,
                 metadata: dict | None = None, timestamp: dt.datetime | None = None) -> None:
    """Insert one audit event on the bound database, stamped ``timestamp`` (default: now).

    Joins the caller's transaction when there is one (so the event commits or rolls back with
    the change it describes); otherwise it commits on its own.
    """
    AuditEvent.insert(timestamp=timestamp or utcnow(), actor=actor, action=action,
                      resource_type=resource_type, resource_id=str(resource_id),
                      metadata=metadata if metadata is not None else {}).execute()
