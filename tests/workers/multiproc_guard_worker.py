"""Run under torchrun: rank 1 alone produces an inf token weight at the 2nd step; a reward function raises on
additions on every rank. Each rank writes its parameter checksums per step and the run's counters."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

from helpers.processes import finish_worker  # noqa: E402  (tests/ is on PYTHONPATH)
from rlvr_entropy.config import load_recipe
from rlvr_entropy.runner import build_trainer


def raise_on_plus(prompts, completions, **kwargs):
    if any("+" in p for p in prompts):
        raise ValueError("cannot score an addition")
    return [0.25] * len(prompts)


class Checksums(TrainerCallback):
    def __init__(self) -> None:
        self.sums: list[float] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.sums.append(float(sum(p.detach().double().sum() for p in model.parameters())))


def main() -> None:
    recipe, out = sys.argv[1], Path(sys.argv[2])
    trainer = build_trainer(load_recipe(recipe, [
        "max_steps=3", "per_device_train_batch_size=8", "steps_per_generation=1", "num_generations=4",
        "learning_rate=1e-4", f"output_dir={out / 'run'}", "reward_timeout=5",
        "methods=[{name: helpers.guard_methods.InfWeight, rank: 1}]",
        "rewards=[correctness, multiproc_guard_worker.raise_on_plus]",
    ]))
    seen = {"plus": 0}
    original = trainer._calculate_rewards

    def count_plus(inputs, prompts, completions, completion_ids_list):
        seen["plus"] += sum("+" in p for p in prompts)  # this rank's samples that must fail
        return original(inputs, prompts, completions, completion_ids_list)

    trainer._calculate_rewards = count_plus
    checksums = Checksums()
    trainer.add_callback(checksums)
    trainer.train()
    rank = trainer.accelerator.process_index
    (out / f"rank{rank}.json").write_text(json.dumps(
        {"checksums": checksums.sums, "counters": trainer._counters, "expected_errors": seen["plus"]}))
    finish_worker(trainer.accelerator)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
