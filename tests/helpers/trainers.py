"""Trainer builders: a random tiny model on disk, CPU arguments, prompt rows, a trainer with methods, one
generation batch and one loss with its gradients."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, set_seed

from rlvr_entropy import EntropyGRPOConfig, EntropyGRPOTrainer
from rlvr_entropy.tasks import make_dataset
from rlvr_entropy.tasks.rewards import correctness
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


def partial_credit(prompts, completions, **kwargs):
    """A dense reward so every group has non-zero variance (random models rarely answer right)."""
    return [float(len(c) % 3) + float(c.strip() == a) for c, a in zip(completions, kwargs["answer"], strict=True)]


def build(model_dir, tmp_path, methods, **overrides) -> EntropyGRPOTrainer:
    """An EntropyGRPOTrainer on the random tiny model with ``methods``, in training mode (seeded)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    set_seed(0)
    trainer = EntropyGRPOTrainer(
        model=str(model_dir),
        reward_funcs=[correctness, partial_credit],
        args=EntropyGRPOConfig(**cpu_args(tmp_path, methods=methods, **overrides)),
        train_dataset=make_dataset("arithmetic", 16, 0),
        processing_class=tokenizer,
    )
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def generate(trainer, rows):
    """One generation batch through the trainer's ``_generate_and_score_completions`` (seeded)."""
    set_seed(123)
    return trainer._generate_and_score_completions([dict(r) for r in rows])


def loss_and_grads(trainer, inputs):
    """The trainer's loss on ``inputs`` and the gradients it leaves."""
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    return loss.detach(), grads(trainer.model)


def off_policy(trainer, out, noise: float = 0.3):
    """``out`` with old log-probs moved away from the current policy's (seeded noise): a later update of a rollout."""
    with torch.no_grad():
        ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
        attn = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
        logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attn, out["completion_ids"].size(1))
    out["old_per_token_logps"] = logps + noise * torch.randn(logps.shape, generator=torch.Generator().manual_seed(1))
    return out
