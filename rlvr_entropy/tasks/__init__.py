"""Synthetic verifiable tasks and their reward functions."""

from rlvr_entropy.tasks.arithmetic import TASKS, completion_budget, make_dataset, make_sft_dataset, problem_split
from rlvr_entropy.tasks.rewards import (
    REWARDS,
    answers_match,
    correctness,
    extract_answer,
    format_reward,
    get_reward,
)

__all__ = [
    "REWARDS",
    "TASKS",
    "answers_match",
    "completion_budget",
    "correctness",
    "extract_answer",
    "format_reward",
    "get_reward",
    "make_dataset",
    "make_sft_dataset",
    "problem_split",
]
