"""SIREN: selective entropy regularisation, a quadratic pull of the peak top-p entropy towards its initial value.

Reference: Jiang et al. 2025, "Rethinking Entropy Regularization in Large Reasoning Models", arXiv 2509.25133.
Three masks keep an entropy term from spreading mass over the whole vocabulary:

1. top-p entropy per position (p = ``top_p`` 0.8 among the ``top_k`` 10000 most likely tokens): sort the
   probabilities, keep the tokens strictly before the one where the running sum first reaches p, renormalise
   and take the entropy (0 when the most likely token alone reaches p):
       H^p_t = -sum_{v in V_p} q_v log q_v,   q_v = pi_v / sum_{V_p} pi
2. peak mask per response: only positions with H^p_t above the response's ``mask_ratio`` (0.8) quantile count;
3. self-anchoring: the penalty is quadratic around the initial value H_anchor, not a monotone bonus:
       H_sel = mean over rows of (mean of H^p over the row's selected positions; 0 if none)
       L = pg_loss + coef * (H_sel - H_anchor)^2,        coef (lambda) = 0.005

Defaults: the released script's (``exp_scripts/siren.sh``) and the actor's config defaults.
Reference impl: Linn3a/siren ``verl/verl/workers/actor/dp_actor.py`` (``efficient_top_p_sampling``,
``mask_by_quantile``, the loss) and ``verl/verl/trainer/ppo/ray_trainer.py`` (the anchor).

H^p is a function of the logits with gradient, so this method has a ``logit_stat`` hook: the trainer computes it
inside the training forward, in chunks of positions, with the logits divided by the sampling temperature.

Deviations and choices:
- The anchor. The reference fixes it at the first training step, from the old policy's selective entropy over
  that step's whole batch, and loses it on resume (it then silently falls back to 0, which turns the penalty
  into coef * H_sel^2). Here it is measured during optimizer step 0 from the on-policy training forwards of
  that step's micro-batches (the policy has not moved yet, so they are the initial policy's values): the mean
  of their H_sel, weighted by rows, i.e. the same seq-mean-token-mean over that step's rows. No penalty is
  applied during step 0; from step 1 on the anchor is fixed. It lives in the method state, so it is saved with
  every checkpoint and survives a resume. ``anchor: <value>`` fixes it instead (penalty from step 0).
  The reference's sample is the whole first rollout (128 prompts x 8 in its script); ours is the first optimizer
  step's rows (8 prompts x 8 with the paper recipe's geometry), the part of that rollout seen before any update.
- H_sel is a mean over the rows of the same micro-step on every process (the reference: one process's
  micro-batch), so it is the same on 1 and N processes.
- The peak mask is applied once, and only to counted tokens. The reference applies it twice (the second time
  on the zeroed tensor, which selects the same positions) and does not AND it with the response mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from rlvr_entropy.methods.base import LossBatch, Method, MethodConfigError, TokenTerms, register

RENORM_EPS = 1e-12  # the reference's guard in the renormalisation and the log


def top_p_entropy(logits: Tensor, top_p: float = 0.8, top_k: int = 10000) -> Tensor:
    """SIREN's top-p entropy of each row of ``logits`` (n, V) -> (n,) float32, with gradient.

    Keeps the tokens strictly before the one at which the cumulative probability (of the ``top_k`` most likely
    tokens, sorted) first reaches ``top_p``, i.e. those with cumulative probability < top_p; 0 when none is kept.
    """
    z = logits.float()
    top_z, _ = torch.topk(z, min(top_k, z.size(-1)), dim=-1)  # (n, k), sorted descending
    top = torch.exp(top_z - torch.logsumexp(z, dim=-1, keepdim=True))  # (n, k) their probabilities; no (n, V) softmax
    keep = torch.cumsum(top.detach(), dim=-1) < top_p  # (n, k): the prefix before the crossing token
    kept = top * keep
    q = kept / (kept.sum(dim=-1, keepdim=True) + RENORM_EPS)  # (n, k)
    return -(q * torch.log(q + RENORM_EPS)).sum(dim=-1)  # (n,)


def peak_mask(values: Tensor, mask: Tensor, ratio: float) -> Tensor:
    """Counted positions whose value exceeds their row's ``ratio`` quantile over its counted positions, (B, T) bool."""
    counted = mask > 0
    x = values.detach().float().masked_fill(~counted, float("nan"))  # (B, T)
    bound = torch.nanquantile(x, ratio, dim=-1, keepdim=True)  # (B, 1), NaN for a row with no counted token
    return (x > bound) & counted


