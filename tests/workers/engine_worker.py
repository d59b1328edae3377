"""Train a recipe under whatever `accelerate launch` / torchrun set up (DDP, DeepSpeed ZeRO, FSDP2) and write the
final weights as one full state dict (``OUT/final_weights.pt``, main process), gathered from the engine's shards.

    accelerate launch --config_file CFG engine_worker.py RECIPE OUT [key=value ...]

With ``RLVR_TEST_FSDP_CPU=1`` the test-only FSDP shim (``fsdp_cpu_shim.py``) is installed first: accelerate
turns an FSDP config into FSDP on GPUs only, and these tests run on CPU processes. With ``RLVR_TEST_NAN_AT=STEP``
TRL's loss turns NaN on process 1 alone at that (0-based) global step, and every rank writes ``guard<rank>.json``:
a checksum of the parameters it holds after each step, and the run totals.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

if os.environ.get("RLVR_TEST_FSDP_CPU") == "1":
    import fsdp_cpu_shim

    fsdp_cpu_shim.install()

from helpers.processes import finish_worker  # noqa: E402  (tests/ is on PYTHONPATH)
from rlvr_entropy.config import load_recipe  # noqa: E402
from rlvr_entropy.runner import build_trainer  # noqa: E402


class FullWeights(TrainerCallback):
    """At the start: how the engine holds the parameters (``engine<rank>.json``: the prepared model's type, the
    elements this process holds and the full count); at the end: the full (gathered) state dict of the policy,
    saved by the main process."""

    def __init__(self, trainer, path: Path) -> None:
        self.trainer = trainer
        self.path = path

    def on_train_begin(self, args, state, control, **kwargs):
        model = self.trainer.model_wrapped
        local = full = 0
        for p in model.parameters():
            if hasattr(p, "ds_tensor"):  # ZeRO-3: this process's partition
                local, full = local + p.ds_tensor.numel(), full + p.ds_numel
            elif hasattr(p, "to_local"):  # FSDP2: a DTensor's shard
                local, full = local + p.to_local().numel(), full + p.numel()
            else:
                local, full = local + p.numel(), full + p.numel()
        rank = self.trainer.accelerator.process_index
        info = {"type": type(model).__name__, "local_elements": local, "full_elements": full,
                "distributed_type": str(self.trainer.accelerator.distributed_type.value)}
        (self.path.parent / f"engine{rank}.json").write_text(json.dumps(info))

    def on_train_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        weights = trainer.accelerator.get_state_dict(trainer.model_wrapped)  # collective under ZeRO-3 and FSDP
        if trainer.accelerator.is_main_process:
            torch.save({k: v.detach().float().cpu() for k, v in weights.items()}, self.path)


class Checksums(TrainerCallback):
    """After each optimizer step: the sum of the parameters this process holds (its shard under ZeRO-3/FSDP2)."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.sums: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        total = 0.0
        for p in self.trainer.model_wrapped.parameters():
            local = p.ds_tensor if hasattr(p, "ds_tensor") else p.to_local() if hasattr(p, "to_local") else p
            total += float(local.detach().double().sum())
        self.sums.append(total)


def nan_loss_on_process_1(step: int) -> None:
    from trl import GRPOTrainer

    original = GRPOTrainer._compute_loss

    def compute_loss(self, model, inputs):
        loss = original(self, model, inputs)
        bad = self.state.global_step == step and self.accelerator.process_index == 1
        return loss * float("nan") if bad else loss

    GRPOTrainer._compute_loss = compute_loss


def main() -> None:
    recipe_path, out, overrides = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    nan_at = os.environ.get("RLVR_TEST_NAN_AT")
    if nan_at is not None:
        nan_loss_on_process_1(int(nan_at))
    recipe = load_recipe(recipe_path, [f"output_dir={out}", *overrides])
    trainer = build_trainer(recipe)
    trainer.add_callback(FullWeights(trainer, out / "final_weights.pt"))
    checksums = Checksums(trainer)
    trainer.add_callback(checksums)
    trainer.train(resume_from_checkpoint=recipe.train.resume_from_checkpoint)
    if nan_at is not None:
        rank = trainer.accelerator.process_index
        (out / f"guard{rank}.json").write_text(json.dumps({"checksums": checksums.sums, "counters": trainer._counters}))
    finish_worker(trainer.accelerator)


if __name__ == "__main__":
    main()
