"""CE-GPPO against docs/methods-2.md §3.6 (values from the official function), through the trainer, composed."""

from __future__ import annotations

import pytest
import torch
from helpers.trainers import build, generate, loss_and_grads, prompt_rows

from rlvr_entropy.config import RecipeError, build_method, load_recipe
from rlvr_entropy.methods import LossBatch, MethodConfigError, Pipeline
from rlvr_entropy.methods.base import clipped_sides
from rlvr_entropy.methods.ce_gppo import gradient_preserving_term
from rlvr_entropy.methods.kl_cov import kl_cov_select

CPU = ["use_cpu=true", "bf16=false", "gradient_checkpointing=false"]
R = torch.tensor([[1.5, 0.6, 0.6, 1.5, 1.1, 0.9, 0.7]])  # the 7th token is padding (junk ratio)
A = torch.tensor([[1.0, -1.0, 1.0, -1.0, 1.0, -0.5, -1.0]])
M = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]])
PPO_TOKEN = [-1.2, 0.8, -0.6, 1.5, -1.1, 0.45]
PPO_GRAD = [0.0, 0.0, -0.1, 0.25, -0.183333, 0.075]
# (beta1, beta2) -> CE-GPPO loss value and d loss / d logp on the 6 counted tokens (the spec's table)
CE_GPPO = {
    (0.5, 1.0): (-0.091667, [-0.2, 0.066667, -0.1, 0.25, -0.183333, 0.075]),
    (0.75, 1.0): (-0.058333, [-0.2, 0.1, -0.1, 0.25, -0.183333, 0.075]),
    (1.0, 1.0): (-0.025000, [-0.2, 0.133333, -0.1, 0.25, -0.183333, 0.075]),
}


def dual_clip(loss, adv, dual):
    """verl's dual clip: for A < 0 the token loss is capped at -A c (None: no dual clip, as TRL's default)."""
    return loss if dual is None else torch.where(adv < 0, torch.minimum(loss, -adv * dual), loss)


def ppo_token_loss(logp, old, adv, eps_low, eps_high, dual=10.0):
    """The reference's PPO token loss with dual clip: max(-A r, -A clip(r)), capped at -A c for A < 0."""
    ratio = torch.exp(logp - old)
    loss = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - eps_low, 1 + eps_high))
    return dual_clip(loss, adv, dual)


def ce_gppo_token_loss(logp, old, adv, beta1, beta2, eps_low, eps_high, dual=10.0):
    """CE-GPPO's token loss, written from the paper's formula: -beta (1 +- eps) r / sg(r) A on clipped tokens."""
    ratio = torch.exp(logp - old)
    low = (ratio < 1 - eps_low) & (adv < 0)
    high = (ratio > 1 + eps_high) & (adv > 0)
    grad_ratio = ratio / ratio.detach()
    loss = torch.where(low, -beta1 * (1 - eps_low) * grad_ratio * adv,
                       torch.where(high, -beta2 * (1 + eps_high) * grad_ratio * adv, -ratio * adv))
    return dual_clip(loss, adv, dual)


def token_mean(x, mask=M):
    return (x * mask).sum() / mask.sum()


def batch(ratio=R, adv=A, mask=M, eps_low=0.2, eps_high=0.2, entropy=None, **kw) -> LossBatch:
    old = torch.zeros_like(ratio)
    return LossBatch(
        logps=ratio.log().clone().requires_grad_(True), old_logps=old, on_policy=False,
        entropy=torch.ones_like(ratio) if entropy is None else entropy, advantages=adv, mask=mask,
        group_ids=torch.zeros(ratio.size(0), dtype=torch.long),
        weight=torch.ones_like(mask), loss_type="dapo", epsilon_low=eps_low, epsilon_high=eps_high,
        importance_sampling_level="token", step=0, micro_step=0, seed=0, process_index=0, num_processes=1,
        gather=lambda x: x, **kw,
    )


