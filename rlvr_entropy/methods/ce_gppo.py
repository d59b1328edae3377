"""CE-GPPO: give PPO-clipped tokens back a bounded gradient, with separate scales for the two clipped sides.

Reference: Su et al. 2025, "CE-GPPO: Coordinating Entropy via Gradient-Preserving Clipping Policy Optimization
in Reinforcement Learning", arXiv 2509.20712; the beta = 1 form (GPPO) first appeared in the Klear-Reasoner
report, arXiv 2508.07629, App. A.2. Per token, with r = exp(logp - old) and sg = stop-gradient:

    low  = r < 1 - eps_low  and A < 0      (negative advantage, probability already pushed down: NA&LP)
    high = r > 1 + eps_high and A > 0      (positive advantage, probability already pushed up: PA&LP)
    loss_t = -beta1 (1 - eps_low)  * r / sg(r) * A    on low tokens
             -beta2 (1 + eps_high) * r / sg(r) * A    on high tokens
             the usual PPO term                      elsewhere

so a clipped token keeps PPO's forward value (for beta = 1) and gets the gradient -beta (1 +- eps) A with
respect to its log-prob, where PPO gives 0. beta1 scales the side whose gradient lowers entropy, beta2 the side
that raises it: beta1 < beta2 keeps entropy up. GPPO is beta1 = beta2 = 1; PPO is beta1 = beta2 = 0.
Reference impl: Kwai-Klear/CE-GPPO ``compute_gppo_loss_general_beta`` (verl/trainer/ppo/core_algos.py), with
``loss_func: gppo_general``.

How it is applied here: TRL's clipped surrogate already has gradient 0 on exactly these tokens (the same
definition as ``LossBatch.ppo_clipped`` and TRL's ``clip_ratio/region_mean``), so one extra per-token term with
value 0 adds the missing gradient:

    e_t = -(beta1 (1 - eps_low) 1[low] + beta2 (1 + eps_high) 1[high]) * A_t * (logp_t - sg(logp_t))

aggregated with TRL's loss_type normaliser. TRL's loss plus e has the CE-GPPO gradient exactly. The *value* of
the logged loss stays PPO's: it differs from CE-GPPO's by (beta - 1)(1 +- eps)|A| on clipped tokens.

Defaults: beta1 0.5, beta2 1.0. The 1.5B recipe's values (``1_5B_perf_run_gppo_v1_beta1_05_beta2_1``), chosen
because this repository's own runs use small models; the 7B recipe and the README's function signature use
beta1 0.75 (recipes/paper/ce_gppo_*.yaml sets it), the repository's config file 0.25.

``pos_nll_coef`` (default 0: off): the reference recipes also add ``positive_loss_coeff * token-mean(-logp)``
over the tokens of correct responses (reward == correct score), an SFT-like term that the CE-GPPO formula does
not mention: a confound, kept separate and off by default. When on, the advantage hook carries a per-sample
``correct`` flag (reward function ``correct_from`` >= 0.5) and the loss hook adds ``coef * mean(-logp)`` over the
correct responses' tokens as a scalar term with its own denominator (``LossBatch.global_mean``: the tokens of
correct responses in this micro-step on every process), as the reference averages over those tokens only.

Requirements (``check``): a loss type whose surrogate is TRL's PPO clip (grpo, bnpo, dr_grpo, dapo, luspo) with
token-level importance sampling; no TRL token masks the extra term cannot see (``top_entropy_quantile < 1``,
``off_policy_mask_threshold``). It acts only off-policy: with one optimizer step per rollout nothing is clipped
and it is a no-op (warned). TRL's vLLM importance-sampling correction multiplies TRL's per-token loss, not the
extra term (the reference has no such correction; warned: set ``vllm_importance_sampling_correction: false``).

Deviations from the reference:
- The dual clip (the reference's clip_ratio_c) is TRL's ``delta``: both stop the gradient of unclipped
  negative-advantage tokens with ratio > c. The reference's would also cap a low token's value if
  beta1 (1 - eps_low) > c, which never happens with its c = 10.
- The clipped sets use TRL's scalar epsilon_low/high. A method that sets per-token clip ranges (archer) changes
  TRL's clipping but not these sets: do not combine them.
- Composition: the advantage in e is ``batch.advantages * batch.weight`` (the weights of methods listed before
  this one); list weighting methods before ce_gppo. A detach mask from another method (e.g. erc) acts on the
  log-probs TRL receives, not on ``batch.logps``, so it does not remove this term's gradient: ERC's ``gppo_erc``
  (the GPPO gradient masked by the entropy band) is not ``[erc, ce_gppo]`` on clipped tokens outside the band.

Logged: ``clipped_low``, ``clipped_high`` (shares of counted tokens in each clipped set, global), and
``pos_nll`` when the NLL term is on.

Formulas, defaults and the worked example the tests use: ``docs/methods-2.md`` §3.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from rlvr_entropy.methods.base import (LossBatch, Method, MethodConfigError, RolloutBatch, TokenTerms, clipped_sides,
                                       register, updates_on_policy_only)
from rlvr_entropy.methods.covariance import PPO_LOSS_TYPES

logger = logging.getLogger(__name__)


def gradient_preserving_term(logps: Tensor, advantages: Tensor, low: Tensor, high: Tensor, beta1: float,
                             beta2: float, eps_low: float, eps_high: float) -> Tensor:
    """The zero-valued per-token term whose gradient is CE-GPPO's on clipped tokens, (B, T)."""
    scale = beta1 * (1 - eps_low) * low.to(logps.dtype) + beta2 * (1 + eps_high) * high.to(logps.dtype)  # (B, T)
    return -scale * advantages.detach().to(logps.dtype) * (logps - logps.detach())


