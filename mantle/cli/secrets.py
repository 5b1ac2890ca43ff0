"""``mantle secrets create|list|delete|rotate-key`` (SPEC 13.2): the encrypted credential store.

Values only ever travel from the command line into ``mantle.credentials``, which encrypts them;
nothing here prints or logs one.
"""

from __future__ import annotations

import logging
import re

from mantle import credentials
from mantle.cli.context import Context, is_utf8
from mantle.cli.output import print_json, wants_json
from mantle.errors import InvalidInput
from mantle.timefmt import rfc3339, table_time

__all__ = ["secrets"]

log = logging.getLogger("mantle.cli")


def secrets(args, context: Context) -> int:
    handler = {"create": _create, "list": _list, "delete": _delete,
               "rotate-key": _rotate}[args.secrets_command]
    return handler(args, context)


def _field_pairs(pairs: list[str]) -> dict[str, str]:
    fields: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            # Not echoed: a mistyped pair ("token:abc") may well be the secret itself.
            raise InvalidInput("invalid --field argument: expected key=value")
        if not is_utf8(value):  # kept, it would be another secret than the one given
            raise InvalidInput(f'field "{key}" must be UTF-8 text')
        fields[key] = value  # a repeated field: the last one counts
    return fields


def _create(args, context: Context) -> int:
    config = context.config  # first: it sets up logging for the warnings below
    credentials.check_name(args.name)
    fields, ignored = credentials.typed_fields(args.type, _field_pairs(args.field))
    for field in ignored:
        log.warning("unknown credential field ignored",
                    extra={"field": field, "type": args.type})
    key = credentials.parse_key(config.encryption_key)
    context.database()
    credentials.create(args.name, args.type, fields, key, actor="cli")
    print(f'Created credential "{args.name}" (type: {args.type})')
    return 0


def _list(args, context: Context) -> int:
    context.database()
    rows = credentials.list_credentials()
    if wants_json(args):
        print_json({"credentials": [{"name": row.name, "type": row.type,
                                     "created_at": rfc3339(row.created_at)} for row in rows]})
        return 0
    if not rows:
        print("(no credentials)")
        return 0
    table = [("NAME", "TYPE", "CREATED")]
    table += [(row.name, row.type, table_time(row.created_at)) for row in rows]
    widths = [max(len(line[column]) for line in table) + 2 for column in range(2)]
    for name, kind, created in table:
        print(f"{name:<{widths[0]}}{kind:<{widths[1]}}{created}")
    return 0


def _delete(args, context: Context) -> int:
    context.database()
    credentials.delete(args.name, actor="cli")
    print(f'Deleted credential "{args.name}"')
    return 0


def _rotate(args, context: Context) -> int:
    old = credentials.parse_key(context.config.encryption_key)
    generated = args.new_key is None
    new_text = credentials.new_key() if generated else args.new_key.strip()
    if not re.fullmatch(r"[0-9A-Fa-f]{64}", new_text):
        raise InvalidInput("invalid encryption key: must be 64 hex characters")
    new = credentials.parse_key(new_text)
    context.database()
    count = credentials.rotate(old, new, actor="cli")
    print(f"Re-encrypted {count} credential(s).")
    if generated:
        print(f"New key: {new_text}")
    print("Update MANTLE_ENCRYPTION_KEY to the new key and restart.")
    return 0
