"""Clip-Cov against docs/methods.md §1.6 (values from the official function), and its invariants."""

from __future__ import annotations

import pytest
import torch
from helpers.cov_example import ADV, LOGP, MASK, OLD, loss_batch, ppo_token_loss, token_mean

from rlvr_entropy.config import build_method
from rlvr_entropy.methods import MethodConfigError
from rlvr_entropy.methods.clip_cov import clip_cov_select


def test_case_a_loss_and_selection():
    method = build_method({"name": "clip_cov", "ratio": 0.1, "lb": 0.7, "ub": 1.0})
    batch = loss_batch()
    terms = method.token_loss(batch)
    selected = terms.weight == 0
    assert sorted(map(tuple, selected.nonzero().tolist())) == [(4, 0), (6, 2)]
    per_token = ppo_token_loss(batch.logps, OLD, ADV, 0.2, 0.2)
    loss = token_mean(per_token * terms.weight)
    assert loss.item() == pytest.approx(-0.074306, abs=5e-7)
    assert token_mean(per_token).item() == pytest.approx(-0.104609, abs=5e-7)  # vanilla PPO, same eps
    assert selected.sum().item() / MASK.sum().item() == pytest.approx(2 / 33)  # the reference's clipfrac
    loss.backward()
    assert batch.logps.grad[4, 0] == 0 and batch.logps.grad[6, 2] == 0
    assert batch.logps.grad[0, 0] != 0


def test_case_a_covariances_and_clipped_tokens():
    batch = loss_batch()
    clipped = batch.ppo_clipped()
    assert sorted(map(tuple, clipped.nonzero().tolist())) == [(0, 3), (1, 2), (4, 2)]
    sel = clip_cov_select(LOGP, ADV, MASK, clipped, 0.1, 0.7, 1.0, torch.Generator().manual_seed(0))
    assert sel.clip_num == 3
    expected_rows = {0: [0.606104, -0.250989, 0.645063, -1.108082, 0.372352], 4: [0.957945, -2.716247, 1.198181, -0.737836, 0.463342]}
    for row, values in expected_rows.items():
        assert sel.cov[row].tolist() == pytest.approx(values, abs=2e-6)
    # (1, 2) lies in the band (cov 0.8787) but PPO already clips it: excluded
    assert sel.cov[1, 2].item() == pytest.approx(0.878666, abs=2e-6)
    assert not sel.candidates[1, 2]


@pytest.mark.parametrize("seed", range(5))
def test_case_b_random_subset_invariants(seed):
    batch = loss_batch()
    sel = clip_cov_select(LOGP, ADV, MASK, batch.ppo_clipped(), 0.1, 0.5, 1.0, torch.Generator().manual_seed(seed))
    cands = set(map(tuple, sel.candidates.nonzero().tolist()))
    assert cands == {(0, 0), (0, 2), (2, 1), (2, 3), (4, 0), (6, 2), (7, 3)}
    chosen = set(map(tuple, sel.selected.nonzero().tolist()))
    assert len(chosen) == 3 and chosen <= cands
    assert not (sel.selected & (MASK == 0)).any()  # padding is never selected
    assert not (sel.selected & batch.ppo_clipped()).any()


def test_case_b_loss_for_a_given_subset():
    per_token = ppo_token_loss(LOGP, OLD, ADV, 0.2, 0.2)
    weight = torch.ones_like(MASK)
    for i, j in [(0, 0), (0, 2), (2, 1)]:
        weight[i, j] = 0
    assert token_mean(per_token * weight).item() == pytest.approx(-0.025880, abs=5e-7)


def test_seeded_draw_repeats_and_varies_with_step():
    method = build_method({"name": "clip_cov", "ratio": 0.1, "lb": 0.5, "ub": 1.0})
    first = method.token_loss(loss_batch()).weight
    again = method.token_loss(loss_batch()).weight
    assert torch.equal(first, again)
    draws = set()
    for step in range(8):
        b = loss_batch()
        b.step = step
        draws.add(tuple(method.token_loss(b).weight.flatten().tolist()))
    assert len(draws) > 1


def test_padding_values_never_matter():
    junk = torch.where(MASK > 0, LOGP, torch.full_like(LOGP, -50.0))
    method = build_method({"name": "clip_cov", "ratio": 0.1, "lb": 0.7, "ub": 1.0})
    assert torch.equal(method.token_loss(loss_batch(logp=junk)).weight, method.token_loss(loss_batch()).weight)


def test_at_least_one_token_and_units_validated():
    sel = clip_cov_select(LOGP, ADV, MASK, torch.zeros_like(MASK, dtype=torch.bool), 1e-9, -10, 10, torch.Generator())
    assert sel.clip_num == 1 and sel.selected.sum() == 1
    with pytest.raises(MethodConfigError, match="fraction in \\[0, 1\\]"):
        build_method({"name": "clip_cov", "ratio": 2.0})  # a percent by mistake
    with pytest.raises(MethodConfigError, match="lb < ub"):
        build_method({"name": "clip_cov", "lb": 5.0, "ub": 1.0})


def test_all_equal_rewards_give_finite_zero_covariance():
    adv = torch.zeros_like(ADV)
    sel = clip_cov_select(LOGP, adv, MASK, torch.zeros_like(MASK, dtype=torch.bool), 0.1, 0.5, 1.0, torch.Generator())
    assert torch.isfinite(sel.cov).all() and sel.selected.sum() == 0
