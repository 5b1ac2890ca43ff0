"""The ``mantle`` command line (SPEC 6): parse, load config, dispatch, map errors to exit 1."""

from __future__ import annotations

import sys
from collections.abc import Callable

from mantle.cli.context import Context
from mantle.cli.parser import UsageError, build_parser
from mantle.db.connect import database_failure
from mantle.errors import MantleError, ValidationFailed

__all__ = ["main"]


def _commands() -> dict[str, Callable]:
    from mantle.cli import (admin, audit, cleanup, definitions, executions, keys, plugins,
                            secrets, serve)

    return {
        "validate": definitions.validate,
        "plan": definitions.plan,
        "apply": definitions.apply,
        "rollback": definitions.rollback,
        "init": admin.init,
        "migrate": admin.migrate,
        "version": admin.version,
        "run": executions.run,
        "cancel": executions.cancel,
        "logs": executions.logs,
        "status": executions.status,
        "retry": executions.retry,
        "serve": serve.serve,
        "keys": keys.keys,
        "audit": audit.audit,
        "plugins": plugins.plugins,
        "secrets": secrets.secrets,
        "cleanup": cleanup.cleanup,
    }


# Options whose value may start with "-" (a bad --since such as -5m must reach the command,
# which explains what it wants, instead of argparse reading it as an unknown option).
_VALUE_OPTIONS = frozenset({"--since", "--limit", "--to-version", "--execution-days",
                            "--audit-days", "--expires"})


def _attach_dash_values(argv: list[str]) -> list[str]:
    out: list[str] = []
    pending = False
    for arg in argv:
        if pending and arg.startswith("-"):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
        pending = arg in _VALUE_OPTIONS
    return out


def main(argv: list[str] | None = None) -> int:
    """Run one command; return the process exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(_attach_dash_values(sys.argv[1:] if argv is None else argv))
    except UsageError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    except SystemExit as exc:  # --help
        return 0 if exc.code in (0, None) else 1
    context = Context(args)
    try:
        with database_failure():
            return _commands()[args.command](args, context)
    except ValidationFailed:
        print("Error: validation failed", file=sys.stderr)
        return 1
    except MantleError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C outside a run's wait (``logs -f``): no traceback
        return 130
    finally:
        context.close()
