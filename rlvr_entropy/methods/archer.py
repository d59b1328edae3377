"""Archer: dual-token constraints, a loose clip for high-entropy tokens and a KL anchor for the rest.

Reference: Wang et al. 2025, "Stabilizing Knowledge, Promoting Reasoning: Dual-Token Constraints for RLVR",
arXiv 2507.15778. Each response's tokens are split at that response's own ``quantile`` (0.8) of the
training-pass entropy H (detached; torch.nanquantile, linear interpolation over the counted tokens):

    q_i  = quantile_{t counted in i}(H_t, 0.8)
    low  = H_t <= q_i   ("knowledge" tokens: ties go here)      high = H_t > q_i   ("reasoning" tokens)
    eps_t = 0.2 on low tokens, 0.5 on high tokens (each side settable), inside TRL's own PPO loss
    k3_t  = clamp(exp(d) - d - 1, -10, 10),  d = clamp(ref_t - logp_t, -20, 20)     (low-variance KL)
    L     = pg(eps_t) + kl_coef * mean_low(k3) + high_kl_coef * mean_high(k3)

Each KL mean has its own denominator (the low or high tokens of the micro-step on every process). Defaults are the
released script's: quantile 0.8, clips 0.2/0.2 (low) and 0.5/0.5 (high), kl_coef 0.001, high_kl_coef 0.
Reference impl: wizard-III/ArcherCodeR ``verl/workers/actor/dp_actor.py`` (token split and KL, where the
mask names are swapped relative to their contents) and ``verl/trainer/ppo/core_algos.py``
``compute_policy_loss`` (per-token clip range, dual clip ``clip_ratio_c``), run from
``scripts/train/run_archer_qwen2.5_1.5b_code.sh``.

Needs TRL's ``beta`` = 0: Archer's KL replaces TRL's uniform one. The reference log-probs come from TRL's
reference model (``loss_needs = {"ref_logps"}``), computed once per generation batch.

Deviations and choices:
- The KL means are over the low (or high) tokens of the same micro-step on every process, not of one
  process's micro-batch: the same on 1 and N processes. On one process this is the reference's per-micro-batch
  mean.
- The KL has no importance weight, as in the reference (TRL's own KL is multiplied by the ratio by default,
  ``use_bias_correction_kl``).
- ``quantile_scope: micro_batch`` splits at one quantile over all counted tokens of this process's loss
  micro-batch (a variant: it depends on the micro-batch); the default is the reference's per-response split.
- The dual clip (``clip_ratio_c`` 10) is TRL's ``delta``: for ``delta > 1 + eps_high`` it caps the ratio of
  negative-advantage tokens at delta, which is the dual clip; a smaller ``delta`` is refused because it
  would cap the ratio below the high-entropy clip range.
- The reference clamps ``logp - old`` to +/-20 before the ratio; TRL does not (no effect unless the policy
  moved by e^20).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from rlvr_entropy.losses import CLIPPED_LOSS_TYPES
from rlvr_entropy.methods.base import (LossBatch, Method, MethodConfigError, TokenTerms, register,
                                       updates_on_policy_only)

logger = logging.getLogger(__name__)

KL_LOG_RATIO_BOUND = 20.0  # the reference clamps ref - logp to +/-20 ...
KL_BOUND = 10.0  # ... and the k3 estimate to +/-10


def low_var_kl(logps: Tensor, ref_logps: Tensor, mask: Tensor) -> Tensor:
    """The reference's clamped k3 estimate of KL(pi || pi_ref) per token, (B, T), with grad through ``logps``;
    0 on padding (whatever the inputs hold there)."""
    d = torch.clamp(ref_logps.float() - logps.float(), -KL_LOG_RATIO_BOUND, KL_LOG_RATIO_BOUND)  # (B, T)
    k3 = torch.clamp(torch.exp(d) - d - 1.0, -KL_BOUND, KL_BOUND)
    return torch.where(mask > 0, k3, torch.zeros_like(k3))


def entropy_split(entropy: Tensor, mask: Tensor, quantile: float,
                  scope: Literal["response", "micro_batch"] = "response") -> tuple[Tensor, Tensor, Tensor]:
    """(low (B, T) bool, high (B, T) bool, q (B,) float32): tokens at or below / above the entropy quantile.

    ``scope="response"``: one quantile per row over its counted tokens (NaN for a row with none, whose tokens
    are in neither set); ``"micro_batch"``: one quantile over all counted tokens, repeated for every row.
    """
    counted = mask > 0
    h = entropy.detach().float().masked_fill(~counted, float("nan"))  # (B, T)
    if scope == "response":
        q = torch.nanquantile(h, quantile, dim=-1)  # (B,)
    else:
        q = torch.nanquantile(h.flatten(), quantile).expand(h.size(0))  # (B,)
    bound = q.unsqueeze(1)  # (B, 1)
    low = (h <= bound) & counted
    high = (h > bound) & counted
    return low, high, q


@register("archer")
@dataclass
class Archer(Method):
    """Archer: per-response entropy split; tight clip + KL to the reference on low-entropy tokens, loose clip on the rest."""

    loss_needs = frozenset({"ref_logps"})

    quantile: float = 0.8  # tokens above this quantile of their response's entropy are "high-entropy"
    quantile_scope: Literal["response", "micro_batch"] = "response"  # where the quantile is taken
    low_entropy_clip_low: float = 0.2  # PPO clip range 1 - eps_low .. 1 + eps_high of low-entropy tokens
    low_entropy_clip_high: float = 0.2
    high_entropy_clip_low: float = 0.5  # ... and of high-entropy tokens
    high_entropy_clip_high: float = 0.5
    kl_coef: float = 0.001  # k3 KL to the reference, mean over low-entropy tokens
    high_kl_coef: float = 0.0  # k3 KL to the reference, mean over high-entropy tokens (the reference: 0)

    def validate(self) -> None:
        if not 0.0 <= self.quantile <= 1.0:
            raise MethodConfigError(f"archer.quantile is a fraction in [0, 1] (the paper uses 0.8), got {self.quantile}")
        for side in ("low", "high"):
            lo, hi = getattr(self, f"{side}_entropy_clip_low"), getattr(self, f"{side}_entropy_clip_high")
            if not 0.0 <= lo < 1.0:
                raise MethodConfigError(f"archer.{side}_entropy_clip_low must be in [0, 1) (the ratio's lower bound "
                                        f"is 1 - it), got {lo}")
            if hi < 0.0:
                raise MethodConfigError(f"archer.{side}_entropy_clip_high must be >= 0, got {hi}")
        for name in ("kl_coef", "high_kl_coef"):
            if getattr(self, name) < 0:
                raise MethodConfigError(f"archer.{name} must be >= 0, got {getattr(self, name)}")

    def check(self, args: Any) -> None:
        if args.beta != 0.0:
            raise MethodConfigError(
                f"archer puts its own KL on the low-entropy tokens (kl_coef) and none on the others: set `beta: 0` "
                f"(TRL's KL would add a uniform one on every token; got beta={args.beta}). The reference model is "
                "still built for archer's KL."
            )
        if args.importance_sampling_level != "token":
            raise MethodConfigError("archer sets a clip range per token: it needs `importance_sampling_level: token`, "
                                    f"got {args.importance_sampling_level!r}")
        if args.loss_type not in CLIPPED_LOSS_TYPES:
            raise MethodConfigError(f"archer sets PPO's clip range per token: loss_type must be one of "
                                    f"{', '.join(CLIPPED_LOSS_TYPES)}, got {args.loss_type!r}")
        widest = max(self.low_entropy_clip_high, self.high_entropy_clip_high)
        if args.delta is not None and args.delta <= 1.0 + widest:
            raise MethodConfigError(
                f"TRL's delta ({args.delta}) caps the ratio below archer's widest upper clip 1 + {widest}: use "
                "delta > 1 + high_entropy_clip_high (the reference's dual clip is 10) or leave it unset"
            )
        if updates_on_policy_only(args):
            logger.warning(
                "archer: every update is on-policy (one optimizer step per generation batch), so the ratio is 1 and "
                "its per-token clip ranges never act; only its KL on low-entropy tokens remains. Set "
                "num_iterations > 1 (the reference uses 3 PPO epochs) or steps_per_generation > "
                "gradient_accumulation_steps."
            )

    def token_loss(self, batch: LossBatch) -> TokenTerms:
        if batch.ref_logps is None:
            raise RuntimeError("archer needs reference log-probs (loss input 'ref_logps'): the trainer provides them")
        low, high, q = entropy_split(batch.entropy, batch.mask, self.quantile, self.quantile_scope)
        eps_low = torch.where(high, self.high_entropy_clip_low, self.low_entropy_clip_low).to(batch.mask.dtype)  # (B, T)
        eps_high = torch.where(high, self.high_entropy_clip_high, self.low_entropy_clip_high).to(batch.mask.dtype)
        k3 = low_var_kl(batch.logps, batch.ref_logps, batch.mask)  # (B, T), with grad
        kl_low = batch.global_mean(k3, subset=low)  # every process calls both reductions, whatever its data
        if self.high_kl_coef > 0:
            kl_high = batch.global_mean(k3, subset=high)
            scalar = self.kl_coef * kl_low + self.high_kl_coef * kl_high
        else:
            total, count = batch.global_sum_count(k3, subset=high)
            kl_high = total / count.clamp(min=1.0)
            scalar = self.kl_coef * kl_low
        counted = batch.mask > 0
        tokens = counted.sum()
        batch.log("high_share", high.sum() / tokens.clamp(min=1), count=tokens)
        batch.log("kl_low", kl_low)
        batch.log("kl_high", kl_high)
        rows = ~torch.isnan(q)
        batch.log("quantile", torch.where(rows, q, 0.0).sum() / rows.sum().clamp(min=1), count=rows.sum())
        return TokenTerms(eps_low=eps_low, eps_high=eps_high, scalar=scalar)
