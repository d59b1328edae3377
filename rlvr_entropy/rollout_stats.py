"""Rollout statistics: behaviour-policy token entropy and sampled-token log-probs, and their summaries.

Three sources produce the same per-token numbers:

- ``generate``: read from HF ``generate``'s own forward calls through a forward hook. Each decoding
  step's logits (B, V) are turned into an entropy (B,) and, one step later when the sampled token is
  known, its log-prob (B,); only one step's (B, V) log-softmax is alive at a time, so nothing of
  size (B, T, V) is kept and no extra forward pass runs.
- ``vllm``: vLLM's own top-k log-probs of every generated token (``topk_token_stats``): the sampled
  token's log-prob exactly, and an entropy *estimate* from the k most likely tokens with the rest of
  the vocabulary as one bucket, a lower bound on the exact entropy (equal to it when k covers the
  vocabulary). vLLM already computed these numbers; nothing of size (B, T, V) is built here.
- ``forward``: one no-grad forward over the finished batch with TRL's fused LM head (used with vLLM,
  continuous batching, tool loops or a custom ``rollout_func``). When TRL already runs its old-logp
  forward for the batch, that pass is reused.

Which source a run uses is :func:`resolve_source`'s answer; ``rollout.py`` (steps 1-2 of the trainer's
hook order) wires the chosen one into TRL's generation.

Both describe the temperature-scaled distribution ``softmax(logits / T_train)`` over the full
vocabulary, i.e. the same distribution the training pass scores; sampling-time truncation (top-p,
top-k, min-p) is not applied, so with truncation on this is the entropy of the policy being trained,
not of the truncated sampler. vLLM's numbers are its "processed" log-probs: after temperature, and
after top-k/top-p/min-p and penalties when those are set, i.e. the distribution it sampled from.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

SOURCES = ("generate", "vllm", "forward")


def resolve_source(requested: str, hf_generate: bool, vllm: bool) -> str:
    """The statistics source for ``rollout_stats_source: requested`` ("auto" or one of :data:`SOURCES`).

    ``hf_generate``: TRL generates with plain HF ``generate`` (no vLLM, continuous batching, custom
    ``rollout_func`` or tools); ``vllm``: with vLLM (no ``rollout_func`` or tools).
    """
    if requested == "generate" and not hf_generate:
        raise ValueError(
            "rollout_stats_source='generate' needs plain HF generation (no vLLM, continuous batching, "
            "rollout_func or tools); use 'forward' or 'auto'"
        )
    if requested == "vllm" and not vllm:
        raise ValueError(
            "rollout_stats_source='vllm' needs use_vllm (without rollout_func or tools); use 'forward' or 'auto'"
        )
    if requested == "auto":
        return "generate" if hf_generate else "vllm" if vllm else "forward"
    return requested


def step_entropy_and_logprobs(logits: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Entropy (B,) and log-softmax (B, V) of one decoding step's logits, in float32."""
    z = logits.float() / temperature  # (B, V)
    entropy, lse = _entropy_and_lse(z)
    return entropy, z - lse.unsqueeze(-1)


def step_entropy(logits: Tensor, temperature: float) -> Tensor:
    """Entropy (B,) of one decoding step's logits, in float32: ``logsumexp(z) - sum softmax(z) * z``.

    Five kernels on (B, V), against ten for the log-softmax route: this runs once per decoding step inside
    generate, where on a small model it is a visible share of the step (scripts/bench_overhead.py).
    """
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    return _entropy_and_lse(z)[0]


def _entropy_and_lse(z: Tensor) -> tuple[Tensor, Tensor]:
    lse = torch.logsumexp(z, dim=-1)  # (B,)
    # nansum: a masked token (z = -inf, p = 0) gives 0 * -inf = NaN, and contributes 0·log 0 = 0
    return lse - (torch.softmax(z, dim=-1) * z).nansum(dim=-1), lse


def topk_entropy(logprobs: Tensor) -> Tensor:
    """Entropy lower bound from the log-probs of each position's most likely tokens.

    With S the probability mass of the listed tokens, the unlisted ones are counted as one bucket:
    ``H_k = -sum_i p_i log p_i - (1 - S) log(1 - S)``. Every unlisted token has p <= 1 - S, so
    ``-log p >= -log(1 - S)`` for each of them and ``H_k <= H``; equality when the list covers every
    token with non-zero probability.

    Args:
        logprobs: (N, K) float; entries that are not listed tokens are -inf or NaN.
    Returns:
        (N,) float32.
    """
    lp = torch.nan_to_num(logprobs.double(), nan=-math.inf, posinf=-math.inf)  # NaN/None: not a listed token
    p = lp.exp()  # (N, K), 0 where not listed
    head = -torch.where(p > 0, p * lp, torch.zeros_like(p)).sum(dim=-1)  # (N,)
    tail = (1.0 - p.sum(dim=-1)).clamp(min=0.0)  # rounding can push the listed mass past 1
    tail_term = -torch.where(tail > 0, tail * torch.log(tail.clamp(min=1e-300)), torch.zeros_like(tail))
    return (head + tail_term).float()


