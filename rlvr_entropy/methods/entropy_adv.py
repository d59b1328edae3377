"""Entropy-based advantage shaping: add a small, capped, detached entropy bonus to each token's advantage.

Reference: Cheng et al. 2025, "Reasoning with Exploration: An Entropy Perspective", arXiv 2506.14758
(AAAI 2026). Per counted token, with H_t the policy's full-vocabulary entropy at that position (no gradient):

    psi_t = min(alpha * H_t, |A_t| / kappa)          alpha > 0, kappa >= 1
    A_t^sh = A_t + psi_t

and the usual clipped surrogate is optimised with A^sh in place of A. Because 0 <= psi_t <= |A_t| / kappa, the
bonus never flips the sign of A (for A < 0 it can at most reach 0, when kappa = 1) and A = 0 stays 0.

How it is applied here: as a token weight, w_t = A_t^sh / A_t = 1 + psi_t / A_t (1 where A_t = 0). Every TRL
loss is positively homogeneous in the advantage of a token (each clip branch scales linearly, and a positive
factor keeps min/max and the sign-dependent branches), so loss_t(w_t * A_t) = loss_t(A_t^sh) exactly. Weights
lie in [1, 1 + 1/kappa] for A > 0 and [1 - 1/kappa, 1] for A < 0, so they are >= 0 for kappa >= 1 (checked).
The stored advantages are left untouched (they are what TRL logs); the shaping acts only inside the loss.

Defaults: alpha 0.4, kappa 2. No official code was found; both values come from third-party ports (a MEDS port:
``min(0.4 * entropy.detach(), |A| / 2)``; the SIREN repository's ``baseline_entropy_adv`` uses alpha 0.4 with
kappa 1). The paper's text requires kappa > 1; kappa = 1 is accepted here to reproduce the SIREN baseline.

Which entropy (``entropy_source``):
- ``train`` (default, as both ports): the entropy of the training forward of this loss micro-batch, detached.
  Free: TRL's fused head computes it anyway.
- ``rollout``: the behaviour policy's entropy at the training temperature (rollout statistic ``entropy``),
  i.e. the entropy of the policy that sampled the batch. Equal to ``train`` on the first update after a
  rollout; on later updates it does not move with the policy. Costs a rollout statistic (free with HF generate).

Composition: the advantage the bonus is added to is ``batch.advantages * batch.weight``, i.e. the advantage as
shaped by the methods listed before this one (per-token advantages from advantage hooks included), so listing
it after a weighting method shifts the weighted advantage. Weights returned by methods listed after it
multiply the shaped advantage.

Deviations from the ports: none in the arithmetic. Not done (as in the ports): re-centring the advantages of a
group after shaping; the bonus is non-negative, so it breaks sum_i A_i = 0 within a group.

Logged: ``psi`` (mean bonus over counted tokens), ``capped`` (share of counted tokens with A != 0 whose bonus
is cut at |A| / kappa), both global means over every process's tokens.

Formulas, defaults and the worked example the tests use: ``docs/methods-2.md`` §2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from rlvr_entropy.methods.base import LossBatch, Method, MethodConfigError, TokenTerms, register


def entropy_shift(
    advantages: Tensor, entropy: Tensor, mask: Tensor, alpha: float, kappa: float
) -> tuple[Tensor, Tensor]:
    """The capped bonus psi and whether its cap binds, both (B, T); 0 / False on padding.

    ``advantages`` (B, T) and ``entropy`` (B, T) are read as float32, without gradient.
    """
    valid = mask > 0
    adv = advantages.detach().float()
    bonus = alpha * torch.where(valid, entropy.detach().float(), torch.zeros_like(adv))  # (B, T), junk-free
    cap = adv.abs() / kappa  # (B, T)
    psi = torch.where(valid, torch.minimum(bonus, cap), torch.zeros_like(adv))
    capped = valid & (adv != 0) & (bonus > cap)
    return psi, capped


def shift_weight(advantages: Tensor, psi: Tensor) -> Tensor:
    """w = (A + psi) / A where A != 0, else 1: the token weight equivalent to shifting A by psi, (B, T)."""
    adv = advantages.detach().float()
    nonzero = adv != 0
    return torch.where(nonzero, 1.0 + psi / torch.where(nonzero, adv, torch.ones_like(adv)), torch.ones_like(adv))


@register("entropy_adv")
@dataclass
class EntropyAdvantage(Method):
    """Entropy-based advantage: A <- A + min(alpha * H, |A| / kappa), as an exact token weight."""

    alpha: float = 0.4  # bonus per nat of entropy
    kappa: float = 2.0  # the bonus is at most |A| / kappa (>= 1, so the advantage keeps its sign)
    entropy_source: Literal["train", "rollout"] = "train"  # training forward (the ports) or behaviour policy

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({"entropy"}) if self.entropy_source == "rollout" else frozenset()

    def validate(self) -> None:
        if not self.alpha > 0:
            raise MethodConfigError(f"entropy_adv.alpha must be > 0 (0 does nothing), got {self.alpha}")
        if not self.kappa >= 1:
            raise MethodConfigError(
                f"entropy_adv.kappa must be >= 1 (the paper: > 1), so that the bonus |A|/kappa at most cancels a "
                f"negative advantage and never flips it; got {self.kappa}"
            )
        if self.entropy_source not in ("train", "rollout"):
            raise MethodConfigError(
                f"entropy_adv.entropy_source must be 'train' or 'rollout', got {self.entropy_source!r}"
            )

    def token_loss(self, batch: LossBatch) -> TokenTerms:
        if self.entropy_source == "rollout":
            if batch.rollout_entropy is None:
                raise RuntimeError("entropy_adv with entropy_source 'rollout' needs the rollout statistic 'entropy'")
            entropy = batch.rollout_entropy
        else:
            entropy = batch.entropy
        advantages = batch.advantages.float() * batch.weight.float()  # (B, T) as shaped by earlier methods
        psi, capped = entropy_shift(advantages, entropy, batch.mask, self.alpha, self.kappa)
        weight = shift_weight(advantages, psi) * (batch.mask > 0)  # (B, T), 0 on padding
        count = batch.mask.sum()
        batch.log("psi", psi.sum() / count.clamp(min=1.0), count=count)
        batch.log("capped", capped.sum() / count.clamp(min=1.0), count=count)
        return TokenTerms(weight=weight)
