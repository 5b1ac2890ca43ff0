"""The benchmark harness runs end to end in its smoke mode (no targets checked in CI)."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_smoke_mode_completes_every_workload():
    result = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--smoke",
                             "--no-postgres"], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "smoke: every workload completed" in result.stdout
    for workload in ("W1 trivial", "W3 sleepers", "W4 cancel", "scaling"):
        assert workload in result.stdout


def test_the_scaling_benchmark_runs_every_worker_count_from_several_client_processes(tmp_path):
    out = tmp_path / "scaling.json"
    result = subprocess.run([sys.executable, str(REPO / "bench" / "scaling.py"), "--workers",
                             "1,2", "--n", "40", "--reps", "1", "--clients", "2", "--threads",
                             "4", "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(out.read_text())
    assert (figures["clients"], figures["threads"], sorted(figures["workers"])) == (
        2, 4, ["1", "2"])
    assert all(f["completed"] and f["exec_per_s"] > 0 for f in figures["workers"].values())
    assert "speed-up" in result.stdout
