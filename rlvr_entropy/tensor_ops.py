"""Small masked tensor statistics shared by the methods and the trainer (float32, padding ignored)."""

from __future__ import annotations

import torch
from torch import Tensor
from trl.trainer.utils import nanstd


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` over positions where ``mask`` is set; 0 when nothing is set."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def per_token(advantages: Tensor, like: Tensor) -> Tensor:
    """(B,) per-sample advantages broadcast to ``like``'s (B, T); (B, T) advantages pass through."""
    return advantages.unsqueeze(1).expand_as(like) if advantages.dim() == 1 else advantages


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
