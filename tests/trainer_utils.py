"""Helpers shared by the trainer tests: a random tiny model on disk, CPU arguments, prompt rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import set_seed

from rlvr_entropy.tasks import make_dataset
from rlvr_entropy.tiny import TinyModelSettings, build_char_tokenizer, make_tiny_model


def save_random_model(directory: Path, seed: int = 0) -> Path:
    """A randomly initialised tiny Qwen2 + char tokenizer saved to ``directory`` (no warm start)."""
    set_seed(seed)
    tokenizer = build_char_tokenizer()
    model = make_tiny_model(tokenizer, TinyModelSettings())
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def cpu_args(output_dir: Path | str, **overrides: Any) -> dict[str, Any]:
    """GRPOConfig keyword arguments for fast, deterministic CPU runs."""
    args = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=8,
        max_steps=2,
        logging_steps=1,
        learning_rate=1e-3,
        report_to="none",
        save_strategy="no",
        seed=0,
        dataloader_num_workers=0,
    )
    args.update(overrides)
    return args


def prompt_rows(num_prompts: int, group_size: int, seed: int = 0) -> list[dict[str, Any]]:
    """Dataset rows repeated ``group_size`` times each, as TRL's sampler hands them to the trainer."""
    dataset = make_dataset("arithmetic", num_prompts, seed)
    return [dict(dataset[i]) for i in range(num_prompts) for _ in range(group_size)]


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
