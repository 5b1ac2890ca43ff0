"""``mantle cleanup`` (SPEC 13.4): delete what the retention no longer keeps, or count it."""

from __future__ import annotations

from mantle import retention
from mantle.cli.context import Context

__all__ = ["cleanup"]


def cleanup(args, context: Context) -> int:
    kept = retention.retention_from(context.config, args.execution_days, args.audit_days)
    context.database()
    if not kept.configured:
        if not args.dry_run:
            retention.prune_nodes()  # bookkeeping of dead processes, not user data
        print("Nothing to clean up: no retention configured.")
        return 0
    result = retention.count(kept) if args.dry_run else retention.sweep(kept)
    verb = "Would delete" if args.dry_run else "Deleted"
    if kept.execution_days is not None:
        print(f"{verb} {result.executions} workflow execution(s) older than "
              f"{kept.execution_days} day(s).")
    if kept.audit_days is not None:
        print(f"{verb} {result.audit} audit event(s) older than {kept.audit_days} day(s).")
    return 0
