"""Sampling accuracy of a causal LM on a synthetic task, scored with the correctness reward."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from rlvr_entropy.tasks import completion_budget, correctness, make_dataset


@torch.no_grad()
def sample_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: str = "arithmetic",
    num_prompts: int = 128,
    temperature: float = 1.0,
    seed: int = 0,
    max_new_tokens: int | None = None,
    batch_size: int = 64,
    split: str = "eval",
) -> float:
    """Fraction of ``num_prompts`` task prompts whose sampled completion is correct.

    ``temperature <= 0`` means greedy decoding. Prompts come from the held-out ``split="eval"`` by
    default; ``max_new_tokens`` defaults to the task's ``completion_budget`` (8 for the bare-answer
    tasks, 48 for ``arithmetic_think``, whose completions think before they answer). Sampling uses its
    own seeded RNG (``torch.random.fork_rng``) so that calling this in the middle of training neither
    depends on nor disturbs the global random state.
    """
    dataset = make_dataset(task, num_prompts, seed=seed, split=split)
    if max_new_tokens is None:
        max_new_tokens = completion_budget(task)
    was_training = model.training
    model.eval()
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    decoding = sampling if temperature > 0 else {"do_sample": False}
    rewards: list[float | None] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, num_prompts, batch_size):
            batch = dataset[start : start + batch_size]
            inputs = tokenizer(batch["prompt"], return_tensors="pt", padding=True).to(model.device)
            # output: (batch, prompt_len + generated_len); left padding puts every prompt's end at prompt_len
            output = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                **decoding,
            )
            completions = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            rewards += correctness(batch["prompt"], completions, answer=batch["answer"])
    model.train(was_training)
    return sum(r or 0.0 for r in rewards) / len(rewards)


def evaluate_accuracy(
    model_path: str | Path,
    task: str = "arithmetic",
    num_prompts: int = 128,
    temperature: float = 1.0,
    seed: int = 0,
    max_new_tokens: int | None = None,
) -> float:
    """Load a saved model + tokenizer from ``model_path`` and return its sampling accuracy on ``task``.

    See sample_accuracy; ``temperature=1.0`` measures the policy GRPO starts from.
    """
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    return sample_accuracy(model, tokenizer, task, num_prompts, temperature, seed, max_new_tokens)
