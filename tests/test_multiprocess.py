"""Two CPU processes (torchrun, gloo): groups that span processes are gathered, computed once, sliced back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.processes import torchrun, worker_env

HERE = Path(__file__).parent


@pytest.mark.slow
@pytest.mark.multiproc
def test_groups_spanning_processes(model_dir, tmp_path):
    cmd = torchrun("multiproc_worker.py", model_dir, tmp_path)
    proc = subprocess.run(cmd, env=worker_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    # Both ranks ran the method on the same global batch and hold the same state.
    assert r0["record"] == r1["record"]
    assert r0["state"] == r1["state"] and r0["state"]["group_centre"]["calls"] == 1
    assert r0["record"]["group_ids"] == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert r0["record"]["entropy_rows"] == 12
    # Each rank kept its own slice of the globally computed advantages.
    assert r0["local_advantages"] + r1["local_advantages"] == pytest.approx(r0["record"]["global_out"])
    assert r0["group_ids"] + r1["group_ids"] == r0["record"]["group_ids"]
    # Group 1 spans the ranks and is centred as a whole.
    assert sum(r0["record"]["global_out"][4:8]) == pytest.approx(0.0, abs=1e-5)
    # Loss-phase metrics are reduced across processes ("sum" of local token counts).
    assert r0["metrics"]["log_tokens/tokens"] == [r0["local_tokens"] + r1["local_tokens"]]
    assert r0["metrics"]["rollout_entropy/mean"] == r1["metrics"]["rollout_entropy/mean"]


LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    # `--cpu` would silently start one process: --multi_gpu gives two gloo ranks on a CPU machine
    "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--main_process_port", "29533"],
}


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_cli_under_launchers(tiny_model_path, tmp_path, launcher):
    """`<launcher> -m rlvr_entropy train RECIPE` runs two ranks, exits cleanly; only rank 0 writes metrics."""
    recipe = HERE.parent / "recipes" / "tiny" / "grpo.yaml"
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RLVR_ENTROPY_CACHE": str(Path(tiny_model_path).parent)}
    cmd = [*LAUNCHERS[launcher], "-m", "rlvr_entropy", "train", str(recipe), "max_steps=2",
           "per_device_train_batch_size=8", "steps_per_generation=1", "num_generations=4", f"output_dir={out}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x["step"] for x in lines if "loss" in x]
    assert steps == [1, 2]
    assert all("rollout_entropy/mean" in x and "entropy/p50" in x for x in lines if "loss" in x)


def run_scope_worker(model_dir, out_dir, method, world):
    cmd = torchrun("multiproc_scope_worker.py", model_dir, out_dir, json.dumps(method), nproc=world)
    proc = subprocess.run(cmd, env=worker_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [json.loads((out_dir / f"result{world}_{r}.json").read_text()) for r in range(world)]
    selected = sorted(tuple(p) for res in results for p in res["selected"])
    advantages = [a for res in results for a in res["advantages"]]
    states = [res["state"] for res in results]
    return selected, advantages, states


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("method", [
    {"name": "clip_cov", "selection_scope": "global", "ratio": 0.2, "lb": 0.0, "ub": 100.0},
    {"name": "kl_cov", "selection_scope": "global", "ratio": 0.2},
], ids=["clip_cov", "kl_cov"])
def test_global_scope_selects_the_same_tokens_on_one_and_two_processes(model_dir, tmp_path, method):
    one, _, _ = run_scope_worker(model_dir, tmp_path, method, 1)
    two, _, _ = run_scope_worker(model_dir, tmp_path, method, 2)
    assert one, "nothing was selected: the test batch is degenerate"
    assert one == two


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("method", [
    {"name": "seed_grpo", "alpha": 1.0},
    {"name": "canon", "metric": "entropy", "mu": 1.0},
], ids=["seed_grpo", "canon"])
def test_group_advantages_are_the_same_on_one_and_two_processes(model_dir, tmp_path, method):
    """12 rows in groups of 4 split 6/6: the middle group spans both processes."""
    _, one, _ = run_scope_worker(model_dir, tmp_path, method, 1)
    _, two, _ = run_scope_worker(model_dir, tmp_path, method, 2)
    assert len(one) == 12 and any(abs(a) > 1e-3 for a in one)
    assert two == pytest.approx(one, abs=1e-5)


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize(("methods", "keys"), [
    ("[{name: aepo, num_samples: 4, prompt_fraction: 0.5}]", ["aepo/injected", "aepo/temperature", "aepo/estimate"]),
    ("[{name: ares, mode: code, window: 2, kl_update_every: 1}]", ["ares/hwe", "ares/threshold", "ares/beta_easy"]),
], ids=["aepo", "ares"])
def test_methods_that_gather_inside_their_hooks_run_on_two_processes(tiny_model_path, tmp_path, methods, keys):
    """AEPO scores extra samples inside the rollout (a gather per batch), ARES gathers KL sums per micro-batch:
    every rank must make the same collective calls, or the run hangs."""
    recipe = HERE.parent / "recipes" / "tiny" / "grpo.yaml"
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RLVR_ENTROPY_CACHE": str(Path(tiny_model_path).parent)}
    cmd = [*LAUNCHERS["torchrun"], "-m", "rlvr_entropy", "train", str(recipe), "max_steps=2", f"methods={methods}",
           "beta=0.01", "per_device_train_batch_size=8", "steps_per_generation=1", "num_generations=4",
           f"output_dir={out}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    logged = set().union(*lines)
    assert set(keys) <= logged, sorted(logged)


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("mode", ["paper", "code"])
def test_ares_running_state_is_the_same_on_every_process_and_process_count(model_dir, tmp_path, mode):
    """ARES's thresholds, targets and caps come from the gathered batch: equal on each rank, and on 1 or 2 ranks."""
    method = {"name": "ares", "mode": mode, "window": 1, "kl": False, "correct_from": "digit_value",
              "trigger_words": None if mode == "paper" else ["1", "2", "3"]}
    _, one, (state1,) = run_scope_worker(model_dir, tmp_path, method, 1)
    _, two, (state_a, state_b) = run_scope_worker(model_dir, tmp_path, method, 2)
    assert state_a == state_b
    assert flat(state1).keys() == flat(state_a).keys()
    for key, value in flat(state1).items():  # float sums may differ in the last bits between process counts
        assert value == (flat(state_a)[key] if value is None else pytest.approx(flat(state_a)[key], rel=1e-5)), key
    assert state1 != build_state(mode), "the batch left ARES's state untouched: the test would not see a difference"
    assert two == pytest.approx(one, abs=1e-5)


def build_state(mode):
    from rlvr_entropy.config import build_method

    return build_method({"name": "ares", "mode": mode, "kl": False}).state


def flat(state, prefix=""):
    out = {}
    for key, value in state.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out
