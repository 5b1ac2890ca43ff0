"""``mantle audit`` (SPEC 6.3, 9.3): audit events, newest first."""

from __future__ import annotations

import datetime as dt

from mantle.cli.context import Context
from mantle.durations import since_filter
from mantle.errors import InvalidInput
from mantle.text import whole_number
from mantle.cli.output import print_json, wants_json
from mantle.timefmt import rfc3339, rfc3339_seconds

__all__ = ["audit", "DEFAULT_LIMIT"]

DEFAULT_LIMIT = 50


def _since(text: str | None) -> float | None:
    try:
        return since_filter(text)
    except ValueError:
        raise InvalidInput(f'invalid --since value "{text}": must be a positive duration such '
                           "as 90s, 30m, 1h30m or 7d") from None


def _limit(text: str | None) -> int:
    if text is None:
        return DEFAULT_LIMIT
    limit = whole_number(text, 1, 1000, digits=7)
    if limit is None:
        raise InvalidInput("--limit must be between 1 and 1000")
    return limit


def audit(args, context: Context) -> int:
    since, limit = _since(args.since), _limit(args.limit)
    context.database()
    from mantle.db.fields import utcnow
    from mantle.db.models import AuditEvent

    query = AuditEvent.select()
    if args.action is not None:
        query = query.where(AuditEvent.action == args.action)
    if args.actor is not None:
        query = query.where(AuditEvent.actor == args.actor)
    if args.resource is not None:
        # TYPE/ID; a bare TYPE filters by type only. IDs may contain "/" (route templates).
        kind, sep, ident = args.resource.partition("/")
        query = query.where(AuditEvent.resource_type == kind)
        if sep:
            query = query.where(AuditEvent.resource_id == ident)
    if since is not None:
        query = query.where(AuditEvent.timestamp >= utcnow() - dt.timedelta(seconds=since))
    rows = list(query.order_by(AuditEvent.timestamp.desc(), AuditEvent.id.desc()).limit(limit))
    if wants_json(args):
        print_json({"events": [_event(row) for row in rows]})
        return 0
    if not rows:
        print("(no audit events)")
        return 0
    for row in rows:
        print("%-20s  %-12s  %-22s  %s/%s" % (rfc3339_seconds(row.timestamp), row.actor,
                                               row.action, row.resource_type, row.resource_id))
    return 0


def _event(row) -> dict:
    """One event with the field names of SPEC 9.3."""
    return {"id": row.id, "timestamp": rfc3339(row.timestamp), "actor": row.actor,
            "action": row.action, "resource_type": row.resource_type,
            "resource_id": row.resource_id, "metadata": row.metadata}
