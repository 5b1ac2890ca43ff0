"""Step preparation cost: a step's ``if`` and templated params evaluated as the engine does
(``resolve_params`` and ``evaluate_condition`` over one activation cache), in process.

W1 has no template, so engine benchmarks do not see the expression evaluator; this does. The
target is a budget against regressions of the evaluator's hot paths (every operand of every
expression passes through them), not a user-facing goal.

    .venv/bin/python bench/expressions.py            # exits 1 when over the target
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mantle.expressions import evaluate_condition, resolve_params  # noqa: E402
from mantle.expressions.evaluation import ActivationCache  # noqa: E402

TARGET_MS = 40.0  # 33 ms on the 2-core development machine, 2026-12-07
ACTIVATION = {
    "inputs": {"who": "ada", "n": 12, "xs": list(range(200))},
    "steps": {"fetch": {"status": "completed", "output": {"status": 200, "json": {
        "items": [{"id": i, "name": f"n{i}"} for i in range(100)]}}}},
    "env": {"REGION": "eu"}, "trigger": {"type": "manual", "payload": None},
}
PARAMS = {
    "message": "hello {{ inputs.who }} in {{ env.REGION }}: {{ inputs.n * 2 }}",
    "ids": "{{ steps.fetch.output.json.items.map(i, i.id) }}",
    "names": "{{ steps.fetch.output.json.items.filter(i, i.id % 2 == 0)"
             ".map(i, i.name + '-x') }}",
    "sum": "{{ inputs.xs.size() + size(inputs.who) }}",
}
CONDITION = "steps.fetch.output.status == 200 && inputs.n > 3"


def prepare_once() -> None:
    cache = ActivationCache(ACTIVATION)
    resolve_params(PARAMS, ACTIVATION, cache)
    evaluate_condition(CONDITION, ACTIVATION, cache)


def main() -> int:
    for _ in range(20):  # compile and warm up
        prepare_once()
    runs = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(200):
            prepare_once()
        runs.append((time.perf_counter() - started) / 200 * 1000)
    median = statistics.median(runs)
    ok = median <= TARGET_MS
    print(f"step preparation (4 templated params, 1 if): {median:.1f} ms "
          f"(target <= {TARGET_MS:.0f} ms) {'pass' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