def test_reference_ppo_loss_matches_the_worked_example():
    logp = R.log().requires_grad_(True)
    per_token = ppo_token_loss(logp, torch.zeros_like(R), A, 0.2, 0.2)
    assert per_token[0, :6].tolist() == pytest.approx(PPO_TOKEN, abs=1e-6)
    loss = token_mean(per_token)
    loss.backward()
    assert loss.item() == pytest.approx(-0.025, abs=1e-6)
    assert logp.grad[0, :6].tolist() == pytest.approx(PPO_GRAD, abs=1e-6)


@pytest.mark.parametrize(("beta1", "beta2"), list(CE_GPPO))
def test_ppo_plus_the_extra_term_has_ce_gppos_gradient_and_ppos_value(beta1, beta2):
    value, grad = CE_GPPO[(beta1, beta2)]
    # the oracle: CE-GPPO's own loss
    logp = R.log().requires_grad_(True)
    oracle = token_mean(ce_gppo_token_loss(logp, torch.zeros_like(R), A, beta1, beta2, 0.2, 0.2))
    oracle.backward()
    assert oracle.item() == pytest.approx(value, abs=1e-6)
    assert logp.grad[0, :6].tolist() == pytest.approx(grad, abs=1e-6)
    # the method: TRL's PPO loss plus its zero-valued extra term
    method = build_method({"name": "ce_gppo", "beta1": beta1, "beta2": beta2})
    b = batch()
    terms = method.token_loss(b)
    assert terms.scalar is None and terms.weight is None and terms.detach is None
    assert terms.extra.detach().abs().max().item() == 0.0  # value 0 everywhere
    total = token_mean(ppo_token_loss(b.logps, b.old_logps, A, 0.2, 0.2) + terms.extra)
    total.backward()
    assert total.item() == pytest.approx(-0.025, abs=1e-6)  # the logged loss is PPO's
    assert b.logps.grad[0, :6].tolist() == pytest.approx(grad, abs=1e-6)
    assert b.logps.grad[0, 6].item() == 0.0  # padding
    assert b.metrics["clipped_low"][0].item() == pytest.approx(1 / 6)
    assert b.metrics["clipped_high"][0].item() == pytest.approx(1 / 6)
    assert b.metrics["clipped_low"][2].item() == 6  # counted tokens: a global mean


def test_clipped_sides_follow_trls_definition_and_asymmetric_epsilons():
    b = batch(eps_low=0.2, eps_high=0.28)
    low, high = clipped_sides(b.logps, b.old_logps, A, M, 0.2, 0.28)
    assert low[0].tolist() == [False, True, False, False, False, False, False]
    assert high[0].tolist() == [True, False, False, False, False, False, False]
    assert torch.equal(low | high, b.ppo_clipped())
    b.logps.data[0, 0] = torch.tensor(1.25).log()  # inside 1 + 0.28: no longer clipped
    assert not clipped_sides(b.logps, b.old_logps, A, M, 0.2, 0.28)[1].any()
    # the restored gradient uses each side's own epsilon
    term = gradient_preserving_term(b.logps, A, low, high, 0.5, 1.0, 0.2, 0.28)
    term.sum().backward()
    assert b.logps.grad[0, 1].item() == pytest.approx(-0.5 * 0.8 * -1.0)


def test_on_policy_batches_are_untouched():
    b = batch(ratio=torch.ones_like(R))
    terms = build_method({"name": "ce_gppo"}).token_loss(b)
    terms.extra.sum().backward()
    assert b.logps.grad.abs().sum().item() == 0.0


