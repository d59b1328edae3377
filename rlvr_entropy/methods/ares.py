"""ARES: an entropy reward by difficulty from high-window-entropy (HWE) counts, and a KL budget per difficulty.

Reference: Chen et al. 2025, "ARES: Multimodal Adaptive Reasoning via Difficulty-Aware Token-Level
Entropy Shaping", arXiv 2510.08457 (ICLR 2026); its RL stage is called "Adaptive Entropy Policy
Optimization" (AEPO). Registered as ``ares`` so it is not confused with ``aepo`` (Arbitrary Entropy
Policy Optimization, a different paper; docs/methods.md §8). Code:
shawn0728/ARES (``examples/reward_function/aepo.py::compute_score``,
``verl/workers/rollout/vllm_rollout_spmd.py``, ``verl/workers/actor/dp_actor.py``).

Shared by both modes, from the behaviour policy's token entropy ``H_t`` of each response:
- window entropy: the mean of ``H`` over a window of ``window`` tokens;
- ``N_HE(y)``: how many high-window-entropy moments response ``y`` has (definition per mode);
- difficulty of a prompt from its group's accuracy ``a``: easy if ``a >= 2/3``, medium if ``a >= 1/3``,
  hard otherwise;
- KL (``kl: true``): TRL's KL term (coefficient ``beta``) is scaled per token by ``beta_d * rho_t``,
  with ``beta_d`` a per-difficulty coefficient adapted to hold the mean token KL of its bucket near
  ``kl_target`` and ``rho_t = kl_hwe_scale`` inside HWE windows, 1 elsewhere.

``mode: paper`` (default; the paper's formulation, docs/methods.md §8.2):
- window ``mean(H[t : t+w])`` over full windows; threshold ``tau`` = batch mean of each response's
  95th-percentile token entropy; ``N_HE`` = number of windows above ``tau``;
- ``Delta = N_HE - target_d`` with ``target_d`` a running mean (EMA ``target_ema``) of the bucket's
  mean ``N_HE`` over *previous* batches (the current batch's mean would make ``lambda_d`` zero);
- ``lambda_d = max(0, (E[N_HE|d] - target_d) / (Var[N_HE|d] + lambda_eps))``;
- ``g_easy = max(0, Delta)``, ``g_medium = |Delta|``, ``g_hard = max(0, -Delta)``;
- ``R = R_acc - 1[wrong] * lambda_d * g_d(Delta)``: only wrong answers are penalised;
- ``rho = 0.5`` inside HWE windows (value not given by the paper).

``mode: code`` (the released code, docs/methods.md §8.3):
- window ``mean(H[t+1 : t+1+w])`` (after the token, partial windows at the end); per response the
  95th percentile of its window means; ``tau`` an EMA (0.99) of their batch median, initialised with
  the first batch's, and the previous batch's value is the one used (the first batch counts every
  window, as the reference does without a validation pass);
- ``N_HE`` = occurrences of trigger words ("wait", "alternatively", ...) followed by a window of
  entropy ``>= tau``;
- ``target_d = round(mean over the bucket's prompts of their mean N_HE)`` of the current batch;
  ``alpha_d`` (init 0.5) moves by ``0.05 * (mean - target)`` (``target - mean`` for hard), in [0, 2];
- a bonus or penalty per the reference's ``compute_score`` (huber and sigmoid shapes with per-bucket
  margins and caps, see ``code_entropy_score``), added to the reward; ``rho = 1``.

Deviations from the reference, and why:
- Entropy is the exact full-vocabulary entropy, read from generation or one forward pass (the reference
  uses vLLM's top-10 log-probs with a tail bucket, an approximation of the same quantity; with vLLM rollouts
  this project uses the same kind of top-k estimate, see ``vllm_backend.py``).
- Trigger words are matched as token sequences of the *sampled* completion (case variants, with and
  without a leading space), so a tokenizer that splits a word still works; the reference compares the
  top-1 token of the top-10 list, which is not always the sampled one.
- Rewards are computed after difficulty and targets are known (the released code's online filtering
  scores before, so its training rewards use default difficulty and target; an acknowledged bug).
- The default trigger list is a short list of reflection words of our own
  (``DEFAULT_TRIGGER_WORDS``), not the reference's ``crucial_token_final_version.json``; pass yours
  with ``trigger_words``.
- The paper's extra rollout branches at HWE windows are not implemented (the released code has none).
- The KL controller's details (relative error, dead zone, log-space step) follow the code's
  parameters as read; its update interval counts loss micro-batches, as the reference's does.

Formulas, defaults and the worked examples the tests use: ``docs/methods.md`` §8.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from rlvr_entropy.methods.base import LossBatch, Method, MethodConfigError, RolloutBatch, TokenTerms, register

BUCKETS = ("easy", "medium", "hard")
EASY, MEDIUM, HARD = 0, 1, 2

#: Reflection words that mark a pause to reconsider (the kind of list the reference ships).
DEFAULT_TRIGGER_WORDS = (
    "wait", "alternatively", "however", "but", "perhaps", "maybe", "hmm", "actually", "therefore", "hence",
    "thus", "so", "check", "verify", "recheck", "instead", "although", "suppose",
)

# Per-bucket shape parameters of the released code's entropy score (easy, medium, hard).
CODE_FRAC = (0.15, 0.25, 0.35)  # margin = max(1, frac * max(target, 1))
CODE_KAPPA = (2.0, 3.0, 4.0)  # huber knee
CODE_TAU = (2.0, 2.5, 3.0)  # sigmoid temperature
CODE_CAPSCALE = (1.0, 1.0, 1.2)  # cap = alpha * capscale
CODE_WRONG = (0.6, 0.8, 1.0)  # share of the cap a wrong answer can earn


# ----------------------------------------------------------------------------------------------------------
# Pure arithmetic (tested against docs/methods.md §8.7)


def window_means(entropy: Tensor, mask: Tensor, width: int, offset: int) -> tuple[Tensor, Tensor]:
    """Mean entropy over ``[t + offset, t + offset + width)`` for every position t, (N, T) each.

    Returns the means (0 where the window holds no valid token) and the number of valid tokens in
    each window. Computed from cumulative sums: no loop over positions.
    """
    n, t = entropy.shape
    values = entropy.float() * mask
    zero = torch.zeros(n, 1, dtype=values.dtype, device=values.device)
    csum = torch.cat([zero, values.cumsum(1)], 1)  # (N, T + 1)
    ccount = torch.cat([zero, mask.float().cumsum(1)], 1)
    start = (torch.arange(t, device=values.device) + offset).clamp(max=t)
    end = (start + width).clamp(max=t)
    sums = csum[:, end] - csum[:, start]
    counts = ccount[:, end] - ccount[:, start]
    return sums / counts.clamp(min=1), counts


def row_quantile(values: Tensor, mask: Tensor, q: float) -> Tensor:
    """The ``q`` quantile (linear interpolation, as numpy) of each row's valid values, (N,); NaN if none."""
    n = mask.sum(1)  # (N,)
    ordered = torch.where(mask > 0, values.float(), torch.full_like(values.float(), math.inf)).sort(1).values
    pos = q * (n - 1).clamp(min=0)
    lo = pos.floor().long().clamp(max=values.size(1) - 1)
    hi = pos.ceil().long().clamp(max=values.size(1) - 1)
    low, high = ordered.gather(1, lo[:, None])[:, 0], ordered.gather(1, hi[:, None])[:, 0]
    frac = pos - pos.floor()
    out = low + (high - low).nan_to_num(0.0) * frac
    return out.masked_fill(n == 0, math.nan)


