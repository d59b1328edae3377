"""AEPO (Arbitrary Entropy Policy Optimization): hold the policy's entropy at a chosen target.

Reference: Wang et al. 2025, "Arbitrary Entropy Policy Optimization", arXiv 2510.08141; code
597358816/AEPO (``verl/trainer/ray_trainer.py::fit``, ``trainer.algorithm == "AEPO"``). Not to be
confused with ARES's "Adaptive Entropy Policy Optimization" (registered here as ``ares``).

The paper adds a REINFORCE term on samples drawn from a temperature-adjusted policy:

    grad J = grad J_GRPO + alpha * E_{o ~ pi^T}[grad log pi(o|q) * R(q, o)],
    T = T_high if H(pi_old) < H_target else T_low

The reference code realises it with sample replacement, which is what this method does:

1. ``H_est``, the behaviour policy's entropy estimate of the previous generation batch, decides
   ``T = temperature_high`` if ``H_est <= target`` else ``temperature_low`` (``H_est`` starts at 0,
   so the first batch samples hot, as in the reference).
2. Besides the normal rollout, one extra completion at temperature ``T`` is drawn for every row of
   the first ``prompt_fraction`` of the batch's prompt groups, and scored with the run's reward
   functions.
3. An extra completion is *successful* when its GRPO advantage within its prompt's extra samples,
   ``(r - mean) / (std + 1e-6)`` with the unbiased std, exceeds ``advantage_threshold``: a right
   answer in a group that is not all right.
4. The first ``k`` successful ones are kept, ``k = min(num_samples, #successful)`` below the target
   and half that above it. Each replaces the normal completion of its own row (same prompt), so the
   batch keeps its shape and ``alpha`` is implicit: about ``k / N`` times ``injected_advantage``.
5. Injected completions get advantage ``injected_advantage`` (1, a one-sided REINFORCE with R = 1)
   on all tokens and are left out of the group baseline of the others (the advantages of groups
   holding an injected sample are recomputed without it); the rest of the batch keeps its
   advantages. List ``aepo`` before methods that rescale advantages (they then see its values). Their old log-probs are those of the training temperature, as in the
   reference (no importance correction for the sampling temperature).

Deviations from the reference, and why:
- A kept sample replaces a normal sample *of the same prompt* (the reference drops the first k rows
  of the batch, whatever their prompt): in TRL each row's prompt is fixed before generation.
- The entropy estimate is the rollout's (behaviour policy, training temperature) mean negative
  log-probability of the sampled tokens over the normal rows, ``estimator: nll`` (the reference
  reads the previous update's ``actor/entropy_loss``, the same NLL estimate one update later), or
  the exact mean token entropy of the rollout, ``estimator: entropy``. Both are logged.
- With several processes each process keeps up to its share of ``num_samples`` from its own rows
  (the reference is a single driver), so totals agree but which samples are kept can differ.
- When nothing passes the filter the injection is skipped (the reference crashes).
The paper's additive ``alpha`` form would need completions outside the batch; ``injected_advantage``
scales the reinforce term instead.

The ``target`` may be a schedule or calibrated (``rlvr_entropy/methods/schedule.py``): a number,
``{kind: linear|cosine, start, end, steps}``, ``{kind: step, start, milestones, gamma}`` or
``{kind: calibrated, steps, scale}``; the switch at a rollout compares ``H_est`` with the target at that
rollout's optimizer step. A calibrated target is ``scale`` times the token-weighted mean of the estimator
over the rollouts of the first ``steps`` optimizer steps; until then AEPO draws no extra samples and injects
nothing (plain GRPO). Its sums and fixed value are part of the method state (checkpointed). Logged per
rollout: ``target`` (at the switch) and ``error`` = the batch's fresh estimate minus that target.

Formulas, defaults and the worked examples the tests use: ``docs/methods.md`` §7.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from rlvr_entropy.methods.base import (
    GenerateFn,
    Method,
    MethodConfigError,
    Rollout,
    RolloutBatch,
    RolloutContext,
    register,
)
from rlvr_entropy.methods.schedule import EntropyTarget

INJECTED = "injected"  # rollout tag: 1.0 on rows whose completion was replaced by a kept extra sample


def successful(rewards: Tensor, group_ids: Tensor, threshold: float) -> Tensor:
    """Which samples beat their group: GRPO advantage ``(r - mean)/(std + 1e-6) > threshold``, (M,) bool.

    ``rewards`` (M,) may hold NaN (unscored: never successful, left out of the statistics);
    ``group_ids`` (M,) need not be contiguous. A group with fewer than two scored samples has no
    spread, so nothing in it is successful.
    """
    scored = ~torch.isnan(rewards)
    r = torch.nan_to_num(rewards.float(), nan=0.0)
    _, groups = torch.unique(group_ids, return_inverse=True)  # (M,) dense ids
    n_groups = int(groups.max()) + 1 if groups.numel() else 0
    count = torch.zeros(n_groups).index_add_(0, groups, scored.float())
    total = torch.zeros(n_groups).index_add_(0, groups, r * scored)
    mean = total / count.clamp(min=1)
    sq = torch.zeros(n_groups).index_add_(0, groups, (r - mean[groups]) ** 2 * scored)
    std = torch.sqrt(sq / (count - 1).clamp(min=1))  # unbiased, as torch.std in the reference
    advantage = (r - mean[groups]) / (std[groups] + 1e-6)
    return scored & (count[groups] >= 2) & (advantage > threshold)


def local_budget(num_samples: int, process_index: int, num_processes: int) -> int:
    """This process's share of a global sample budget (the first processes take the remainder)."""
    return num_samples // num_processes + int(process_index < num_samples % num_processes)


