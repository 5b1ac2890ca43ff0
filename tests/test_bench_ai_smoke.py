"""The AI benchmark (bench/ai.py) runs end to end in its smoke mode (no goal checked)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ai_bench_smoke_mode_completes_every_shape():
    result = subprocess.run([sys.executable, str(REPO / "bench" / "ai.py"), "--smoke"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "smoke: every AI step completed" in result.stdout
    for shape in ("executions", "fan-out"):
        assert shape in result.stdout
