"""The engine's immutable view of a valid workflow (SPEC 2).

Instances come from ``load_workflow`` (validated YAML) or ``workflow_from_definition`` (stored
JSON); both build them the same way, so a stored definition yields an equal model. ``params``
and ``definition`` are plain dicts shared with the parsed document: treat them as read-only.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["Workflow", "InputSpec", "Step", "Trigger", "Hooks"]


@dataclasses.dataclass(frozen=True, slots=True)
class InputSpec:
    """One declared input; ``type`` None accepts any JSON value."""

    name: str
    type: str | None = None
    description: str | None = None
    default: Any = None
    has_default: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class Step:
    """A main step (``hook_block`` None) or a hook step (``hook_block`` names its block).

    ``condition`` is the ``if`` text as written (hyphenated references not yet rewritten).
    ``depends_on`` is the explicit list; ``dependencies`` adds the steps named in ``if`` and
    in ``params`` templates (SPEC 3.3). Hook steps have neither.
    """

    name: str
    action: str
    params: dict = dataclasses.field(default_factory=dict)
    condition: str | None = None
    depends_on: tuple[str, ...] = ()
    dependencies: frozenset[str] = frozenset()
    max_attempts: int = 1
    backoff: str = "fixed"
    timeout: str | None = None
    timeout_seconds: float | None = None
    continue_on_error: bool = False
    max_parallel: int = 0
    credential: str | None = None
    hook_block: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Trigger:
    """``type`` is ``cron`` (with ``schedule``) or ``webhook`` (with ``path``, maybe ``secret``
    and ``max_age``, the oldest signed timestamp accepted, as written)."""

    type: str
    schedule: str | None = None
    path: str | None = None
    secret: str | None = None
    max_age: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Hooks:
    """Hook blocks in declaration order; ``timeout`` bounds all of them together."""

    timeout: str | None = None
    timeout_seconds: float | None = None
    on_success: tuple[Step, ...] = ()
    on_failure: tuple[Step, ...] = ()
    on_finish: tuple[Step, ...] = ()

    def block(self, name: str) -> tuple[Step, ...]:
        """The steps of ``on_success``, ``on_failure`` or ``on_finish``."""
        return getattr(self, name)


@dataclasses.dataclass(frozen=True, slots=True)
class Workflow:
    """A valid workflow. ``timeout`` is the text as written (used in error messages, SPEC
    4.5); ``timeout_seconds`` its value. ``definition`` is the stored, diffed JSON form."""

    name: str
    description: str | None
    inputs: dict[str, InputSpec]
    steps: tuple[Step, ...]
    triggers: tuple[Trigger, ...]
    timeout: str | None
    timeout_seconds: float | None
    max_parallel_executions: int
    on_limit: str
    hooks: Hooks
    definition: dict

    def step(self, name: str) -> Step:
        """The main step called ``name``; KeyError when there is none."""
        for step in self.steps:
            if step.name == name:
                return step
        raise KeyError(name)
