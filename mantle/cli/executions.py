"""``run``, ``cancel``, ``logs``, ``status`` and ``retry`` (SPEC 6.2).

``run`` and ``retry`` drive their execution in this process with an ``Engine`` and wait for it;
``remote`` does the same through a server and reuses ``_typed``, ``_Signals`` and ``_exit_for``.
"""

from __future__ import annotations

import math
import re
import signal
import sys
import threading
import time

from mantle import queries
from mantle.cli import remote
from mantle.cli.context import Context, is_utf8
from mantle.cli.output import print_json, wants_json
from mantle.cli.progress import LiveLines
from mantle.connectors.ai import usage_line
from mantle.durations import format_seconds, since_filter
from mantle.errors import (ExecutionNotFound, InvalidInput, MantleError, WorkflowNotFound)
from mantle.text import whole_number
from mantle.timefmt import rfc3339_seconds, table_time

__all__ = ["run", "cancel", "logs", "status", "retry", "parse_inputs", "drive",
           "print_followed"]

_STATUSES = ("pending", "running", "completed", "failed", "cancelled")
_FINAL = ("completed", "failed", "cancelled")
_STEP_ORDER = ("pending", "running", "completed", "failed", "skipped", "cancelled")
_INT = re.compile(r"-?[0-9]+")
_DOUBLE_DIGITS = len(str(int(sys.float_info.max)))  # 309
# Plain decimal notation only: float() would also take "nan", "inf", "1_000" and spaces.
_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
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
        if not is_utf8(text):  # bytes the terminal's encoding is not: nothing can store them
            raise InvalidInput(f'input "{key}" must be UTF-8 text')
        inputs[key] = _typed(key, text, spec.type)
    return inputs


def _typed(key: str, text: str, kind: str | None):
    if kind == "number":
        if _INT.fullmatch(text):
            # Beyond a double (1 and 400 zeros) no expression can hold it and the API refuses
            # it, as 1e400 is here; past 4300 digits int() itself refuses.
            if len(text.lstrip("-0")) <= _DOUBLE_DIGITS and abs(int(text)) <= sys.float_info.max:
                return int(text)
            raise InvalidInput(f'input "{key}" must be a number')
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

    as_json = wants_json(args)

    def start(engine) -> str:
        try:
            result = engine.run(args.workflow, inputs, actor="cli")
        except WorkflowNotFound:  # deleted between the check and the run
            raise NotApplied(args.workflow) from None
        if not as_json:
            print(f"Running {result.workflow} (version {result.version})...", flush=True)
        return result.execution_id

    return drive(context, start, None, as_json=as_json)


def drive(context: Context, start, lines, as_json: bool = False) -> int:
    """Run an execution in-process and report it (``run``, ``retry``).

    ``start(engine)`` creates the execution, prints the intro line and returns the id.
    ``lines(detail)`` gives the step lines printed after the ``Execution`` line (``retry``);
    with ``lines=None`` the step lines are printed live as the steps finish, and the
    ``Execution`` line last (``run``, 13.1.2). ``as_json`` prints only the final detail
    document (13.1.7). Signals are handled from before the engine starts until it is
    stopped, so an early Ctrl-C still cancels what gets created.
    """
    from actors.engine import Engine

    config = context.config
    live = None if lines is not None or as_json else LiveLines()
    with _Signals() as signals:
        engine = Engine(context.database(), plugins_dir=config.plugins_dir, env=config.env,
                        lease_ttl=config.lease_ttl_seconds,
                        max_depth=config.max_depth).start()
        try:
            execution_id = start(engine)
            show = (lambda: _print_live(live, execution_id)) if live else None
            interrupted = _wait(engine, execution_id, signals, show)
            detail = queries.execution_detail(execution_id, raw=True)
            if as_json:
                print_json(queries.execution_detail(execution_id))
            elif live is not None:
                _print_lines(live.new_lines(detail, last=True))
                print(f"Execution {execution_id}: {detail['status']}")
            else:
                print(f"Execution {execution_id}: {detail['status']}")
                _print_lines(lines(detail))
            return 130 if interrupted else _exit_for(detail)
        finally:
            engine.shutdown(timeout=5)


def _print_lines(lines: list[str]) -> None:
    for line in lines:
        print(line, flush=True)


def _print_live(live: LiveLines, execution_id: str) -> None:
    """The lines of steps that finished since the last look (skipped during an outage)."""
    from peewee import DatabaseError

    try:
        detail = queries.execution_detail(execution_id, raw=True)
    except DatabaseError:
        return
    _print_lines(live.new_lines(detail))


