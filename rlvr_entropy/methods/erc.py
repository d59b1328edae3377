"""ERC (Entropy Ratio Clipping): stop the gradient of tokens whose position's entropy has drifted from the old policy's.

Reference: Su et al. 2025, "Entropy Ratio Clipping as a Soft Global Constraint for Stable Reinforcement
Learning", arXiv 2512.05591. PPO's clip bounds only the sampled token's probability ratio; the rest of the
distribution can still move. ERC watches the whole distribution through its entropy. Per counted token:

    rho_t  = (H_theta(s_t) + 1e-8) / (H_old(s_t) + 1e-8)       H_theta: current policy, H_old: behaviour policy
    keep_t = low < rho_t < high                                 strict; band (0.95, 1.05)
    loss_t = loss_t if keep_t else sg(loss_t)                    value kept, gradient removed

The normaliser still counts every token. Reference impl: Kwai-Klear/ERC ``compute_policy_loss_grpo_erc``
(verl/trainer/ppo/core_algos.py; ``gppo_erc`` is the same mask on the GPPO loss), with ``entropy_mask_low/high``.

How it is applied here: a detach mask (``~keep``), which TRL's loss receives as log-probs without gradient on
those tokens: the loss value is unchanged and their policy-gradient term has no gradient. H_theta is the
training forward's entropy (detached: it only decides the mask), H_old the rollout statistic ``entropy``: the
behaviour policy's entropy at the training temperature, which is the reference's old-policy entropy (its
trainer keeps the entropies of the old-log-prob pass). Exact with HF generation (read from generate's own
forward calls) or ``rollout_stats_source: forward``; with vLLM the default source is a top-k estimate, a lower
bound on the entropy, and a +-5% band would then fire on estimator error (warned: use ``forward``).

It acts only off-policy. On the first update after a rollout the policy is the behaviour policy, rho = 1 up to
numerical noise and nothing is detached; the reference recipes take 8 optimizer steps per rollout (warned when
every update is on-policy).

Defaults: low 0.95, high 1.05 (``recipe/dapo/*_erc_1_05.sh``). The recipes also use PPO clip 0.2/0.28 and dual
clip 10 (``grpo_erc``), which recipes/paper/erc_*.yaml sets.

Deviations and composition:
- The reference recipes add an NLL term (``postive_loss_coeff`` 0.1) on correct responses; it is not part of
  ERC and is not ported (``ce_gppo.pos_nll_coef`` implements the same term, for the GPPO variant).
- With TRL's ``beta`` > 0 the detach also removes the KL term's gradient on those tokens (TRL adds its KL to
  the same per-token loss); the reference recipes have no KL.
- The mask reaches TRL's loss only. Extra terms of other methods that read ``batch.logps`` keep their gradient
  on detached tokens: with ce_gppo after erc (the paper's ``gppo_erc`` variant), the gradient ce_gppo restores
  on PPO-clipped tokens is not removed outside the band, whereas ``gppo_erc`` removes it. On tokens that PPO
  does not clip, [erc, ce_gppo with beta1 = beta2 = 1] equals ``gppo_erc``. (Handing the detached log-probs to
  the methods listed after a detaching one would close the gap: a pipeline change, not made here.)

Logged: ``entropy_frac`` (share of counted tokens kept, the reference's metric) and ``abs_dev`` (mean |rho - 1|),
both global means over every process's tokens.

Formulas, defaults and the worked example the tests use: ``docs/methods-2.md`` §5.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from rlvr_entropy.methods.base import (LossBatch, Method, MethodConfigError, TokenTerms, register,
                                       updates_on_policy_only)

logger = logging.getLogger(__name__)

RATIO_FLOOR = 1e-8  # the reference's smoothing of both entropies


def entropy_ratio(entropy: Tensor, old_entropy: Tensor, mask: Tensor) -> Tensor:
    """rho = (H + 1e-8) / (H_old + 1e-8), (B, T) float32, without gradient; 1 on padding."""
    valid = mask > 0
    new = torch.where(valid, entropy.detach().float(), torch.ones_like(mask, dtype=torch.float32))
    old = torch.where(valid, old_entropy.float(), torch.ones_like(new))
    return (new + RATIO_FLOOR) / (old + RATIO_FLOOR)


@register("erc")
@dataclass
class ERC(Method):
    """ERC: detach tokens whose entropy ratio H_theta / H_old leaves the band (low, high)."""

    needs = frozenset({"entropy"})

    low: float = 0.95  # lower edge of the entropy-ratio band (exclusive)
    high: float = 1.05  # upper edge (exclusive)

    def validate(self) -> None:
        if not 0.0 < self.low < 1.0 < self.high:
            raise MethodConfigError(f"erc needs 0 < low < 1 < high (the paper: 0.95, 1.05), got low={self.low}, "
                                    f"high={self.high}")

    def check(self, args: Any) -> None:
        if getattr(args, "use_vllm", False) and getattr(args, "rollout_stats_source", "auto") != "forward":
            logger.warning(
                "erc: with vLLM the old-policy entropy comes from vLLM's top-k log-probs unless "
                "rollout_stats_source is 'forward'; that estimate is a lower bound, and a band of "
                f"({self.low}, {self.high}) would fire on its error. Set rollout_stats_source: forward (exact)."
            )
        if updates_on_policy_only(args):
            logger.warning(
                "erc: every update is on-policy (one optimizer step per generation batch), so the entropy ratio is "
                "1 and ERC is a no-op. Set steps_per_generation to a multiple of gradient_accumulation_steps "
                "(the reference uses 8 optimizer steps per rollout) or num_iterations > 1."
            )

    def token_loss(self, batch: LossBatch) -> TokenTerms:
        if batch.rollout_entropy is None:
            raise RuntimeError("erc needs the behaviour policy's token entropy (rollout statistic 'entropy')")
        rho = entropy_ratio(batch.entropy, batch.rollout_entropy, batch.mask)  # (B, T)
        counted = batch.mask > 0
        keep = (rho > self.low) & (rho < self.high) & counted
        count = batch.mask.sum()
        batch.log("entropy_frac", keep.sum() / count.clamp(min=1.0), count=count)
        batch.log("abs_dev", ((rho - 1).abs() * counted).sum() / count.clamp(min=1.0), count=count)
        return TokenTerms(detach=~keep & counted)
