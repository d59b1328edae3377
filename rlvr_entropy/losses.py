"""Loss aggregation that matches TRL 1.16's ``loss_type`` normalisers, for extra per-token terms.

TRL offers no hook between its per-token loss and the aggregation, so a method's extra per-token
term is aggregated here with the same normaliser and added to TRL's scalar loss. Because every
normaliser below is linear, ``aggregate(a) + aggregate(b) == aggregate(a + b)``: adding the term
afterwards equals adding it to TRL's per-token loss before aggregation.
"""

from __future__ import annotations

from torch import Tensor

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo")
#: The loss types whose surrogate is PPO's clipped one, min(r*A, clip(r, 1 - epsilon_low, 1 + epsilon_high)*A).
CLIPPED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")


def aggregate(
    per_token: Tensor,
    mask: Tensor,
    loss_type: str,
    *,
    num_items_in_batch: Tensor | float,
    num_processes: int,
    gradient_accumulation_steps: int,
    steps_per_generation: int,
    max_completion_length: int,
    training: bool,
) -> Tensor:
    """Reduce a (B, T) per-token loss to a scalar exactly as TRL's ``_compute_loss`` does for ``loss_type``.

    Args:
        per_token: (B, T) loss per completion token (may carry gradients).
        mask: (B, T) 1.0 for tokens that count (completion mask times tool mask).
        num_items_in_batch: global count of loss tokens in the generation batch (TRL's input key).
        gradient_accumulation_steps: TRL's ``current_gradient_accumulation_steps`` (1 in eval).
    """
    mask = mask.to(per_token.dtype)
    accumulation = gradient_accumulation_steps if training else 1.0
    if loss_type in ("grpo", "sapo"):
        per_seq = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)  # (B,)
        return per_seq.mean() / accumulation
    if loss_type == "bnpo":
        return (per_token * mask).sum() / mask.sum().clamp(min=1.0) / accumulation
    if loss_type == "dr_grpo":
        return (per_token * mask).sum() / (per_token.size(0) * max_completion_length) / accumulation
    if loss_type in ("cispo", "dapo", "vespo"):
        items = num_items_in_batch.clamp(min=1.0) if isinstance(num_items_in_batch, Tensor) else max(num_items_in_batch, 1.0)
        normalizer = items / num_processes
        if training:  # the generation batch is split over steps_per_generation micro-batches
            normalizer = normalizer * gradient_accumulation_steps / steps_per_generation
        return (per_token * mask).sum() / normalizer
    if loss_type == "luspo":
        return (per_token * mask).sum(-1).mean() / accumulation
    raise ValueError(f"unknown loss_type '{loss_type}'; TRL 1.16 offers {', '.join(LOSS_TYPES)}")
