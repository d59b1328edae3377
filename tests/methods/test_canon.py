"""CANON against docs/methods.md §5.6 (verified there with the official functions, max_length = 1)."""

from __future__ import annotations

import pytest
import torch
from helpers.cov_example import LENGTHS, MASK

from rlvr_entropy.config import build_method
from rlvr_entropy.methods import RolloutBatch
from rlvr_entropy.methods.canon import canon_advantages, cosine_restart, split_halves

R = torch.tensor([1.0, 0, 1, 0, 1, 0, 0, 0])
MEAN_H = torch.tensor([0.50, 0.80, 0.20, 0.50, 0.50, 0.20, 1.10, 0.30])
GROUP = torch.arange(8) // 4


def entropy_rows():
    """Token entropies whose masked means are MEAN_H, with large junk on padding."""
    h = MEAN_H.unsqueeze(1).repeat(1, 5)
    h[2, :4] = torch.tensor([0.2, 0.1, 0.3, 0.2])  # row 2 of the spec: mean 0.2 over its 4 tokens
    return torch.where(MASK > 0, h, torch.full_like(h, 9.0))


def batch(rewards=R, step=0):
    return RolloutBatch(
        rewards_per_func=rewards.unsqueeze(1), reward_names=["r"], reward_weights=torch.ones(1), group_ids=GROUP,
        group_size=4, mask=MASK, completion_ids=torch.zeros(8, 5, dtype=torch.long), step=step, training=True,
        entropy=entropy_rows(),
    )


EXPECTED = {
    1.0: [1, -1, 1, -1, 1.00, -0.50, 0.00, -0.50],
    0.0: [0, 0, 0, 0, 0.50, 0.00, -0.50, 0.00],
    0.5: [0.5, -0.5, 0.5, -0.5, 0.75, -0.25, -0.25, -0.25],
}


@pytest.mark.parametrize("mu", [1.0, 0.0, 0.5])
def test_entropy_metric_worked_example(mu):
    out = build_method({"name": "canon", "mu": mu}).advantage(torch.zeros(8), batch())
    assert out.tolist() == pytest.approx(EXPECTED[mu], abs=1e-6)


def test_mu_half_is_dr_grpo():
    rewards = torch.tensor([0.3, 1.0, 0.0, 0.7, 2.0, -1.0, 0.5, 0.5])
    out = build_method({"name": "canon", "mu": 0.5}).advantage(torch.zeros(8), batch(rewards))
    dr_grpo = rewards - rewards.view(2, 4).mean(1).repeat_interleave(4)
    assert torch.allclose(out, dr_grpo, atol=1e-6)


def test_tie_order_is_stable_and_matters():
    high = split_halves(MEAN_H, GROUP, 4)
    assert high.tolist() == [False, True, False, True, True, False, True, False]  # row 0 (0.5) before row 3 (0.5)
    # breaking the row0/row3 tie the other way changes prompt 0's inter advantages: the test must see it
    flipped = torch.tensor([True, True, False, False])
    other, _ = canon_advantages(R[:4], flipped, GROUP[:4], 1.0)
    assert other.tolist() == pytest.approx([0.5, -0.5, 0.5, -0.5])
    assert other.tolist() != pytest.approx(EXPECTED[1.0][:4])


def test_annealed_schedule_and_length_variant():
    annel = build_method({"name": "canon", "schedule": "accuracy"}).advantage(torch.zeros(8), batch())
    assert annel.tolist() == pytest.approx([0.375, -0.375, 0.375, -0.375, 0.6875, -0.1875, -0.3125, -0.1875], abs=1e-6)
    length = build_method({"name": "canon", "metric": "length", "alpha": 0.9})
    assert length.needs == frozenset()
    out = length.advantage(torch.zeros(8), batch())
    assert out.tolist() == pytest.approx([0.40, -0.50, 0.55, -0.45, 0.90, -0.45, 0.00, -0.45], abs=1e-6)
    assert LENGTHS == [5, 5, 4, 3, 5, 2, 5, 4]


def test_alpha_on_the_low_half_is_the_entropy_code_path():
    out, _ = canon_advantages(R, split_halves(MEAN_H, GROUP, 4), GROUP, 1.0, alpha=0.9, alpha_group="low")
    # C+ (rows 1, 3 | 4, 6): R - 0.9 mu-;  C- (rows 0, 2 | 5, 7): 0.9 R - mu+
    assert out.tolist() == pytest.approx([0.9 - 0, 0 - 0.9, 0.9 - 0, 0 - 0.9, 1 - 0, 0 - 0.5, 0 - 0, 0 - 0.5], abs=1e-6)


def test_degenerate_groups_are_finite():
    single, _ = canon_advantages(torch.tensor([1.0, 0.0]), torch.tensor([True, True]), torch.tensor([0, 1]), 1.0)
    assert single.tolist() == [1.0, 0.0]  # a group of one: both means 0, A = R
    equal = build_method({"name": "canon"}).advantage(torch.zeros(8), batch(torch.ones(8)))
    assert torch.equal(equal, torch.zeros(8))
    unscored = R.clone()
    unscored[:4] = float("nan")
    out = build_method({"name": "canon", "mu": 0.5}).advantage(torch.zeros(8), batch(unscored))
    assert torch.isfinite(out).all() and (out[:4] == 0).all()


def test_cosine_restart_shape():
    assert cosine_restart(0, 150, 30, 3, 0.6, 0.0) == pytest.approx(0.02)
    assert cosine_restart(29, 150, 30, 3, 0.6, 0.0) == pytest.approx(0.6)
    assert cosine_restart(30, 150, 30, 3, 0.6, 0.0) == pytest.approx(0.6)
    assert cosine_restart(50, 150, 30, 3, 0.6, 0.0) == pytest.approx(0.3)
    assert cosine_restart(70, 150, 30, 3, 0.6, 0.0) == pytest.approx(0.6)  # restart
    mu = build_method({"name": "canon", "schedule": "cosine_restart_r"}).current_mu(batch(step=30), R)
    assert mu == pytest.approx(1.0)


def test_metrics_logged():
    b = batch()
    build_method({"name": "canon"}).advantage(torch.zeros(8), b)
    assert b.metrics["mu"] == 1.0
    assert b.metrics["high_won"] == pytest.approx(0.5)  # prompt 0: mu+ 0 < mu- 1; prompt 1: 0.5 > 0
    assert 0.0 <= b.metrics["agreement"] <= 1.0
