"""Synthetic arithmetic tasks with exactly checkable answers.

These are the "tiny world" used by the quickstart and the tests: prompts are plain text such as
``"23+58="`` and the reference answer is the integer result as a string (``"81"``). They are small
enough for a ~1M-parameter character-level model to learn, which makes RLVR runs possible on a CPU
without downloading anything.

Train/eval split convention: every problem belongs to exactly one split, decided by a stable hash
of its prompt text (about 1 in 10 problems is held out for ``split="eval"``). So ``make_dataset(...,
split="eval")`` never contains a prompt that ``split="train"`` (or ``make_sft_dataset``) can produce,
whatever the seeds; the seed only chooses which problems of that split are drawn.
"""

from __future__ import annotations

import difflib
import hashlib
import random
from collections.abc import Callable
from typing import Literal

from datasets import Dataset

Split = Literal["train", "eval"]
# A problem generator draws one (prompt, answer) pair from the given random stream.
ProblemGenerator = Callable[[random.Random], tuple[str, str]]

# One problem in EVAL_FRACTION_DENOMINATOR is held out for evaluation.
EVAL_FRACTION_DENOMINATOR = 10


def _operand(rng: random.Random) -> int:
    """A one-digit (0..9) or two-digit (10..99) number, each with probability 1/2.

    The mix of lengths gives the task a spread of difficulties: a tiny model masters one-digit facts
    quickly and two-digit carries slowly, so a warm-started policy is right on some prompts and wrong
    on others, which is what gives GRPO groups with mixed rewards.
    """
    return rng.randint(0, 9) if rng.random() < 0.5 else rng.randint(10, 99)


def _add_sub(rng: random.Random) -> tuple[str, str]:
    """Two-operand addition or subtraction with operands in 0..99 (see _operand).

    Subtraction puts the larger operand first so answers are never negative: this keeps the task
    learnable by a tiny model (results are 0..198, at most three digits, no sign).
    """
    a, b = _operand(rng), _operand(rng)
    if rng.random() < 0.5:
        return f"{a}+{b}=", str(a + b)
    a, b = max(a, b), min(a, b)
    return f"{a}-{b}=", str(a - b)


def _three_operands(rng: random.Random) -> tuple[str, str]:
    """Three operands in 0..99 joined by random ``+``/``-``; the result may be negative."""
    a, b, c = (rng.randint(0, 99) for _ in range(3))
    op1, op2 = rng.choice("+-"), rng.choice("+-")
    result = a + (b if op1 == "+" else -b)
    result = result + (c if op2 == "+" else -c)
    return f"{a}{op1}{b}{op2}{c}=", str(result)


TASKS: dict[str, ProblemGenerator] = {
    "arithmetic": _add_sub,
    "arithmetic_hard": _three_operands,
}


def _get_task(task: str) -> ProblemGenerator:
    if task in TASKS:
        return TASKS[task]
    close = difflib.get_close_matches(task, list(TASKS), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"Unknown task {task!r}; valid tasks: {sorted(TASKS)}.{hint}")


def problem_split(prompt: str) -> Split:
    """The split a problem belongs to, from a hash of its prompt (stable across runs and machines)."""
    digest = hashlib.sha256(prompt.encode()).digest()
    return "eval" if int.from_bytes(digest[:4], "big") % EVAL_FRACTION_DENOMINATOR == 0 else "train"


def _sample_problems(task: str, n: int, seed: int, split: Split, stream: str) -> list[tuple[str, str]]:
    """Draw ``n`` problems of ``split`` (with replacement) by rejection sampling from the task generator.

    ``stream`` names the consumer ("rl" or "sft") so that the same seed gives different problems to the
    warm start and to RL, instead of RL starting on exactly the prompts the model was fitted on.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    generate = _get_task(task)
    # Mixing task and stream names into the seed keeps their random streams independent.
    rng = random.Random(f"{task}:{stream}:{seed}")
    problems: list[tuple[str, str]] = []
    while len(problems) < n:
        prompt, answer = generate(rng)
        if problem_split(prompt) == split:
            problems.append((prompt, answer))
    return problems


def make_dataset(task: str, num_prompts: int, seed: int, split: Split = "train") -> Dataset:
    """RL prompts for ``task``: columns ``prompt`` (plain text, not chat format) and ``answer``.

    Deterministic for a given ``(task, num_prompts, seed, split)``. Use ``split="eval"`` for held-out
    evaluation prompts (disjoint from the train split, see the module docstring).
    """
    problems = _sample_problems(task, num_prompts, seed, split, stream="rl")
    return Dataset.from_dict({"prompt": [p for p, _ in problems], "answer": [a for _, a in problems]})


def make_sft_dataset(task: str, num_examples: int, seed: int) -> Dataset:
    """Supervised warm-start examples: columns ``prompt`` and ``completion`` (the bare answer).

    The EOS token is not included; TRL's ``SFTTrainer`` appends it to non-conversational completions,
    which is how the warm-started model learns to stop right after the answer. Examples come from the
    train split only, so held-out eval prompts stay unseen.
    """
    problems = _sample_problems(task, num_examples, seed, "train", stream="sft")
    return Dataset.from_dict({"prompt": [p for p, _ in problems], "completion": [a for _, a in problems]})
