"""Validation of main steps and hook steps: rules 12, 13, 21-35 (SPEC 2.3, 2.4, 2.7, 3.3)."""

from __future__ import annotations

import re

from mantle.durations import parse_duration
from mantle.expressions import syntax_error
from mantle.workflow.fields import WRONG, FieldReader
from mantle.workflow.references import implicit_dependencies, param_templates
from mantle.workflow.report import Path

__all__ = ["StepChecker", "check_duration", "too_long", "NAME_PATTERN", "HOOK_BLOCKS",
           "BACKOFFS", "MAX_STORED_LENGTH"]

NAME_PATTERN = re.compile(r"[a-z][a-z0-9-]*")
# The columns that hold workflow and step names, webhook paths and cron schedules.
MAX_STORED_LENGTH = 255
HOOK_BLOCKS = ("on_success", "on_failure", "on_finish")
BACKOFFS = ("fixed", "exponential")


def too_long(text: str, what: str) -> str | None:
    """The error for text longer than its column (PostgreSQL refuses it; SQLite would not)."""
    if len(text) <= MAX_STORED_LENGTH:
        return None
    return f"{what} must be at most {MAX_STORED_LENGTH} characters"


def check_duration(reader: FieldReader, container: dict, key: str, path: Path,
                   label: str = "timeout") -> None:
    """Rules 12 and 13 for a timeout field (and a webhook's ``max_age``: ``label``)."""
    text = reader.string(container, key, path)
    if not isinstance(text, str):
        return
    try:
        seconds = parse_duration(text)
    except ValueError:
        reader.collector.add(12, path, f'invalid duration: "{text}"')
        return
    if seconds <= 0:
        reader.collector.add(13, path, f"{label} must be a positive duration")


