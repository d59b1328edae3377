"""Synthetic tasks: columns, determinism, correct answers and a disjoint train/eval split."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from rlvr_entropy.tasks import TASKS, completion_budget, correctness, make_dataset, make_sft_dataset, problem_split
from rlvr_entropy.tasks.arithmetic import _decomposition


def evaluate_prompt(prompt: str) -> int:
    """Independent check of a task prompt such as ``"12+7-30="``: sum the signed integer terms.
    A ``split`` prompt ``"57=?+?"`` asks for a sum equal to its number."""
    if prompt.endswith("=?+?"):
        return int(prompt[: -len("=?+?")])
    assert prompt.endswith("=")
    terms = re.findall(r"[+-]?\d+", prompt[:-1])
    assert "".join(terms) == prompt[:-1], f"unexpected prompt shape {prompt!r}"
    return sum(int(term) for term in terms)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_columns_and_answers_are_correct(task):
    dataset = make_dataset(task, 200, seed=0)
    assert dataset.column_names == ["prompt", "answer"]
    assert len(dataset) == 200
    for row in dataset:
        assert isinstance(row["prompt"], str) and isinstance(row["answer"], str)
        assert row["answer"] == str(evaluate_prompt(row["prompt"]))


@pytest.mark.parametrize("task", sorted(TASKS))
def test_deterministic_for_a_seed(task):
    assert make_dataset(task, 50, seed=3)[:] == make_dataset(task, 50, seed=3)[:]
    assert make_dataset(task, 50, seed=3)["prompt"] != make_dataset(task, 50, seed=4)["prompt"]


def test_arithmetic_shapes():
    easy = make_dataset("arithmetic", 500, seed=0)
    assert all(len(re.findall(r"\d+", p)) == 2 for p in easy["prompt"])
    assert all(int(a) >= 0 for a in easy["answer"]), "subtraction keeps answers non-negative"
    operands = [int(n) for p in easy["prompt"] for n in re.findall(r"\d+", p)]
    assert min(operands) >= 0 and max(operands) <= 99
    # Both one- and two-digit operands occur, giving a spread of difficulties.
    assert any(n < 10 for n in operands) and any(n >= 10 for n in operands)
    hard = make_dataset("arithmetic_hard", 500, seed=0)
    assert all(len(re.findall(r"\d+", p)) == 3 for p in hard["prompt"])
    assert any(int(a) < 0 for a in hard["answer"])


@pytest.mark.parametrize("task", sorted(TASKS))
def test_train_and_eval_splits_are_disjoint(task):
    train = set(make_dataset(task, 2000, seed=0, split="train")["prompt"])
    held_out = set(make_dataset(task, 300, seed=0, split="eval")["prompt"])
    assert not train & held_out
    assert {problem_split(p) for p in held_out} == {"eval"}
    assert not held_out & set(make_sft_dataset(task, 2000, seed=0)["prompt"])


def test_sft_dataset():
    sft = make_sft_dataset("arithmetic", 100, seed=0)
    assert sft.column_names == ["prompt", "completion"]
    assert all(c == str(evaluate_prompt(p)) for p, c in zip(sft["prompt"], sft["completion"], strict=True))
    assert sft["prompt"] != make_dataset("arithmetic", 100, seed=0)["prompt"], "SFT and RL draw different streams"


def test_unknown_task_lists_valid_names():
    with pytest.raises(ValueError, match="arithmetic_hard") as error:
        make_dataset("arithmetc", 4, seed=0)
    assert "Did you mean 'arithmetic'" in str(error.value)
    with pytest.raises(ValueError, match="split"):
        make_dataset("arithmetic", 4, seed=0, split="test")


def test_think_task_poses_the_problems_of_arithmetic():
    assert make_dataset("arithmetic_think", 100, seed=0)[:] == make_dataset("arithmetic", 100, seed=0)[:]
    assert make_dataset("arithmetic_think", 50, seed=1, split="eval")[:] == make_dataset("arithmetic", 50, seed=1, split="eval")[:]
    think_sft, bare_sft = make_sft_dataset("arithmetic_think", 200, seed=0), make_sft_dataset("arithmetic", 200, seed=0)
    assert think_sft["prompt"] == bare_sft["prompt"], "the two warm starts see the same problems"
    assert think_sft["completion"] != bare_sft["completion"]


def check_step(step: str) -> None:
    """One thinking step ``"a+b=c"`` / ``"a-b=c"`` is true arithmetic."""
    left, _, result = step.partition("=")
    assert re.fullmatch(r"\d+[+-]\d+", left) and re.fullmatch(r"\d+", result), step
    assert evaluate_prompt(left + "=") == int(result), step


def test_think_sft_completions_think_then_answer_after_the_marker():
    sft = make_sft_dataset("arithmetic_think", 2000, seed=0)
    budget = completion_budget("arithmetic_think")
    thinking_lengths = []
    for prompt, completion in zip(sft["prompt"], sft["completion"], strict=True):
        assert completion.count("</think>") == 1, completion
        thinking, answer = completion.split("</think>")
        assert answer == str(evaluate_prompt(prompt)), (prompt, completion)
        assert len(completion) <= TASKS["arithmetic_think"].max_completion_chars and len(completion) + 1 <= budget
        steps = thinking.split(" ") if thinking else []
        for step in steps:
            check_step(step)
        if steps:
            assert steps[-1].endswith(f"={answer}"), "the thinking ends at the answer"
        # the answer the reward reads is the one after the marker
        assert correctness([prompt], [completion], answer=[answer]) == [1.0]
        thinking_lengths.append(len(thinking))
    counts = Counter(thinking_lengths)
    # Thinking length varies for RL to act on: empty about 1 in 4, and many non-empty lengths.
    assert 0.18 < counts[0] / len(thinking_lengths) < 0.32
    assert len(counts) >= 8 and max(counts) >= 25
    # Restated problems occur (the prompt itself, with its result, as the last step).
    assert any(f" {p}" in c for p, c in zip(sft["prompt"], sft["completion"], strict=True))


def test_think_decomposition_covers_every_problem():
    """Every problem of the task (operands 0..99) decomposes into true steps within the length budget."""
    longest = 0
    for a in range(100):
        for b in range(100):
            for prompt in (f"{a}+{b}=", f"{max(a, b)}-{min(a, b)}="):
                answer = str(evaluate_prompt(prompt))
                steps = _decomposition(prompt).split(" ")
                assert 1 <= len(steps) <= 2 and steps[-1].endswith(f"={answer}"), (prompt, steps)
                for step in steps:
                    check_step(step)
                longest = max(longest, len(f"{' '.join(steps)} {prompt}{answer}</think>{answer}"))
    assert longest == TASKS["arithmetic_think"].max_completion_chars


def test_completion_budget():
    assert completion_budget("arithmetic") == completion_budget("arithmetic_hard") == 8
    assert completion_budget("arithmetic_think") == 48
    for task in TASKS:
        longest = max(len(c) for c in make_sft_dataset(task, 500, seed=0)["completion"])
        assert longest + 1 <= completion_budget(task), task  # room for <eos>


def test_split_has_many_right_answers_and_the_warm_start_shows_them():
    rl = make_dataset("split", 300, seed=0)
    assert all(10 <= int(a) <= 59 for a in rl["answer"])
    sft = make_sft_dataset("split", 2000, seed=0)
    by_prompt: dict[str, set[str]] = {}
    for prompt, completion in zip(sft["prompt"], sft["completion"], strict=True):
        a, b = (int(x) for x in re.fullmatch(r"(\d+)\+(\d+)", completion).groups())
        assert a + b == evaluate_prompt(prompt) and len(completion) <= TASKS["split"].max_completion_chars
        by_prompt.setdefault(prompt, set()).add(completion)
    assert max(len(v) for v in by_prompt.values()) >= 10  # one prompt, many different right splits
    # any split is right, whatever its form; a wrong sum is not
    assert correctness(["57=?+?"] * 4, ["23+34", "0+57", "57+0", "23+33"], answer=["57"] * 4) == [1.0, 1.0, 1.0, 0.0]
