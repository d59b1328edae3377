"""Synthetic arithmetic tasks with exactly checkable answers.

These are the "tiny world" used by the quickstart and the tests: prompts are plain text such as
``"23+58="`` and the reference answer is the integer result as a string (``"81"``). They are small
enough for a ~1M-parameter character-level model to learn, which makes RLVR runs possible on a CPU
without downloading anything.

Train/eval split convention: every problem belongs to exactly one split, decided by a stable hash
of its prompt text (about 1 in 10 problems is held out for ``split="eval"``). So ``make_dataset(...,
split="eval")`` never contains a prompt that ``split="train"`` (or ``make_sft_dataset``) can produce,
whatever the seeds; the seed only chooses which problems of that split are drawn.

``arithmetic_think``: the problems of ``arithmetic`` (same prompts for the same seed, same split) with a
thinking phase before the answer, for methods that act on it (PEAR splits each response at the first
``</think>``). SFT completions are ``<thinking></think><answer>`` with the bare integer answer after the
marker, for example::

    47+38=  ->  47+30=77 77+8=85</think>85           add the tens of the second operand, then its ones
    47-38=  ->  47-30=17 17-8=9 47-38=9</think>9     ... and sometimes restate the problem with its result
    47+38=  ->  </think>85                           no thinking at all
    38+7=   ->  38+7=45</think>45                    one step when the second operand has one nonzero digit

The thinking part varies in length on purpose: empty (1 in 4), the one- or two-step decomposition
(1 in 2), or the decomposition followed by a redundant restatement (1 in 4), drawn independently for
each SFT example. The warm-started model thus samples every length for the same prompt, so an RL method
that rewards shorter (or longer) thinking has something to select from, and the decomposition makes the
answer easier to get right than answering at once, so thinking is not free to drop. Every completion fits
in ``completion_budget("arithmetic_think")`` characters. The reward reads only the text after the marker
(``rlvr_entropy.tasks.rewards.extract_answer``), so numbers in the thinking never count as the answer.

``split``: write a number as a sum of two non-negative integers (``57=?+?`` -> ``23+34``). Unlike the
other tasks it has many right answers per prompt (any split), so a policy can stay uncertain and still
be right: entropy collapse shows as mode collapse onto a few splits (``57+0`` is always right), and
entropy-control methods have room to hold entropy without losing reward. The warm start writes a
uniformly random split; the reference answer is the number itself, and ``correctness`` accepts any
expression equal to it (math-verify evaluates ``23+34``).
"""

from __future__ import annotations

import difflib
import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from datasets import Dataset

from rlvr_entropy.tasks.rewards import THINK_MARKER

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


def _split_problem(rng: random.Random) -> tuple[str, str]:
    """A number 10..59 to write as a sum of two non-negative integers (small enough for the tiny model
    to learn the subtraction that picks the second term: about half its warm-start splits are right)."""
    n = rng.randint(10, 59)
    return f"{n}=?+?", str(n)


def _split_completion(prompt: str, answer: str, rng: random.Random) -> str:
    """A uniformly random split ``a+b`` of the number: every right answer equally likely in the warm start."""
    n = int(answer)
    a = rng.randint(0, n)
    return f"{a}+{n - a}"


# Probabilities of the three thinking forms of arithmetic_think (see the module docstring).
THINK_EMPTY_PROBABILITY = 0.25
THINK_RESTATE_PROBABILITY = 0.25


def _decomposition(prompt: str) -> str:
    """Step-by-step working for a two-operand prompt ``"a+b="`` / ``"a-b="``: tens of b first, then its ones.

    ``47+38=`` gives ``47+30=77 77+8=85``. Each step changes one digit place of a running total, which is
    easier for a tiny model than the whole sum at once. When b has a single nonzero digit (``38+7=``,
    ``47+30=``) the one step is the problem itself.
    """
    op = "+" if "+" in prompt else "-"
    a, b = (int(x) for x in prompt.rstrip("=").split(op))
    sign = 1 if op == "+" else -1
    tens, ones = b - b % 10, b % 10
    if tens and ones:
        middle = a + sign * tens
        return f"{a}{op}{tens}={middle} {middle}{op}{ones}={middle + sign * ones}"
    return f"{a}{op}{b}={a + sign * b}"