class StepChecker:
    """Checks ``steps`` and ``hooks`` of one document through a FieldReader."""

    def __init__(self, reader: FieldReader):
        self.reader = reader
        self.add = reader.collector.add

    # Main steps ---------------------------------------------------------------------------

    def check_steps(self, steps: list[tuple[Path, dict]]) -> None:
        """Rules 21-31 for every step, then the dependency rules 28 and 29."""
        seen: set[str] = set()
        graph: dict[str, set[str]] = {}
        wanted: list[tuple[Path, list[str], set[str]]] = []
        for path, step in steps:
            name = self.reader.string(step, "name", path + ("name",))
            if name is WRONG:
                name = None
            elif not name:
                self.add(21, path + ("name",), "step name is required")
            else:
                self._step_name(name, path, seen)
            self._action(step, path, 24, "step action is required")
            self._common(step, path)
            explicit = self.reader.strings(step, "depends_on", path + ("depends_on",))
            implicit = implicit_dependencies(_text_or_none(step.get("if")),
                                             _params(step)) - set(explicit)
            wanted.append((path, explicit, implicit))
            if name:
                graph.setdefault(name, set()).update(explicit, implicit)
        for path, explicit, implicit in wanted:
            for missing in _unknown(explicit, implicit, graph):
                self.add(28, path + ("depends_on",), f'references undefined step "{missing}"')
        if _has_cycle(graph):
            self.add(29, ("steps",), "cycle detected in step dependencies")

    def _step_name(self, name: str, path: Path, seen: set[str]) -> None:
        if not NAME_PATTERN.fullmatch(name):
            self.add(22, path + ("name",), "step name must match ^[a-z][a-z0-9-]*$")
        elif error := too_long(name, "step name"):
            self.add(22, path + ("name",), error)
        if name in seen:
            self.add(23, path + ("name",), f'duplicate step name "{name}"')
        seen.add(name)

    # Hook steps ---------------------------------------------------------------------------

    def check_hooks(self, hooks: dict) -> None:
        """``hooks.timeout`` and rules 32-35 (plus the shared step rules) for every block."""
        check_duration(self.reader, hooks, "timeout", ("hooks", "timeout"))
        first_block: dict[str, str] = {}
        # Document order, so "also declared in" names the block that comes first in the file.
        for block in [key for key in hooks if key in HOOK_BLOCKS]:
            for path, step in self.reader.mapping_items(hooks, block, ("hooks", block)):
                self._hook_name(step, path, block, first_block)
                self._action(step, path, 34, "hook step action is required")
                if "depends_on" in step:
                    self.add(35, path + ("depends_on",), "hook steps do not support depends_on")
                self._common(step, path)

    def _hook_name(self, step: dict, path: Path, block: str, first_block: dict) -> None:
        name = self.reader.string(step, "name", path + ("name",))
        if name is WRONG:
            return
        if not name:
            self.add(32, path + ("name",), "hook step name is required")
            return
        if not NAME_PATTERN.fullmatch(name):
            self.add(32, path + ("name",), "hook step name must match ^[a-z][a-z0-9-]*$")
        elif error := too_long(name, "hook step name"):
            self.add(32, path + ("name",), error)
        if name in first_block:
            self.add(33, path + ("name",), f'duplicate hook step name "{name}" '
                                           f"(also declared in hooks.{first_block[name]})")
        else:
            first_block[name] = block

    # Shared by both -----------------------------------------------------------------------

    def _action(self, step: dict, path: Path, rule: int, message: str) -> None:
        action = self.reader.string(step, "action", path + ("action",))
        if action is not WRONG and not action:
            self.add(rule, path + ("action",), message)

    def _common(self, step: dict, path: Path) -> None:
        """Fields steps and hook steps share: rules 4, 12, 13, 25, 26, 27, 30, 31."""
        read = self.reader
        params = read.mapping(step, "params", path + ("params",))
        if isinstance(params, dict):
            for where, expr in param_templates(params):
                problem = syntax_error(expr)
                if problem is not None:
                    self.add(31, path + ("params",) + where,
                             f'invalid CEL expression "{expr}": {problem}')
        condition = read.string(step, "if", path + ("if",))
        if isinstance(condition, str):
            problem = syntax_error(condition)
            if problem is not None:
                self.add(30, path + ("if",), f"invalid CEL expression: {problem}")
        self._retry(step, path)
        check_duration(read, step, "timeout", path + ("timeout",))
        read.boolean(step, "continue_on_error", path + ("continue_on_error",))
        limit = read.integer(step, "max_parallel", path + ("max_parallel",))
        if isinstance(limit, int) and limit < 0:
            self.add(27, path + ("max_parallel",), f"max_parallel must be >= 0, got {limit}")
        read.string(step, "credential", path + ("credential",))

    def _retry(self, step: dict, path: Path) -> None:
        retry = self.reader.mapping(step, "retry", path + ("retry",))
        if not isinstance(retry, dict):
            return
        where = path + ("retry",)
        attempts = self.reader.integer(retry, "max_attempts", where + ("max_attempts",))
        if attempts is None or (attempts is not WRONG and attempts <= 0):
            self.add(25, where + ("max_attempts",), "max_attempts must be greater than 0")
        backoff = self.reader.string(retry, "backoff", where + ("backoff",))
        if isinstance(backoff, str) and backoff not in BACKOFFS:
            self.add(26, where + ("backoff",),
                     f'backoff must be one of: fixed, exponential (got "{backoff}")')


def _text_or_none(value) -> str | None:
    return value if isinstance(value, str) else None


def _params(step: dict):
    params = step.get("params")
    return params if isinstance(params, dict) else {}


def _unknown(explicit: list[str], implicit: set[str], known: dict) -> list[str]:
    """Unknown names: explicit ones in written order, then implicit ones alphabetically."""
    missing = [name for name in dict.fromkeys(explicit) if name not in known]
    return missing + sorted(name for name in implicit if name not in known)


def _has_cycle(graph: dict[str, set[str]]) -> bool:
    """Kahn's algorithm over the known names; a self-dependency is a cycle."""
    edges = {name: {dep for dep in deps if dep in graph} for name, deps in graph.items()}
    waiting = {name: len(deps) for name, deps in edges.items()}
    dependents: dict[str, list[str]] = {name: [] for name in edges}
    for name, deps in edges.items():
        for dep in deps:
            dependents[dep].append(name)
    ready = [name for name, count in waiting.items() if count == 0]
    done = 0
    while ready:
        name = ready.pop()
        done += 1
        for dependent in dependents[name]:
            waiting[dependent] -= 1
            if waiting[dependent] == 0:
                ready.append(dependent)
    return done < len(edges)
