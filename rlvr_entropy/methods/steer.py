"""STEER: reweight tokens by their estimated entropy change, so no single step moves entropy much.

Reference: Hao et al. 2025, "STEER: Stabilizing Token-level Entropy-changE via Reweighting",
arXiv 2510.10150. Per token (no gradient), with x = pi(y_t) of the current policy, p_old = pi_old(y_t)
and H the behaviour policy's entropy at that position:

    Omega_t = (A_t / p_old) * x (1 - x) * (log x + H)          (non-finite -> 0)

- exp mapping (the paper's default): kappa = -ln(lambda_min) / max(max|Omega|, 0.02),
  w = clamp(exp(-kappa |Omega|), lambda_min, 1);
- linear mapping: w = clamp(lambda_max - (|Omega| - min|Omega|)(lambda_max - lambda_min) /
  (max|Omega| - min|Omega|), lambda_min, lambda_max), and (lambda_min + lambda_max) / 2 when all |Omega| are equal.

max/min over the valid tokens of the loss micro-batch (the reference scope, ``normalizer_scope: micro_batch``),
or over the same micro-step's micro-batches of all processes (``global``: one gather of two numbers; the
same weights on 1 and N processes). The weight multiplies the token's clipped policy-gradient term; the
normaliser still counts every valid token.
Reference impl: zz-haooo/STEER ``compute_token_weights`` (verl/trainer/ppo/core_algos.py).

Deviations: follows the official code where it differs from the paper (no clipping indicator in
Omega; the 0.02 floor on the exp normaliser); ``use_clip_indicator: true`` gives the paper's Omega,
which is 0 for tokens PPO clips. The reference's dual clip (clip_ratio_c = 10) is TRL's ``delta``
(for delta > 1 + epsilon_high it caps the ratio of negative-advantage tokens at delta and leaves the
rest unchanged); the paper recipe sets it.

Formulas, defaults and the worked examples the tests use: ``docs/methods.md`` §3.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from rlvr_entropy.methods.base import LossBatch, Method, MethodConfigError, TokenTerms, register

OMEGA_FLOOR = 0.02  # the official code's floor on max|Omega| (exp mapping): no up-weighting of noise


def steer_omega(logp: Tensor, old_logp: Tensor, adv: Tensor, entropy: Tensor) -> Tensor:
    """First-order estimate of each token's entropy change, (B, T), finite (non-finite -> 0)."""
    x = torch.exp(logp.detach().float()).clamp(1e-8, 1 - 1e-8)
    p_old = torch.exp(old_logp.float()).clamp(1e-8, 1.0)
    omega = adv.float() / p_old * x * (1 - x) * (torch.log(x) + entropy.float())
    return torch.where(torch.isfinite(omega), omega, torch.zeros_like(omega))


def magnitude_bounds(omega: Tensor, mask: Tensor) -> Tensor:
    """(max, min) of |Omega| over the valid tokens, (2,); (-inf, inf) when there is none."""
    mag = omega.abs().float()
    valid = mask > 0
    return torch.stack([mag.masked_fill(~valid, -math.inf).max(), mag.masked_fill(~valid, math.inf).min()])


def steer_weights(
    omega: Tensor, mask: Tensor, mapping: Literal["exp", "linear"], weight_min: float, weight_max: float,
    bounds: Tensor | None = None,
) -> Tensor:
    """Token weights (B, T) from Omega; 0 on padding. ``bounds``: (max, min) of |Omega| over a wider scope
    than this micro-batch (``normalizer_scope: global``); by default this micro-batch's."""
    valid = mask > 0
    mag = omega.abs()
    if not bool(valid.any()):
        return torch.zeros_like(mag)
    hi, lo = magnitude_bounds(omega, mask) if bounds is None else bounds
    if mapping == "exp":
        kappa = -math.log(weight_min) / torch.clamp(hi, min=OMEGA_FLOOR)
        w = torch.exp(-kappa * mag).clamp(weight_min, 1.0)
    elif hi > lo:
        w = (weight_max - (mag - lo) * (weight_max - weight_min) / (hi - lo)).clamp(weight_min, weight_max)
    else:
        w = torch.full_like(mag, (weight_min + weight_max) / 2)
    return w * valid


@register("steer")
@dataclass
class Steer(Method):
    """STEER: down-weight tokens whose estimated entropy change |Omega| is large."""

    needs = frozenset({"entropy"})

    mapping: Literal["exp", "linear"] = "exp"
    weight_min: float = 0.8  # lambda_min
    weight_max: float = 1.0  # lambda_max (linear mapping; the paper's linear runs use 1.2)
    use_clip_indicator: bool = False  # the paper's Omega (0 for PPO-clipped tokens) instead of the code's
    # max/min |Omega| over this process's loss micro-batch (the reference: results change with the number of
    # processes), or over the same micro-step's micro-batches of every process (the same on 1 and N processes)
    normalizer_scope: Literal["micro_batch", "global"] = "micro_batch"

    def validate(self) -> None:
        if not 0.0 < self.weight_min <= 1.0:
            raise MethodConfigError(f"steer.weight_min must be in (0, 1], got {self.weight_min}")
        if self.weight_max < self.weight_min:
            raise MethodConfigError("steer.weight_max must be >= weight_min")

    def token_loss(self, batch: LossBatch) -> TokenTerms:
        if batch.rollout_entropy is None:
            raise RuntimeError("steer needs the behaviour policy's token entropy (rollout statistic 'entropy')")
        omega = steer_omega(batch.logps, batch.old_logps, batch.advantages, batch.rollout_entropy)
        if self.use_clip_indicator:
            omega = omega.masked_fill(batch.ppo_clipped(), 0.0)
        bounds = None
        if self.normalizer_scope == "global":  # every process takes part, with or without valid tokens
            local = magnitude_bounds(omega, batch.mask) * torch.tensor([1.0, -1.0], device=omega.device)  # (max, -min)
            both = batch.gather(local.view(1, 2)).amax(0)  # (2,)
            bounds = both * torch.tensor([1.0, -1.0], device=both.device)
        w = steer_weights(omega, batch.mask, self.mapping, self.weight_min, self.weight_max, bounds)
        valid = batch.mask > 0
        if bool(valid.any()):
            count = valid.sum()  # token means weighted by tokens: the same statistic on 1 and N processes
            batch.log("mean_weight", w[valid].mean(), count=count)
            batch.log("min_weight", w[valid].min(), reduce="min")
            batch.log("frac_below_0.9", (w[valid] < 0.9).float().mean(), count=count)
            batch.log("mean_abs_omega", omega.abs()[valid].mean(), count=count)
        return TokenTerms(weight=w)
