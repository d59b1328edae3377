"""Two CPU processes (torchrun, gloo): groups that span processes are gathered, computed once, sliced back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
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
    """`<launcher> -m rlvr_entropy train RECIPE` runs two ranks as written, exits cleanly; only rank 0 writes metrics."""
    recipe = HERE.parent / "recipes" / "tiny" / "grpo.yaml"
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RLVR_ENTROPY_CACHE": str(Path(tiny_model_path).parent)}
    # As written (the README's line): the recipe's own batch geometry must fill a generation batch on 2 processes.
    cmd = [*LAUNCHERS[launcher], "-m", "rlvr_entropy", "train", str(recipe), "max_steps=2", f"output_dir={out}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "FutureWarning" not in proc.stderr, proc.stderr[-4000:]  # none the user could act on
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x["step"] for x in lines if "loss" in x]
    assert steps == [1, 2]
    train_lines = [x for x in lines if "loss" in x]
    assert all("entropy/p50" in x for x in train_lines)
    assert "rollout_entropy/mean" in train_lines[0]  # logged on generation steps (4 optimizer steps per rollout)
    # The recipe's evaluation ran at the end, sharded over both ranks: it equals one process evaluating the
    # saved policy with the same seed.
    logged = {k.removeprefix("eval/arithmetic/"): v for k, v in train_lines[-1].items() if k.startswith("eval/arithmetic/")}
    assert_eval_matches_one_process(out, logged, step=2)


def assert_eval_matches_one_process(run_dir: Path, logged: dict, step: int) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlvr_entropy.config import load_recipe
    from rlvr_entropy.evaluation import HFSampler, evaluate_dataset
    from rlvr_entropy.periodic_eval import load_eval_rows
    from rlvr_entropy.tensor_ops import stable_hash

    recipe = load_recipe(run_dir / "recipe.yaml")
    spec = recipe.evaluation
    model = AutoModelForCausalLM.from_pretrained(run_dir, dtype=torch.float32).eval()
    sampler = HFSampler(model, AutoTokenizer.from_pretrained(run_dir), recipe.train.temperature, spec.top_p)
    report = evaluate_dataset(sampler, load_eval_rows(spec.datasets[0], spec.num_prompts), "arithmetic",
                              samples=spec.k, k=spec.k, max_new_tokens=recipe.train.max_completion_length,
                              batch_size=spec.batch_size, seed=stable_hash((spec.seed, step)))
    expected = {k: v for k, v in report.figures.items() if k not in ("prompts", "samples")}
    assert logged.keys() == expected.keys()
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, abs=1e-5), key


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


def flatten(values):
    """Nested lists (rows of tokens, parameters of functionals) as one flat list."""
    if isinstance(values, list):
        return [v for item in values for v in flatten(item)]
    return [values]


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


# -------------------------------------------------------------------- every method: 1 process == 2 processes

#: Recipe entries for the methods whose default is process-count dependent by design, and the rollout tags a
#: method's later hooks read (the worker bypasses rollout hooks, which sample). A method not listed runs with
#: its defaults: a new method is covered the day it is registered.
SCOPE_SETTINGS = {
    # micro_batch (the reference's default) selects per loss micro-batch on each process: global is the
    # process-count-free variant, and the one this test can hold to equality.
    "clip_cov": {"entry": {"selection_scope": "global", "ratio": 0.2, "lb": 0.0, "ub": 100.0}},
    "kl_cov": {"entry": {"selection_scope": "global", "ratio": 0.2, "base_clip": True}},
    "aepo": {"tags": {"aepo/injected": [1, 9]}},  # one injected sample in a group of each process
    "ares": {"entry": {"window": 2, "kl_update_every": 1}},
    "pear": {"entry": {"alpha": 0.5}},
    "steer": {"entry": {"normalizer_scope": "global"}},  # micro_batch: max/min |Omega| per process (the reference)
    # TRL's own entropy bonus, which this method switches on, is the mean entropy of each process's tokens, then
    # averaged over processes by DDP: with unequal token counts per process its gradient is not one process's.
    "entropy_bonus": {"trl_per_process_gradient": True},
    "entropy_coef_schedule": {"trl_per_process_gradient": True},  # TRL's bonus again, with a scheduled coefficient
    # Archer's own KL (on low-entropy tokens) replaces TRL's: it refuses beta != 0 (TRL's reference model is still
    # built for it). "args" are TRL settings for the method's trainer, over the worker's defaults.
    "archer": {"args": {"beta": 0.0}},
    # SIREN applies no penalty during optimizer step 0 (it measures its anchor): a fixed anchor exercises the penalty.
    "siren": {"entry": {"anchor": 0.5}},
    # EntroPIC's default high_prob (0.95) selects no token of the random test model: a lower one exercises its term.
    "entropic": {"entry": {"high_prob": 0.02, "kp": 0.05, "target": 1.0}},
}


@pytest.fixture(scope="module")
def method_scope_runs(model_dir, tmp_path_factory):
    """One launch per process count; each runs every registered method on the same fixed batch."""
    from rlvr_entropy.methods import METHODS

    out = tmp_path_factory.mktemp("method_scope")
    spec = {name: {"entry": {"name": name, **SCOPE_SETTINGS.get(name, {}).get("entry", {})},
                   "tags": SCOPE_SETTINGS.get(name, {}).get("tags", {}),
                   "args": SCOPE_SETTINGS.get(name, {}).get("args", {})} for name in METHODS}
    for world in (1, 2):
        cmd = torchrun("method_scope_worker.py", model_dir, out, json.dumps(spec), nproc=world)
        proc = subprocess.run(cmd, env=worker_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-5000:]
    return out


def _registered() -> list[str]:
    from rlvr_entropy.methods import METHODS

    return list(METHODS)


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("name", _registered())
def test_every_method_gives_the_same_results_on_one_and_two_processes(name, method_scope_runs):
    one = json.loads((method_scope_runs / f"{name}_1_0.json").read_text())
    two = [json.loads((method_scope_runs / f"{name}_2_{r}.json").read_text()) for r in (0, 1)]
    # What the reward and advantage hooks computed over the gathered batch: equal on each rank, and to 1 process.
    for key in ("rewards", "advantages"):
        if key in one["seen"]:
            assert two[0]["seen"][key] == pytest.approx(two[1]["seen"][key], abs=1e-6, nan_ok=True)
            assert two[0]["seen"][key] == pytest.approx(one["seen"][key], abs=1e-5, nan_ok=True), key
    assert two[0]["local_advantages"] + two[1]["local_advantages"] == pytest.approx(one["local_advantages"], abs=1e-5)
    # Token terms of the loss micro-batch: each rank's rows equal the same rows on one process.
    for key in ("weight", "detach", "extra"):
        assert (key in one["seen"]) == (key in two[0]["seen"]) == (key in two[1]["seen"]), key
        if key in one["seen"]:
            both = flatten(two[0]["seen"][key] + two[1]["seen"][key])
            assert both == pytest.approx(flatten(one["seen"][key]), abs=1e-5), key
    # The gradient DDP would apply (the mean over ranks) is the one-process gradient, TRL's loss terms included.
    mean = [(a + b) / 2 for a, b in zip(*(flatten(t["gradient"]) for t in two), strict=True)]
    assert any(abs(v) > 1e-6 for v in flatten(one["gradient"]))
    if SCOPE_SETTINGS.get(name, {}).get("trl_per_process_gradient"):
        assert mean != pytest.approx(flatten(one["gradient"]), rel=1e-4, abs=1e-6)  # still so? then revisit
    else:
        assert mean == pytest.approx(flatten(one["gradient"]), rel=1e-4, abs=1e-6)
    # Method state and logged statistics: global, so the same everywhere.
    assert two[0]["state"] == two[1]["state"]
    expected, got = flat(one["state"]), flat(two[0]["state"])
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        assert got[key] == (value if value is None else pytest.approx(value, rel=1e-5, abs=1e-6)), key
    assert two[0]["metrics"] == two[1]["metrics"]
    assert two[0]["metrics"].keys() == one["metrics"].keys()
    for key, values in one["metrics"].items():
        assert two[0]["metrics"][key] == pytest.approx(values, rel=1e-5, abs=1e-6), key