@register("aepo")
@dataclass
class Aepo(Method):
    """AEPO (arbitrary entropy): inject successful samples drawn hotter or colder to hold entropy at a target."""

    needs = frozenset({"entropy", "logps"})

    target: float | dict[str, Any] = 0.5  # target entropy H (nats per token; the reference script 0.5, its best
    # run 0.75), or a schedule / calibration (rlvr_entropy/methods/schedule.py)
    temperature_high: float = 1.2  # sampling temperature for extra samples while below the target
    temperature_low: float = 0.8  # ... and while above it
    num_samples: int = 60  # most extra samples kept per generation batch below the target (half above)
    prompt_fraction: float = 0.25  # share of the batch's prompt groups that get extra samples
    advantage_threshold: float = 0.05  # GRPO advantage an extra sample must exceed to be kept
    injected_advantage: float = 1.0  # advantage of a kept sample on all its tokens
    estimator: Literal["nll", "entropy"] = "nll"

    def __post_init__(self) -> None:
        self.entropy_target = EntropyTarget(self.target, "aepo.target")  # init_state needs it
        super().__post_init__()

    def validate(self) -> None:
        if not 0.0 < self.prompt_fraction <= 1.0:
            raise MethodConfigError(f"aepo.prompt_fraction must be in (0, 1], got {self.prompt_fraction}")
        if self.temperature_high <= 0 or self.temperature_low <= 0:
            raise MethodConfigError("aepo temperatures must be positive")
        if self.num_samples < 0:
            raise MethodConfigError(f"aepo.num_samples must be >= 0, got {self.num_samples}")

    def check(self, args: Any) -> None:
        if getattr(args, "use_vllm", False):
            raise MethodConfigError("aepo regenerates part of the batch, which needs HF generation (use_vllm: false)")
        if getattr(args, "multi_objective_aggregation", "sum_then_normalize") != "sum_then_normalize":
            raise MethodConfigError("aepo needs multi_objective_aggregation: sum_then_normalize (its advantages)")

    def init_state(self) -> dict[str, Any]:
        # "target": a calibrated target's sums and fixed value ({} for a number or a schedule)
        return {"estimate": 0.0, "batches": 0, "target": self.entropy_target.init_state()}

    def target_at(self, step: int) -> float | None:
        """The target at optimizer step ``step``; None while a calibrated target is still being measured."""
        return self.entropy_target.value(step, self._target_state())

    def _target_state(self) -> dict[str, Any]:
        # a checkpoint written before targets could be calibrated has no "target": it held a number
        return self.state.setdefault("target", self.entropy_target.init_state())

    def rollout(self, ctx: RolloutContext, generate: GenerateFn) -> Rollout:
        main = generate(None, None)
        ctx.tag(main, INJECTED, torch.zeros(len(main)))
        if not ctx.training:
            return main
        if ctx.score is None:
            raise RuntimeError("aepo needs the trainer's reward functions in its rollout hook")
        target = self.target_at(ctx.step)
        ctx.log("estimate", self.state["estimate"])
        if target is None:  # calibrating: plain GRPO until the target is known
            return main
        below = self.state["estimate"] <= target
        temperature = self.temperature_high if below else self.temperature_low
        rows = self._extra_rows(ctx)
        extra = generate(rows, temperature)
        rewards = ctx.score(rows, extra)  # (R,) every process scores the same number of rows
        groups = ctx.global_rows()[rows] // ctx.group_size
        passed = successful(rewards.cpu(), groups, self.advantage_threshold)
        budget = local_budget(self.num_samples, ctx.process_index, ctx.num_processes)
        budget = budget if below else budget // 2
        keep = torch.nonzero(passed).flatten()[:budget].tolist()
        ctx.log("temperature", temperature)
        ctx.log("target", target)
        # Counts here would be per process; the advantage hook logs the global number injected.
        if not keep:
            return main
        ctx.tag(extra, INJECTED, torch.ones(len(extra)))  # the tag travels with the rows it marks
        return main.replace_rows([rows[j] for j in keep], extra.select(keep))

    def _extra_rows(self, ctx: RolloutContext) -> list[int]:
        """The first ``prompt_fraction`` of this process's rows, rounded up to whole prompt groups
        when groups do not straddle processes. Same count on every process (they all score)."""
        n = len(ctx.prompt_ids)
        if n % ctx.group_size == 0:
            groups = n // ctx.group_size
            count = min(n, ctx.group_size * max(1, math.ceil(self.prompt_fraction * groups - 1e-9)))
        else:
            count = max(1, round(self.prompt_fraction * n))
        return list(range(count))

    def advantage(self, advantages: Tensor, batch: RolloutBatch) -> Tensor:
        injected = batch.tag(INJECTED) > 0  # (N,)
        normal = (~injected).float().unsqueeze(1) * batch.mask  # (N, T) tokens of normal rows
        if batch.training:
            count = float(normal.sum())
            nll_sum = float(-(batch.logps * normal).sum())
            entropy_sum = float((batch.entropy * normal).sum())
            nll, entropy = nll_sum / max(count, 1.0), entropy_sum / max(count, 1.0)
            self.state["estimate"] = nll if self.estimator == "nll" else entropy
            self.state["batches"] += 1
            estimate_sum = nll_sum if self.estimator == "nll" else entropy_sum
            self.entropy_target.observe(batch.step, self._target_state(), estimate_sum, count)
            batch.log("nll", nll)
            batch.log("entropy", entropy)
            target = self.entropy_target.value(batch.step, dict(self._target_state()))
            if target is not None:  # the target the rollout switch used at this step
                batch.log("error", self.state["estimate"] - target)
        rewards = batch.total_rewards()
        batch.log("injected", injected.sum())
        batch.log("main_reward", float(torch.nanmean(rewards[~injected])) if bool((~injected).any()) else 0.0)
        if not bool(injected.any()):
            return advantages
        # Injected samples must not move the baseline of the normal samples of their group: those
        # groups get advantages recomputed without them (TRL's formula); other groups are untouched.
        base = batch.grpo_advantages(rewards.masked_fill(injected, float("nan")))  # (N,)
        touched = torch.zeros(int(batch.group_ids.max()) + 1, dtype=torch.bool, device=injected.device)
        touched[batch.group_ids[injected]] = True
        touched = touched[batch.group_ids]  # (N,) rows of groups with an injected sample
        value = torch.where(injected, torch.full_like(base, self.injected_advantage), base)
        if advantages.dim() == 2:
            return torch.where(touched.unsqueeze(1), value.unsqueeze(1).to(advantages), advantages)
        return torch.where(touched, value.to(advantages), advantages)
