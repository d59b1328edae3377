"""SEED-GRPO against docs/methods.md §4.6, plus clustering by meaning and degenerate groups."""

from __future__ import annotations

import math

import pytest
import torch

from rlvr_entropy.config import build_method
from rlvr_entropy.methods import RolloutBatch
from rlvr_entropy.methods.seed_grpo import cluster_group, seed_scale, semantic_entropy

ANSWERS = ["3", "3", "5", "3", "12", "7", None, "12"]
LOGLIK = torch.tensor([-0.20, -0.35, -0.90, -0.25, -0.50, -0.40, -1.20, -0.60])
R = torch.tensor([1.0, 1, 0, 1, 0, 1, 0, 0])
A = R - R.view(2, 4).mean(1).repeat_interleave(4)  # Dr.GRPO advantages


def batch(answers=ANSWERS, loglik=LOGLIK, group_size=4):
    n = len(answers)
    # one token per completion whose log-prob is the sequence log-likelihood (length-normalised = itself)
    return RolloutBatch(
        rewards_per_func=torch.zeros(n, 1), reward_names=["r"], reward_weights=torch.ones(1),
        group_ids=torch.arange(n) // group_size, group_size=group_size, mask=torch.ones(n, 1),
        completion_ids=torch.zeros(n, 1, dtype=torch.long), step=0, training=True,
        answers=list(answers), logps=loglik.unsqueeze(1),
    )


def clusters():
    ids0, ids1 = cluster_group(ANSWERS[:4]), cluster_group(ANSWERS[4:])
    return torch.tensor(ids0 + [i + max(ids0) + 1 for i in ids1])


def test_clusters_and_entropies_match_worked_example():
    assert cluster_group(ANSWERS[:4]) == [0, 0, 1, 0] and cluster_group(ANSWERS[4:]) == [0, 1, 2, 0]
    group = torch.arange(8) // 4
    rao, k = semantic_entropy(LOGLIK, group, clusters(), "rao")
    assert rao.tolist() == pytest.approx([0.422870, 0.972212], abs=2e-6) and k.tolist() == [2, 3]
    count, _ = semantic_entropy(LOGLIK, group, clusters(), "count")
    assert count.tolist() == pytest.approx([0.562335, 1.039721], abs=2e-6)
    mc, _ = semantic_entropy(LOGLIK, group, clusters(), "mc")
    p0 = [0.849907, 0.150093]
    assert mc[0].item() == pytest.approx(-sum(math.log(p) for p in p0) / 2, abs=2e-5)


@pytest.mark.parametrize(("alpha", "f", "expected"), [
    (0.0417, "inverse", [0.987440, 0.971587]),
    (1.0, "inverse", [0.766262, 0.587785]),
    (1.0, "linear", [0.694964, 0.298697]),
])
def test_scales_match_worked_example(alpha, f, expected):
    rao = torch.tensor([0.422870, 0.972212])
    assert seed_scale(rao, 4, alpha, True, f).tolist() == pytest.approx(expected, abs=2e-6)


def test_hook_scales_advantages():
    method = build_method({"name": "seed_grpo"})
    out = method.advantage(A.clone(), batch())
    assert out.tolist() == pytest.approx([0.246860, 0.246860, -0.740580, 0.246860,
                                          -0.242897, 0.728690, -0.242897, -0.242897], abs=2e-6)
    strong = build_method({"name": "seed_grpo", "alpha": 1.0}).advantage(A.clone(), batch())
    assert strong[:4].tolist() == pytest.approx([0.191566, 0.191566, -0.574697, 0.191566], abs=2e-6)
    per_token = method.advantage(A.unsqueeze(1).repeat(1, 3), batch())  # (N, T) advantages keep their shape
    assert per_token.shape == (8, 3) and torch.allclose(per_token[:, 0], out)


def test_equivalent_answers_share_a_cluster():
    assert cluster_group(["1/2", "0.5", "\\frac{1}{2}", "2", None, None]) == [0, 0, 0, 1, 2, 3]


def test_degenerate_groups_give_finite_results():
    method = build_method({"name": "seed_grpo", "alpha": 1.0})
    # all answers unparseable: every answer its own cluster, entropy ln-ish but finite
    out = method.advantage(A.clone(), batch(answers=[None] * 8))
    assert torch.isfinite(out).all()
    # all the same answer: one cluster, entropy 0, scale 1
    same = method.advantage(A.clone(), batch(answers=["4"] * 8))
    assert torch.allclose(same, A)
    # groups of size 1: ln G = 0 must not divide
    single = method.advantage(torch.zeros(3), batch(answers=["1", None, "2"], loglik=torch.tensor([-1.0, -2.0, -3.0]), group_size=1))
    assert torch.isfinite(single).all()
    # all-equal rewards: zero advantages stay zero
    assert torch.equal(method.advantage(torch.zeros(8), batch()), torch.zeros(8))
    # very negative log-likelihoods do not underflow
    deep = method.advantage(A.clone(), batch(loglik=LOGLIK * 1000))
    assert torch.isfinite(deep).all()
