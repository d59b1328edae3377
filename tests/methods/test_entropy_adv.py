"""Entropy-based advantage against docs/methods-2.md §2.6, through the trainer, and composed with others."""

from __future__ import annotations

import pytest
import torch
from helpers.cov_example import ppo_token_loss
from helpers.trainers import build, generate, loss_and_grads, prompt_rows

from rlvr_entropy.config import build_method
from rlvr_entropy.methods import LossBatch, MethodConfigError, Pipeline
from rlvr_entropy.methods.entropy_adv import entropy_shift, shift_weight

NAN = float("nan")
A = torch.tensor([[1.0, 1.0, 1.0, 1.0], [-0.5, -0.5, -0.5, 3.0]])  # (1, 3) is padding: junk advantage
H = torch.tensor([[0.10, 0.80, 2.50, 1.30], [0.20, 0.90, 3.00, NAN]])  # junk (NaN) entropy on padding
M = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
# (alpha, kappa) -> psi, A^sh, w on the 7 counted tokens (row 0, then row 1's first three)
EXAMPLE = {
    2.0: ([0.04, 0.32, 0.50, 0.50, 0.08, 0.25, 0.25], [1.04, 1.32, 1.50, 1.50, -0.42, -0.25, -0.25],
          [1.04, 1.32, 1.5, 1.5, 0.84, 0.5, 0.5]),
    1.0: ([0.04, 0.32, 1.00, 0.52, 0.08, 0.36, 0.50], [1.04, 1.32, 2.00, 1.52, -0.42, -0.14, 0.00],
          [1.04, 1.32, 2.0, 1.52, 0.84, 0.28, 0.0]),
}
# ratios for the loss check: some tokens clipped on each side
LOGP = torch.log(torch.tensor([[1.30, 0.90, 1.05, 0.70], [0.60, 1.40, 1.00, 1.00]]))
OLD = torch.zeros(2, 4)


def counted(x: torch.Tensor) -> list[float]:
    return x[M > 0].tolist()


def batch(entropy=H, adv=A, mask=M, **kw) -> LossBatch:
    logp = LOGP.clone().requires_grad_(True)
    return LossBatch(
        logps=logp, old_logps=OLD, on_policy=False, entropy=entropy, advantages=adv, mask=mask,
        group_ids=torch.tensor([0, 0]), weight=torch.ones_like(mask), loss_type="dapo", epsilon_low=0.2,
        epsilon_high=0.2, importance_sampling_level="token", step=0, micro_step=0, seed=0, process_index=0,
        num_processes=1, gather=lambda x: x, **kw,
    )


@pytest.mark.parametrize("kappa", [2.0, 1.0])
def test_worked_example_psi_shifted_advantage_and_weight(kappa):
    psi_exp, shifted_exp, w_exp = EXAMPLE[kappa]
    psi, _ = entropy_shift(A, H, M, 0.4, kappa)
    w = shift_weight(A, psi)
    assert counted(psi) == pytest.approx(psi_exp, abs=1e-6)
    assert counted(A + psi) == pytest.approx(shifted_exp, abs=1e-6)
    assert counted(w) == pytest.approx(w_exp, abs=1e-6)
    assert psi[1, 3].item() == 0.0  # padding: no bonus, NaN entropy not read
    method = build_method({"name": "entropy_adv", "alpha": 0.4, "kappa": kappa})
    terms = method.token_loss(b := batch())
    assert counted(terms.weight) == pytest.approx(w_exp, abs=1e-6)
    assert terms.weight[1, 3].item() == 0.0 and bool(torch.isfinite(terms.weight).all())
    assert b.metrics["psi"][0].item() == pytest.approx(sum(psi_exp) / 7, abs=1e-6)
    assert b.metrics["psi"][2].item() == 7  # the count: a global mean over tokens
    if kappa == 2.0:  # alpha H > |A| / kappa on 4 tokens (kappa 1 has a tie at (0, 2): 0.4 * 2.5 == 1)
        assert b.metrics["capped"][0].item() == pytest.approx(4 / 7, abs=1e-6)


@pytest.mark.parametrize("kappa", [2.0, 1.0])
def test_weighted_ppo_loss_equals_the_loss_with_the_shifted_advantage(kappa):
    """PPO's clipped loss is positively homogeneous in A: w * A in TRL's loss is A + psi, value and gradient."""
    _, shifted, _ = EXAMPLE[kappa]
    a_sh = torch.zeros(2, 4)
    a_sh[M > 0] = torch.tensor(shifted)
    method = build_method({"name": "entropy_adv", "kappa": kappa})
    b = batch()
    weighted = (ppo_token_loss(b.logps, OLD, A * method.token_loss(b).weight, 0.2, 0.2) * M).sum() / M.sum()
    weighted.backward()
    logp = LOGP.clone().requires_grad_(True)
    direct = (ppo_token_loss(logp, OLD, a_sh, 0.2, 0.2) * M).sum() / M.sum()
    direct.backward()
    assert weighted.item() == pytest.approx(direct.item(), abs=1e-7)
    assert torch.allclose(b.logps.grad, logp.grad, atol=1e-7)
    assert b.logps.grad.abs().sum() > 0


