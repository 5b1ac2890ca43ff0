"""The argument parser: global options are accepted before or after the command name."""

from __future__ import annotations

import argparse
import sys

__all__ = ["build_parser", "UsageError"]


class UsageError(Exception):
    """Bad command line; the message is printed after the usage text."""


class _Parser(argparse.ArgumentParser):
    # argparse exits 2 on usage errors; SPEC 6 wants 1 and an ``Error:`` line.
    def error(self, message: str):  # type: ignore[override]
        self.print_usage(sys.stderr)
        raise UsageError(message)


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE",
                        help="config file (default: mantle.yaml in the working directory)")
    common.add_argument("--database-url", default=argparse.SUPPRESS, metavar="URL",
                        help="database URL (default: sqlite:///mantle.db)")
    common.add_argument("--log-level", default=argparse.SUPPRESS, metavar="LEVEL",
                        help="debug, info, warn or error")
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = _Parser(prog="mantle", description="mantle workflow orchestrator",
                     parents=[common])
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help_text, description=help_text,
                                   parents=[common])

    for name, text in (("validate", "check a workflow file offline"),
                       ("plan", "show what apply would change"),
                       ("apply", "store a new version of a workflow")):
        add(name, text).add_argument("file")
    rollback = add("rollback", "make an earlier version current")
    rollback.add_argument("workflow")
    rollback.add_argument("--to-version", default=None, metavar="N")

    add("init", "create or upgrade the database schema")
    migrate = add("migrate", "apply pending migrations")
    migrate.add_argument("action", nargs="?", choices=("status", "down"),
                         help="status: list migrations; down: revert the newest")
    add("version", "print the version")

    return parser
