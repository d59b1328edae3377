"""Sharding engines on two CPU processes (gloo), launched with the shipped accelerate configs: DeepSpeed ZeRO-2,
ZeRO-3 with every parameter partitioned, FSDP2 (through the test-only CPU shim) train a method recipe to the
weights 2-process DDP reaches, and resume from a checkpoint inside a generation cycle to the very same weights."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from helpers.engines import accelerate_launch, cpu_launch_config
from helpers.processes import worker_env
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tiny" / "clip_cov.yaml"
# 3 optimizer steps, 2 per generation batch, a checkpoint after every step: checkpoint-1 lies inside a
# generation cycle, so its resume also needs the buffered batch (exact resume's hardest case). Adam moves every
# weight by about the learning rate per step whatever the gradient's size, so float-order differences between
# engines show up in proportion to it: 1e-5 keeps them under 1e-6 while the weights move by 3e-5.
TRAIN = ["max_steps=3", "per_device_train_batch_size=8", "num_generations=4", "steps_per_generation=2",
         "save_strategy=steps", "save_steps=1", "data.num_prompts=64", "learning_rate=1e-5"]
PORTS = {"ddp": 29611, "zero2": 29612, "zero3": 29613, "fsdp2": 29614}
pytestmark = [pytest.mark.slow, pytest.mark.multiproc]


def launch(engine: str, tmp: Path, cache: Path, name: str, *overrides: str, nan_at: int | None = None,
           train: list[str] = TRAIN) -> Path:
    out = tmp / name
    config = cpu_launch_config(engine, tmp)
    env = worker_env(cache=cache)
    env["RLVR_TEST_FSDP_CPU"] = "1" if engine == "fsdp2" else "0"
    if nan_at is not None:
        env["RLVR_TEST_NAN_AT"] = str(nan_at)
    port = PORTS[engine] + (20 if overrides else 0) + (40 if nan_at is not None else 0)
    proc = subprocess.run(accelerate_launch(config, port, RECIPE, out, *train, *overrides), env=env,
                          capture_output=True, text=True, timeout=420, cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return out


def weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "final_weights.pt", weights_only=True)


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest difference over the shared tensors. Some engines also write the tied LM head under its own name:
    that copy must equal the embedding it is tied to."""
    for d in (a, b):
        if "lm_head.weight" in d and "model.embed_tokens.weight" in d:
            assert torch.equal(d["lm_head.weight"], d["model.embed_tokens.weight"])
    shared = a.keys() & b.keys()
    assert shared >= (a.keys() | b.keys()) - {"lm_head.weight"}
    return max((a[k] - b[k]).abs().max().item() for k in shared)


@pytest.fixture(scope="module")
def ddp_run(tiny_model_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    return launch("ddp", tmp, Path(tiny_model_path).parent, "run")


@pytest.mark.parametrize("engine", ["zero2", "zero3", "fsdp2"])
def test_engine_trains_like_ddp_and_resumes_exactly(engine, ddp_run, tiny_model_path, tmp_path):
    cache = Path(tiny_model_path).parent
    full = launch(engine, tmp_path, cache, "full")
    info = [json.loads((full / f"engine{r}.json").read_text()) for r in (0, 1)]
    expected = {"zero2": "DEEPSPEED", "zero3": "DEEPSPEED", "fsdp2": "FSDP"}[engine]
    assert {i["distributed_type"] for i in info} == {expected}
    if engine in ("zero3", "fsdp2"):  # parameters really partitioned: each process holds about half
        assert all(i["local_elements"] < 0.6 * i["full_elements"] for i in info), info
        assert sum(i["local_elements"] for i in info) >= info[0]["full_elements"]
    resumed = launch(engine, tmp_path, cache, "resumed", f"resume_from_checkpoint={full / 'checkpoint-1'}")

    start = load_file(str(Path(tiny_model_path) / "model.safetensors"))
    reference, ours, again = weights(ddp_run), weights(full), weights(resumed)
    moved = max((ours[k] - start[k].float()).abs().max().item() for k in ours if k in start)
    assert moved > 1e-5, "training did not move the weights: the comparison would be empty"
    assert max_diff(ours, reference) < 1e-6  # the same run as 2-process DDP, up to float summation order
    assert max_diff(ours, again) == 0.0  # exact resume from a checkpoint inside a generation cycle
    logged = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [x["step"] for x in logged] == [2, 3]
    # The recipe's evaluation after the last step, through TRL's generation context on the sharded model: the
    # resumed run logs the very same figures, and they are DDP's (weights equal up to summation order).
    figures = final_eval(full)
    assert figures and figures == final_eval(resumed)
    for key, value in final_eval(ddp_run).items():
        assert figures[key] == pytest.approx(value, abs=2e-3), key


def final_eval(run_dir: Path) -> dict[str, float]:
    """The eval figures on the run's last logged line (wall-clock time left out)."""
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    return {k: v for k, v in lines[-1].items() if k.startswith("eval/") and k != "eval/seconds"}


@pytest.mark.parametrize("engine", ["zero2", "fsdp2"])
def test_non_finite_gradients_on_one_process_skip_the_step_everywhere(engine, tiny_model_path, tmp_path):
    """Process 1 alone gets a NaN loss at step 2. FSDP2: each process checks its gradient shard, the flag is
    all-reduced. DeepSpeed: its own check of the global gradient norm skips the step inside the backward pass, and
    the guard counts it. Either way no process moves at step 2, both move at step 3, and both count one skip."""
    train = ["max_steps=3", "per_device_train_batch_size=8", "num_generations=4", "steps_per_generation=1",
             "data.num_prompts=64", "learning_rate=1e-4"]
    out = launch(engine, tmp_path, Path(tiny_model_path).parent, "guard", nan_at=1, train=train)
    ranks = [json.loads((out / f"guard{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        first, second, third = r["checksums"]
        assert second == first != third  # step 2 skipped on this process too, step 3 trained
        assert r["counters"]["guard/skipped_steps"] == 1
        assert r["counters"]["guard/nonfinite/grad"] >= 1


def test_lora_under_zero3_trains_only_the_adapter(tiny_model_path, tmp_path):
    """A recipe `peft:` section under ZeRO-3 with every parameter partitioned: the adapter trains, the base does not."""
    train = ["max_steps=2", "per_device_train_batch_size=8", "num_generations=4", "steps_per_generation=1",
             "data.num_prompts=64", "peft.r=4", "peft.lora_alpha=8", "peft.target_modules=[q_proj, v_proj]"]
    out = launch("zero3", tmp_path, Path(tiny_model_path).parent, "lora", train=train)
    info = json.loads((out / "engine0.json").read_text())
    assert info["type"] == "DeepSpeedEngine" and info["local_elements"] < 0.6 * info["full_elements"]
    final, start = weights(out), load_file(str(Path(tiny_model_path) / "model.safetensors"))
    adapter = {k: v for k, v in final.items() if "lora_" in k}
    assert adapter and max(v.abs().max().item() for k, v in adapter.items() if "lora_B" in k) > 0  # B starts at 0
    base = {k.replace("base_model.model.", "").replace(".base_layer", ""): v for k, v in final.items() if "lora_" not in k}
    assert all(torch.equal(base[k], start[k].float()) for k in start if k in base)
    assert len([k for k in start if k in base]) == len(start)
