"""Exact resume and crash-safe checkpoints.

A run resumed from a checkpoint logs the same metrics and ends with the same weights as a run that never
stopped (CPU, same seed), with adaptive methods on, a checkpoint inside a generation cycle and an epoch
boundary behind it. A save killed halfway leaves the previous checkpoint usable.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers.processes import python, worker_env
from safetensors.torch import load_file
from transformers.trainer_utils import get_last_checkpoint
from trl.trainer.utils import RepeatSampler

from rlvr_entropy.checkpointing import EpochRepeatSampler, publish_checkpoint
from rlvr_entropy.config import load_recipe
from rlvr_entropy.metrics import truncate_metrics
from rlvr_entropy.runner import train

HERE = Path(__file__).parent
RECIPE = HERE.parent / "recipes" / "tiny" / "grpo.yaml"
# 8 prompts, 8 of them per generation batch and two optimizer steps on each: one epoch = 2 steps, and a
# checkpoint at an odd step falls inside a generation cycle.
CYCLE = ["per_device_train_batch_size=16", "steps_per_generation=2", "num_generations=4", "data.num_prompts=8",
         "max_steps=6", "methods=[{name: aepo, num_samples: 8, prompt_fraction: 0.5, temperature_high: 1.5, "
         "temperature_low: 0.6}, {name: entropy_bonus, adaptive: true, coef: 0.01, target: 1.0}]",
         # evaluation during training at step 4 and at the end (6): the figures must survive a resume
         "eval={datasets: [task:arithmetic], every: 4, k: 4, num_prompts: 12, batch_size: 5}"]
TIMING = {"step_time", "eval/seconds"}  # wall-clock keys differ between any two runs


def step_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows if "loss" in r]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "weights differ"


@pytest.mark.slow
def test_resumed_run_equals_the_uninterrupted_one(tiny_model_path, tmp_path):
    full = tmp_path / "full"
    uninterrupted = train(load_recipe(RECIPE, [*CYCLE, f"output_dir={full}", "save_strategy=steps", "save_steps=1"]))
    assert (full / "checkpoint-3" / "rlvr_entropy_buffer_0.pt").is_file()  # saved inside a generation cycle
    assert not (full / "checkpoint-4" / "rlvr_entropy_buffer_0.pt").exists()  # saved on a cycle boundary
    expected = step_rows(full)
    assert [r["step"] for r in expected] == [1, 2, 3, 4, 5, 6]
    assert any(r["aepo/injected"] for r in expected)  # the adaptive method did something
    assert [r["step"] for r in expected if "eval/arithmetic/pass@4" in r] == [4, 6]  # every 4 steps, and the end

    # 1. From checkpoint-3 (mid-cycle, epoch 1) into a fresh directory.
    resumed = tmp_path / "resumed"
    checkpoint = full / "checkpoint-3"
    trainer = train(load_recipe(RECIPE, [*CYCLE, f"output_dir={resumed}", f"resume_from_checkpoint={checkpoint}"]))
    assert step_rows(resumed) == expected[3:]
    assert_same_weights(full, resumed)
    assert trainer.pipeline.state_dict() == uninterrupted.pipeline.state_dict()
    assert trainer.entropy_coef == uninterrupted.entropy_coef

    # 2. A crash after step 5 whose last checkpoint is step 3: restart the same command with "last".
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    shutil.copytree(full / "checkpoint-3", crashed / "checkpoint-3")
    lines = (full / "metrics.jsonl").read_text().splitlines()
    (crashed / "metrics.jsonl").write_text("".join(x + "\n" for x in lines if json.loads(x)["step"] <= 5))
    train(load_recipe(RECIPE, [*CYCLE, f"output_dir={crashed}", "resume_from_checkpoint=last"]))
    assert step_rows(crashed) == expected  # steps 4 and 5 logged once, with the uninterrupted values
    assert_same_weights(full, crashed)


@pytest.mark.slow
def test_a_save_killed_halfway_leaves_the_last_checkpoint_usable(tiny_model_path, tmp_path):
    out = tmp_path / "run"
    marker = tmp_path / "saving"
    env = worker_env(cache=Path(tiny_model_path).parent)
    proc = subprocess.Popen(python("save_kill_worker.py", RECIPE, out, marker),
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert proc.poll() is None, f"the worker exited early: {proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "the worker never reached the second save"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)  # in the middle of writing checkpoint-2: weights and optimizer are on disk
    finally:
        proc.kill()
        proc.wait()
    # checkpoint-1 is whole; checkpoint-2 never appeared under its name (save_total_limit=1 deleted nothing)
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-1")
    assert (out / "checkpoint-1" / "trainer_state.json").is_file()
    assert (out / "checkpoint-1" / "rlvr_entropy_state.json").is_file()
    assert not (out / "checkpoint-2").exists()
    assert (out / ".checkpoint-staging" / "checkpoint-2" / "model.safetensors").is_file()  # the half-written one

    # Restarting the same command resumes from checkpoint-1 and ends where a run that never died ends.
    args = ["per_device_train_batch_size=16", "steps_per_generation=1", "num_generations=4", "data.num_prompts=64",
            "max_steps=3", "save_strategy=steps", "save_steps=1", "save_total_limit=1"]
    train(load_recipe(RECIPE, [*args, f"output_dir={out}", "resume_from_checkpoint=last"]))
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-3")
    assert not (out / "checkpoint-1").exists() and not (out / ".checkpoint-staging" / "checkpoint-2").exists()
    never_died = tmp_path / "never_died"
    train(load_recipe(RECIPE, [*args, f"output_dir={never_died}"]))
    assert_same_weights(never_died, out)
    assert step_rows(out) == step_rows(never_died)


def test_resume_from_last_without_a_checkpoint_starts_afresh(tiny_model_path, tmp_path):
    out = tmp_path / "fresh"
    trainer = train(load_recipe(RECIPE, ["per_device_train_batch_size=8", "steps_per_generation=1", "num_generations=4",
                                         "max_steps=1", f"output_dir={out}", "resume_from_checkpoint=last",
                                         "reward_sandbox=none"]))
    assert trainer.state.global_step == 1


def test_epoch_order_depends_only_on_seed_and_epoch():
    """TRL's sampler continues one generator across epochs; ours gives the same orders, and the same order
    for epoch e from a fresh sampler told its epoch (what a resumed run builds)."""
    data = list(range(10))
    kwargs = dict(mini_repeat_count=2, batch_size=3, repeat_count=2, shuffle=True, seed=7)
    trl_sampler, ours = RepeatSampler(data, **kwargs), EpochRepeatSampler(data, **kwargs)
    orders = [list(trl_sampler) for _ in range(4)]
    assert [list(ours) for _ in range(4)] == orders
    assert len({tuple(o) for o in orders}) == 4
    fresh = EpochRepeatSampler(data, **kwargs)
    fresh.set_epoch(2)
    assert list(fresh) == orders[2] and list(fresh) == orders[3]


def test_metrics_after_the_checkpoint_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1}\n{"step": 2, "loss": 2}\n{"step": 3, "loss": 3}\n{"step": 3, "lo')
    assert truncate_metrics(str(path), 2) == 2
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]


def test_publishing_replaces_an_older_copy_of_the_same_step(tmp_path):
    staged, final = tmp_path / ".checkpoint-staging" / "checkpoint-4", tmp_path / "checkpoint-4"
    staged.mkdir(parents=True)
    final.mkdir()
    (staged / "new").write_text("new")
    (final / "old").write_text("old")
    publish_checkpoint(str(staged), str(final))
    assert sorted(p.name for p in final.iterdir()) == ["new"] and not staged.exists()
