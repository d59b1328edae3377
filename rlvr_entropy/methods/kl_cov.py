"""KL-Cov: penalise the log-ratio of the highest-covariance tokens, on an unclipped policy gradient.

Reference: Cui et al. 2025, "The Entropy Mechanism of Reinforcement Learning for Reasoning Language
Models", arXiv 2505.22617. Per token ``c_t = (A_t - mean A)(logp_t - mean logp)`` over the valid
tokens in scope; the ``k = max(1, int(ratio * N))`` tokens with the largest ``c_t`` get the extra
loss ``beta * |logp_t - logp_old_t|``; the base loss is the unclipped ``-A_t * exp(logp_t - logp_old_t)``.
Reference impl: verl ``compute_policy_loss_kl_cov`` (verl/trainer/ppo/core_algos.py) and the
PRIME-RL/Entropy-Mechanism-of-RL fork (``k_percent`` there is a percent; ``ratio`` here is a fraction).

Scopes (``selection_scope``): ``micro_batch`` (the reference: top-k over one loss call on one process,
current log-probs) or ``global`` (top-k over the whole generation batch of all processes, once per
generation batch, with the behaviour policy's log-probs; independent of micro-batch size and process
count; on later updates of the same rollout the selection stays that of the rollout).

The penalty ``|logp - logp_old|`` is exactly zero, with zero gradient, on the first update after a
rollout (on-policy). With one optimizer step per generation batch KL-Cov is therefore plain
unclipped REINFORCE; the method warns at start-up and logs ``kl_cov/inert`` (share of loss calls where
the penalty had nothing to act on).

Deviations from the reference: none in the arithmetic. The unclipped base loss is obtained from TRL's
clipped one by requiring ``epsilon >= 1`` (the lower clip at ratio 0 never binds) and a very large
``epsilon_high``; ``base_clip: true`` keeps PPO clipping instead (an ablation the paper's equation
suggests).

Formulas, defaults and the worked examples the tests use: ``docs/methods.md`` §2.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from rlvr_entropy.methods.base import (LossBatch, MethodConfigError, RolloutBatch, TokenTerms, register,
                                       updates_on_policy_only)
from rlvr_entropy.methods.covariance import CovarianceMethod
from rlvr_entropy.tensor_ops import centered_product, masked_mean

logger = logging.getLogger(__name__)

UNCLIPPED_EPSILON_HIGH = 1e6  # a ratio above 1 + 1e6 never happens in practice


def kl_cov_select(logp: Tensor, adv: Tensor, mask: Tensor, ratio: float) -> tuple[Tensor, Tensor, int]:
    """The top-k covariance tokens: (selected (B, T) bool, centred product (B, T), k).

    ``logp`` is detached by the caller; ties are broken by ``torch.topk`` (unspecified order).
    """
    valid = mask > 0
    cov = centered_product(adv, logp.detach(), mask)
    k = max(1, int(int(valid.sum()) * ratio))
    scores = cov.masked_fill(~valid, float("-inf")).flatten()
    k = min(k, int(valid.sum()))
    top = torch.topk(scores, k).indices
    selected = torch.zeros_like(scores, dtype=torch.bool)
    selected[top] = True
    return selected.view_as(valid) & valid, cov.masked_fill(~valid, 0.0), k


@register("kl_cov")
@dataclass
class KLCov(CovarianceMethod):
    """KL-Cov: |log-ratio| penalty on the top-k logp-advantage covariance tokens, unclipped PG elsewhere."""

    ratio: float = 2e-3  # fraction of valid tokens penalised (paper: 2e-3 for 7B, 2e-4 for 32B)
    beta: float = 1.0  # penalty coefficient (verl's ppo_kl_coef; the paper's scripts use 1)
    base_clip: bool = False  # keep PPO clipping on the base loss (ablation; the reference has none)

    def validate(self) -> None:
        if not 0.0 <= self.ratio <= 1.0:
            raise MethodConfigError(
                f"kl_cov.ratio is a fraction in [0, 1] (the paper uses 2e-3 or 2e-4), got {self.ratio}"
            )
        if self.beta < 0:
            raise MethodConfigError(f"kl_cov.beta must be >= 0, got {self.beta}")

    def check(self, args: Any) -> None:
        super().check(args)
        eps_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
        if not self.base_clip and (args.epsilon < 1.0 or eps_high < UNCLIPPED_EPSILON_HIGH):
            raise MethodConfigError(
                "kl_cov replaces the PPO surrogate with the unclipped -A*ratio of the reference: set "
                f"`epsilon: 1.0` and `epsilon_high: {UNCLIPPED_EPSILON_HIGH:g}` in the recipe, "
                "or `base_clip: true` on the method to keep PPO clipping"
            )
        if updates_on_policy_only(args):
            logger.warning(
                "kl_cov: every update is on-policy (one optimizer step per generation batch), so its penalty "
                "|logp - logp_old| is identically 0 and KL-Cov reduces to unclipped REINFORCE. Set "
                "steps_per_generation to a multiple of gradient_accumulation_steps (the paper uses 8 "
                "optimizer steps per rollout) or num_iterations > 1."
            )

    def select_global(self, advantages: Tensor, batch: RolloutBatch) -> Tensor:
        selected, cov, k = kl_cov_select(batch.logps, advantages, batch.mask, self.ratio)
        _log_cov(batch.log, k, cov, selected, batch.mask)
        return selected

    def token_loss(self, batch: LossBatch) -> TokenTerms:
        if self.selection_scope == "global":
            selected = batch.carried_value("selected").bool()
        else:
            selected, cov, k = kl_cov_select(batch.logps, batch.advantages, batch.mask, self.ratio)
            _log_cov(lambda name, v: batch.log(name, v, reduce="sum" if name == "selected" else "mean"), k, cov,
                     selected, batch.mask)
        delta = (batch.logps - batch.old_logps).abs()  # (B, T), with grad through logps
        penalty = self.beta * delta * selected.to(delta.dtype)
        batch.log("penalty", masked_mean(penalty.detach(), batch.mask))
        batch.log("inert", float(not bool((delta.detach() * selected).any())))
        return TokenTerms(extra=penalty)


def _log_cov(log: Any, k: int, cov: Tensor, selected: Tensor, mask: Tensor) -> None:
    log("selected", k)
    if bool((mask > 0).any()):
        log("cov_all", cov[mask > 0].mean())
    if bool(selected.any()):
        log("cov_selected", cov[selected].mean())
