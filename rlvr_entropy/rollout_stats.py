"""Rollout statistics: behaviour-policy token entropy and sampled-token log-probs, and their summaries.

Two sources produce the same per-token numbers:

- ``generate``: read from HF ``generate``'s own forward calls through a forward hook. Each decoding
  step's logits (B, V) are turned into an entropy (B,) and, one step later when the sampled token is
  known, its log-prob (B,); only one step's (B, V) log-softmax is alive at a time, so nothing of
  size (B, T, V) is kept and no extra forward pass runs.
- ``forward``: one no-grad forward over the finished batch with TRL's fused LM head (used with vLLM,
  continuous batching, tool loops or a custom ``rollout_func``). When TRL already runs its old-logp
  forward for the batch, that pass is reused.

Both describe the temperature-scaled distribution ``softmax(logits / T_train)`` over the full
vocabulary, i.e. the same distribution the training pass scores; sampling-time truncation (top-p,
top-k, min-p) is not applied, so with truncation on this is the entropy of the policy being trained,
not of the truncated sampler.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType

import torch
from torch import Tensor, nn


def step_entropy_and_logprobs(logits: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Entropy (B,) and log-softmax (B, V) of one decoding step's logits, in float32."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # (B, V)
    p = logp.exp()
    plogp = torch.where(p > 0, p * logp, torch.zeros_like(p))  # 0·log 0 = 0 for masked tokens
    return -plogp.sum(dim=-1), logp


class GenerationRecorder:
    """Context manager: records per-step entropy (and sampled-token log-probs) during ``generate``.

    Register it on the causal LM whose ``forward`` generate calls. On exit nothing stays hooked.
    """

    def __init__(self, model: nn.Module, temperature: float, logps: bool) -> None:
        self.model = model
        self.temperature = temperature
        self.want_logps = logps
        self.entropies: list[Tensor] = []  # one (B,) per decoding step
        self.token_logps: list[Tensor] = []  # one (B,) per decoding step but the last
        self._last_logp: Tensor | None = None  # (B, V) of the latest step, until its token is known
        self._handle = None

    def __enter__(self) -> GenerationRecorder:
        self._handle = self.model.register_forward_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        logits = getattr(output, "logits", None)
        if logits is None:
            return
        entropy, logp = step_entropy_and_logprobs(logits[:, -1, :], self.temperature)
        if self.want_logps and self._last_logp is not None:
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            sampled = input_ids[:, -1:]  # (B, 1) the token drawn at the previous step
            self.token_logps.append(self._last_logp.gather(1, sampled).squeeze(1))
        self.entropies.append(entropy)
        if self.want_logps:
            self._last_logp = logp

    def rows(self, completion_ids: Sequence[Sequence[int]], pad_token_id: int) -> dict[str, list[Tensor]]:
        """Per-row statistics, each cut to the row's completion length (EOS included)."""
        if not self.entropies:
            return {}
        lengths = [len(c) for c in completion_ids]
        entropy = torch.stack(self.entropies, dim=1).cpu()  # (B, S)
        out = {"entropy": [entropy[i, :n] for i, n in enumerate(lengths)]}
        if self.want_logps and self._last_logp is not None:
            steps = entropy.size(1)
            # The last step's token never comes back as an input: take it from the completions.
            last = [c[steps - 1] if len(c) >= steps else pad_token_id for c in completion_ids]
            last_t = torch.tensor(last, device=self._last_logp.device).unsqueeze(1)  # (B, 1)
            self.token_logps.append(self._last_logp.gather(1, last_t).squeeze(1))
            logps = torch.stack(self.token_logps, dim=1).cpu()  # (B, S)
            out["logps"] = [logps[i, :n] for i, n in enumerate(lengths)]
        self._last_logp = None
        return out


def pad_rows(rows: Sequence[Tensor], width: int, value: float = 0.0) -> Tensor:
    """Right-pad 1-D tensors into a (len(rows), width) float32 tensor (rows longer than width are cut)."""
    out = torch.full((len(rows), width), value, dtype=torch.float32)
    for i, r in enumerate(rows):  # one copy per row, not per token
        n = min(len(r), width)
        out[i, :n] = r[:n].float()
    return out


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


def find_marker(completion_ids: Tensor, mask: Tensor, marker: Sequence[int]) -> Tensor:
    """Start index of the first occurrence of the token sequence ``marker`` in each row, -1 if absent.

    Args:
        completion_ids: (N, T) token ids.
        mask: (N, T) 1 for real tokens; a match must lie entirely on real tokens.
    Returns:
        (N,) long.
    """
    n, t = completion_ids.shape
    k = len(marker)
    if k == 0 or t < k:
        return torch.full((n,), -1, dtype=torch.long, device=completion_ids.device)
    target = torch.tensor(list(marker), device=completion_ids.device)
    windows = completion_ids.unfold(1, k, 1)  # (N, T-k+1, k)
    valid = mask.bool().unfold(1, k, 1).all(dim=-1)  # (N, T-k+1)
    hit = (windows == target).all(dim=-1) & valid  # (N, T-k+1)
    first = hit.int().argmax(dim=1)
    return torch.where(hit.any(dim=1), first, torch.full_like(first, -1))