def difficulty(correct: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Bucket of each sample's prompt from its group's accuracy, (N,) long in {EASY, MEDIUM, HARD}, and the accuracy."""
    _, groups = torch.unique(group_ids, return_inverse=True)
    count = torch.zeros(int(groups.max()) + 1).index_add_(0, groups, torch.ones_like(correct, dtype=torch.float))
    hits = torch.zeros_like(count).index_add_(0, groups, correct.float())
    accuracy = (hits / count)[groups]
    # 2/3 and 1/3 are the reference's thresholds; a small tolerance keeps 2 of 3 (0.666...) easy
    bucket = torch.where(accuracy >= 2 / 3 - 1e-6, EASY, torch.where(accuracy >= 1 / 3 - 1e-6, MEDIUM, HARD))
    return bucket.long(), accuracy


def trigger_ends(completion_ids: Tensor, mask: Tensor, patterns: list[list[int]]) -> Tensor:
    """(N, T) bool: a trigger token sequence ends at this position (all of it inside the valid tokens)."""
    hits = torch.zeros_like(mask, dtype=torch.bool)
    n, t = completion_ids.shape
    valid = mask > 0
    for pattern in patterns:  # a few dozen short patterns; each match is one vectorised comparison
        k = len(pattern)
        if k == 0 or k > t:
            continue
        windows = completion_ids.unfold(1, k, 1)  # (N, T - k + 1, k)
        ok = (windows == torch.tensor(pattern, device=completion_ids.device)).all(-1)
        ok &= valid.unfold(1, k, 1).all(-1)
        hits[:, k - 1 :] |= ok
    return hits


def paper_penalty(n_he: Tensor, bucket: Tensor, correct: Tensor, target: Tensor, lam: Tensor) -> Tensor:
    """The paper's reward change ``-1[wrong] * lambda_d * g_d(N_HE - target_d)``, (N,).

    ``target`` and ``lam`` are per-bucket (3,) tensors.
    """
    delta = n_he - target[bucket]
    g = torch.stack([delta.clamp(min=0), delta.abs(), (-delta).clamp(min=0)], 1).gather(1, bucket[:, None])[:, 0]
    return -(~correct).float() * lam[bucket] * g


def bucket_moments(n_he: Tensor, bucket: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Size, mean and (population) variance of ``N_HE`` in each difficulty bucket, (3,) each; 0 when empty."""
    count = torch.zeros(3).index_add_(0, bucket, torch.ones_like(n_he))
    mean = torch.zeros(3).index_add_(0, bucket, n_he) / count.clamp(min=1)
    var = torch.zeros(3).index_add_(0, bucket, (n_he - mean[bucket]) ** 2) / count.clamp(min=1)
    return count, mean, var


def paper_lambda(n_he: Tensor, bucket: Tensor, target: Tensor, eps: float) -> Tensor:
    """``lambda_d = max(0, (E[N_HE|d] - target_d) / (Var[N_HE|d] + eps))`` per bucket, (3,); 0 for empty buckets."""
    count, mean, var = bucket_moments(n_he, bucket)
    lam = ((mean - target) / (var + eps)).clamp(min=0)
    return torch.where(count > 0, lam, torch.zeros_like(lam))


def _huber(x: Tensor, kappa: Tensor) -> Tensor:
    return torch.where(x <= kappa, x * x / (2 * kappa), x - kappa / 2)


def code_entropy_score(n_he: Tensor, target: Tensor, bucket: Tensor, correct: Tensor, alpha: Tensor) -> Tensor:
    """The released code's entropy score, (N,); ``target`` (N,) per sample, ``alpha`` (3,) per bucket."""
    frac, kappa, tau, capscale, wrong_share = (
        torch.tensor(p, dtype=torch.float32)[bucket] for p in (CODE_FRAC, CODE_KAPPA, CODE_TAU, CODE_CAPSCALE, CODE_WRONG)
    )
    delta = n_he - target
    margin = torch.clamp(frac * target.clamp(min=1.0), min=1.0)
    cap = alpha[bucket] * capscale
    excess = torch.where(bucket == MEDIUM, delta.abs() - margin, delta - margin).clamp(min=0)
    over = -torch.minimum(cap, _huber(excess, kappa) / (margin + kappa) * cap)  # easy and medium
    hard_bonus = torch.sigmoid((delta + margin) / tau) * cap
    hard_short = -torch.minimum(cap, 0.5 * _huber((-delta - margin).clamp(min=0), kappa) / (margin + kappa) * cap)
    hard = torch.where(delta >= -margin, hard_bonus, hard_short)
    right = torch.where(bucket == HARD, hard, over)
    wrong = torch.sigmoid((delta - margin).clamp(min=0) / tau) * cap * wrong_share
    return torch.where(correct, right, wrong)


def kl_controller_step(beta: float, kl_ema: float, target: float, deadzone: float, step: float) -> float:
    """One update of a bucket's KL coefficient toward ``kl_ema == target``, in log space, in [1e-4, 1e2]."""
    error = kl_ema / target - 1.0
    if abs(error) <= deadzone:
        return beta
    return float(min(1e2, max(1e-4, beta * math.exp(step * max(-0.2, min(0.2, error))))))


# ----------------------------------------------------------------------------------------------------------
# The method


@register("ares")
@dataclass
class Ares(Method):
    """ARES (adaptive entropy): reward HWE moments by difficulty; a KL budget per difficulty."""

    needs = frozenset({"entropy"})

    mode: Literal["paper", "code"] = "paper"
    window: int = 4  # tokens per entropy window (the paper uses 4-8)
    percentile: float = 95.0
    correct_from: str = "correctness"  # reward function whose value >= 0.5 means a right answer
    trigger_words: list[str] | None = None  # None: every position (paper), DEFAULT_TRIGGER_WORDS (code)
    target_ema: float = 0.9  # paper: running bucket targets (value not given by the paper)
    lambda_eps: float = 1.0  # paper: keeps lambda finite when a bucket's counts do not vary
    threshold_ema: float = 0.99  # code: EMA of the batch median window-entropy threshold
    alpha_init: float = 0.5  # code: initial cap of the entropy score
    alpha_lr: float = 0.05  # code: step of alpha toward its bucket's target
    kl: bool = True  # scale TRL's KL term (needs beta > 0) per difficulty and inside HWE windows
    kl_hwe_scale: float | None = None  # rho inside HWE windows; None: 0.5 (paper), 1.0 (code)
    kl_target: float = 0.01  # the KL per token each bucket's coefficient steers toward
    kl_ema: float = 0.97
    kl_deadzone: float = 0.02  # relative error below which the coefficient stays
    kl_step: float = 0.05  # log-space step per update (error clipped to +-0.2)
    kl_update_every: int = 100  # loss micro-batches between coefficient updates

    def reward_inputs(self) -> list[str]:
        return [self.correct_from]

    def validate(self) -> None:
        if self.window < 1:
            raise MethodConfigError(f"ares.window must be >= 1, got {self.window}")
        if not 0 < self.percentile <= 100:
            raise MethodConfigError(f"ares.percentile is a percentage in (0, 100], got {self.percentile}")
        for name in ("target_ema", "threshold_ema", "kl_ema"):
            if not 0 <= getattr(self, name) < 1:
                raise MethodConfigError(f"ares.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.kl_target <= 0 or self.lambda_eps <= 0 or self.kl_update_every < 1:
            raise MethodConfigError("ares.kl_target and ares.lambda_eps must be > 0, ares.kl_update_every >= 1")
        if self.kl_hwe_scale is not None and self.kl_hwe_scale < 0:
            raise MethodConfigError(f"ares.kl_hwe_scale must be >= 0, got {self.kl_hwe_scale}")

    def check(self, args: Any) -> None:
        if self.kl and not getattr(args, "beta", 0.0):
            raise MethodConfigError(
                "ares.kl scales TRL's KL term, which is off (beta: 0): set beta (the paper's code uses 0.01) or ares.kl: false"
            )

    def init_state(self) -> dict[str, Any]:
        return {
            "threshold": None,  # code: EMA of window-entropy thresholds
            "targets": {b: None for b in BUCKETS},  # paper: running N_HE targets
            "alpha": {b: self.alpha_init for b in BUCKETS},  # code
            "beta": {b: 1.0 for b in BUCKETS},  # per-difficulty KL multiplier
            "kl": {b: None for b in BUCKETS},  # EMA of the observed KL per token
            "kl_calls": 0,
        }

    @property
    def rho(self) -> float:
        if self.kl_hwe_scale is not None:
            return self.kl_hwe_scale
        return 0.5 if self.mode == "paper" else 1.0

    # -- reward -------------------------------------------------------------------------------------------
    def reward(self, rewards: Tensor, batch: RolloutBatch) -> Tensor:
        if batch.entropy is None:
            raise RuntimeError("ares needs the 'entropy' rollout statistic")
        mask = batch.mask
        correct = torch.nan_to_num(batch.reward_column(self.correct_from), nan=0.0).cpu() >= 0.5  # (N,)
        bucket, _ = difficulty(correct, batch.group_ids.cpu())
        starts = self._hwe_starts(batch).cpu()  # (N, T) bool
        n_he = starts.sum(1).float()  # (N,)
        if self.mode == "paper":
            shaped = rewards + self._paper_reward(n_he, bucket, correct, batch).to(rewards)
        else:
            shaped = rewards + self._code_reward(n_he, bucket, correct, batch).to(rewards)
        if self.kl and batch.training:
            # KL budget: which bucket each sample is in, and which tokens lie inside an HWE window.
            inside = torch.cumsum(starts.float(), 1)
            inside = (inside - torch.nn.functional.pad(inside, (self.window, 0))[:, : inside.size(1)]) > 0
            offset = 0 if self.mode == "paper" else 1
            if offset:  # code windows start after the trigger token
                inside = torch.nn.functional.pad(inside, (1, 0))[:, :-1]
            batch.carry("bucket", bucket.to(mask.device))
            batch.carry("relax", torch.where(inside.to(mask.device) & (mask > 0), self.rho, 1.0))
        batch.log("hwe", n_he.mean())
        for b, name in enumerate(BUCKETS):
            batch.log(f"share_{name}", (bucket == b).float().mean())
        return shaped

    def _hwe_starts(self, batch: RolloutBatch) -> Tensor:
        """(N, T) bool: the positions counted in N_HE."""
        entropy, mask = batch.entropy.float(), batch.mask  # type: ignore[union-attr]
        words = self.trigger_words if self.trigger_words is not None else (
            list(DEFAULT_TRIGGER_WORDS) if self.mode == "code" else None
        )
        if self.mode == "paper":
            means, counts = window_means(entropy, mask, self.window, 0)
            # tau: batch mean of each response's percentile token entropy (recomputed every batch)
            per_row = row_quantile(entropy, mask, self.percentile / 100)
            tau = float(per_row[~torch.isnan(per_row)].mean()) if bool((~torch.isnan(per_row)).any()) else math.inf
            batch.log("threshold", tau)
            starts = (counts >= self.window) & (means > tau) & (mask > 0)
        else:
            means, counts = window_means(entropy, mask, self.window, 1)
            has = (counts > 0) & (mask > 0)
            per_row = row_quantile(means, has.float(), self.percentile / 100)
            per_row = per_row[~torch.isnan(per_row)]
            tau = self.state["threshold"]
            used = -math.inf if tau is None else tau  # the first batch counts every window
            if per_row.numel() and batch.training:
                median = float(torch.quantile(per_row, 0.5))
                self.state["threshold"] = median if tau is None else self.threshold_ema * tau + (1 - self.threshold_ema) * median
            batch.log("threshold", used if math.isfinite(used) else float("nan"))
            starts = has & (means >= used)
        if words is not None:
            starts = starts & trigger_ends(batch.completion_ids, mask, self._patterns(batch, words))
        return starts

    def _patterns(self, batch: RolloutBatch, words: list[str]) -> list[list[int]]:
        if batch.encode is None:
            raise RuntimeError("ares trigger words need the trainer's tokenizer (batch.encode)")
        variants = {v for w in words for v in (w, w.capitalize(), " " + w, " " + w.capitalize())}
        patterns = {tuple(batch.encode(v)) for v in sorted(variants)}
        return [list(p) for p in sorted(patterns) if p]

    def _paper_reward(self, n_he: Tensor, bucket: Tensor, correct: Tensor, batch: RolloutBatch) -> Tensor:
        count, mean, _ = bucket_moments(n_he, bucket)
        # A bucket seen for the first time gets this batch's mean as its target (so lambda_d = 0).
        target = torch.tensor([
            mean[b].item() if self.state["targets"][name] is None else self.state["targets"][name]
            for b, name in enumerate(BUCKETS)
        ])
        lam = paper_lambda(n_he, bucket, target, self.lambda_eps)
        delta_reward = paper_penalty(n_he, bucket, correct, target, lam)
        for b, name in enumerate(BUCKETS):
            if count[b] > 0:
                batch.log(f"target_{name}", target[b])
                batch.log(f"lambda_{name}", lam[b])
                if batch.training:
                    old = self.state["targets"][name]
                    self.state["targets"][name] = float(mean[b]) if old is None else (
                        self.target_ema * old + (1 - self.target_ema) * float(mean[b])
                    )
        batch.log("entropy_reward", delta_reward.mean())
        return delta_reward

    def _code_reward(self, n_he: Tensor, bucket: Tensor, correct: Tensor, batch: RolloutBatch) -> Tensor:
        groups = torch.unique(batch.group_ids.cpu(), return_inverse=True)[1]
        n_groups = int(groups.max()) + 1
        size = torch.zeros(n_groups).index_add_(0, groups, torch.ones_like(n_he))
        prompt_mean = torch.zeros(n_groups).index_add_(0, groups, n_he) / size  # mean N_HE per prompt
        prompt_bucket = torch.zeros(n_groups, dtype=torch.long).index_copy_(0, groups, bucket)
        target = torch.zeros(3)
        for b, name in enumerate(BUCKETS):
            in_bucket = prompt_bucket == b
            if not bool(in_bucket.any()):
                continue
            mean = float(prompt_mean[in_bucket].mean())
            target[b] = round(mean)
            if batch.training:
                change = self.alpha_lr * ((mean - target[b].item()) if b != HARD else (target[b].item() - mean))
                self.state["alpha"][name] = min(2.0, max(0.0, self.state["alpha"][name] + change))
            batch.log(f"target_{name}", target[b])
            batch.log(f"alpha_{name}", self.state["alpha"][name])
        alpha = torch.tensor([self.state["alpha"][name] for name in BUCKETS])
        score = code_entropy_score(n_he, target[bucket], bucket, correct, alpha)
        batch.log("entropy_reward", score.mean())
        return score

    # -- KL per difficulty ----------------------------------------------------------------------------------
    def token_loss(self, batch: LossBatch) -> TokenTerms | None:
        if not self.kl or batch.ref_logps is None or not batch.has_carried("bucket"):
            return None
        bucket = batch.carried_value("bucket").long()  # (B,)
        relax = batch.carried_value("relax")  # (B, T)
        kl = batch.kl()  # (B, T) TRL's KL term, with grad
        beta = torch.tensor([self.state["beta"][b] for b in BUCKETS], device=kl.device)
        scale = beta[bucket].unsqueeze(1) * relax  # (B, T) multiplier of TRL's KL coefficient
        # TRL already adds beta_trl * KL; this adds (scale - 1) * beta_trl * KL on top, normalised alike.
        extra = (scale - 1.0) * batch.kl_coef * kl
        self._observe_kl(batch, kl.detach(), bucket)
        for b, name in enumerate(BUCKETS):
            batch.log(f"beta_{name}", self.state["beta"][name])
        return TokenTerms(extra=extra)

    def _observe_kl(self, batch: LossBatch, kl: Tensor, bucket: Tensor) -> None:
        """Update each bucket's KL EMA from this micro-batch (all processes) and, every
        ``kl_update_every`` calls, its coefficient. Gathered sums keep the state equal everywhere."""
        mask = batch.mask
        onehot = torch.nn.functional.one_hot(bucket, 3).float()  # (B, 3)
        sums = torch.cat([onehot.T @ (kl * mask).sum(1), onehot.T @ mask.sum(1)])  # (6,)
        sums = batch.gather(sums.unsqueeze(0)).sum(0).cpu()  # (6,) over processes
        for b, name in enumerate(BUCKETS):
            if sums[3 + b] > 0:
                observed = float(sums[b] / sums[3 + b])
                old = self.state["kl"][name]
                self.state["kl"][name] = observed if old is None else self.kl_ema * old + (1 - self.kl_ema) * observed
        self.state["kl_calls"] += 1
        if self.state["kl_calls"] % self.kl_update_every == 0:
            for name in BUCKETS:
                if self.state["kl"][name] is not None:
                    self.state["beta"][name] = kl_controller_step(
                        self.state["beta"][name], self.state["kl"][name], self.kl_target, self.kl_deadzone, self.kl_step
                    )
