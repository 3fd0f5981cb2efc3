"""benchmarks/quality.py mechanics (random weights: the AUC values are meaningless, their plumbing is not)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quality_benchmark_runs_dense_and_sparse_on_the_fox_scene():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--model", "random", "--preset", "tiny",
           "--frames", "6", "--image-size", "140", "--ks", "2", "all", "--neighbors", "sequence",
           "--device", "cpu", "--threads", "1", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["random_weights"] and "mechanics only" in result["note"]
    assert result["frames"] == 6
    assert [r["k"] for r in result["rows"]] == ["2", "all"]
    for row in result["rows"]:
        assert 0.0 <= row["auc30"] <= 1.0
        assert row["seconds"] > 0 and row["peak_bytes"] > 0
