"""mantle's benchmarks: W1-W4, W3x10, scaling and PostgreSQL W1 against a real `mantle serve`.

Every workload drives the daemon through its public REST API from a client thread pool:
executions are triggered with POST /api/v1/run/{workflow}, completion is observed through the
list endpoint (GET /api/v1/executions?workflow=...&status=...), cancels go through
POST /api/v1/cancel/{id}. The daemon's peak RSS (process and children) is sampled from /proc.

Targets are ratios to the reference floor (../shared/bench/floor.py), measured in the same
invocation on the same machine; the table printed at the end shows each figure, its target and
pass/fail. `--smoke` runs tiny sizes, checks nothing but that every workload completes, and is
what CI runs.

    python bench/run.py                 # full run, median of 3 (about 2 minutes)
    python bench/run.py --smoke         # seconds; no targets
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from daemon import Daemon, PostgresServer  # noqa: E402
from workloads import (cancel_workload, sleepers_workload,  # noqa: E402
                       throughput_workload)

FLOOR = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "bench", "floor.py"))

WORKFLOWS = {
    "w1": "name: w1\nsteps: [{name: noop, action: core/log, params: {message: x}}]\n",
    "w2": """name: w2
steps:
  - {name: a, action: core/log, params: {message: a}}
  - {name: b, action: core/log, depends_on: [a], params: {message: b}}
  - {name: c, action: core/log, depends_on: [a], params: {message: c}}
  - {name: d, action: core/log, depends_on: [a], params: {message: d}}
  - {name: e, action: core/log, depends_on: [a], params: {message: e}}
  - {name: f, action: core/log, depends_on: [b, c, d, e], params: {message: f}}
