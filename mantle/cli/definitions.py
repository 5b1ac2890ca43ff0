"""``validate``, ``plan``, ``apply`` and ``rollback`` (SPEC 6.1)."""

from __future__ import annotations

import os
import re
import sys

from mantle import definitions
from mantle.cli.context import Context, read_workflow_file
from mantle.db.fields import MAX_INTEGER
from mantle.errors import InvalidInput, ValidationFailed
from mantle.workflow import Workflow, load_workflow

__all__ = ["validate", "plan", "apply", "rollback"]


def _load(path: str) -> tuple[bytes, Workflow]:
    """Read and validate; on failure print the 2.7 lines and re-raise ValidationFailed."""
    raw = read_workflow_file(path)
    try:
        return raw, load_workflow(raw)
    except ValidationFailed as failed:
        name = os.path.basename(path)
        for error in failed.errors:
            print(error.format(name), file=sys.stderr)
        raise


def validate(args, context: Context) -> int:
    context.config  # noqa: B018 - loads config and logging, reports a bad config file
    _load(args.file)
    print(f"{os.path.basename(args.file)}: valid")
    return 0


def plan(args, context: Context) -> int:
    context.config  # noqa: B018
    raw, workflow = _load(args.file)
    context.database()
    result = definitions.plan_definition(raw, workflow)
    if result.current is None:
        print(f"+ {result.name} (new)")
        print()
        print("Plan: 1 workflow to create")
        return 0
    if result.unchanged:
        print(f"No changes — {result.name} is at version {result.current}")
        return 0
    arrow = f"version {result.current} → {result.new_version}"
    print(f"~ {result.name} ({arrow})")
    if result.changes:
        for change in result.changes:
            print(change.render())
    else:
        print("  (no definition changes; only formatting or comments differ)")
    print()
    print(f"Plan: 1 workflow to update ({arrow})")
    return 0


def apply(args, context: Context) -> int:
    context.config  # noqa: B018
    raw, workflow = _load(args.file)
    context.database()
    for step in definitions.self_calls(workflow):
        print(f'Warning: step "{step}" runs workflow "{workflow.name}" itself; each level '
              f"nests one deeper until engine.max_workflow_depth "
              f"({context.config.max_depth}) fails it", file=sys.stderr)
    result = definitions.apply_definition(raw, workflow)
    if result.created:
        print(f"Applied {result.name} version {result.version}")
    else:
        print(f"No changes — {result.name} is already at version {result.version}")
    return 0


def rollback(args, context: Context) -> int:
    target: int | str | None = None
    if args.to_version is not None:
        digits = args.to_version.strip().lstrip("0")
        # ASCII digits only (str.isdigit() takes "²", which int() refuses); a number longer
        # than any version can be goes on as its text, which int() may refuse to read.
        if not re.fullmatch(r"[0-9]+", digits):
            raise InvalidInput(f'invalid --to-version value "{args.to_version}"')
        target = int(digits) if len(digits) <= len(str(MAX_INTEGER)) else digits
    context.database()
    old, new = definitions.rollback(args.workflow, target)
    print(f"Rolled back {args.workflow} from version {old} to version {new}")
    return 0
