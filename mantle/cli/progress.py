"""Live step lines of ``mantle run`` (SPEC 13.1.2), for in-process and ``--server`` runs.

Fed successive 7.4 detail documents (from the database or the API), ``LiveLines`` returns the
lines of the steps that reached a final status since the last call: main steps in the order
they finished, then hooks as ``  <hook> (hook): <status>``. The latest attempt of a step is
final only when the step is (a failed attempt that will be retried is stored together with
its successor), so a retried step is printed once, with its last status.

Hook lines wait until every main step has its line: hooks start only after the main steps,
but a main step that never started has no finish time until the execution ends.
"""

from __future__ import annotations

import datetime as dt

__all__ = ["LiveLines", "FINAL_STEP_STATUSES"]

FINAL_STEP_STATUSES = frozenset({"completed", "failed", "skipped", "cancelled"})
_FINAL_EXECUTION = frozenset({"completed", "failed", "cancelled"})


def _finish_key(step: dict):
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

    def new_lines(self, detail: dict) -> list[str]:
        """Lines for the steps newly final in ``detail``; once the execution is final,
        every step not printed yet (never-started ones show ``cancelled``)."""
        ended = detail["status"] in _FINAL_EXECUTION
        lines = []
        fresh = [step for step in detail["steps"]
                 if step["name"] not in self._printed_steps
                 and (ended or step["status"] in FINAL_STEP_STATUSES)]
        for step in sorted(fresh, key=_finish_key):  # stable: ties keep detail order
            self._printed_steps.add(step["name"])
            lines.append(f"  {step['name']}: {step['status']}")
        if len(self._printed_steps) < len(detail["steps"]):
            return lines
        hooks = [hook for hook in detail["hooks"]
                 if hook["name"] not in self._printed_hooks
                 and (ended or hook["status"] in FINAL_STEP_STATUSES)]
        for hook in sorted(hooks, key=_finish_key):
            self._printed_hooks.add(hook["name"])
            lines.append(f"  {hook['name']} (hook): {hook['status']}")
        return lines
