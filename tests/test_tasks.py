"""Synthetic tasks: columns, determinism, correct answers and a disjoint train/eval split."""

from __future__ import annotations

import re

import pytest

from rlvr_entropy.tasks import TASKS, make_dataset, make_sft_dataset, problem_split


def evaluate_prompt(prompt: str) -> int:
    """Independent check of a task prompt such as ``"12+7-30="``: sum the signed integer terms."""
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
