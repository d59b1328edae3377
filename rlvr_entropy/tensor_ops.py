"""Small tensor helpers shared by the methods and the trainer: masked statistics (float32, padding
ignored), TRL's group advantages, and a process-independent seed hash."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint
from trl.trainer.utils import nanstd

LOGIT_CHUNK = 1024  # completion positions whose (n, V) logits exist at once in ``logit_stats``


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` over positions where ``mask`` is set; 0 when nothing is set."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def per_token(advantages: Tensor, like: Tensor) -> Tensor:
    """(B,) per-sample advantages broadcast to ``like``'s (B, T); (B, T) advantages pass through."""
    return advantages.unsqueeze(1).expand_as(like) if advantages.dim() == 1 else advantages


def fit_width(x: Tensor, width: int) -> Tensor:
    """``x`` (B, T', ...) cut or right-padded with zeros along dim 1 to (B, width, ...)."""
    x = x[:, :width]
    if x.size(1) == width:
        return x
    pad = [0, 0] * (x.dim() - 2) + [0, width - x.size(1)]
    return torch.nn.functional.pad(x, pad)


def centered_product(adv: Tensor, logp: Tensor, mask: Tensor) -> Tensor:
    """Per-token ``(A - mean A)(logp - mean logp)``, means over the valid tokens, (B, T).

    Its masked mean is the covariance Cov(log pi, A) that Cui et al. (arXiv 2505.22617) show drives
    the entropy change of a policy-gradient step. ``logp`` must be detached by the caller.
    """
    adv, logp = adv.float(), logp.float()
    return (adv - masked_mean(adv, mask)) * (logp - masked_mean(logp, mask))


def grpo_advantages(rewards: Tensor, group_size: int, scale_rewards: str = "group") -> Tensor:
    """GRPO advantages exactly as TRL computes them (``multi_objective_aggregation="sum_then_normalize"``).

    ``rewards`` (N,) holds consecutive groups of ``group_size``. NaN rewards are left out of their
    group's mean and std and get advantage 0, TRL's rule for samples no reward function scored;
    methods use that to keep a sample out of the baseline of the others. Returns (N,) float32.
    """
    rewards = rewards.float()
    grouped = rewards.view(-1, group_size)  # (N / G, G)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(group_size)
    advantages = rewards - mean
    if scale_rewards == "group":
        std = nanstd(grouped, dim=1).repeat_interleave(group_size) if group_size > 1 else torch.zeros_like(rewards)
    elif scale_rewards == "batch":
        std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    elif scale_rewards == "none":
        std = None
    else:
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}")
    if std is not None:
        advantages = advantages / (std + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


def stable_hash(key: tuple[int, ...]) -> int:
    """FNV-1a over the integers of ``key``: a seed that never depends on the interpreter or the process."""
    h = 1469598103934665603
    for part in key:
        for byte in int(part).to_bytes(8, "little", signed=True):
            h = ((h ^ byte) * 1099511628211) % (1 << 64)
    return h % (1 << 63)


def logit_stats(methods: Sequence[Any], hidden: Tensor, valid: Tensor, lm_head: torch.nn.Module,
                inv_temperature: float) -> dict[str, Tensor]:
    """Each method's ``logit_stat`` at every valid position: ``{"<method>/logit_stat": (b, L) float32}``, 0 elsewhere.

    ``hidden`` (b, L, d) are the backbone's final hidden states (with grad), ``valid`` (b, L) the positions whose
    next token is scored. The logits of at most ``LOGIT_CHUNK`` positions exist at once, and each chunk is
    recomputed in the backward pass (activation checkpointing), so no (b, L, V) tensor is ever kept.
    """
    weight, bias = lm_head.weight, lm_head.bias
    if hasattr(weight, "full_tensor"):  # FSDP2 shards the head as DTensors: gather it, as TRL's fused head does
        weight = weight.full_tensor()
        bias = bias.full_tensor() if bias is not None else None
    h = hidden[valid]  # (n, d)
    out = {}
    for m in methods:
        parts = [checkpoint(_chunk_stat, chunk, weight, bias, inv_temperature, m.logit_stat, use_reentrant=False)
                 for chunk in h.split(LOGIT_CHUNK)]
        values = torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32)
        grid = torch.zeros(valid.shape, dtype=torch.float32, device=hidden.device)
        out[f"{m.name}/logit_stat"] = grid.masked_scatter(valid, values.float())
    return out


def _chunk_stat(h: Tensor, weight: Tensor, bias: Tensor | None, inv_temperature: float,
                fn: Callable[[Tensor], Tensor]) -> Tensor:
    logits = torch.nn.functional.linear(h.float(), weight.float(), None if bias is None else bias.float())
    values = fn(logits * inv_temperature)  # (n,)
    if values.shape != h.shape[:1]:
        raise ValueError(f"a logit_stat hook must return one value per position ({h.size(0)}), got {tuple(values.shape)}")
    return values.float()