def test_zero_advantage_and_the_rollout_source():
    zero = torch.zeros(2, 4)
    assert counted(shift_weight(zero, entropy_shift(zero, H, M, 0.4, 2.0)[0])) == [1.0] * 7
    method = build_method({"name": "entropy_adv", "entropy_source": "rollout"})
    assert method.needs == frozenset({"entropy"}) and build_method({"name": "entropy_adv"}).needs == frozenset()
    assert Pipeline([method]).needs == frozenset({"entropy"})
    # the rollout source reads the behaviour policy's entropy, not the training forward's
    w = method.token_loss(batch(entropy=torch.zeros(2, 4), rollout_entropy=H)).weight
    assert counted(w) == pytest.approx(EXAMPLE[2.0][2], abs=1e-6)
    with pytest.raises(RuntimeError, match="rollout statistic 'entropy'"):
        method.token_loss(batch())


def test_config_errors():
    with pytest.raises(MethodConfigError, match="kappa must be >= 1"):
        build_method({"name": "entropy_adv", "kappa": 0.5})
    with pytest.raises(MethodConfigError, match="alpha must be > 0"):
        build_method({"name": "entropy_adv", "alpha": 0.0})
    with pytest.raises(MethodConfigError, match="entropy_source"):
        build_method({"name": "entropy_adv", "entropy_source": "old"})


def test_composes_with_erc_and_kl_cov_each_keeping_its_effect():
    """entropy_adv shifts the advantage it receives; erc's detach and kl_cov's penalty pass
    through unchanged."""
    old = OLD  # the ratios of LOGP differ from 1: kl_cov's penalty |logp - old| has something to act on
    h_train = H.clone()
    h_train[0, 2] = 3.0  # rho = 1.2 at (0, 2): erc detaches it
    entries = [{"name": "entropy_adv"}, {"name": "erc"}, {"name": "kl_cov", "ratio": 0.3, "base_clip": True}]
    alone = []
    for entry in entries:
        b = batch(entropy=h_train, rollout_entropy=torch.nan_to_num(H))
        b.old_logps = old
        alone.append(build_method(entry).token_loss(b))
    b = batch(entropy=h_train, rollout_entropy=torch.nan_to_num(H))
    b.old_logps = old
    terms = Pipeline([build_method(e) for e in entries]).token_loss(b)
    assert torch.equal(terms.weight, alone[0].weight)  # entropy_adv: computed on A, the only weight
    assert torch.equal(terms.detach, alone[1].detach) and terms.detach[0, 2] and int(terms.detach.sum()) == 1
    assert torch.allclose(terms.extra, alone[2].extra) and terms.extra.detach().abs().sum() > 0
    assert {"entropy_adv/psi", "erc/entropy_frac", "kl_cov/penalty"} <= set(b.metrics)
    # a weight from a method listed before entropy_adv: the bonus is added to the weighted advantage
    b = batch()
    b.weight = torch.full_like(M, 0.5)
    w = build_method({"name": "entropy_adv"}).token_loss(b).weight
    psi, _ = entropy_shift(0.5 * A, H, M, 0.4, 2.0)
    assert torch.allclose((0.5 * A * w)[M > 0], (0.5 * A + psi)[M > 0], atol=1e-6)


def test_trainer_loss_and_gradients_equal_trls_with_the_shifted_advantages(model_dir, tmp_path):
    """Through the trainer: the method's weights give TRL's loss with per-token advantages A + psi(H_train)."""
    plain = build(model_dir, tmp_path, [])
    # alpha 0.05: at a random model's entropy (~3.5 nats) 0.4 would cap every bonus at |A| / kappa
    shaped = build(model_dir, tmp_path, [{"name": "entropy_adv", "alpha": 0.05, "kappa": 2.0}])
    out = generate(plain, prompt_rows(2, 4))
    with torch.no_grad():
        noise = 0.3 * torch.randn(out["completion_ids"].shape, generator=torch.Generator().manual_seed(1))
        ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
        attn = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
        logps, entropy, _ = plain._get_per_token_logps_and_entropies(
            plain.model, ids, attn, out["completion_ids"].size(1), compute_entropy=True)
    out["old_per_token_logps"] = logps + noise  # off-policy: some tokens clipped
    mask = out["completion_mask"].float()
    adv = out["advantages"].unsqueeze(1).expand_as(mask)
    psi = torch.minimum(0.05 * entropy, adv.abs() / 2.0) * mask
    assert psi.sum() > 0 and (psi < adv.abs() / 2.0 - 1e-6).any()  # the bonus is real and not always capped
    shifted = dict(out, advantages=adv + psi)
    expected = loss_and_grads(plain, shifted)
    got = loss_and_grads(shaped, dict(out))
    assert got[0].item() == pytest.approx(expected[0].item(), rel=1e-5, abs=1e-7)
    for name, g in expected[1].items():
        assert torch.allclose(got[1][name], g, rtol=1e-4, atol=1e-6), name
    assert loss_and_grads(plain, dict(out))[0].item() != pytest.approx(expected[0].item(), abs=1e-5)
    assert shaped._metrics["train"]["entropy_adv/psi"][0] == pytest.approx((psi.sum() / mask.sum()).item(), rel=1e-4)


def test_the_rollout_source_asks_the_trainer_for_rollout_entropy(model_dir, tmp_path):
    trainer = build(model_dir, tmp_path, [{"name": "entropy_adv", "entropy_source": "rollout"}])
    out = generate(trainer, prompt_rows(2, 4))
    assert "rollout_entropy" in out
    loss, grads = loss_and_grads(trainer, out)
    assert torch.isfinite(loss) and grads
    assert trainer._metrics["train"]["entropy_adv/psi"][0] > 0