""",
    "w3": "name: w3\nsteps: [{name: nap, action: core/sleep, params: {duration: 5s}}]\n",
    "w4": "name: w4\nsteps: [{name: nap, action: core/sleep, params: {duration: 60s}}]\n",
}


def median_of(reps: list[dict]) -> dict:
    out = {}
    for key in reps[0]:
        values = [r[key] for r in reps]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[key] = round(statistics.median(values), 3)
        else:
            out[key] = values[-1]
    return out


def run_floor(reps: int, sizes: dict) -> dict:
    """Run the reference floor in a subprocess of this Python (needs psutil for W3 RSS)."""
    out = tempfile.mktemp(suffix=".json")
    import subprocess
    subprocess.run([sys.executable, FLOOR, "--out", out, "--reps", str(reps),
                    "--n1", str(sizes["W1"]), "--n2", str(sizes["W2"]),
                    "--n3", str(sizes["W3"]), "--n4", str(sizes["W4"])],
                   check=True, stdout=subprocess.DEVNULL)
    with open(out) as handle:
        data = json.load(handle)
    return {w: data["workloads"][w]["median"] for w in ("W1", "W2", "W3", "W4")}


def measure(reps: int, sizes: dict, smoke: bool, with_pg: bool) -> dict:
    results: dict = {}
    with Daemon(WORKFLOWS) as daemon:
        results["W1"] = median_of([throughput_workload(daemon, "w1", sizes["W1"], 1)
                                   for _ in range(reps)])
        results["W2"] = median_of([throughput_workload(daemon, "w2", sizes["W2"], 6)
                                   for _ in range(reps)])
        results["W3"] = median_of([sleepers_workload(daemon, "w3", sizes["W3"])
                                   for _ in range(reps)])
        results["W4"] = median_of([cancel_workload(daemon, "w4", sizes["W4"])
                                   for _ in range(reps)])
        scaling = {}
        for n in sizes["scaling"]:
            scaling[n] = median_of([throughput_workload(daemon, "w1", n, 1)
                                    for _ in range(reps)])
        results["scaling"] = scaling
    with Daemon(WORKFLOWS) as daemon:  # a fresh daemon, so its peak RSS is W3x10's own
        results["W3x10"] = sleepers_workload(daemon, "w3", sizes["W3x10"])
    results["workers"] = {}
    for count in sizes["workers"]:  # serve --workers N, each on a fresh daemon
        with Daemon(WORKFLOWS, workers=count) as daemon:
            results["workers"][count] = median_of(
                [throughput_workload(daemon, "w1", sizes["W1"], 1) for _ in range(reps)])
            if count == 2:
                results["W2x2"] = median_of([throughput_workload(daemon, "w2", sizes["W2"], 6)
                                             for _ in range(reps)])
                results["W4x2"] = median_of([cancel_workload(daemon, "w4", sizes["W4"])
                                             for _ in range(reps)])
    if with_pg:
        with PostgresServer() as pg, Daemon(WORKFLOWS, database_url=pg.url) as daemon:
            results["PG-W1"] = median_of([throughput_workload(daemon, "w1", sizes["W1"], 1)
                                          for _ in range(reps)])
    return results


def table(results: dict, floor: dict | None) -> tuple[list[tuple], bool]:
    rows = []

    def row(workload, figure, value, target, ok):
        rows.append((workload, figure, value, target, "pass" if ok else "FAIL"))

    w1, w2, w3, w4 = (results[k] for k in ("W1", "W2", "W3", "W4"))
    if floor:
        f1, f2 = floor["W1"]["exec_per_s"], floor["W2"]["steps_per_s"]
        row("W1 trivial", "executions/s", f"{w1['exec_per_s']:.0f} (floor {f1:.0f})",
            f">= {0.25 * f1:.0f}", w1["exec_per_s"] >= 0.25 * f1)
    row("W1 trivial", "trigger->completed p99", f"{w1['lat_p99_ms']:.1f} ms", "<= 100 ms",
        w1["lat_p99_ms"] <= 100)
    if floor:
        row("W2 dag", "steps/s", f"{w2['steps_per_s']:.0f} (floor {f2:.0f})",
            f">= {0.25 * f2:.0f}", w2["steps_per_s"] >= 0.25 * f2)
    row("W3 sleepers", "wall for 200 x 5 s", f"{w3['wall_s']:.2f} s", "<= 5.5 s",
        w3["wall_s"] <= 5.5)
    row("W3 sleepers", "daemon peak RSS", f"{w3['peak_rss_mb']:.0f} MiB", "<= 150 MiB",
        w3["peak_rss_mb"] <= 150)
    x10 = results["W3x10"]
    row("W3 x10", "2,000 x 5 s: wall, RSS, done",
        f"{x10['wall_s']:.2f} s, {x10['peak_rss_mb']:.0f} MiB, {x10['finished']}",
        "<= 8 s, <= 400 MiB, all",
        x10["wall_s"] <= 8 and x10["peak_rss_mb"] <= 400 and x10["all_finished"])
    row("W4 cancel", "cancel->cancelled p99", f"{w4['cancel_p99_ms']:.1f} ms", "<= 50 ms",
        w4["cancel_p99_ms"] <= 50 and w4["all_cancelled"])
    sizes = sorted(results["scaling"])
    cost = {n: 1000.0 / results["scaling"][n]["exec_per_s"] for n in sizes}
    growth = cost[sizes[-1]] / cost[sizes[0]]
    row("scaling", f"cost/exec {sizes[0]}->{sizes[-1]}",
        " / ".join(f"{cost[n]:.2f} ms" for n in sizes) + f" (x{growth:.2f})", "<= x1.5",
        growth <= 1.5)
    workers = results["workers"]
    for count, figures in sorted(workers.items()):
        target, ok = "-", True  # reported for the scaling (issue 12): 1 and 4 have no target
        if count == 2 and floor:
            target, ok = f">= {0.35 * f1:.0f}", figures["exec_per_s"] >= 0.35 * f1
        row(f"--workers {count}", "W1 executions/s, CPU/exec",
            f"{figures['exec_per_s']:.0f}, {figures['cpu_ms_per_exec']:.2f} ms", target, ok)
    if "W2x2" in results and floor:
        steps = results["W2x2"]["steps_per_s"]
        row("--workers 2", "W2 steps/s", f"{steps:.0f}", f">= {0.5 * f2:.0f}",
            steps >= 0.5 * f2)
    if "W4x2" in results:
        w4x2 = results["W4x2"]
        p99 = w4x2.get("non_owner_p99_ms", w4x2["cancel_p99_ms"])
        row("--workers 2", f"W4 cancel to non-owner p99 ({w4x2.get('non_owner', 0)})",
            f"{p99:.1f} ms", "<= 50 ms", p99 <= 50 and w4x2["all_cancelled"])
    if "PG-W1" in results and floor:
        pg = results["PG-W1"]["exec_per_s"]
        row("PostgreSQL", "W1 executions/s", f"{pg:.0f}", f">= {0.25 * f1:.0f}",
            pg >= 0.25 * f1)
    return rows, all(r[4] == "pass" for r in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, no targets")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-floor", action="store_true", help="skip the reference floor")
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--out", help="write all figures as JSON here")
    args = parser.parse_args()
    if args.smoke:
        sizes = {"W1": 20, "W2": 10, "W3": 10, "W4": 5, "W3x10": 20, "scaling": [10, 20],
                 "workers": [2]}
        reps = 1
    else:
        sizes = {"W1": 300, "W2": 100, "W3": 200, "W4": 50, "W3x10": 2000,
                 "scaling": [300, 600, 1200], "workers": [1, 2, 4]}
        reps = args.reps
    results = measure(reps, sizes, args.smoke, with_pg=not args.no_postgres)
    floor = None if (args.smoke or args.no_floor) else run_floor(reps, sizes)
    rows, ok = table(results, floor)
    widths = [max(len(str(r[i])) for r in rows + [("workload", "figure", "measured",
                                                    "target", "result")]) for i in range(5)]
    header = ("workload", "figure", "measured", "target", "result")
    for line in [header] + rows:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"results": results, "floor": floor, "rows": rows}, handle, indent=2,
                      default=str)
    if args.smoke:
        done = all(results[w].get(k) for w, k in (("W1", "completed"), ("W2", "completed"),
                                                   ("W3", "all_finished"),
                                                   ("W4", "all_cancelled")))
        print("smoke:", "every workload completed" if done else "INCOMPLETE")
        return 0 if done else 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