def selected_row_means(values: Tensor, selected: Tensor) -> Tensor:
    """Mean of ``values`` over each row's selected positions, (B,), with gradient; 0 for a row with none."""
    sel = selected.to(values.dtype)
    return (values * sel).sum(dim=-1) / sel.sum(dim=-1).clamp(min=1.0)


@register("siren")
@dataclass
class Siren(Method):
    """SIREN: coef * (H_sel - H_anchor)^2 on the top-p entropy of each response's highest-entropy positions."""

    coef: float = 0.005  # lambda (the reference's entropy_coeff)
    top_p: float = 0.8  # nucleus of the entropy (tokens before the one where the running sum reaches top_p)
    top_k: int = 10000  # the nucleus is searched among this many most likely tokens
    mask_ratio: float = 0.8  # positions above this quantile of their response's top-p entropy are regularised
    anchor: float | None = None  # a fixed H_anchor; None: measured during optimizer step 0

    def validate(self) -> None:
        if self.coef < 0:
            raise MethodConfigError(f"siren.coef must be >= 0 (the paper uses 0.005), got {self.coef}")
        if not 0.0 < self.top_p <= 1.0:
            raise MethodConfigError(f"siren.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 1:
            raise MethodConfigError(f"siren.top_k must be >= 1, got {self.top_k}")
        if not 0.0 <= self.mask_ratio <= 1.0:
            raise MethodConfigError(f"siren.mask_ratio is a quantile in [0, 1] (the paper uses 0.8), got {self.mask_ratio}")
        if self.anchor is not None and self.anchor < 0:
            raise MethodConfigError(f"siren.anchor is an entropy (>= 0) or null, got {self.anchor}")

    def init_state(self) -> dict[str, Any]:
        # anchor: fixed once measured; sum/count: rows and their selective entropy seen during the measuring step
        return {"anchor": None, "measure_step": None, "sum": 0.0, "count": 0.0}

    def logit_stat(self, logits: Tensor) -> Tensor:
        return top_p_entropy(logits, self.top_p, self.top_k)

    def current_anchor(self, step: int, training: bool) -> float | None:
        """The anchor in force at optimizer step ``step``; None while it is being measured (no penalty then)."""
        if self.anchor is not None:
            return self.anchor
        state = self.state
        if state["anchor"] is None and state["measure_step"] is not None and step > state["measure_step"]:
            if training:  # the measuring step is over: fix the anchor (the same on every process)
                state["anchor"] = state["sum"] / max(state["count"], 1.0)
            else:
                return state["sum"] / max(state["count"], 1.0)
        return state["anchor"]

    def token_loss(self, batch: LossBatch) -> TokenTerms | None:
        hp = batch.logit_stat()  # (B, T) top-p entropy with grad, 0 where not counted
        selected = peak_mask(hp, batch.mask, self.mask_ratio)  # (B, T)
        row_means = selected_row_means(hp, selected)  # (B,)
        h_sel = batch.global_mean(row_means)  # () seq-mean over the rows of every process
        anchor = self.current_anchor(batch.step, batch.training)
        tokens = (batch.mask > 0).sum()
        batch.log("H_sel", h_sel)
        batch.log("selected", selected.sum() / tokens.clamp(min=1), count=tokens)
        if anchor is None:  # the measuring step: no penalty, accumulate this micro-step's rows
            if batch.training:
                total, rows = batch.global_sum_count(row_means)  # the same on every process
                state = self.state
                if state["measure_step"] is None:
                    state["measure_step"] = batch.step
                state["sum"] += float(total)
                state["count"] += float(rows)
            return None
        penalty = self.coef * (h_sel - anchor) ** 2
        batch.log("anchor", anchor)
        batch.log("penalty", penalty)
        return TokenTerms(scalar=penalty)
