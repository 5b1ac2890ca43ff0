"""``run``, ``cancel``, ``logs``, ``status`` and ``retry`` (SPEC 6.2)."""

from __future__ import annotations

import re
import signal
import sys
import threading

from mantle import queries
from mantle.cli import remote
from mantle.cli.context import Context
from mantle.durations import format_seconds, parse_since
from mantle.errors import (ExecutionNotFound, InvalidInput, MantleError, WorkflowNotFound)
from mantle.timefmt import rfc3339_seconds, table_time

__all__ = ["run", "cancel", "logs", "status", "retry", "parse_inputs"]

_STATUSES = ("pending", "running", "completed", "failed", "cancelled")
_STEP_ORDER = ("pending", "running", "completed", "failed", "skipped", "cancelled")
_INT = re.compile(r"-?[0-9]+")


class NotApplied(MantleError):
    def __init__(self, name: str):
        super().__init__(f'workflow "{name}" not found — have you run \'mantle apply\'?')


def parse_inputs(pairs: list[str], declared: dict) -> dict:
    """``KEY=VALUE`` arguments typed by the declaration (6.2)."""
    inputs = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise InvalidInput(f'invalid input format "{pair}" — expected key=value')
        spec = declared.get(key)
        if spec is None:
            raise InvalidInput(f'unknown input "{key}"')
        inputs[key] = _typed(key, text, spec.type)
    return inputs


def _typed(key: str, text: str, kind: str | None):
    if kind == "number":
        try:
            return int(text) if _INT.fullmatch(text) else float(text)
        except ValueError:
            raise InvalidInput(f'input "{key}" must be a number') from None
    if kind == "boolean":
        if text.lower() in ("true", "false"):
            return text.lower() == "true"
        raise InvalidInput(f'input "{key}" must be a boolean')
    return text


class _Signals:
    """SIGINT/SIGTERM while waiting: remember it, so the main loop cancels and exits 130."""

    def __init__(self):
        self.caught = threading.Event()
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, lambda *_: self.caught.set())
        return self

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def run(args, context: Context) -> int:
    config = context.config
    if args.server or config.server:
        return remote.run(args, config)
    context.database()
    from actors.engine import Engine
    from mantle.db import models

    pointer = models.Workflow.get_or_none(models.Workflow.name == args.workflow)
    if pointer is None:
        raise NotApplied(args.workflow)
    model = queries.workflow_version_model(args.workflow, pointer.current_version)
    inputs = parse_inputs(args.input, model.inputs)
    engine = Engine(context.database(), plugins_dir=config.plugins_dir, env=config.env).start()
    try:
        result = engine.run(args.workflow, inputs, actor="cli")
        print(f"Running {result.workflow} (version {result.version})...", flush=True)
        return _wait_and_report(engine, result.execution_id)
    except WorkflowNotFound:
        raise NotApplied(args.workflow) from None
    finally:
        engine.shutdown(timeout=5)


def _poll_status(execution_id: str):
    """A cheap status read, so a cancel or finish seen only in the database ends the wait."""
    from mantle.db.models import WorkflowExecution

    def poll():
        status = (WorkflowExecution.select(WorkflowExecution.status)
                  .where(WorkflowExecution.id == execution_id).scalar())
        return status if status in ("completed", "failed", "cancelled") else None
    return poll


def _wait_and_report(engine, execution_id: str, header=None) -> int:
    interrupted = False
    with _Signals() as signals:
        poll = _poll_status(execution_id)
        while engine.wait(execution_id, timeout=0.2, poll=poll) is None:
            if signals.caught.is_set() and not interrupted:
                interrupted = True
                try:
                    engine.cancel(execution_id, actor="cli")
                except MantleError:
                    pass
    detail = queries.execution_detail(execution_id, raw=True)
    print(f"Execution {execution_id}: {detail['status']}")
    for line in (header(detail) if header else
                 [f"  {s['name']}: {s['status']}" for s in detail["steps"]]):
        print(line)
    if interrupted:
        return 130
    return _exit_for(detail)


def _exit_for(detail: dict) -> int:
    if detail["status"] == "failed":
        print(f"Error: {detail['error']}", file=sys.stderr)
        return 1
    if detail["status"] == "cancelled":
        print(f"Error: execution {detail['id']} was cancelled", file=sys.stderr)
        return 1
    return 0