def _wait(engine, execution_id: str, signals: _Signals, on_tick=None) -> bool:
    """Wait for the end; the first signal cancels, a second stops waiting. True if signalled.

    ``on_tick()`` runs every 0.2 s or less while waiting (live step lines)."""
    import pykka

    poll = _settled_status(execution_id)
    cancelled = False
    while True:
        if on_tick is not None:
            on_tick()
        if signals.caught.is_set() and not cancelled:
            cancelled = True
            try:
                engine.cancel(execution_id, actor="cli")
            except (MantleError, pykka.Timeout):
                pass  # already final: the summary shows how it ended
        if signals.count > 1:
            return True
        status = engine.wait(execution_id, timeout=0.2, poll=poll)
        if status in _FINAL:
            return cancelled
        if status is not None:  # another node runs it now (lease lost): watch the database
            time.sleep(0.2)
            if poll() is not None:
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

    from mantle.services.channel import local_targets, send_cancels
    from mantle.services.nodes import host_key

    execution_id = args.execution_id
    found = None
    if queries.is_uuid(execution_id):
        with transaction(context.database()):
            found = store.cancel_execution(execution_id, "cli")
            owners = {owner for _, _, owner in (found.cancelled if found else ()) if owner}
            channels = store.node_channels(owners)
    if found is None:
        raise ExecutionNotFound(execution_id)
    send_cancels(local_targets(found.cancelled, channels, host_key()))
    previous = found.previous
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
    """``logs -f <id>`` on the database: poll the detail and print the lines ``mantle run``
    prints (``LiveLines``: main steps in completion order, never-started ones before the
    hooks, then hooks), and the final line once the execution ends."""
    config = context.config
    if args.server or config.server:
        return remote.follow(args, config)
    context.database()
    live = LiveLines()
    settled = _settled_status(args.execution_id)
    while True:
        detail = queries.execution_detail(args.execution_id, raw=True)
        final = detail["status"] in _FINAL and settled() is not None
        _print_lines(live.new_lines(detail, last=final))
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
        if wants_json(args):
            print_json(queries.execution_detail(args.execution_id))
            return 0
        detail = queries.execution_detail(args.execution_id, raw=True)
        for line in _header(detail, with_duration=True):
            print(line)
        print()
        print("Steps:")
        _print_steps(detail, "")
        if detail["hooks"]:
            print()
            print("Hooks:")
            children = _children_by_step(detail)
            for hook in detail["hooks"]:
                _print_step(hook, f"{hook['block']}/{hook['name']}")
                _print_children(children.get((hook["block"], hook["name"]), ()), "", 1)
        return 0
    status, since, limit = _list_filters(args)
    context.database()
    if wants_json(args):
        print_json({"executions": queries.list_executions(args.workflow, status, since, limit)})
        return 0
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
    try:
        since = since_filter(args.since)
    except ValueError:
        raise InvalidInput(f'invalid --since value "{args.since}": must be a positive '
                           "duration such as 90s, 30m, 1h30m or 7d") from None
    limit = 20
    if args.limit is not None:
        limit = whole_number(args.limit, 1, 1000, digits=7)  # as the API and audit read it
        if limit is None:
            raise InvalidInput("--limit must be between 1 and 1000")
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


def _print_steps(detail: dict, indent: str, depth: int = 1) -> None:
    """A detail's main steps, each followed by the sub-workflow executions it started
    (SPEC 13.3), indented four more with their own steps, down to the deepest."""
    children = _children_by_step(detail)
    for step in detail["steps"]:
        _print_step(step, step["name"], indent)
        _print_children(children.get((None, step["name"]), ()), indent, depth)


def _children_by_step(detail: dict) -> dict[tuple[str | None, str], list[dict]]:
    """A raw detail's children by the (hook block or None, step) that started them."""
    children: dict[tuple[str | None, str], list[dict]] = {}
    for child in detail.get("children", ()):
        children.setdefault((child["parent_block"], child["parent_step"]), []).append(child)
    return children


def _print_children(children, indent: str, depth: int) -> None:
    for child in children:
        print(f"{indent}    {child['workflow']} {child['id']}: {child['status']}")
        if depth < 100:  # a tree deeper than engine.max_workflow_depth allows: cut short
            _print_steps(queries.execution_detail(child["id"], raw=True), indent + "    ",
                         depth + 1)


def _print_step(step: dict, label: str, indent: str = "") -> None:
    print(f"{indent}  %-20s %s" % (label, step["status"] + _step_timing(step)))
    if step["status"] == "failed":
        print(f"{indent}    error: {step['error'] or ''}")
    if tokens := usage_line(step):  # AI steps (SPEC 13.6)
        print(indent + tokens)


def status(args, context: Context) -> int:
    context.database()
    if wants_json(args):
        print_json(queries.execution_detail(args.execution_id))
        return 0
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
