"""``mantle retry``: re-run a failed execution from a step, reusing what is upstream (6.2).

The rules are ``mantle.retries`` (shared with ``POST /api/v1/retry/{execution}``); in-process
the engine creates the new execution and copies the reused step results into it, with
``--server`` the server does (``remote.retry``).
"""

from __future__ import annotations

from mantle.cli.context import Context
from mantle.durations import format_seconds
from mantle.retries import NotFailed, StillRunning, plan_retry

__all__ = ["retry_execution", "step_lines"]


def step_lines(reused: set[str], seconds):
    """The summary's step lines: ``  <name>: reused (cached)`` or ``  <name>: <status>`` plus
    `` (<duration>)`` when it ran; ``seconds(step)`` is its duration or None."""
    def lines(detail: dict) -> list[str]:
        out = []
        for step in detail["steps"]:
            if step["name"] in reused:
                out.append(f"  {step['name']}: reused (cached)")
                continue
            took = seconds(step)
            timing = "" if took is None else f" ({format_seconds(took)})"
            out.append(f"  {step['name']}: {step['status']}{timing}")
        return out
    return lines


def _seconds(step: dict) -> float | None:
    if step["started_at"] is None or step["completed_at"] is None:
        return None
    return (step["completed_at"] - step["started_at"]).total_seconds()


def retry_execution(args, context: Context) -> int:
    from mantle.cli.executions import drive

    config = context.config
    if args.server or config.server:
        from mantle.cli import remote
        return remote.retry(args, config)
    context.database()
    try:
        plan = plan_retry(args.execution_id, args.from_step)
    except StillRunning as running:  # the CLI words every status alike (SPEC 6.2)
        raise NotFailed(running.execution_id, running.status) from None

    def start(engine) -> str:
        result = engine.run(plan.workflow, plan.inputs, version=plan.version,
                            trigger=plan.trigger, actor="cli", retry_of=plan.original_id,
                            from_step=plan.from_step, reuse=plan.reuse)
        print(f'Retrying execution {plan.original_id} from step "{plan.from_step}"...',
              flush=True)
        return result.execution_id

    return drive(context, start, step_lines(set(plan.reused), _seconds))
