"""Live step lines of ``mantle run`` (SPEC 13.1.2), for in-process and ``--server`` runs.

Fed successive 7.4 detail documents (from the database or the API), ``LiveLines`` returns the
lines of the steps that reached a final status since the last call: main steps in the order
they finished, then hooks as ``  <hook> (hook): <status>``. The latest attempt of a step is
final only when the step is (a failed attempt that will be retried is stored together with
its successor), so a retried step is printed once, with its last status.

A main step that never started (cancelled after a failure) has no finish time: it is printed
after those that ran, once hooks have started or the execution has ended. Hook lines wait
until every main step has its line.
"""

from __future__ import annotations

import datetime as dt

__all__ = ["LiveLines", "FINAL_STEP_STATUSES", "finish_key"]

FINAL_STEP_STATUSES = frozenset({"completed", "failed", "skipped", "cancelled"})


def _finished(step: dict) -> bool:
    """Final with a finish time. A step that never started has none: it is printed with the
    last lines, after those that ran, whatever moment its status was decided."""
    return step["status"] in FINAL_STEP_STATUSES and step["completed_at"] is not None


def finish_key(step: dict):
    """Order of finishing: ``completed_at`` (datetime or RFC 3339 text), unknown last."""
    when = step.get("completed_at")
    if isinstance(when, str):
        when = dt.datetime.fromisoformat(when.replace("Z", "+00:00")).replace(tzinfo=None)
    return (when is None, when or dt.datetime.max)


class LiveLines:
    """Which step lines were printed, and the next ones to print."""

    def __init__(self):
        self._printed_steps: set[str] = set()
        self._printed_hooks: set[str] = set()

    def new_lines(self, detail: dict, last: bool = False) -> list[str]:
        """Lines for the steps newly final in ``detail``; with ``last`` (the execution ended
        and its rows settled) every step not printed yet, whatever its status."""
        lines = []
        # Once hooks run, every main step is decided: never-started ones too.
        decided = last or bool(detail["hooks"])
        fresh = [step for step in detail["steps"]
                 if step["name"] not in self._printed_steps
                 and (last or _finished(step)
                      or decided and step["status"] in FINAL_STEP_STATUSES)]
        for step in sorted(fresh, key=finish_key):  # stable: ties keep detail order
            self._printed_steps.add(step["name"])
            lines.append(f"  {step['name']}: {step['status']}")
        if len(self._printed_steps) < len(detail["steps"]):
            return lines
        hooks = [hook for hook in detail["hooks"]
                 if hook["name"] not in self._printed_hooks and (last or _finished(hook))]
        for hook in sorted(hooks, key=finish_key):
            self._printed_hooks.add(hook["name"])
            lines.append(f"  {hook['name']} (hook): {hook['status']}")
        return lines