def topk_token_stats(
    completion_ids: Sequence[Sequence[int]],
    logprobs: Sequence[Sequence[Sequence[float | None]]],
    token_ids: Sequence[Sequence[Sequence[int]]],
) -> tuple[dict[str, list[Tensor]], list[list[float]]]:
    """Per-token rollout statistics from vLLM's top-k log-probs (as TRL's ``VLLMGeneration.generate`` returns them).

    Args:
        completion_ids: per row, the sampled tokens (T_i,).
        logprobs: per row and position, the log-probs of the top-k tokens plus the sampled one
            (k or k+1 entries, any order; None for NaN).
        token_ids: the token ids of those entries, same nesting.
    Returns:
        ``({"entropy": rows, "logps": rows}, sampled)``: float32 (T_i,) tensors per row (the top-k entropy
        estimate and the sampled token's log-prob), and the sampled token's log-prob per position as the
        Python float vLLM returned (NaN where it returned none), which is what TRL reads with ``logprobs=0``.
    """
    lengths = [len(c) for c in completion_ids]
    if [len(r) for r in logprobs] != lengths or [len(r) for r in token_ids] != lengths:
        raise ValueError("vLLM returned log-probs for a different number of tokens than it generated")
    counts_list = [len(pos) for row in logprobs for pos in row]  # entries per generated token
    n_pos = len(counts_list)
    if n_pos == 0:
        empty = [torch.zeros(0) for _ in lengths]
        return {"entropy": empty, "logps": list(empty)}, [[] for _ in lengths]
    # The nested lists arrive from vLLM as Python objects: one flattening pass, then only tensor ops.
    values = torch.from_numpy(  # None -> NaN
        np.array(list(itertools.chain.from_iterable(itertools.chain.from_iterable(logprobs))), dtype=np.float64)
    )  # (E,)
    ids = torch.from_numpy(
        np.fromiter(itertools.chain.from_iterable(itertools.chain.from_iterable(token_ids)), dtype=np.int64)
    )  # (E,)
    counts = torch.tensor(counts_list)  # (P,)
    if values.numel() != ids.numel() or values.numel() != int(counts.sum()):
        raise ValueError("vLLM's log-probs and their token ids do not line up")
    width = int(counts.max())
    pos = torch.repeat_interleave(torch.arange(n_pos), counts)  # (E,) position of each entry
    col = torch.arange(values.numel()) - (torch.cumsum(counts, 0) - counts)[pos]  # (E,) slot within its position
    lp = torch.full((n_pos, width), -math.inf, dtype=torch.float64)
    lp[pos, col] = values
    id_grid = torch.full((n_pos, width), -1, dtype=torch.long)
    id_grid[pos, col] = ids
    sampled_ids = torch.tensor(list(itertools.chain.from_iterable(completion_ids)), dtype=torch.long)  # (P,)
    hit = id_grid == sampled_ids.unsqueeze(1)  # (P, K)
    found = hit.any(dim=1)
    sampled = lp.gather(1, hit.int().argmax(dim=1, keepdim=True)).squeeze(1)
    sampled = torch.where(found, sampled, torch.full_like(sampled, math.nan))  # (P,) float64: vLLM's values
    entropy = topk_entropy(lp)  # (P,)
    stats = {
        "entropy": list(torch.split(entropy, lengths)),
        "logps": list(torch.split(sampled.float(), lengths)),
    }
    sampled_rows = [row.tolist() for row in torch.split(sampled, lengths)]
    return stats, sampled_rows


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
        if self.want_logps:
            entropy, logp = step_entropy_and_logprobs(logits[:, -1, :], self.temperature)
        else:
            entropy, logp = step_entropy(logits[:, -1, :], self.temperature), None
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


def encode_marker(tokenizer: Any, marker: str, users: str) -> list[int]:
    """The token ids of the thinking-end marker; a ValueError naming ``users`` (the methods that need the
    ``phases`` statistic) and what to change when this tokenizer cannot encode it faithfully."""
    ids = tokenizer.encode(marker, add_special_tokens=False)
    unk = tokenizer.unk_token_id
    decoded = tokenizer.decode(ids) if ids else ""
    if not ids or (unk is not None and unk in ids) or "".join(decoded.split()) != "".join(marker.split()):
        shown = "encodes to no tokens" if not ids else f"encodes to {ids}, which decodes to {decoded!r}"
        raise ValueError(
            f"think_marker {marker!r} {shown} with this tokenizer, so {users} cannot find where thinking ends. "
            "Set think_marker to the text the model writes at the end of its thinking, made of characters the "
            "tokenizer knows (e.g. '</think>')"
        )
    return ids


def completion_grid(
    completion_ids: Sequence[Sequence[int]], pad_token_id: int, tool_mask: Sequence[Sequence[int]] | None = None
) -> tuple[Tensor, Tensor]:
    """Ragged completions as right-padded ids (B, T) long and a mask (B, T) float32 of the tokens that count
    (times the tool mask, when tools inserted tokens the policy did not sample); T >= 1."""
    lengths = [len(c) for c in completion_ids]
    width = max(1, max(lengths, default=0))
    mask = (torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).float()  # (B, T)
    if tool_mask is not None:
        mask = mask * pad_rows([torch.tensor(m) for m in tool_mask], width)
    ids = torch.full((len(lengths), width), pad_token_id, dtype=torch.long)
    for i, c in enumerate(completion_ids):  # one copy per row
        ids[i, : len(c)] = torch.tensor(c, dtype=torch.long)
    return ids, mask


def forward_inputs(
    prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], pad_token_id: int
) -> tuple[Tensor, Tensor, int]:
    """Inputs of a forward pass over finished rollouts, laid out as TRL lays out its own: prompts left-padded,
    completions right-padded. Returns ids (B, P + C), attention mask (B, P + C) and C (logits to keep)."""
    p_len = max(len(p) for p in prompt_ids)
    c_len = max(1, max(len(c) for c in completion_ids))
    ids = torch.full((len(prompt_ids), p_len + c_len), pad_token_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids, strict=True)):  # one copy per row
        ids[i, p_len - len(p) : p_len] = torch.tensor(p, dtype=torch.long)
        attn[i, p_len - len(p) : p_len + len(c)] = 1
        ids[i, p_len : p_len + len(c)] = torch.tensor(c, dtype=torch.long)
    return ids, attn, c_len
