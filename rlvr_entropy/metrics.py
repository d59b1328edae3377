"""Metric arithmetic: what every run logs beside TRL's own metrics, as pure functions that return dicts.

The trainer calls these and appends the values to TRL's ``_metrics``; nothing here touches a trainer.
Statistics are float32 over valid tokens only (padding never counts) and global: a function either
receives tensors already gathered from every process, or all-reduces a few sums through ``reduce_sum``
(identity on one process), so one and N processes log the same numbers.

- token entropy: mean and p10/p50/p90 (:func:`entropy_summary`);
- ``covariance/logp_adv``: Cov(log pi, A), the term Cui et al. (arXiv 2505.22617) show drives the
  entropy change of a policy-gradient step (:func:`logp_adv_covariance`);
- ``rollout_entropy/gap`` and ``gap_signed``: a rollout entropy estimate against the exact training-pass
  entropy of the same tokens (:func:`entropy_gap`);
- methods' loss-phase statistics, reduced across processes by the kind each asks for
  (:func:`reduce_across`);
- every log line appended to ``<output_dir>/metrics.jsonl`` (:class:`MetricsJsonlCallback`), with the
  lines a dead run wrote after its last checkpoint dropped on resume (:func:`truncate_metrics`).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from transformers import TrainerCallback

from rlvr_entropy.tensor_ops import masked_mean, per_token

logger = logging.getLogger(__name__)

QUANTILES = (0.1, 0.5, 0.9)
REDUCTIONS = ("mean", "sum", "max", "min")

#: All-reduce (sum) of a tensor over the processes; the identity on one process.
ReduceSum = Callable[[Tensor], Tensor]


def masked_quantiles(values: Tensor, mask: Tensor, qs: Sequence[float]) -> list[float]:
    """Quantiles of ``values`` where ``mask`` is set (linear interpolation, as numpy's default).

    Uses a sort instead of ``torch.quantile``, which refuses inputs above 16M elements.
    """
    flat = values.detach().float()[mask.bool()]
    if flat.numel() == 0:
        return [float("nan")] * len(qs)
    flat, _ = torch.sort(flat)
    n = flat.numel()
    out = []
    for q in qs:
        pos = q * (n - 1)
        lo = int(pos)
        hi = min(lo + 1, n - 1)
        frac = pos - lo
        out.append(float(flat[lo] * (1 - frac) + flat[hi] * frac))
    return out


def entropy_summary(prefix: str, values: Tensor, mask: Tensor, mean: bool = True) -> dict[str, float]:
    """``<prefix>/mean`` (optional) and ``<prefix>/p10|p50|p90`` of token entropy over the valid tokens.

    Args:
        values: (N, T) entropy of every process's tokens (gathered).
        mask: (N, T) 1.0 where a token counts.
    """
    out = {f"{prefix}/mean": float(masked_mean(values.float(), mask))} if mean else {}
    for q, v in zip(QUANTILES, masked_quantiles(values, mask, QUANTILES), strict=True):
        out[f"{prefix}/p{int(q * 100)}"] = v
    return out


def logp_adv_covariance(logps: Tensor, advantages: Tensor, mask: Tensor, reduce_sum: ReduceSum) -> dict[str, float]:
    """``covariance/logp_adv``: Cov(log pi, A) over the valid tokens of all processes, from four all-reduced sums.

    Args:
        logps: (B, T) log-probs of the sampled tokens (detached).
        advantages: (B,) or (B, T).
        mask: (B, T) float.
    """
    adv = per_token(advantages, logps)
    logps, adv = logps.float() * mask, adv.float() * mask
    sums = torch.stack([mask.sum(), adv.sum(), logps.sum(), (adv * logps).sum()])
    n, sa, sl, sal = reduce_sum(sums).tolist()
    return {"covariance/logp_adv": sal / n - (sa / n) * (sl / n)} if n > 0 else {}


def entropy_gap(rollout: Tensor, training: Tensor, mask: Tensor, reduce_sum: ReduceSum) -> dict[str, float]:
    """``rollout_entropy/gap``: mean |H_train - H_rollout| over the valid tokens of all processes, and the signed
    mean ``gap_signed`` = train - rollout (positive for a lower-bound estimate such as vLLM's top-k).

    On the first loss step after a generation both sides describe the same weights, so the gap there is
    the estimator's error; later steps of the same generation batch add the policy's own change.
    """
    diff = (training.detach().float() - rollout.float()) * mask  # (B, T)
    sums = torch.stack([mask.sum(), diff.abs().sum(), diff.sum()])
    n, abs_sum, signed_sum = reduce_sum(sums).tolist()
    if n <= 0:
        return {}
    return {"rollout_entropy/gap": abs_sum / n, "rollout_entropy/gap_signed": signed_sum / n}


DIFFICULTY_BUCKETS = ("unsolved", "hard", "medium", "easy", "solved")


def difficulty_buckets(rewards: Tensor, group_size: int, threshold: float) -> Tensor:
    """Each group's accuracy bucket, (N / G,) long indexing ``DIFFICULTY_BUCKETS``: p = share of the group's rewards
    at or above ``threshold`` (an unscored, NaN, reward counts as wrong); p = 0 unsolved, 0 < p < 1/3 hard,
    1/3 <= p < 2/3 medium, 2/3 <= p < 1 easy, p = 1 solved. Groups of p 0 and 1 get buckets of their own: their GRPO
    advantages are 0."""
    solved = (rewards >= threshold).float().view(-1, group_size).sum(1)  # (N / G,) whole counts: exact edges
    bucket = torch.where(3 * solved < group_size, 1, torch.where(3 * solved < 2 * group_size, 2, 3))
    bucket = torch.where(solved == 0, 0, torch.where(solved == group_size, 4, bucket))
    return bucket.long()


def entropy_by_difficulty(rewards: Tensor, group_size: int, mask: Tensor, entropy: Tensor | None,
                          threshold: float) -> dict[str, float]:
    """DiffAdapt-style diagnostic over one gathered generation batch: for each non-empty accuracy bucket, the number
    of prompts, the mean completion length and (when rollout entropy exists) the mean over responses of each
    response's mean token entropy, ``entropy_by_difficulty/<bucket>/{prompts,length,entropy}``.

    ``rewards`` (N,), ``mask`` (N, T), ``entropy`` (N, T) behaviour-policy entropy or None. Buckets with no prompt
    are left out of the line (a NaN would poison the averages of a logging window).
    """
    groups = difficulty_buckets(rewards.float(), group_size, threshold)  # (N / G,)
    per_row = groups.repeat_interleave(group_size).to(mask.device)  # (N,)
    lengths = mask.float().sum(1)  # (N,)
    response_entropy = None
    if entropy is not None:
        response_entropy = (entropy.float() * mask).sum(1) / lengths.clamp(min=1.0)  # (N,)
    out: dict[str, float] = {}
    for index, name in enumerate(DIFFICULTY_BUCKETS):
        rows = per_row == index
        prompts = int((groups == index).sum())
        out[f"entropy_by_difficulty/{name}/prompts"] = float(prompts)
        if prompts == 0:
            continue
        out[f"entropy_by_difficulty/{name}/length"] = float(lengths[rows].mean())
        if response_entropy is not None:
            out[f"entropy_by_difficulty/{name}/entropy"] = float(response_entropy[rows].mean())
    return out


def reduce_across(
    metrics: dict[str, tuple[Tensor, ...]],
    gather: Callable[[Tensor], Tensor],
    device: torch.device | None = None,
    gather_objects: Callable[[list[Any]], list[Any]] | None = None,
) -> dict[str, float]:
    """Loss-phase metrics ``{key: (0-d value, "mean" | "sum" | "max" | "min"[, 0-d count])}`` reduced across
    processes, with one gather per reduction kind in use. ``gather`` concatenates along dim 0 (identity on one
    process); ``device`` is where the collective needs its tensors. A ``"mean"`` is weighted by each process's
    count (1 when absent): the mean over all items of all processes.

    A method may log a statistic on some processes only (one whose micro-batch had nothing to report). Every
    process must still make the same gathers, so with several processes ``gather_objects`` first agrees on
    the keys: a process without a key contributes nothing to its reduction.
    """
    kinds = {key: entry[1] for key, entry in metrics.items()}
    if gather_objects is not None:
        for other in gather_objects([kinds]):
            kinds.update(other)
    out: dict[str, float] = {}
    for kind in REDUCTIONS:
        keys = sorted(k for k, r in kinds.items() if r == kind)
        if not keys:
            continue
        n = len(keys)
        # Tensors stay where they are (no host sync per metric); a missing key is NaN with count 0.
        nan, zero, one = (torch.tensor(v, device=device) for v in (float("nan"), 0.0, 1.0))
        values = torch.stack([metrics[k][0].float().to(device) if k in metrics else nan for k in keys])  # (n,)
        if kind == "mean":  # weighted: sum(value * count) / sum(count); a missing key weighs 0
            counts = torch.stack([(metrics[k][2].float().to(device) if len(metrics[k]) > 2 else one)
                                  if k in metrics else zero for k in keys])
            local = torch.cat([torch.nan_to_num(values) * counts, counts])  # (2n,)
            totals = gather(local.unsqueeze(0)).view(-1, 2 * n).double().sum(0)  # (2n,)
            reduced = (totals[:n] / totals[n:]).float()  # 0 / 0 = NaN only where no process had the key
        else:
            values = gather(values.unsqueeze(0)).view(-1, n).float()  # (P, n)
            present = ~torch.isnan(values)
            if kind == "sum":
                reduced = values.nansum(0)
            else:
                fill = float("-inf") if kind == "max" else float("inf")
                filled = values.masked_fill(~present, fill)
                reduced = filled.amax(0) if kind == "max" else filled.amin(0)
            reduced = reduced.masked_fill(~present.any(0), float("nan"))
        out.update(zip(keys, reduced.tolist(), strict=True))
    return out


# ----------------------------------------------------------------------------------------------------------
# metrics.jsonl


class MetricsJsonlCallback(TrainerCallback):
    """Appends each log line, with its step, to ``<output_dir>/metrics.jsonl`` (main process only)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        if state.global_step > 0:  # resumed: forget what came after the checkpoint
            truncate_metrics(self.path, state.global_step)
        elif os.path.exists(self.path) and os.path.getsize(self.path) > 0:
            # A new run in a directory that holds an old one's log: appending would mix the two runs' curves.
            kept = set_aside(self.path)
            logger.warning("%s held the log of an earlier run; it is kept as %s and a new log starts", self.path, kept)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step}
        for key, value in logs.items():
            if isinstance(value, float) and not math.isfinite(value):
                value = None  # JSON has no NaN; None keeps the line parseable everywhere
            record[key] = value
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


def set_aside(path: str) -> str:
    """Rename ``path`` (``.../metrics.jsonl``) to the first free ``.../metrics.N.jsonl``; returns the new name."""
    stem, ext = os.path.splitext(path)
    n = 1
    while os.path.exists(f"{stem}.{n}{ext}"):
        n += 1
    os.replace(path, f"{stem}.{n}{ext}")
    return f"{stem}.{n}{ext}"


def truncate_metrics(path: str, step: int) -> int:
    """Drop the lines of a ``metrics.jsonl`` logged after ``step`` (by a run that died after its last
    checkpoint), so a run resumed in the same directory logs each step once. Returns the lines dropped."""
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line).get("step", 0) > step:
                continue
        except json.JSONDecodeError:
            continue  # a line cut by the crash
        kept.append(line)
    if len(kept) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)
    return len(lines) - len(kept)
