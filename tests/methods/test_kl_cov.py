"""KL-Cov against docs/methods.md §2.6 (values from the official function), on- and off-policy."""

from __future__ import annotations

import pytest
import torch
from helpers.cov_example import ADV, LOGP, MASK, loss_batch, token_mean

from rlvr_entropy.config import build_method
from rlvr_entropy.methods import MethodConfigError
from rlvr_entropy.methods.kl_cov import kl_cov_select


def total_loss(method, batch):
    """The reference's token-mean of -A*ratio (unclipped) plus the method's extra term."""
    terms = method.token_loss(batch)
    base = -batch.advantages * torch.exp(batch.logps - batch.old_logps)
    return token_mean(base + terms.extra), terms


@pytest.mark.parametrize(("beta", "expected"), [(1.0, -0.106636), (0.0, -0.118757)])
def test_worked_example_loss(beta, expected):
    method = build_method({"name": "kl_cov", "ratio": 0.1, "beta": beta})
    loss, _ = total_loss(method, loss_batch())
    assert loss.item() == pytest.approx(expected, abs=5e-7)


def test_selected_tokens_in_order_and_gradients():
    selected, cov, k = kl_cov_select(LOGP, ADV, MASK, 0.1)
    assert k == 3
    assert sorted(map(tuple, selected.nonzero().tolist())) == [(3, 2), (4, 0), (4, 2)]
    assert [cov[3, 2].item(), cov[4, 2].item(), cov[4, 0].item()] == pytest.approx([2.022115, 1.198181, 0.957945], abs=2e-6)
    method = build_method({"name": "kl_cov", "ratio": 0.1, "beta": 1.0})
    batch = loss_batch()
    loss, _ = total_loss(method, batch)
    loss.backward()
    grads = [batch.logps.grad[3, 2].item(), batch.logps.grad[4, 2].item(), batch.logps.grad[4, 0].item()]
    assert grads == pytest.approx([-0.006557, -0.031054, -0.045455], abs=2e-6)


def test_on_policy_penalty_has_zero_gradient():
    method = build_method({"name": "kl_cov", "ratio": 0.1, "beta": 1.0})
    off = build_method({"name": "kl_cov", "ratio": 0.1, "beta": 0.0})
    grads = []
    for m in (method, off):
        batch = loss_batch(old=LOGP.clone())  # on-policy: old == current
        loss, terms = total_loss(m, batch)
        loss.backward()
        grads.append(batch.logps.grad.clone())
        assert batch.metrics["inert"][0] == 1.0  # no pipeline here, so no "kl_cov/" prefix
    assert torch.equal(grads[0], grads[1])


def test_padding_never_selected_and_units():
    junk = torch.where(MASK > 0, LOGP, torch.full_like(LOGP, 100.0))
    selected, _, _ = kl_cov_select(junk, ADV, MASK, 0.5)
    assert not (selected & (MASK == 0)).any()
    with pytest.raises(MethodConfigError, match="fraction"):
        build_method({"name": "kl_cov", "ratio": 0.2 * 100})


def test_requires_unclipped_base_or_explicit_base_clip():
    from rlvr_entropy.config import RecipeError, load_recipe

    cpu = ["use_cpu=true", "bf16=false", "gradient_checkpointing=false"]
    with pytest.raises(RecipeError, match="epsilon: 1.0"):
        load_recipe(None, [*cpu, "methods=[{name: kl_cov}]"])
    load_recipe(None, [*cpu, "methods=[{name: kl_cov, base_clip: true}]"])
    load_recipe(None, [*cpu, "epsilon=1.0", "epsilon_high=1.0e6", "methods=[{name: kl_cov}]"])


def test_warns_when_every_update_is_on_policy(caplog):
    from rlvr_entropy.config import load_recipe

    cpu = ["use_cpu=true", "bf16=false", "gradient_checkpointing=false", "epsilon=1.0", "epsilon_high=1.0e6"]
    with caplog.at_level("WARNING"):
        load_recipe(None, [*cpu, "methods=[{name: kl_cov}]"])
    assert "identically 0" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        load_recipe(None, [*cpu, "steps_per_generation=4", "methods=[{name: kl_cov}]"])
    assert "identically 0" not in caplog.text
