"""CANON: split each prompt's responses into a high and a low half by a metric; let the data decide which half to push.

Reference: Chen et al. 2025, "CANON: Conditional advANtage estimatiON" (arXiv 2509.23962, ICLR 2026).
Per prompt group (rewards R, metric m = mean behaviour-policy token entropy, or length):
1. stable ascending sort by m (ties keep batch order); the first n//2 are the low half C-, the rest
   (one more when n is odd) the high half C+; mu+ / mu- are the halves' mean rewards;
2. inter-group advantage: R - mu_other; intra-group: R - mu_own;
   Eq. 8 with ``alpha`` on the group named by ``alpha_group`` ("high", the paper and the length code:
   C+ gets alpha*R - mu- + beta, C- gets R - alpha*mu+ - beta; "low", the entropy code path:
   C+ gets R - alpha*mu- + beta, C- gets alpha*R - mu+ - beta);
3. A = mu * inter + (1 - mu) * intra (the paper's mu is the code's ``_lambda``). mu = 0.5 with
   alpha = 1 gives R - (mu+ + mu-)/2, i.e. Dr.GRPO's advantages for even group sizes.
Schedules for mu ("CANON-Dynamic"): ``accuracy`` mu = mean reward of the batch (intra-heavy early,
inter-heavy later; the code's intra weight is 1 - mean R); ``cosine_restart`` mu = 1 - c(step) with
c warming up linearly to 0.6 over ``warmup_steps`` then cosine-decaying 0.6 -> 0 over ``cycles``
equal cycles ending at ``total_steps`` (and repeating after it); ``cosine_restart_r`` mu = c'(step),
the same shape from 1 to 0.4.
Reference impl: biuboomc/CANON ``compute_dr_entropy_per_token_group_outcome_advantage``,
``compute_dr_length_on_mean_group_outcome_advantage`` and the ``_annel`` / ``_cosine_restart(_r)``
variants (verl/trainer/ppo/core_algos.py).

Deviations: no division by ``max_response_length`` here: the reference does it for its
seq-mean-token-sum loss, which is TRL's ``loss_type: dr_grpo`` (its normaliser divides by
max_completion_length); the recipes set that. Advantages are recomputed from the rewards (CANON
replaces GRPO's estimator), so methods listed before CANON that rescale advantages are overridden;
reward hooks before it are not. A completion without any reward (NaN) gets advantage 0, as in TRL.
A group of one has both means 0.

Formulas, defaults and the worked examples the tests use: ``docs/methods.md`` §5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from rlvr_entropy.methods.base import Method, MethodConfigError, RolloutBatch, register


def split_halves(metric: Tensor, group: Tensor, group_size: int) -> Tensor:
    """(N,) bool, True for the high half of each group: rank >= n // 2 after a stable sort by metric."""
    by_metric = torch.sort(metric, stable=True).indices
    order = by_metric[torch.sort(group[by_metric], stable=True).indices]  # group-major, metric-minor, stable
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order)) - group[order] * group_size
    return rank >= group_size // 2


def canon_advantages(
    rewards: Tensor, high: Tensor, group: Tensor, mu: float, alpha: float = 1.0,
    alpha_group: Literal["high", "low"] = "high", beta: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """CANON advantages (N,) and the per-group means, from rewards (N,) and the half split.

    NaN rewards are left out of the means and get advantage 0.
    """
    n_groups = int(group.max()) + 1
    scored = ~torch.isnan(rewards)
    r = torch.where(scored, rewards, torch.zeros_like(rewards)).double()

    def half_mean(side: Tensor) -> Tensor:
        members = (side & scored).double()
        total = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, group, r * members)
        count = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, group, members)
        return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))  # empty half -> 0

    mu_high, mu_low = half_mean(high)[group], half_mean(~high)[group]  # (N,)
    if alpha_group == "high":  # Eq. 8: C+ weighs its own reward by alpha, C- the other half's mean
        inter = torch.where(high, alpha * r - mu_low + beta, r - alpha * mu_high - beta)
    else:  # the reference's entropy code path
        inter = torch.where(high, r - alpha * mu_low + beta, alpha * r - mu_high - beta)
    intra = torch.where(high, r - mu_high, r - mu_low)
    adv = (mu * inter + (1 - mu) * intra).masked_fill(~scored, 0.0)
    return adv.float(), {"inter": inter.float(), "intra": intra.float(),
                         "mu_high": half_mean(high).float(), "mu_low": half_mean(~high).float()}


def cosine_restart(step: int, total: int, warmup: int, cycles: int, high: float, low: float) -> float:
    """Linear warm-up to ``high``, then ``cycles`` cosine decays high -> low up to ``total``, repeating."""
    if step < warmup:
        return high * (step + 1) / warmup
    length = max((total - warmup) / cycles, 1.0)
    pos = ((step - warmup) % length) / length
    return low + (high - low) * 0.5 * (1 + math.cos(math.pi * pos))


@register("canon")
@dataclass
class Canon(Method):
    """CANON: inter/intra-group advantages over a high and a low half of each group by entropy or length."""

    metric: Literal["entropy", "length"] = "entropy"
    mu: float = 1.0  # weight of the inter-group advantage (1 = CANON-Inter, 0 = CANON-Intra)
    alpha: float = 1.0  # Eq. 8 (the paper uses 0.9 with the length metric)
    alpha_group: Literal["high", "low"] = "high"  # the half whose own reward is multiplied by alpha
    beta: float = 0.0  # the reference code's offset on the inter term
    schedule: Literal["none", "accuracy", "cosine_restart", "cosine_restart_r"] = "none"
    warmup_steps: int = 30
    total_steps: int = 150
    cycles: int = 3

    def validate(self) -> None:
        if not 0.0 <= self.mu <= 1.0:
            raise MethodConfigError(f"canon.mu must be in [0, 1], got {self.mu}")
        if self.warmup_steps < 1 or self.cycles < 1 or self.total_steps <= self.warmup_steps:
            raise MethodConfigError("canon needs warmup_steps >= 1, cycles >= 1 and total_steps > warmup_steps")

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({"entropy"}) if self.metric == "entropy" else frozenset()

    def current_mu(self, batch: RolloutBatch, rewards: Tensor) -> float:
        if self.schedule == "accuracy":
            valid = rewards[~torch.isnan(rewards)]
            return float(valid.mean().clamp(0.0, 1.0)) if valid.numel() else self.mu
        if self.schedule == "cosine_restart":
            return 1.0 - cosine_restart(batch.step, self.total_steps, self.warmup_steps, self.cycles, 0.6, 0.0)
        if self.schedule == "cosine_restart_r":
            return cosine_restart(batch.step, self.total_steps, self.warmup_steps, self.cycles, 1.0, 0.4)
        return self.mu

    def advantage(self, advantages: Tensor, batch: RolloutBatch) -> Tensor:
        rewards = batch.total_rewards().cpu()
        metric = (batch.mean_entropy() if self.metric == "entropy" else batch.lengths).cpu()
        group = batch.group_ids.cpu()
        high = split_halves(metric, group, batch.group_size)
        mu = self.current_mu(batch, rewards)
        adv, parts = canon_advantages(rewards, high, group, mu, self.alpha, self.alpha_group, self.beta)
        batch.log("mu", mu)
        batch.log("high_won", (parts["mu_high"] > parts["mu_low"]).float().mean())
        moving = (parts["inter"] != 0) | (parts["intra"] != 0)
        agree = torch.sign(parts["inter"]) == torch.sign(parts["intra"])
        if bool(moving.any()):
            batch.log("agreement", agree[moving].float().mean())
        return adv.to(advantages.device)
