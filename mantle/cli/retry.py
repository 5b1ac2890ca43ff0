"""``mantle retry``: re-run a failed execution from a step, reusing what is upstream (6.2).

The new execution has the original's version, inputs and trigger; the steps outside the retry
point and its dependents that ended ``completed`` or ``skipped`` are copied into it (output and
times) by the engine when it creates the execution, so they are not run again.
"""

from __future__ import annotations

import json

from mantle import queries
from mantle.cli.context import Context
from mantle.durations import format_seconds
from mantle.errors import MantleError
from mantle.workflow import Workflow

__all__ = ["retry_execution", "retry_point", "reusable_steps", "supplied_inputs",
           "NotFailed", "UnknownStep"]


class NotFailed(MantleError):
    def __init__(self, execution_id: str, status: str):
        super().__init__(f"execution {execution_id} is not in a failed state "
                         f"(status: {status}).")


class UnknownStep(MantleError):
    def __init__(self, step: str, workflow: str):
        super().__init__(f'step "{step}" not found in workflow "{workflow}"')


def retry_point(model: Workflow, steps: dict[str, dict], from_step: str | None) -> str:
    """``--from-step``, else the first step in definition order that failed without
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
    from mantle.db.models import StepExecution

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


def _lines(reused: set[str]):
    def lines(detail: dict) -> list[str]:
        out = []
        for step in detail["steps"]:
            if step["name"] in reused:
                out.append(f"  {step['name']}: reused (cached)")
                continue
            timing = ""
            if step["started_at"] is not None and step["completed_at"] is not None:
                seconds = (step["completed_at"] - step["started_at"]).total_seconds()
                timing = f" ({format_seconds(seconds)})"
            out.append(f"  {step['name']}: {step['status']}{timing}")
        return out
    return lines


def retry_execution(args, context: Context) -> int:
    from mantle.cli.executions import drive
    from mantle.db.models import WorkflowExecution

    context.database()
    original = queries.execution_detail(args.execution_id, raw=True)
    if original["status"] != "failed":
        raise NotFailed(original["id"], original["status"])
    model = queries.workflow_version_model(original["workflow"], original["version"])
    steps = {step["name"]: step for step in original["steps"]}
    point = retry_point(model, steps, args.from_step)
    reuse = reusable_steps(model, original["id"], point)
    trigger = (WorkflowExecution.select(WorkflowExecution.trigger)
               .where(WorkflowExecution.id == original["id"]).scalar())
    inputs = supplied_inputs(model, original["inputs"])

    def start(engine) -> str:
        result = engine.run(original["workflow"], inputs, version=original["version"],
                            trigger=trigger, actor="cli", retry_of=original["id"],
                            from_step=point, reuse=tuple(reuse))
        print(f'Retrying execution {original["id"]} from step "{point}"...', flush=True)
        return result.execution_id

    return drive(context, start, _lines({row["step"] for row in reuse}))
