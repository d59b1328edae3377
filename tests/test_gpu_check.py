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


@pytest.mark.slow
@pytest.mark.e2e
def test_bench_overhead_times_each_configuration_in_its_own_process(tmp_path):
    out = tmp_path / "bench"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_overhead.py"), "--out", str(out), "--rounds", "1",
           "--steps", "2", "--warmup", "1", "--batch", "16", "--max-tokens", "8", "--methods", "clip_cov"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((out / "bench_overhead.json").read_text())
    assert list(report["results"]) == ["trl", "none", "clip_cov"]
    for name, r in report["results"].items():
        assert r["step_s"] > 0 and r["peak_rss_mib"] > 100, name
        assert r["generation"] > 0 and r["loss"] > 0 and r["backward"] > 0 and r["reward"] > 0, (name, r)
        assert r["rollout_stats"] == 0  # HF generate: the statistics come from generate itself, no extra forward
    assert report["results"]["trl"]["hooks"] == 0 and report["results"]["clip_cov"]["hooks"] > 0
    table = (out / "bench_overhead.md").read_text()
    assert "| none |" in table and "| TRL | 1.02" in table and "| clip_cov |" in table and "| no method | 1.03" in table


def test_bench_overhead_ratios_pair_each_round_with_its_reference():
    """A machine that slows down between rounds moves every configuration alike: paired ratios stay put."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_overhead", ROOT / "scripts" / "bench_overhead.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    slow = [1.0, 1.5, 2.0]   # the machine's speed in each round
    rounds = {name: [{"step_s": cost * s} for s in slow] for name, cost in (("trl", 0.100), ("none", 0.101), ("kl_cov", 0.104))}
    ratios = bench.paired_ratios(rounds)
    assert set(ratios) == {"none", "kl_cov"}
    assert ratios["none"] == pytest.approx([1.01] * 3) and ratios["kl_cov"] == pytest.approx([0.104 / 0.101] * 3)
    phases = dict.fromkeys(bench.PHASES, 0.01)
    results = {name: {"step_s": runs[1]["step_s"], **phases, "peak_rss_mib": 500.0} for name, runs in rounds.items()}
    meta = {"machine": "m", "model": "x", "batch": 1, "max_tokens": 1, "steps": 1, "rounds": 3}
    table = bench.markdown(results, meta, ratios)
    assert "| none | 151.5 | 1.010 | 1.010-1.010 | TRL | 1.02 ok |" in table
    assert "| kl_cov | 156.0 | 1.030 | 1.030-1.030 | no method | 1.03 ok |" in table