@register("ce_gppo")
@dataclass
class CEGPPO(Method):
    """CE-GPPO: bounded gradients -beta(1 +- eps)A on PPO-clipped tokens (beta1: A < 0 side, beta2: A > 0 side)."""

    beta1: float = 0.5  # scale on clipped negative-advantage tokens (NA&LP); larger: faster, lower entropy
    beta2: float = 1.0  # scale on clipped positive-advantage tokens (PA&LP); larger: more exploration
    pos_nll_coef: float = 0.0  # the reference recipes' NLL on correct responses (0.1 there); off by default
    correct_from: str = "correctness"  # reward function whose value >= 0.5 marks a correct response (pos_nll only)

    def validate(self) -> None:
        if self.beta1 < 0 or self.beta2 < 0:
            raise MethodConfigError(f"ce_gppo.beta1 and beta2 must be >= 0, got {self.beta1} and {self.beta2}")
        if self.pos_nll_coef < 0:
            raise MethodConfigError(f"ce_gppo.pos_nll_coef must be >= 0, got {self.pos_nll_coef}")

    def check(self, args: Any) -> None:
        if args.loss_type not in PPO_LOSS_TYPES:
            raise MethodConfigError(
                f"ce_gppo restores the gradient of PPO-clipped tokens: loss_type must be one whose surrogate is the "
                f"PPO clip ({', '.join(PPO_LOSS_TYPES)}), got '{args.loss_type}'"
            )
        if args.importance_sampling_level != "token":
            raise MethodConfigError("ce_gppo clips per token: importance_sampling_level must be 'token'")
        if getattr(args, "top_entropy_quantile", 1.0) < 1.0:
            raise MethodConfigError(
                "ce_gppo cannot see TRL's high-entropy token mask (top_entropy_quantile < 1): it would restore "
                "gradients on tokens TRL masks out; use top_entropy_quantile: 1.0"
            )
        if getattr(args, "off_policy_mask_threshold", None) is not None:
            raise MethodConfigError(
                "ce_gppo cannot see TRL's off-policy sequence mask (off_policy_mask_threshold): it would restore "
                "gradients on sequences TRL masks out; unset off_policy_mask_threshold"
            )
        if getattr(args, "use_vllm", False) and getattr(args, "vllm_importance_sampling_correction", False):
            logger.warning(
                "ce_gppo: TRL's vLLM importance-sampling correction weights TRL's per-token loss but not the "
                "gradient ce_gppo restores on clipped tokens; the reference has no such correction: set "
                "vllm_importance_sampling_correction: false to match it."
            )
        if updates_on_policy_only(args):
            logger.warning(
                "ce_gppo: every update is on-policy (one optimizer step per generation batch), so no token is "
                "PPO-clipped and CE-GPPO is a no-op. Set steps_per_generation to a multiple of "
                "gradient_accumulation_steps (the reference uses 8 optimizer steps per rollout) or num_iterations > 1."
            )

    def reward_inputs(self) -> list[str]:
        return [self.correct_from] if self.pos_nll_coef > 0 else []

    def advantage(self, advantages: Tensor, batch: RolloutBatch) -> Tensor:
        if self.pos_nll_coef > 0:
            correct = torch.nan_to_num(batch.reward_column(self.correct_from), nan=0.0) >= 0.5  # (N,)
            batch.carry("correct", correct.float())
        return advantages

    def token_loss(self, batch: LossBatch) -> TokenTerms:
        advantages = batch.advantages * batch.weight  # (B, T): what TRL's loss sees from the methods before this one
        low, high = clipped_sides(batch.logps, batch.old_logps, advantages, batch.mask, batch.epsilon_low,
                                  batch.epsilon_high)
        extra = gradient_preserving_term(batch.logps, advantages, low, high, self.beta1, self.beta2,
                                         batch.epsilon_low, batch.epsilon_high)
        count = batch.mask.sum()
        batch.log("clipped_low", low.sum() / count.clamp(min=1.0), count=count)
        batch.log("clipped_high", high.sum() / count.clamp(min=1.0), count=count)
        scalar = None
        if self.pos_nll_coef > 0:
            correct = batch.carried_value("correct") > 0.5  # (B,)
            subset = correct.unsqueeze(1).expand_as(batch.mask)  # (B, T)
            nll = batch.global_mean(-batch.logps, subset)  # mean over correct responses' tokens, every process
            batch.log("pos_nll", nll.detach())
            scalar = self.pos_nll_coef * nll
        return TokenTerms(extra=extra, scalar=scalar)
