"""Retrying a failed execution from a step, reusing what is upstream (SPEC 6.2, 13.8).

One set of rules for ``mantle retry`` (in-process, or ``--server``) and
``POST /api/v1/retry/{execution}``: ``plan_retry`` checks the original and works out the retry
point, the step results to copy and the inputs; the caller hands the plan to the engine
(``Engine.run(..., retry_of=, from_step=, reuse=)``), which creates the new execution with the
original's version, inputs and trigger and copies the reused rows into it.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from mantle import queries
from mantle.db.models import StepExecution, WorkflowExecution
from mantle.errors import MantleError
from mantle.workflow import Workflow

__all__ = ["RetryPlan", "plan_retry", "retry_point", "reusable_steps", "supplied_inputs",
           "NotFailed", "StillRunning", "UnknownStep"]


class NotFailed(MantleError):
    def __init__(self, execution_id: str, status: str):
        super().__init__(f"execution {execution_id} is not in a failed state "
                         f"(status: {status}).")
        self.execution_id = execution_id
        self.status = status


class StillRunning(NotFailed):
    """Not failed because it has not ended yet (the API's 409 words it so, SPEC 13.8)."""

    def __init__(self, execution_id: str, status: str):
        super().__init__(execution_id, status)
        self.message = f"execution {execution_id} is still {status}"


class UnknownStep(MantleError):
    def __init__(self, step: str, workflow: str):
        super().__init__(f'step "{step}" not found in workflow "{workflow}"')


@dataclasses.dataclass(frozen=True, slots=True)
class RetryPlan:
    """What the engine needs to create the retry: ``reuse`` holds the rows to copy."""

    original_id: str
    workflow: str
    version: int
    from_step: str
    inputs: dict
    trigger: Any
    reuse: tuple[dict, ...]

    @property
    def reused(self) -> list[str]:
        return [row["step"] for row in self.reuse]


def plan_retry(execution_id: str, from_step: str | None) -> RetryPlan:
    """Check the original and plan its retry. Raises ExecutionNotFound, StillRunning
    (pending/running), NotFailed (completed/cancelled) or UnknownStep."""
    original = queries.execution_detail(execution_id, raw=True)
    if original["status"] in ("pending", "running"):
        raise StillRunning(original["id"], original["status"])
    if original["status"] != "failed":
        raise NotFailed(original["id"], original["status"])
    model = queries.workflow_version_model(original["workflow"], original["version"])
    steps = {step["name"]: step for step in original["steps"]}
    point = retry_point(model, steps, from_step)
    trigger = (WorkflowExecution.select(WorkflowExecution.trigger)
               .where(WorkflowExecution.id == original["id"]).scalar())
    return RetryPlan(original["id"], original["workflow"], original["version"], point,
                     supplied_inputs(model, original["inputs"]), trigger,
                     tuple(reusable_steps(model, original["id"], point)))


def retry_point(model: Workflow, steps: dict[str, dict], from_step: str | None) -> str:
    """``from_step``, else the first step in definition order that failed without
    ``continue_on_error`` (else the first step: a failure no step explains, e.g. an internal
    error, is retried from the start)."""
    if from_step is not None:
        if from_step not in {spec.name for spec in model.steps}:
            raise UnknownStep(from_step, model.name)
        return from_step
    for spec in model.steps:
        if steps.get(spec.name, {}).get("status") == "failed" and not spec.continue_on_error:
            return spec.name
    return model.steps[0].name


def _dependents(model: Workflow, start: str) -> set[str]:
    """``start`` and every step that depends on it, transitively."""
    affected = {start}
    changed = True
    while changed:
        changed = False
        for spec in model.steps:
            if spec.name not in affected and spec.dependencies & affected:
                affected.add(spec.name)
                changed = True
    return affected


def reusable_steps(model: Workflow, execution_id: str, start: str) -> list[dict]:
    """Rows to copy: latest attempts of the steps outside ``start`` and its dependents that
    ended completed or skipped (a ``continue_on_error`` failure is run again)."""
    affected = _dependents(model, start)
    latest: dict[str, StepExecution] = {}
    for row in (StepExecution.select()
                .where(StepExecution.execution_id == execution_id, ~StepExecution.is_hook)
                .order_by(StepExecution.attempt)):
        latest[row.step_name] = row
    return [{"step": row.step_name, "attempt": row.attempt, "status": row.status,
             "output": row.output, "error": row.error, "started_at": row.started_at,
             "completed_at": row.completed_at, "is_hook": False, "hook_block": None}
            for name, row in latest.items()
            if name not in affected and row.status in ("completed", "skipped")]


def _same(a, b) -> bool:
    # JSON text, not ==: True == 1 and 1 == 1.0 in Python, but not as input values.
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def supplied_inputs(model: Workflow, effective: dict) -> dict:
    """The original's effective inputs minus the values its defaults give back.

    Creating the retry re-applies the defaults, so the effective inputs come out the same; and
    a default that does not match its declared type (validation does not check defaults) is
    not refused as if it had been supplied.
    """
    supplied = {}
    for name, value in effective.items():
        spec = model.inputs.get(name)
        if spec is not None and spec.has_default and _same(value, spec.default):
            continue
        supplied[name] = value
    return supplied
