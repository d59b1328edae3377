"""scripts/gpu_check.py in its CPU smoke mode: the code path a GPU run takes, every configuration timed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.e2e
def test_gpu_check_cpu_tiny_times_trl_and_every_method(tmp_path):
    from rlvr_entropy.methods import METHODS

    out = tmp_path / "check"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--cpu", "--tiny", "--out", str(out),
                           "--no-vllm"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((out / "gpu_check.json").read_text())
    results = report["results"]
    assert set(results) == {"trl", "none", "canon_length", *METHODS}
    assert all(r["step_s"] > 0 and r["tokens_per_s"] > 0 for r in results.values())
    assert all(len(runs) == 2 for runs in report["rounds"].values())  # interleaved rounds
    table = (out / "gpu_check.md").read_text()
    assert "| none |" in table and "| steer |" in table and "vs TRL" in table
    assert report["meta"]["vllm"] == {"skipped": "--no-vllm"}
