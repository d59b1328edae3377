"""SEED-GRPO: scale each prompt's advantages down when its answers disagree in meaning.

Reference: Chen et al. 2025, "SEED-GRPO: Semantic Entropy Enhanced GRPO for Uncertainty-Aware Policy
Optimization", arXiv 2505.12346. Per prompt q with G answers:
1. cluster the answers by meaning (here: equal final answers, ``answers_match``: exact string, then
   exact rationals, then math-verify, so ``1/2``, ``0.5`` and ``\\frac{1}{2}`` share a cluster; an
   unparseable answer is its own cluster);
2. cluster probabilities from the behaviour policy's sequence log-likelihoods l_i (length-normalised
   by default): p_k = sum_{i in C_k} e^{l_i} / sum_j e^{l_j};
3. semantic entropy SE(q): ``rao`` = -sum_k p_k log p_k (default), ``mc`` = -(1/K) sum_k log p_k (the
   paper's Monte-Carlo form), ``count`` = -sum_k (|C_k|/G) log(|C_k|/G);
4. x = alpha * SE / ln G (``normalize_by_max_entropy``), scale s_q = f(x) with f = ``inverse`` 1/(1+x)
   (default), ``linear`` max(0, 1-x) or ``exp`` exp(-x); every advantage of the prompt is multiplied by s_q.

Defaults follow the third-party port that claims parity with the official commit (alpha 0.0417,
Rao entropy, inverse scale, length-normalised log-likelihoods); the official code is not readable
here, and the paper's summaries describe the MC estimator and other f, offered as options.
Deviations: clustering uses answer equivalence instead of exact strings (the spec's recommendation);
a group of size 1 has SE = 0 and scale 1. The paper pairs the method with Dr.GRPO advantages
(``scale_rewards: none``, ``loss_type: dr_grpo``): the recipes set that; the method scales whatever
advantages reach it, so it composes with the others.

Formulas, defaults and the worked examples the tests use: ``docs/methods.md`` §4.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from rlvr_entropy.methods.base import Method, MethodConfigError, RolloutBatch, register
from rlvr_entropy.tasks.rewards import answers_match


def cluster_group(answers: list[str | None], same: Callable[[str, str], bool] = answers_match) -> list[int]:
    """Cluster ids (0..K-1) for one group's answers: each answer joins the first cluster whose first
    member it matches; None (no parseable answer) is always a cluster of its own."""
    representatives: list[str | None] = []
    ids = []
    for answer in answers:
        found = None
        if answer is not None:
            for k, rep in enumerate(representatives):
                if rep is not None and (rep == answer or same(answer, rep)):
                    found = k
                    break
        if found is None:
            representatives.append(answer)
            found = len(representatives) - 1
        ids.append(found)
    return ids


def _scatter_logsumexp(values: Tensor, index: Tensor, size: int) -> Tensor:
    """logsumexp of ``values`` grouped by ``index`` -> (size,)."""
    peak = torch.full((size,), float("-inf"), dtype=values.dtype).scatter_reduce(0, index, values, "amax")
    total = torch.zeros(size, dtype=values.dtype).index_add_(0, index, torch.exp(values - peak[index]))
    return peak + torch.log(total)


def semantic_entropy(
    loglik: Tensor, group: Tensor, cluster: Tensor, estimator: Literal["rao", "mc", "count"]
) -> tuple[Tensor, Tensor]:
    """Semantic entropy per group and number of clusters per group.

    Args:
        loglik: (N,) sequence log-likelihood of each answer under the behaviour policy.
        group: (N,) group index in [0, n_groups).
        cluster: (N,) cluster index, unique across groups, in [0, n_clusters).
    Returns:
        (n_groups,) entropy and (n_groups,) cluster count, float32.
    """
    loglik = loglik.double()  # many tiny probabilities: do the log-sum-exp arithmetic in float64
    n_groups, n_clusters = int(group.max()) + 1, int(cluster.max()) + 1
    cluster_group_id = torch.zeros(n_clusters, dtype=torch.long).scatter_(0, cluster, group)  # (n_clusters,)
    clusters_per_group = torch.zeros(n_groups, dtype=torch.float64).index_add_(
        0, cluster_group_id, torch.ones(n_clusters, dtype=torch.float64)
    )
    if estimator == "count":
        members = torch.zeros(n_clusters, dtype=torch.float64).index_add_(0, cluster, torch.ones_like(loglik))
        size = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, group, torch.ones_like(loglik))
        log_p = torch.log(members) - torch.log(size[cluster_group_id])
    else:
        log_p = _scatter_logsumexp(loglik, cluster, n_clusters) - _scatter_logsumexp(loglik, group, n_groups)[cluster_group_id]
    if estimator == "mc":
        total = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, cluster_group_id, -log_p)
        entropy = total / clusters_per_group
    else:
        total = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, cluster_group_id, -torch.exp(log_p) * log_p)
        entropy = total
    return entropy.float(), clusters_per_group.float()


def seed_scale(entropy: Tensor, group_size: int, alpha: float, normalize: bool, f: str) -> Tensor:
    """The per-group advantage scale s_q from semantic entropy."""
    x = alpha * entropy
    if normalize:
        x = x / math.log(group_size) if group_size > 1 else torch.zeros_like(x)
    if f == "inverse":
        return 1.0 / (1.0 + x)
    if f == "linear":
        return torch.clamp(1.0 - x, min=0.0)
    return torch.exp(-x)


@register("seed_grpo")
@dataclass
class SeedGRPO(Method):
    """SEED-GRPO: shrink a prompt's advantages by the semantic entropy of its answers."""

    needs = frozenset({"answers", "logps"})

    alpha: float = 0.0417
    estimator: Literal["rao", "mc", "count"] = "rao"
    scale: Literal["inverse", "linear", "exp"] = "inverse"
    normalize_by_max_entropy: bool = True  # divide SE by ln G
    length_normalize: bool = True  # mean (not sum) token log-prob as the sequence log-likelihood

    def validate(self) -> None:
        if self.alpha < 0:
            raise MethodConfigError(f"seed_grpo.alpha must be >= 0, got {self.alpha}")

    def advantage(self, advantages: Tensor, batch: RolloutBatch) -> Tensor:
        if batch.answers is None:
            raise RuntimeError("seed_grpo needs the 'answers' rollout statistic")
        g = batch.group_ids.cpu()
        cluster = torch.empty_like(g)
        offset = 0
        for start in range(0, len(batch.answers), batch.group_size):  # one clustering per prompt
            ids = cluster_group(batch.answers[start : start + batch.group_size])
            cluster[start : start + len(ids)] = torch.tensor(ids) + offset
            offset += max(ids) + 1
        loglik = batch.sequence_logp(normalize=self.length_normalize).cpu()
        entropy, clusters = semantic_entropy(loglik, g, cluster, self.estimator)
        scale = seed_scale(entropy, batch.group_size, self.alpha, self.normalize_by_max_entropy, self.scale)
        batch.log("semantic_entropy", entropy.mean())
        batch.log("clusters", clusters.mean())
        batch.log("scale", scale.mean())
        s = scale.to(advantages.device)[batch.group_ids]  # (N,)
        return advantages * (s if advantages.dim() == 1 else s.unsqueeze(1))