def _think_completion(prompt: str, answer: str, rng: random.Random) -> str:
    """An SFT completion of arithmetic_think: thinking of a random form (empty, steps, steps + restatement),
    the marker, then the bare answer."""
    draw = rng.random()
    if draw < THINK_EMPTY_PROBABILITY:
        thinking = ""
    elif draw < THINK_EMPTY_PROBABILITY + THINK_RESTATE_PROBABILITY:
        thinking = f"{_decomposition(prompt)} {prompt}{answer}"
    else:
        thinking = _decomposition(prompt)
    return f"{thinking}{THINK_MARKER}{answer}"


def _bare_answer(prompt: str, answer: str, rng: random.Random) -> str:
    return answer


# Writes the SFT completion of one problem; ``rng`` is for tasks whose completions vary in form.
CompletionWriter = Callable[[str, str, random.Random], str]


@dataclass(frozen=True)
class Task:
    """A synthetic task: how its problems are drawn and how its warm-start completions are written."""

    generate: ProblemGenerator
    write_completion: CompletionWriter = _bare_answer
    # Longest SFT completion in characters (one token each for the tiny tokenizer), EOS not included.
    max_completion_chars: int = 4
    # Name of the random stream the problems are drawn from: tasks sharing it pose the same problems.
    problem_stream: str | None = None


TASKS: dict[str, Task] = {
    "arithmetic": Task(_add_sub, max_completion_chars=3),  # results 0..198
    "arithmetic_hard": Task(_three_operands, max_completion_chars=4),  # results -198..297
    # Longest: "99+90=189 189+9=198 99+99=198</think>198" (40 characters).
    "arithmetic_think": Task(_add_sub, _think_completion, max_completion_chars=40, problem_stream="arithmetic"),
    # Longest: "10+49" and the like (5 characters for n <= 59).
    "split": Task(_split_problem, _split_completion, max_completion_chars=5),
}


def _get_task(task: str) -> Task:
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
    spec = _get_task(task)
    # Mixing task and stream names into the seed keeps their random streams independent; a task that
    # names another's problem stream draws exactly that task's problems.
    rng = random.Random(f"{spec.problem_stream or task}:{stream}:{seed}")
    problems: list[tuple[str, str]] = []
    while len(problems) < n:
        prompt, answer = spec.generate(rng)
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
    """Supervised warm-start examples: columns ``prompt`` and ``completion``.

    The completion is the bare answer, or for ``arithmetic_think`` thinking + ``</think>`` + the answer.
    The EOS token is not included; TRL's ``SFTTrainer`` appends it to non-conversational completions,
    which is how the warm-started model learns to stop right after the answer. Examples come from the
    train split only, so held-out eval prompts stay unseen.
    """
    spec = _get_task(task)
    problems = _sample_problems(task, num_examples, seed, "train", stream="sft")
    # The completion forms come from their own stream, so the problems stay those of the shared stream.
    rng = random.Random(f"{task}:sft-completions:{seed}")
    completions = [spec.write_completion(prompt, answer, rng) for prompt, answer in problems]
    return Dataset.from_dict({"prompt": [p for p, _ in problems], "completion": completions})


def completion_budget(task: str) -> int:
    """Generation budget in tokens of the tiny character tokenizer for ``task``: its longest warm-start
    completion plus EOS, rounded up to a multiple of 8 (so 8 for the bare-answer tasks, 48 for
    ``arithmetic_think``). A policy that writes more than that is cut off and scored as it stands."""
    needed = _get_task(task).max_completion_chars + 1
    return -(-needed // 8) * 8
