"""``run``, ``cancel``, ``logs``, ``status`` and ``retry`` (SPEC 6.2).

``run`` and ``retry`` drive their execution in this process with an ``Engine`` and wait for it;
``remote`` does the same through a server and reuses ``_typed``, ``_Signals`` and ``_exit_for``.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import signal
import sys
import threading
import time

from mantle import queries
from mantle.cli import remote
from mantle.cli.context import Context
from mantle.durations import format_seconds, parse_since
from mantle.errors import (ExecutionNotFound, InvalidInput, MantleError, WorkflowNotFound)
from mantle.timefmt import rfc3339_seconds, table_time

__all__ = ["run", "cancel", "logs", "status", "retry", "parse_inputs", "drive",
           "print_followed"]

_STATUSES = ("pending", "running", "completed", "failed", "cancelled")
_FINAL = ("completed", "failed", "cancelled")
_STEP_ORDER = ("pending", "running", "completed", "failed", "skipped", "cancelled")
_STEP_FINAL = ("completed", "failed", "skipped", "cancelled")
_INT = re.compile(r"-?[0-9]+")
# Plain decimal notation only: float() would also take "nan", "inf", "1_000" and spaces.
_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
# A --since reaching back beyond year 1 cannot be computed; it filters nothing anyway.
_SINCE_FOREVER = 3e10
# After the database shows a final status, how long the engine may take to settle the rows of
# interrupted steps before the summary is printed from whatever is stored.
_SETTLE_GRACE = 5.0


class NotApplied(MantleError):
    def __init__(self, name: str):
        super().__init__(f'workflow "{name}" not found — have you run \'mantle apply\'?')


def parse_inputs(pairs: list[str], declared: dict) -> dict:
    """``KEY=VALUE`` arguments typed by the declaration (6.2); the first bad one raises."""
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
        if _INT.fullmatch(text):
            return int(text)
        value = float(text) if _FLOAT.fullmatch(text) else math.nan
        if not math.isfinite(value):  # JSON has no NaN or infinity
            raise InvalidInput(f'input "{key}" must be a number')
        return value
    if kind == "boolean":
        if text.lower() in ("true", "false"):
            return text.lower() == "true"
        raise InvalidInput(f'input "{key}" must be a boolean')
    return text


class _Signals:
    """SIGINT/SIGTERM while waiting: remember them, so the main loop cancels and exits 130.

    ``count`` is how many arrived; the handlers only record, as signals run on the main thread
    between bytecodes and must not touch the engine or the database.
    """

    def __init__(self):
        self.caught = threading.Event()
        self.count = 0
        self._old = {}

    def _handle(self, *_args) -> None:
        self.count += 1
        self.caught.set()

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def run(args, context: Context) -> int:
    config = context.config
    if args.server or config.server:
        return remote.run(args, config)
    context.database()
    from mantle.db import models

    pointer = models.Workflow.get_or_none(models.Workflow.name == args.workflow)
    if pointer is None:
        raise NotApplied(args.workflow)
    model = queries.workflow_version_model(args.workflow, pointer.current_version)
    inputs = parse_inputs(args.input, model.inputs)

    def start(engine) -> str:
        try:
            result = engine.run(args.workflow, inputs, actor="cli")
        except WorkflowNotFound:  # deleted between the check and the run
            raise NotApplied(args.workflow) from None
        print(f"Running {result.workflow} (version {result.version})...", flush=True)
        return result.execution_id

    return drive(context, start, _run_lines)


def drive(context: Context, start, lines) -> int:
    """Run an execution in-process and report it (``run``, ``retry``).

    ``start(engine)`` creates the execution, prints the intro line and returns the id;
    ``lines(detail)`` gives the step lines of the summary. Signals are handled from before the
    engine starts until it is stopped, so an early Ctrl-C still cancels what gets created.
    """
    from actors.engine import Engine

    config = context.config
    with _Signals() as signals:
        engine = Engine(context.database(), plugins_dir=config.plugins_dir,
                        env=config.env).start()
        try:
            execution_id = start(engine)
            interrupted = _wait(engine, execution_id, signals)
            detail = queries.execution_detail(execution_id, raw=True)
            print(f"Execution {execution_id}: {detail['status']}")
            for line in lines(detail):
                print(line)
            return 130 if interrupted else _exit_for(detail)
        finally:
            engine.shutdown(timeout=5)


def _wait(engine, execution_id: str, signals: _Signals) -> bool:
    """Wait for the end; the first signal cancels, a second stops waiting. True if signalled."""
    import pykka

    poll = _settled_status(execution_id)
    cancelled = False
    while True:
        if signals.caught.is_set() and not cancelled:
            cancelled = True
            try:
                engine.cancel(execution_id, actor="cli")
            except (MantleError, pykka.Timeout):
                pass  # already final: the summary shows how it ended
        if signals.count > 1:
            return True
        if engine.wait(execution_id, timeout=0.2, poll=poll) is not None:
            return cancelled


def _settled_status(execution_id: str):
    """A poll for ``Engine.wait``: the final status once the database shows it and no step row
    is still pending or running (or the grace has passed).

    The engine reports ends it drives itself; the database also shows a queued execution
    cancelled by another process, which this engine never started. A cancel is committed before
    the steps are interrupted, so returning on the status alone would stop the engine while
    their rows still say ``running``.
    """
    from peewee import DatabaseError

    from mantle.db.models import StepExecution, WorkflowExecution
    seen_final = None

    def poll():
        nonlocal seen_final
        try:
            status = (WorkflowExecution.select(WorkflowExecution.status)
                      .where(WorkflowExecution.id == execution_id).scalar())
            if status not in _FINAL:
                return None
            seen_final = seen_final or time.monotonic()
            busy = (StepExecution.select().where(
                StepExecution.execution_id == execution_id,
                StepExecution.status.in_(("pending", "running"))).exists())
        except DatabaseError:  # an outage: the engine keeps going, so keep waiting
            return None
        if busy and time.monotonic() - seen_final < _SETTLE_GRACE:
            return None
        return status
    return poll


def _run_lines(detail: dict) -> list[str]:
    return [f"  {step['name']}: {step['status']}" for step in detail["steps"]]


def _exit_for(detail: dict) -> int:
    if detail["status"] == "failed":
        print(f"Error: {detail['error']}", file=sys.stderr)
        return 1
    if detail["status"] == "cancelled":
        print(f"Error: execution {detail['id']} was cancelled", file=sys.stderr)
        return 1
    if detail["status"] != "completed":  # the engine lost it (internal error)
        print(f"Error: execution {detail['id']} did not finish (status: {detail['status']})",
              file=sys.stderr)
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


def print_followed(step: dict, printed: set[str]) -> None:
    """A followed step's line, once: ``  <name>: <status>``, or ``  <name> (hook): <status>``
    for a hook step (``block`` set), as ``mantle run`` prints them (SPEC 13.1.2)."""
    hook = step.get("block") is not None
    key = ("hook:" if hook else "step:") + step["step"]
    if key in printed:
        return
    printed.add(key)
    label = f"{step['step']} (hook)" if hook else step["step"]
    print(f"  {label}: {step['status']}", flush=True)


def _follow(args, context: Context) -> int:
    """``logs -f <id>`` on the database: poll the detail, print steps as they finish (main
    steps in completion order, then hooks), and the final line once the execution ends."""
    config = context.config
    if args.server or config.server:
        return remote.follow(args, config)
    context.database()
    printed: set[str] = set()
    settled = _settled_status(args.execution_id)
    while True:
        detail = queries.execution_detail(args.execution_id, raw=True)
        final = detail["status"] in _FINAL and settled() is not None
        done = [step for step in detail["steps"] if step["status"] in _STEP_FINAL
                and (final or step["completed_at"] is not None)]
        done.sort(key=lambda step: step["completed_at"] or dt.datetime.max)
        hooks = [hook for hook in detail["hooks"] if hook["status"] in _STEP_FINAL]
        for step in done + hooks:
            print_followed({"step": step["name"], "status": step["status"],
                            "block": step.get("block")}, printed)
        if final:
            print(f"Execution {detail['id']}: {detail['status']}")
            return _exit_for(detail)
        time.sleep(0.2)


def logs(args, context: Context) -> int:
    if args.follow:
        if not args.execution_id:
            raise InvalidInput("--follow needs an execution id")
        return _follow(args, context)
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
        if since >= _SINCE_FOREVER:
            since = None
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
    """`` (1.2s)``, `` (15ms, 3 attempts)``; nothing until the (latest) attempt has finished,
    as the attempt count lives inside the duration's parentheses (6.2)."""
    if step["started_at"] is None or step["completed_at"] is None:
        return ""
    text = format_seconds((step["completed_at"] - step["started_at"]).total_seconds())
    if step["attempt"] > 1:
        text += f", {step['attempt']} attempts"
    return f" ({text})"


def _print_step(step: dict, label: str) -> None:
    print("  %-20s %s" % (label, step["status"] + _step_timing(step)))
    if step["status"] == "failed":
        print(f"    error: {step['error'] or ''}")


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

    return retry_execution(args, context)
