"""The benchmark harness runs end to end in its smoke mode (no targets checked in CI)."""

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
