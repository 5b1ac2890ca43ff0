"""A valid definition (plain JSON-able data) to the model, without re-validating it."""

from __future__ import annotations

from typing import Any

from mantle.durations import parse_duration
from mantle.workflow.fields import scalar_text
from mantle.workflow.model import Hooks, InputSpec, Step, Trigger, Workflow
from mantle.workflow.references import implicit_dependencies
from mantle.workflow.steps import HOOK_BLOCKS

__all__ = ["workflow_from_definition"]


def workflow_from_definition(definition: dict) -> Workflow:
    """Rebuild the model of an already validated definition (e.g. one read from the DB).

    Nothing is checked: a definition that never passed validation may raise anything.
    """
    timeout = _text(definition.get("timeout"))
    inputs = definition.get("inputs") or {}
    return Workflow(
        name=_text(definition["name"]),
        description=_text(definition.get("description")),
        inputs={name: _input(name, spec or {}) for name, spec in inputs.items()},
        steps=tuple(_step(step, None) for step in definition["steps"]),
        triggers=tuple(_trigger(trigger) for trigger in definition.get("triggers") or ()),
        timeout=timeout,
        timeout_seconds=_seconds(timeout),
        max_parallel_executions=definition.get("max_parallel_executions") or 0,
        on_limit=_text(definition.get("on_limit")) or "queue",
        hooks=_hooks(definition.get("hooks") or {}),
        definition=definition,
    )


def _text(value: Any) -> str | None:
    # Validation already stored string fields as text; this covers hand-made definitions.
    if value is None or isinstance(value, str):
        return value
    return scalar_text(value)


def _seconds(timeout: str | None) -> float | None:
    return None if timeout is None else parse_duration(timeout)


def _input(name: str, spec: dict) -> InputSpec:
    return InputSpec(name=name, type=_text(spec.get("type")),
                     description=_text(spec.get("description")),
                     default=spec.get("default"), has_default="default" in spec)


def _step(step: dict, hook_block: str | None) -> Step:
    condition = _text(step.get("if"))
    params = step.get("params") or {}
    retry = step.get("retry") or {}
    timeout = _text(step.get("timeout"))
    if hook_block is None:
        depends_on = tuple(_text(name) for name in step.get("depends_on") or ())
        dependencies = frozenset(depends_on) | implicit_dependencies(condition, params)
    else:
        depends_on, dependencies = (), frozenset()
    return Step(
        name=_text(step["name"]),
        action=_text(step["action"]),
        params=params,
        condition=condition,
        depends_on=depends_on,
        dependencies=frozenset(dependencies),
        max_attempts=retry.get("max_attempts") or 1,
        backoff=_text(retry.get("backoff")) or "fixed",
        timeout=timeout,
        timeout_seconds=_seconds(timeout),
        continue_on_error=bool(step.get("continue_on_error")),
        max_parallel=step.get("max_parallel") or 0,
        credential=_text(step.get("credential")),
        hook_block=hook_block,
    )


def _trigger(trigger: dict) -> Trigger:
    return Trigger(type=_text(trigger["type"]), schedule=_text(trigger.get("schedule")),
                   path=_text(trigger.get("path")), secret=_text(trigger.get("secret")),
                   max_age=_text(trigger.get("max_age")))


def _hooks(hooks: dict) -> Hooks:
    timeout = _text(hooks.get("timeout"))
    blocks = {block: tuple(_step(step, block) for step in hooks.get(block) or ())
              for block in HOOK_BLOCKS}
    return Hooks(timeout=timeout, timeout_seconds=_seconds(timeout), **blocks)
