"""``init``, ``migrate`` and ``version`` (SPEC 6.3)."""

from __future__ import annotations

import logging

from mantle import __version__
from mantle.cli.context import Context
from mantle.db import migrations

__all__ = ["init", "migrate", "version", "version_line"]

log = logging.getLogger(__name__)


def init(args, context: Context) -> int:
    database = context.database(require_head=False)
    print("Running migrations...")
    migrations.migrate(database)
    print("Migrations complete.")
    return 0


def migrate(args, context: Context) -> int:
    if args.action is None:
        return init(args, context)
    database = context.database(require_head=False)
    if args.action == "status":
        print("%-31s %s" % ("Applied At", "Migration"))
        print("=" * 60)
        for name, applied_at in migrations.status(database):
            when = applied_at.strftime("%Y-%m-%d %H:%M:%S +0000") if applied_at else "pending"
            print("%-31s %s" % (when, name))
        return 0
    reverted = migrations.migrate_down(database)
    print(f"Reverted {reverted}" if reverted else "No migrations to revert")
    return 0


def version_line() -> str:
    """``mantle v<version> (<commit>, built <date>)``; stamps come from mantle/_build.py."""
    try:
        from mantle import _build  # written by packaging scripts; absent in a checkout
        commit = getattr(_build, "COMMIT", "") or "unknown"
        built = getattr(_build, "BUILD_DATE", "") or "unknown"
    except ImportError:
        commit = built = "unknown"
    return f"mantle v{__version__} ({commit}, built {built})"


def version(args, context: Context) -> int:
    print(version_line())
    return 0