def cancel(args, context: Context) -> int:
    config = context.config
    if args.server or config.server:
        return remote.cancel(args, config)
    context.database()
    from mantle import store
    from mantle.db import transaction

    execution_id = args.execution_id
    found = None
    if queries.is_uuid(execution_id):
        with transaction(context.database()):
            found = store.cancel_execution(execution_id, "cli")
    if found is None:
        raise ExecutionNotFound(execution_id)
    previous, _ = found
    if previous in ("pending", "running"):
        print(f"Cancelled execution {execution_id}")
    else:
        print(f"Execution {execution_id} is already {previous}")
    return 0


def logs(args, context: Context) -> int:
    if args.execution_id:
        context.database()
        detail = queries.execution_detail(args.execution_id, raw=True)
        for line in _header(detail, with_duration=True):
            print(line)
        print()
        print("Steps:")
        for step in detail["steps"]:
            _print_step(step, step["name"])
        if detail["hooks"]:
            print()
            print("Hooks:")
            for hook in detail["hooks"]:
                _print_step(hook, f"{hook['block']}/{hook['name']}")
        return 0
    status, since, limit = _list_filters(args)
    context.database()
    rows = queries.list_executions(args.workflow, status, since, limit, raw=True)
    if not rows:
        print("No executions found. Run a workflow with: mantle run <workflow>")
        return 0
    print("%-38s %-20s %7s %-10s %-20s %-20s" % ("ID", "WORKFLOW", "VERSION", "STATUS",
                                                "STARTED", "COMPLETED"))
    print("-" * 120)
    for row in rows:
        print("%-38s %-20s %7d %-10s %-20s %-20s" % (
            row["id"], row["workflow"], row["version"], row["status"],
            table_time(row["started_at"]), table_time(row["completed_at"])))
    print()
    print(f"{len(rows)} execution(s) shown.")
    return 0


def _list_filters(args) -> tuple[str | None, float | None, int]:
    if args.status is not None and args.status not in _STATUSES:
        raise InvalidInput(f'invalid status "{args.status}": must be one of '
                           "pending, running, completed, failed, cancelled")
    since = None
    if args.since is not None:
        try:
            since = parse_since(args.since)
        except ValueError:
            raise InvalidInput(f'invalid --since value "{args.since}": must be a positive '
                               "duration such as 90s, 30m, 1h30m or 7d") from None
    limit = 20
    if args.limit is not None:
        if not re.fullmatch(r"[0-9]+", args.limit) or not 1 <= int(args.limit) <= 1000:
            raise InvalidInput("--limit must be between 1 and 1000")
        limit = int(args.limit)
    return args.status, since, limit


def _header(detail: dict, with_duration: bool) -> list[str]:
    lines = [f"Execution: {detail['id']}",
             f"Workflow:  {detail['workflow']} (version {detail['version']})",
             f"Status:    {detail['status']}",
             f"Started:   {rfc3339_seconds(detail['started_at'])}"]
    if detail["completed_at"] is not None:
        lines.append(f"Completed: {rfc3339_seconds(detail['completed_at'])}")
        if with_duration:
            seconds = (detail["completed_at"] - detail["started_at"]).total_seconds()
            lines.append(f"Duration:  {seconds:.3f}s")
    return lines


def _step_timing(step: dict) -> str:
    parts = []
    if step["started_at"] is not None and step["completed_at"] is not None:
        parts.append(format_seconds(
            (step["completed_at"] - step["started_at"]).total_seconds()))
    if step["attempt"] > 1:
        parts.append(f"{step['attempt']} attempts")
    return f" ({', '.join(parts)})" if parts else ""


def _print_step(step: dict, label: str) -> None:
    print("  %-20s %s" % (label, step["status"] + _step_timing(step)))
    if step["status"] == "failed" and step["error"]:
        print(f"    error: {step['error']}")


def status(args, context: Context) -> int:
    context.database()
    detail = queries.execution_detail(args.execution_id, raw=True)
    for line in _header(detail, with_duration=False):
        print(line)
    print()
    print("Steps:")
    counts = {name: 0 for name in _STEP_ORDER}
    for step in detail["steps"]:
        counts[step["status"]] = counts.get(step["status"], 0) + 1
    for name in _STEP_ORDER:
        if counts[name]:
            print(f"  {name}: {counts[name]}")
    return 0


def retry(args, context: Context) -> int:
    from mantle.cli.retry import retry_execution

    return retry_execution(args, context, _wait_and_report)
