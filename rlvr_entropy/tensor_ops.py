"""Small masked tensor statistics shared by the methods and the trainer (float32, padding ignored)."""

from __future__ import annotations

from torch import Tensor


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
