"""Execution and step statuses and the one table of allowed transitions (STYLE habit 4)."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["ExecutionStatus", "StepStatus", "EXECUTION_TRANSITIONS", "STEP_TRANSITIONS",
           "IllegalTransition", "check_transition"]


class ExecutionStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in (ExecutionStatus.COMPLETED, ExecutionStatus.FAILED,
                        ExecutionStatus.CANCELLED)


class StepStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self not in (StepStatus.PENDING, StepStatus.RUNNING)


_E = ExecutionStatus
_S = StepStatus
EXECUTION_TRANSITIONS: dict[ExecutionStatus, frozenset[ExecutionStatus]] = {
    _E.PENDING: frozenset({_E.RUNNING, _E.CANCELLED}),
    _E.RUNNING: frozenset({_E.COMPLETED, _E.FAILED, _E.CANCELLED}),
    _E.COMPLETED: frozenset(),
    _E.FAILED: frozenset(),
    _E.CANCELLED: frozenset(),
}
STEP_TRANSITIONS: dict[StepStatus, frozenset[StepStatus]] = {
    _S.PENDING: frozenset({_S.RUNNING, _S.SKIPPED, _S.CANCELLED, _S.FAILED}),
    # running -> running: a retry starts the next attempt.
    _S.RUNNING: frozenset({_S.RUNNING, _S.COMPLETED, _S.FAILED, _S.CANCELLED}),
    _S.COMPLETED: frozenset(),
    _S.FAILED: frozenset(),
    _S.SKIPPED: frozenset(),
    _S.CANCELLED: frozenset(),
}


class IllegalTransition(RuntimeError):
    """A status change the state machine does not allow; always a bug, never user input."""


def check_transition(table: dict, old: StrEnum, new: StrEnum) -> None:
    """Raise IllegalTransition unless ``old -> new`` is in ``table``."""
    if new not in table[old]:
        raise IllegalTransition(f"{type(old).__name__}: {old} -> {new} is not allowed")
