"""The argument parser: global options are accepted before or after the command name."""

from __future__ import annotations

import argparse
import sys

from mantle.cli.output import output_option

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


def _client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", default=None, metavar="URL",
                        help="send the command to a running mantle serve (or MANTLE_SERVER)")
    parser.add_argument("--api-key", default=None, metavar="KEY",
                        help="API key for --server (or MANTLE_API_KEY)")


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

    run = add("run", "run a workflow and wait for it")
    run.add_argument("workflow")
    run.add_argument("--input", action="append", default=[], metavar="KEY=VALUE")
    _client_options(run)
    output_option(run)
    cancel = add("cancel", "cancel an execution")
    cancel.add_argument("execution_id")
    _client_options(cancel)
    logs = add("logs", "list executions, or show one")
    logs.add_argument("execution_id", nargs="?")
    logs.add_argument("-f", "--follow", action="store_true",
                      help="print step lines as they finish until the execution ends")
    logs.add_argument("--workflow", default=None)
    logs.add_argument("--status", default=None)
    logs.add_argument("--since", default=None)
    logs.add_argument("--limit", default=None)
    output_option(logs)
    _client_options(logs)  # used by --follow: the server's event stream
    status = add("status", "summarise an execution")
    status.add_argument("execution_id")
    output_option(status)
    retry = add("retry", "re-run a failed execution")
    retry.add_argument("execution_id")
    retry.add_argument("--from-step", default=None, metavar="NAME")
    _client_options(retry)

    _daemon_commands(add, common)
    _maintenance_commands(add, common)
    return parser


def _plugins_dir(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS, as for the global options: a sub-command's default must not overwrite a value
    # given before its name (``mantle plugins --plugins-dir D list``).
    parser.add_argument("--plugins-dir", default=argparse.SUPPRESS, metavar="DIR",
                        help="plugin directory (default: .mantle/plugins)")


def _actions(parser: argparse.ArgumentParser, dest: str, common):
    """A function adding sub-commands to ``parser`` (``keys create``); they accept the global
    options too."""
    actions = parser.add_subparsers(dest=dest, metavar="ACTION", parser_class=_Parser)
    actions.required = True
    return lambda name, text: actions.add_parser(name, help=text, description=text,
                                                 parents=[common])


def _daemon_commands(add, common) -> None:
    """``serve``, ``keys``, ``audit`` and ``plugins`` (SPEC 6.3)."""
    from mantle.cli.serve import threads_argument

    serve = add("serve", "run the daemon: REST API, webhooks, cron, metrics, probes")
    serve.add_argument("--api-address", default=None, metavar="HOST:PORT",
                       help="listen address (default :8080; port 0 picks a free port)")
    serve.add_argument("--shutdown-timeout", default=None, metavar="DURATION",
                       help="how long running steps may finish after SIGTERM (default 30s)")
    serve.add_argument("--threads", default=None, type=threads_argument, metavar="N",
                       help="HTTP worker threads per process (default 8)")
    serve.add_argument("--workers", default=None, metavar="N",
                       help="worker processes sharing the listening socket (default 1)")
    _plugins_dir(serve)

    keys = _actions(add("keys", "manage API keys"), "keys_command", common)
    create = keys("create", "create an API key and print it once")
    create.add_argument("name")
    create.add_argument("--role", default="admin", metavar="ROLE",
                        help="admin (default), operator or viewer")
    create.add_argument("--expires", default=None, metavar="DURATION",
                        help="refuse the key after this long, e.g. 12h or 30d")
    output_option(keys("list", "list API keys"))
    keys("revoke", "revoke an API key").add_argument("name")

    audit = add("audit", "list audit events, newest first")
    audit.add_argument("--action", default=None)
    audit.add_argument("--actor", default=None)
    audit.add_argument("--resource", default=None, metavar="TYPE/ID")
    audit.add_argument("--since", default=None)
    audit.add_argument("--limit", default=None)
    output_option(audit)

    plugins_parser = add("plugins", "manage plugin executables")
    _plugins_dir(plugins_parser)
    plugins = _actions(plugins_parser, "plugins_command", common)
    plugins_list = plugins("list", "list installed plugins")
    _plugins_dir(plugins_list)
    output_option(plugins_list)
    install = plugins("install", "copy an executable into the plugin directory")
    install.add_argument("path")
    _plugins_dir(install)
    remove = plugins("remove", "delete an installed plugin")
    remove.add_argument("name")
    _plugins_dir(remove)


def _maintenance_commands(add, common) -> None:
    """``secrets`` (SPEC 13.2) and ``cleanup`` (13.4)."""
    secrets = _actions(add("secrets", "manage encrypted credentials"), "secrets_command", common)
    create = secrets("create", "encrypt and store a credential")
    create.add_argument("--name", required=True)
    create.add_argument("--type", required=True,
                        help="generic, bearer, openai, basic or postgres")
    create.add_argument("--field", action="append", default=[], metavar="KEY=VALUE",
                        help="a field of the credential (repeat for each)")
    output_option(secrets("list", "list credentials (never their values)"))
    secrets("delete", "delete a credential").add_argument("--name", required=True)
    rotate = secrets("rotate-key", "re-encrypt every credential with a new key")
    rotate.add_argument("--new-key", default=None, metavar="HEX",
                        help="the new key, 64 hex characters (default: a random one, printed)")

    cleanup = add("cleanup", "delete old executions and audit events")
    cleanup.add_argument("--execution-days", default=None, metavar="N",
                         help="delete final executions completed more than N days ago")
    cleanup.add_argument("--audit-days", default=None, metavar="M",
                         help="delete audit events older than M days")
    cleanup.add_argument("--dry-run", action="store_true",
                         help="count what would be deleted, delete nothing")
