"""The SPEC 2.7 rules for a loaded document: top level, inputs and triggers here, steps and
hooks in ``steps.py``.

``validate_document`` reports every error at once, sorted by line, column and rule number.
"""

from __future__ import annotations

import re

from croniter import croniter

from mantle.workflow.fields import WRONG, FieldReader
from mantle.workflow.loader import LoadedDocument
from mantle.workflow.report import Collector
from mantle.workflow.steps import NAME_PATTERN, StepChecker, check_duration, too_long

__all__ = ["validate_document", "valid_cron", "INPUT_NAME_PATTERN", "INPUT_TYPES",
           "WEBHOOK_PATH_PATTERN", "ON_LIMIT_VALUES"]

INPUT_NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]*")
INPUT_TYPES = ("string", "number", "boolean")
WEBHOOK_PATH_PATTERN = re.compile(r"/hooks/[A-Za-z0-9._~/-]+")
ON_LIMIT_VALUES = ("queue", "reject")
TRIGGER_TYPES = ("cron", "webhook")
_CRON_FIELD = re.compile(r"[0-9*,/-]+")


def valid_cron(schedule: str) -> bool:
    """A 5-field expression of numbers, ``*``, lists, ranges and steps (SPEC 2.5, 8).

    Names (``mon``, ``jan``), macros (``@daily``), a seconds or year field and croniter's
    extensions (``L``, ``#``, ``H``) are refused: the contract promises only the plain form.
    """
    fields = schedule.split()
    if len(fields) != 5 or not all(_CRON_FIELD.fullmatch(field) for field in fields):
        return False
    try:
        return bool(croniter.is_valid(schedule))
    except Exception:  # croniter raises assorted errors for odd input; any is "invalid"
        return False


def validate_document(document: LoadedDocument) -> dict:
    """Check every rule; return the definition (string fields as text) or raise
    ValidationFailed with all errors, sorted."""
    collector = Collector(document.positions, document.duplicates)
    data = document.data
    if not isinstance(data, dict):
        collector.add(2, (), "workflow must be a mapping")
        collector.raise_if_any()
    reader = FieldReader(collector, document.texts)
    _top_level(reader, data)
    _inputs(reader, data)
    if data.get("steps") in (None, []):  # a wrong kind is mapping_items' rule-4 error
        collector.add(7, ("steps",), "at least one step is required")
    checker = StepChecker(reader)
    checker.check_steps(reader.mapping_items(data, "steps", ("steps",)))
    _triggers(reader, data)
    hooks = reader.mapping(data, "hooks", ("hooks",))
    if isinstance(hooks, dict):
        checker.check_hooks(hooks)
    collector.raise_if_any()
    return data


def _top_level(reader: FieldReader, data: dict) -> None:
    add = reader.collector.add
    name = reader.string(data, "name", ("name",))
    if name is not WRONG:
        if not name:
            add(5, ("name",), "name is required")
        elif not NAME_PATTERN.fullmatch(name):
            add(6, ("name",), "name must match ^[a-z][a-z0-9-]*$")
        elif error := too_long(name, "name"):
            add(6, ("name",), error)
    reader.string(data, "description", ("description",))
    check_duration(reader, data, "timeout", ("timeout",))
    limit = reader.integer(data, "max_parallel_executions", ("max_parallel_executions",))
    if isinstance(limit, int) and limit < 0:
        add(10, ("max_parallel_executions",), f"max_parallel_executions must be >= 0, got {limit}")
    on_limit = reader.string(data, "on_limit", ("on_limit",))
    if isinstance(on_limit, str) and on_limit not in ON_LIMIT_VALUES:
        add(11, ("on_limit",), f'on_limit must be one of: queue, reject (got "{on_limit}")')


def _inputs(reader: FieldReader, data: dict) -> None:
    inputs = reader.mapping(data, "inputs", ("inputs",))
    if not isinstance(inputs, dict):
        return
    for name in inputs:
        path = ("inputs", name)
        if not INPUT_NAME_PATTERN.fullmatch(name):
            reader.collector.add(8, path, "input name must match ^[a-z][a-z0-9_]*$")
        spec = reader.mapping(inputs, name, path)
        if not isinstance(spec, dict):
            continue
        kind = reader.string(spec, "type", path + ("type",))
        if isinstance(kind, str) and kind not in INPUT_TYPES:
            reader.collector.add(9, path + ("type",), "type must be one of: string, number, "
                                                      f'boolean (got "{kind}")')
        reader.string(spec, "description", path + ("description",))


def _triggers(reader: FieldReader, data: dict) -> None:
    add = reader.collector.add
    webhook_paths: set[str] = set()
    for path, trigger in reader.mapping_items(data, "triggers", ("triggers",)):
        kind = reader.string(trigger, "type", path + ("type",))
        schedule = reader.string(trigger, "schedule", path + ("schedule",))
        hook_path = reader.string(trigger, "path", path + ("path",))
        secret = reader.string(trigger, "secret", path + ("secret",))
        if isinstance(secret, str) and "\x00" in secret:  # no PostgreSQL text column holds it
            add(4, path + ("secret",), "secret must not contain a NUL character")
        # Replay protection of signed webhooks (docs/workflows.md): checked like a timeout.
        check_duration(reader, trigger, "max_age", path + ("max_age",), label="max_age")
        if kind is WRONG:
            continue
        if not kind:
            add(14, path + ("type",), "trigger type is required")
        elif kind not in TRIGGER_TYPES:
            add(15, path + ("type",), f'trigger type must be one of: cron, webhook (got "{kind}")')
        elif kind == "cron" and schedule is not WRONG:
            if not schedule:
                add(16, path + ("schedule",), "schedule is required for cron triggers")
            elif error := too_long(schedule, "cron schedule"):
                add(17, path + ("schedule",), error)
            elif not valid_cron(schedule):
                add(17, path + ("schedule",), f'invalid cron schedule "{schedule}"')
        elif kind == "webhook" and hook_path is not WRONG:
            if not hook_path:
                add(18, path + ("path",), "path is required for webhook triggers")
                continue
            if not WEBHOOK_PATH_PATTERN.fullmatch(hook_path):
                add(19, path + ("path",), "webhook path must match ^/hooks/[A-Za-z0-9._~/-]+$")
            elif error := too_long(hook_path, "webhook path"):
                add(19, path + ("path",), error)
            if hook_path in webhook_paths:
                add(20, path + ("path",), f'duplicate webhook path "{hook_path}"')
            webhook_paths.add(hook_path)
