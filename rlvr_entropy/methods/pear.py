"""PEAR: for correct responses, penalise a thinking phase more uncertain than the answer phase.

Reference: Huang, Lu, Zhang 2025, "PEAR: Phase Entropy Aware Reward for Efficient Reasoning",
arXiv 2510.08026 (ICLR 2026). With H_t the behaviour policy's token entropy and the thinking phase
ending at the first thinking-end marker (``</think>`` by default; a marker the tokenizer splits into
several tokens works, its tokens belong to neither phase):

    H_think = mean H_t before the marker,   H_answer = mean H_t after it
    P = max(0, H_think - alpha * H_answer)
    r = min(1, score - P) if the answer is correct, else format_score

A response without the marker: H_answer = 0 and H_think is the mean over all its tokens
(``missing_marker: all_tokens``, the spec's recommendation) or over all but the last
(``exclude_last``, the paper's formula read literally).
Reference impl: iNLP-Lab/PEAR ``entropy.py::compute_score`` (not readable here; the formula follows the
paper and its reviews, see docs/methods.md §6).

In this trainer PEAR reshapes the reward of one named reward function (``correct_from``, default
``correctness``; a value >= 0.5 means correct): that function's contribution is replaced by PEAR's
reward, and the other reward functions add up as before. The entropies are those of the rollout
(read from generation, no extra pass).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from rlvr_entropy.methods.base import Method, MethodConfigError, RolloutBatch, register


def phase_entropies(
    entropy: Tensor, mask: Tensor, marker_start: Tensor, marker_length: int,
    missing: Literal["all_tokens", "exclude_last"] = "all_tokens",
) -> tuple[Tensor, Tensor]:
    """Mean token entropy of the thinking and answer phases of each response, (N,) each (0 when empty).

    Args:
        entropy: (N, T) behaviour-policy token entropy.
        mask: (N, T) 1 for real tokens.
        marker_start: (N,) position of the first marker token, -1 when the response has none.
    """
    valid = mask > 0
    pos = torch.arange(entropy.size(1), device=entropy.device).unsqueeze(0)  # (1, T)
    start = marker_start.unsqueeze(1)  # (N, 1)
    has = start >= 0
    think_with = valid & (pos < start)
    think_without = valid if missing == "all_tokens" else valid & (pos < valid.sum(1, keepdim=True) - 1)
    think = torch.where(has, think_with, think_without)
    answer = valid & has & (pos >= start + marker_length)

    def mean(selector: Tensor) -> Tensor:
        return (entropy * selector).sum(1) / selector.sum(1).clamp(min=1)

    return mean(think), mean(answer)


def pear_rewards(
    correct: Tensor, h_think: Tensor, h_answer: Tensor, alpha: float, score: float, format_score: float
) -> tuple[Tensor, Tensor]:
    """PEAR's reward (N,) and penalty (N,) from correctness (N,) bool and the phase entropies."""
    penalty = torch.clamp(h_think - alpha * h_answer, min=0.0)
    reward = torch.where(correct, torch.clamp(score - penalty, max=1.0), torch.full_like(penalty, format_score))
    return reward, penalty


@register("pear")
@dataclass
class Pear(Method):
    """PEAR: reward correct answers less when their thinking phase is more uncertain than their answer."""

    needs = frozenset({"entropy", "phases"})

    alpha: float = 1.0  # weight of the answer-phase entropy
    score: float = 1.0  # reward of a correct response before the penalty
    format_score: float = 0.0  # reward of a wrong response
    correct_from: str = "correctness"  # the reward function whose value (>= 0.5) means "correct"
    missing_marker: Literal["all_tokens", "exclude_last"] = "all_tokens"

    def reward_inputs(self) -> list[str]:
        return [self.correct_from]

    def validate(self) -> None:
        if self.score > 1.0:
            raise MethodConfigError(f"pear.score is capped at 1 by the formula min(1, score - P), got {self.score}")

    def reward(self, rewards: Tensor, batch: RolloutBatch) -> Tensor:
        if batch.entropy is None or batch.phases is None:
            raise RuntimeError("pear needs the 'entropy' and 'phases' rollout statistics")
        column = batch.reward_column(self.correct_from)  # (N,)
        weight = batch.reward_weights[batch.reward_names.index(self.correct_from)]
        h_think, h_answer = phase_entropies(batch.entropy, batch.mask, batch.phases, batch.marker_length,
                                            self.missing_marker)
        correct = torch.nan_to_num(column, nan=0.0) >= 0.5
        shaped, penalty = pear_rewards(correct, h_think, h_answer, self.alpha, self.score, self.format_score)
        # Replace the correctness function's contribution; rows it did not score keep their reward.
        out = torch.where(torch.isnan(column), rewards, rewards - weight * column + weight * shaped)
        has = batch.phases >= 0
        batch.log("think_entropy", h_think.mean())
        if bool(has.any()):
            batch.log("answer_entropy", h_answer[has].mean())
        if bool(correct.any()):
            batch.log("penalty", penalty[correct].mean())
        batch.log("missing_marker", (~has).float().mean())
        batch.log("length", batch.lengths.mean())
        return out
