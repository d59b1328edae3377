"""ERC against docs/methods-2.md §5.6 (values from the official grpo_erc), through the trainer, composed."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers.trainers import build, generate, loss_and_grads, prompt_rows

from rlvr_entropy.config import build_method, load_recipe
from rlvr_entropy.methods import LossBatch, MethodConfigError, Pipeline
from rlvr_entropy.methods.erc import entropy_ratio

CPU = ["use_cpu=true", "bf16=false", "gradient_checkpointing=false"]
NAN = float("nan")
H_OLD = torch.tensor([[1.00, 0.50, 2.00, 0.10], [0.80, 1.20, 0.30, 0.0]])  # (1, 3) is padding
H_NEW = torch.tensor([[1.03, 0.45, 2.08, 0.104], [0.79, 1.30, 0.30, NAN]])  # junk (NaN) on padding
R = torch.tensor([[1.05, 0.90, 1.30, 1.00], [1.10, 0.95, 0.70, 5.00]])
A = torch.tensor([[1.0, 1.0, 1.0, 1.0], [-1.0, -1.0, -1.0, -1.0]])
M = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
RHO = [1.03, 0.90, 1.04, 1.04, 0.9875, 1.083333, 1.0]
KEEP = [True, False, True, True, True, False, True]
GRAD_VANILLA = [-0.15, -0.128571, 0.0, -0.142857, 0.157143, 0.135714, 0.0]
GRAD_ERC = [-0.15, 0.0, 0.0, -0.142857, 0.157143, 0.0, 0.0]


def ppo_token_loss(logp, old, adv, eps_low=0.2, eps_high=0.28, dual=10.0):
    """The reference's PPO token loss (grpo_erc's base): max(-A r, -A clip(r)), capped at -A c for A < 0."""
    ratio = torch.exp(logp - old)
    loss = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - eps_low, 1 + eps_high))
    return torch.where(adv < 0, torch.minimum(loss, -adv * dual), loss)


def token_mean(x):
    return (x * M).sum() / M.sum()


def counted(x):
    return x[M > 0].tolist()


def batch(h_new=H_NEW, h_old=H_OLD, **kw) -> LossBatch:
    return LossBatch(
        logps=R.log().clone().requires_grad_(True), old_logps=torch.zeros_like(R), on_policy=False, entropy=h_new,
        advantages=A, mask=M, group_ids=torch.tensor([0, 0]), weight=torch.ones_like(M), loss_type="dapo",
        epsilon_low=0.2, epsilon_high=0.28, importance_sampling_level="token", step=0, micro_step=0, seed=0,
        process_index=0, num_processes=1, gather=lambda x: x, rollout_entropy=h_old, **kw,
    )


def loss_with(terms, b):
    """What TRL computes: the PPO loss on the log-probs it receives (detached where the mask says), plus extras."""
    logps = b.logps if terms.detach is None else torch.where(terms.detach, b.logps.detach(), b.logps)
    adv = A if terms.weight is None else A * terms.weight
    per_token = ppo_token_loss(logps, b.old_logps, adv)
    return token_mean(per_token if terms.extra is None else per_token + terms.extra)


def test_worked_example_ratio_mask_loss_and_gradients():
    rho = entropy_ratio(H_NEW, H_OLD, M)
    assert counted(rho) == pytest.approx(RHO, abs=1e-6)
    assert rho[1, 3].item() == 1.0  # padding is never read
    b = batch()
    terms = build_method({"name": "erc"}).token_loss(b)
    assert counted(~terms.detach) == KEEP and not terms.detach[1, 3]
    assert terms.weight is None and terms.extra is None
    assert b.metrics["entropy_frac"][0].item() == pytest.approx(0.714286, abs=1e-6)
    assert b.metrics["entropy_frac"][2].item() == 7  # the count: a global mean over tokens
    assert b.metrics["abs_dev"][0].item() == pytest.approx(sum(abs(r - 1) for r in RHO) / 7, abs=1e-6)
    loss = loss_with(terms, b)
    loss.backward()
    assert loss.item() == pytest.approx(-0.197143, abs=1e-6)  # unchanged
    assert counted(b.logps.grad) == pytest.approx(GRAD_ERC, abs=1e-6)
    vanilla = batch()
    plain = token_mean(ppo_token_loss(vanilla.logps, vanilla.old_logps, A))
    plain.backward()
    assert plain.item() == pytest.approx(-0.197143, abs=1e-6)
    assert counted(vanilla.logps.grad) == pytest.approx(GRAD_VANILLA, abs=1e-6)


def test_band_edges_are_exclusive_and_unchanged_entropy_is_a_no_op():
    h_old = torch.ones(2, 4)
    h_new = torch.tensor([[0.95, 1.05, 0.9501, 1.0499], [1.0, 1.0, 1.0, NAN]], dtype=torch.float64).float()
    terms = build_method({"name": "erc"}).token_loss(batch(h_new=h_new, h_old=h_old))
    assert counted(terms.detach)[:4] == [True, True, False, False]
    b = batch(h_new=torch.nan_to_num(H_OLD), h_old=H_OLD)  # on-policy with an exact old entropy: rho = 1
    terms = build_method({"name": "erc"}).token_loss(b)
    assert not terms.detach.any() and b.metrics["entropy_frac"][0].item() == 1.0
    with pytest.raises(RuntimeError, match="rollout statistic 'entropy'"):
        build_method({"name": "erc"}).token_loss(batch(h_old=None))


def test_config_errors_and_warnings(caplog):
    for low, high in ((1.0, 1.05), (0.0, 1.05), (0.95, 1.0), (1.1, 1.2)):
        with pytest.raises(MethodConfigError, match="0 < low < 1 < high"):
            build_method({"name": "erc", "low": low, "high": high})
    erc = build_method({"name": "erc"})
    assert erc.needs == frozenset({"entropy"})
    args = {"num_iterations": 1, "steps_per_generation": 4, "gradient_accumulation_steps": 1}
    with caplog.at_level("WARNING"):
        erc.check(SimpleNamespace(use_vllm=True, rollout_stats_source="auto", **args))
    assert "rollout_stats_source: forward" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        erc.check(SimpleNamespace(use_vllm=True, rollout_stats_source="forward", **args))
        erc.check(SimpleNamespace(use_vllm=False, rollout_stats_source="auto", **args))
    assert caplog.text == ""
    with caplog.at_level("WARNING"):
        load_recipe(None, [*CPU, "methods=[{name: erc}]"])
    assert "no-op" in caplog.text


def test_composes_with_ce_gppo_and_clip_cov():
    """[erc, ce_gppo, clip_cov] (the paper's gppo_erc plus Clip-Cov): ERC's detach and Clip-Cov's zero weights reach
    TRL's loss; ce_gppo's restored gradient on clipped tokens is not removed by ERC's mask (see erc.py)."""
    h_new = H_NEW.clone()
    h_new[0, 2] = 2.2  # rho = 1.1 on a token PPO clips (r = 1.3 > 1.28, A > 0): ERC detaches it
    entries = [{"name": "erc"}, {"name": "ce_gppo", "beta1": 0.5, "beta2": 1.0},
               {"name": "clip_cov", "ratio": 0.2, "lb": -100.0, "ub": 100.0}]
    b = batch(h_new=h_new)
    terms = Pipeline([build_method(e) for e in entries]).token_loss(b)
    zeroed = (terms.weight == 0) & (M > 0)
    assert int(zeroed.sum()) == 1 and not (zeroed & b.ppo_clipped()).any()  # clip_cov: one unclipped token
    alone = build_method(entries[2]).token_loss(batch(h_new=h_new))
    assert torch.equal(terms.weight, alone.weight)  # the same seeded draw as on its own
    assert counted(terms.detach) == [False, True, True, False, False, True, False]
    loss = loss_with(terms, b)
    loss.backward()
    ppo_value = token_mean(ppo_token_loss(b.logps.detach(), b.old_logps, A * terms.weight))
    assert loss.item() == pytest.approx(ppo_value.item(), abs=1e-7)  # ERC and ce_gppo leave the value to PPO's
    expected = torch.zeros(2, 4)
    expected[M > 0] = torch.tensor([-0.15, 0.0, -1.28 / 7, -0.142857, 0.157143, 0.0, 0.5 * 0.8 / 7])
    expected[zeroed] = 0.0
    # (0, 2): clipped and outside the band. gppo_erc would give it no gradient; here ce_gppo restores -beta2 (1 + eps) A
    assert torch.allclose(b.logps.grad, expected, atol=1e-6)
    assert {"erc/entropy_frac", "ce_gppo/clipped_high", "clip_cov/selected"} <= set(b.metrics)


def test_through_the_trainer_tokens_outside_the_band_lose_their_gradient(model_dir, tmp_path):
    """With the behaviour policy's exact entropy ERC changes nothing on-policy; where the old entropy is made to
    differ (rows 0-3) those rows' tokens keep their loss value and lose their gradient."""
    plain = build(model_dir, tmp_path, [], beta=0.0)
    erc = build(model_dir, tmp_path, [{"name": "erc"}], beta=0.0)
    rows = prompt_rows(2, 4)
    out, p_out = generate(erc, rows), generate(plain, rows)
    assert "rollout_entropy" in out and torch.equal(out["completion_ids"], p_out["completion_ids"])
    p_loss, p_grads = loss_and_grads(plain, dict(p_out))
    e_loss, e_grads = loss_and_grads(erc, dict(out))
    assert e_loss.item() == pytest.approx(p_loss.item(), rel=1e-6)
    for name, g in p_grads.items():
        assert torch.allclose(e_grads[name], g, rtol=1e-5, atol=1e-7), name
    assert erc._metrics["train"]["erc/entropy_frac"][0] == 1.0  # generate's entropy is the training forward's
    assert erc._metrics["train"]["erc/abs_dev"][0] < 1e-4
    drifted = dict(out)
    drifted["rollout_entropy"] = out["rollout_entropy"].clone()
    drifted["rollout_entropy"][:4] *= 1.5  # rho = 2/3 on rows 0-3
    e_loss, e_grads = loss_and_grads(erc, drifted)
    zeroed = dict(p_out, advantages=p_out["advantages"].clone())
    zeroed["advantages"][:4] = 0.0  # with beta 0, no gradient through a row's tokens = a zero advantage there
    _, z_grads = loss_and_grads(plain, zeroed)
    assert e_loss.item() == pytest.approx(p_loss.item(), rel=1e-6)  # the value is unchanged
    for name, g in z_grads.items():
        assert torch.allclose(e_grads[name], g, rtol=1e-4, atol=1e-7), name
    mask = out["completion_mask"].float()
    share = (mask[4:].sum() / mask.sum()).item()
    assert erc._metrics["train"]["erc/entropy_frac"][-1] == pytest.approx(share, rel=1e-6)