def test_positive_nll_term_averages_minus_logp_over_correct_responses():
    ratio = torch.tensor([[0.5, 0.8, 1.0], [0.9, 0.4, 2.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    method = build_method({"name": "ce_gppo", "pos_nll_coef": 0.1})
    assert method.reward_inputs() == ["correctness"] and build_method({"name": "ce_gppo"}).reward_inputs() == []
    b = batch(ratio=ratio, adv=torch.zeros(2, 3), mask=mask, carried={"correct": torch.tensor([1.0, 0.0])})
    terms = method.token_loss(b)
    expected = -(torch.tensor(0.5).log() + torch.tensor(0.8).log()) / 2  # row 0's two counted tokens only
    assert terms.scalar.item() == pytest.approx(0.1 * expected.item(), abs=1e-7)
    terms.scalar.backward()
    assert b.logps.grad.flatten().tolist() == pytest.approx([-0.05, -0.05, 0.0, 0.0, 0.0, 0.0])
    assert b.metrics["pos_nll"][0].item() == pytest.approx(expected.item(), abs=1e-6)


def test_config_errors_and_checks(caplog):
    with pytest.raises(MethodConfigError, match="beta1 and beta2 must be >= 0"):
        build_method({"name": "ce_gppo", "beta1": -0.1})
    with pytest.raises(MethodConfigError, match="pos_nll_coef"):
        build_method({"name": "ce_gppo", "pos_nll_coef": -1.0})
    for bad, message in ((["loss_type=cispo"], "PPO clip"), (["importance_sampling_level=sequence"], "per token"),
                         (["top_entropy_quantile=0.2"], "high-entropy token mask"),
                         (["off_policy_mask_threshold=0.5"], "off-policy sequence mask")):
        with pytest.raises(RecipeError, match=message):
            load_recipe(None, [*CPU, *bad, "methods=[{name: ce_gppo}]"])
    with caplog.at_level("WARNING"):
        load_recipe(None, [*CPU, "methods=[{name: ce_gppo}]"])
    assert "no-op" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        load_recipe(None, [*CPU, "steps_per_generation=4", "methods=[{name: ce_gppo}]"])
    assert "no-op" not in caplog.text


def test_composes_with_entropy_adv_and_kl_cov_each_keeping_its_effect():
    """ce_gppo restores the gradient of the advantage TRL sees (shaped by entropy_adv, listed first); kl_cov's
    penalty adds to it."""
    entropy = torch.tensor([[0.1, 2.0, 0.5, 3.0, 1.0, 0.2, 0.0]])
    entries = [{"name": "entropy_adv"}, {"name": "ce_gppo", "beta1": 0.5},
               {"name": "kl_cov", "ratio": 0.5, "base_clip": True}]
    b = batch(entropy=entropy)
    terms = Pipeline([build_method(e) for e in entries]).token_loss(b)
    w = build_method(entries[0]).token_loss(batch(entropy=entropy)).weight
    assert torch.equal(terms.weight, w)
    total = token_mean(ppo_token_loss(b.logps, b.old_logps, A * terms.weight, 0.2, 0.2) + terms.extra)
    total.backward()
    # expected: CE-GPPO with the shifted advantage, plus kl_cov's |logp - old| on its selected tokens
    logp = R.log().requires_grad_(True)
    selected, _, _ = kl_cov_select(logp.detach(), A, M, 0.5)
    oracle = token_mean(ce_gppo_token_loss(logp, torch.zeros_like(R), A * w, 0.5, 1.0, 0.2, 0.2)
                        + (logp - 0.0).abs() * selected)
    oracle.backward()
    assert torch.allclose(b.logps.grad, logp.grad, atol=1e-6)
    assert selected.sum() == 3 and b.logps.grad[0, 1].item() != 0.0  # the restored low-side gradient survives
    assert {"entropy_adv/psi", "ce_gppo/clipped_low", "kl_cov/penalty"} <= set(b.metrics)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_trls_loss_plus_the_extra_term_gives_ce_gppos_gradient(model_dir, tmp_path, loss_type):
    """Through the trainer, off-policy: the loss value is TRL's PPO loss and the gradient is CE-GPPO's."""
    plain = build(model_dir, tmp_path, [], loss_type=loss_type)
    ce = build(model_dir, tmp_path, [{"name": "ce_gppo", "beta1": 0.5, "beta2": 1.0}], loss_type=loss_type)
    out = generate(plain, prompt_rows(2, 4))
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    attn = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    width = out["completion_ids"].size(1)
    with torch.no_grad():
        logps, _, _ = plain._get_per_token_logps_and_entropies(plain.model, ids, attn, width)
    out["old_per_token_logps"] = logps + 0.3 * torch.randn(logps.shape, generator=torch.Generator().manual_seed(1))
    p_loss, p_grads = loss_and_grads(plain, dict(out))
    c_loss, c_grads = loss_and_grads(ce, dict(out))
    assert c_loss.item() == pytest.approx(p_loss.item(), rel=1e-6, abs=1e-7)
    assert any(not torch.allclose(c_grads[n], g, atol=1e-6) for n, g in p_grads.items())  # the gradient moved
    metrics = ce._metrics["train"]
    assert metrics["ce_gppo/clipped_low"][0] > 0 and metrics["ce_gppo/clipped_high"][0] > 0
    # the oracle: CE-GPPO's own loss, aggregated as TRL aggregates this loss type (TRL's delta is unset: no dual clip)
    ce.model.zero_grad(set_to_none=True)
    logp, _, _ = ce._get_per_token_logps_and_entropies(ce.model, ids, attn, width)
    mask = out["completion_mask"].float()
    adv = out["advantages"].unsqueeze(1).expand_as(mask)
    per_token = ce_gppo_token_loss(logp, out["old_per_token_logps"], adv, 0.5, 1.0, 0.2, 0.2, dual=None)
    if loss_type == "dapo":
        oracle = (per_token * mask).sum() / out["num_items_in_batch"]
    else:
        oracle = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1.0)).mean()
    oracle.backward()
    for name, p in ce.model.named_parameters():
        if p.grad is not None:
            assert torch.allclose(c_grads[name], p.grad, rtol=1e-4, atol=1e-6), name


def test_positive_nll_through_the_trainer(model_dir, tmp_path):
    """pos_nll_coef carries a correctness flag per sample and adds coef * mean(-logp) over correct tokens."""
    plain = build(model_dir, tmp_path, [])
    nll = build(model_dir, tmp_path, [{"name": "ce_gppo", "pos_nll_coef": 0.1, "correct_from": "partial_credit"}])
    rows = prompt_rows(2, 4)
    p_out, n_out = generate(plain, rows), generate(nll, rows)
    assert "carry/ce_gppo/correct" in n_out
    correct = n_out["carry/ce_gppo/correct"] > 0.5
    assert 0 < int(correct.sum()) < len(correct)
    p_loss, _ = loss_and_grads(plain, p_out)
    n_loss, _ = loss_and_grads(nll, n_out)
    mask = n_out["completion_mask"].float() * correct.unsqueeze(1)
    ids = torch.cat([n_out["prompt_ids"], n_out["completion_ids"]], 1)
    attn = torch.cat([n_out["prompt_mask"], n_out["completion_mask"]], 1)
    with torch.no_grad():
        logp, _, _ = nll._get_per_token_logps_and_entropies(nll.model, ids, attn, n_out["completion_ids"].size(1))
    expected = 0.1 * (-logp * mask).sum() / mask.sum()
    assert n_loss.item() - p_loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert nll._metrics["train"]["ce_gppo/pos_nll"][0] == pytest.approx((expected / 0.1).item(), rel=1e-4)


def test_positive_nll_reads_a_reward_function_the_run_must_have(model_dir, tmp_path):
    with pytest.raises(MethodConfigError, match="reads reward function 'accuracy'"):
        build(model_dir, tmp_path, [{"name": "ce_gppo", "pos_nll_coef": 0.1, "correct_from": "accuracy"}])
    build(model_dir, tmp_path, [{"name": "ce_gppo", "correct_from": "accuracy"}])  # off: nothing is read
