"""``mantle keys create|list|revoke`` (SPEC 6.3, 13.8)."""

from __future__ import annotations

from mantle import apikeys
from mantle.cli.context import Context
from mantle.cli.output import print_json, wants_json
from mantle.db.fields import utcnow
from mantle.timefmt import rfc3339, table_time

__all__ = ["keys"]

# SPEC 6.3's columns with ROLE after PREFIX and EXPIRES after CREATED (13.8); STATUS is
# ``active``, ``expired`` or ``revoked``.
_ROW = "%-20s %-10s %-8s %-20s %-20s %-20s %s"


def keys(args, context: Context) -> int:
    context.database()
    return {"create": _create, "list": _list, "revoke": _revoke}[args.keys_command](args)


def _create(args) -> int:
    expires_in = None if args.expires is None else apikeys.parse_expiry(args.expires)
    key = apikeys.create_key(args.name, actor="cli", role=args.role, expires_in=expires_in)
    print(f"API Key: {key}")
    print()
    print("Save this key — it cannot be retrieved again.")
    print(f"Key prefix for reference: {key[:9]}")
    return 0


def _status(row, now) -> str:
    if row.revoked_at:
        return "revoked"
    if row.expires_at is not None and now >= row.expires_at:
        return "expired"
    return "active"


def _list(args) -> int:
    rows = apikeys.list_keys()
    if wants_json(args):
        print_json({"keys": [{"name": row.name, "role": row.role,
                              "created_at": rfc3339(row.created_at),
                              "expires_at": rfc3339(row.expires_at),
                              "revoked": row.revoked_at is not None} for row in rows]})
        return 0
    if not rows:
        print("(no API keys)")
        return 0
    now = utcnow()
    print(_ROW % ("NAME", "PREFIX", "ROLE", "CREATED", "EXPIRES", "LAST USED", "STATUS"))
    for row in rows:
        last_used = table_time(row.last_used_at) if row.last_used_at else "never"
        expires = table_time(row.expires_at) if row.expires_at else "never"
        print(_ROW % (row.name, row.prefix, row.role, table_time(row.created_at), expires,
                      last_used, _status(row, now)))
    return 0


def _revoke(args) -> int:
    remaining = apikeys.revoke_key(args.name, actor="cli")
    print(f'Revoked key "{args.name}"')
    if remaining == 0:
        print("No active keys remain — the API no longer requires authentication.")
    return 0
