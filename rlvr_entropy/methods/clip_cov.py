"""Clip-Cov: stop the gradient of a few random high-covariance tokens to slow entropy collapse.

Reference: Cui et al. 2025, "The Entropy Mechanism of Reinforcement Learning for Reasoning Language
Models", arXiv 2505.22617. Per token, ``Cov_t = (A_t - mean A)(logp_t - mean logp)`` over the valid
tokens in scope. Among tokens with ``lb < Cov_t < ub`` that PPO has not already clipped, a uniformly
random subset of size ``max(int(ratio * N), 1)`` (N = valid tokens in scope) gets weight 0; every
other token keeps the usual clipped surrogate, and the normaliser still counts the zeroed tokens.
Reference impl: verl ``compute_policy_loss_clip_cov`` (verl/trainer/ppo/core_algos.py) and the
PRIME-RL/Entropy-Mechanism-of-RL fork.

Scopes (``selection_scope``):
- ``micro_batch`` (the reference): statistics, candidates and the random draw over the tensors of one
  loss call on one process, with the current log-probs. The result depends on the micro-batch size
  and the number of processes.
- ``global``: statistics and the draw over the whole generation batch of all processes, once per
  generation batch, with the behaviour policy's log-probs (rollout statistics). On the first update
  after a rollout these equal the current log-probs; on later updates the selection stays that of
  the rollout, as if the covariance were frozen. Tokens PPO clips at loss time are exempted then,
  so after the first update slightly fewer than ``ratio * N`` tokens may be zeroed. Independent of
  micro-batch size and process count.

Deviations from the reference: the draw uses a generator seeded from (training seed, step,
micro-step), so runs repeat exactly (the reference calls an unseeded ``randperm``). The paper's
scripts disable PPO clipping (``clip_ratio_low = clip_ratio_high = 1``); this method does not change
TRL's ``epsilon`` fields: the paper recipes set them.

Formulas, defaults and the worked examples the tests use: ``docs/methods.md`` §1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from rlvr_entropy.methods.base import LossBatch, MethodConfigError, RolloutBatch, TokenTerms, register
from rlvr_entropy.methods.covariance import CovarianceMethod
from rlvr_entropy.tensor_ops import centered_product


class Selection(NamedTuple):
    selected: Tensor  # (B, T) bool, tokens whose gradient is stopped
    candidates: Tensor  # (B, T) bool, valid unclipped tokens with lb < Cov < ub
    cov: Tensor  # (B, T) float32 centred product, 0 on padding
    clip_num: int


def clip_cov_select(
    logp: Tensor,
    adv: Tensor,
    mask: Tensor,
    clipped: Tensor,
    ratio: float,
    lb: float,
    ub: float,
    generator: torch.Generator,
) -> Selection:
    """Choose Clip-Cov's tokens.

    Args:
        logp: (B, T) log-probs of the sampled tokens, detached (current policy in micro-batch scope).
        adv: (B, T) advantages.
        mask: (B, T) 1 for valid tokens.
        clipped: (B, T) bool, tokens PPO already clips (never selected).
        generator: CPU generator for the random subset.
    """
    valid = mask > 0
    cov = centered_product(adv, logp.detach(), mask).masked_fill(~valid, 0.0)  # (B, T)
    clip_num = max(int(ratio * int(valid.sum())), 1)
    candidates = valid & ~clipped & (cov > lb) & (cov < ub)
    flat = candidates.flatten().nonzero().squeeze(1)  # candidate positions, row-major
    order = torch.randperm(flat.numel(), generator=generator)[:clip_num].to(flat.device)
    selected = torch.zeros_like(candidates).flatten()
    selected[flat[order]] = True
    return Selection(selected.view_as(candidates), candidates, cov, clip_num)


@register("clip_cov")
@dataclass
class ClipCov(CovarianceMethod):
    """Clip-Cov: zero the gradient of a random few tokens whose logp-advantage covariance is high."""

    ratio: float = 2e-4  # fraction of valid tokens to zero, in [0, 1] (not a percent)
    lb: float = 1.0  # covariance band, lower bound (exclusive)
    ub: float = 5.0  # covariance band, upper bound (exclusive)

    def validate(self) -> None:
        if not 0.0 <= self.ratio <= 1.0:
            raise MethodConfigError(
                f"clip_cov.ratio is a fraction in [0, 1] (the paper uses 2e-4), got {self.ratio}"
            )
        if not self.lb < self.ub:
            raise MethodConfigError(f"clip_cov needs lb < ub, got lb={self.lb}, ub={self.ub}")

    def select_global(self, advantages: Tensor, batch: RolloutBatch) -> Tensor:
        nothing_clipped = torch.zeros_like(batch.mask, dtype=torch.bool)  # on-policy at rollout time
        sel = clip_cov_select(batch.logps, advantages, batch.mask, nothing_clipped, self.ratio, self.lb, self.ub,
                              batch.generator())
        _log_selection(batch.log, sel, batch.mask)
        return sel.selected

    def token_loss(self, batch: LossBatch) -> TokenTerms:
        clipped = batch.ppo_clipped()
        if self.selection_scope == "global":
            selected = batch.carried_value("selected").bool() & ~clipped
            batch.log("applied", selected.sum(), reduce="sum")
        else:
            sel = clip_cov_select(batch.logps, batch.advantages, batch.mask, clipped, self.ratio, self.lb,
                                  self.ub, batch.generator(per_process=True))
            selected = sel.selected
            _log_selection(lambda k, v: batch.log(k, v, reduce="sum" if k in ("candidates", "selected") else "mean"),
                           sel, batch.mask)
        return TokenTerms(weight=(~selected).to(batch.mask.dtype))


def _log_selection(log: Any, sel: Selection, mask: Tensor) -> None:
    valid = mask > 0
    log("candidates", sel.candidates.sum())
    log("selected", sel.selected.sum())
    if bool(valid.any()):
        log("cov_all", sel.cov[valid].mean())
    if bool(sel.selected.any()):  # no value rather than a misleading 0 when nothing was selected
        log("cov_selected", sel.cov[sel.selected].mean())
