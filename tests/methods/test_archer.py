"""Archer against docs/methods-2.md §4.6 (verified with the official compute_policy_loss and kl_penalty), and in the trainer."""

from __future__ import annotations

import pytest
import torch
from helpers.cov_example import ppo_token_loss
from helpers.trainers import build, generate, grads, loss_and_grads, off_policy, prompt_rows

from rlvr_entropy.config import RecipeError, build_method, load_recipe
from rlvr_entropy.methods import LossBatch, MethodConfigError, Pipeline
from rlvr_entropy.methods.archer import entropy_split, low_var_kl

P = 7.7  # junk on padding: must never be read
M = torch.tensor([[1.0, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
H = torch.tensor([[0.05, 0.10, 1.20, 0.30, 2.00], [0.40, 0.02, 0.90, P, P]])
R = torch.tensor([[1.00, 1.30, 1.40, 0.70, 0.55], [1.25, 0.90, 0.60, 1.0, 1.0]])
A = torch.tensor([[1.0] * 5, [-1.0] * 5])
LOGP = torch.tensor([[-0.10, -0.20, -1.50, -0.60, -2.00], [-0.80, -0.05, -1.10, P, P]])
REF = torch.tensor([[-0.12, -0.25, -1.00, -0.70, -2.60], [-0.70, -0.05, -1.60, -P, -P]])
OLD = LOGP - R.log()

HIGH = [(0, 4), (1, 2)]
PG_DUAL, PG_UNIFORM = -0.2375, -0.2125
K3 = [[0.000199, 0.001229, 0.148721, 0.004837, 0.148812], [0.005171, 0.0, 0.106531]]
KL_LOW, KL_HIGH = 0.026693, 0.127671
LOSS = -0.237473
GRAD = [[-0.124997, 0.0000081, -0.000108, -0.087484, -0.06875], [0.156232, 0.1125, 0.075, 0.0, 0.0]]


def archer_batch(logp=LOGP, old=OLD, adv=A, entropy=H, ref=REF, mask=M, **kw) -> LossBatch:
    """A one-process DAPO loss micro-batch over the worked example (rows, then junk padding)."""
    logp = logp.clone().requires_grad_(True)
    return LossBatch(
        logps=logp, old_logps=old, on_policy=False, entropy=entropy, advantages=adv, mask=mask,
        group_ids=torch.arange(mask.size(0)), weight=torch.ones_like(mask), loss_type="dapo", epsilon_low=0.2,
        epsilon_high=0.2, importance_sampling_level="token", step=0, micro_step=0, seed=0, process_index=0,
        num_processes=1, gather=lambda x: x, ref_logps=ref, **kw,
    )


def token_mean(x: torch.Tensor, mask: torch.Tensor = M) -> torch.Tensor:
    return (x * mask).sum() / mask.sum()


def run(entry=None, **kw):
    """Archer's terms on the worked example, the reference PPO loss they give (with per-token eps) and L."""
    batch = archer_batch(**kw)
    terms = Pipeline([build_method({"name": "archer", **(entry or {})})]).token_loss(batch)
    pg = token_mean(ppo_token_loss(batch.logps, batch.old_logps, batch.advantages, terms.eps_low, terms.eps_high),
                    batch.mask)
    return batch, terms, pg, pg + terms.scalar


def test_split_quantiles_and_clip_ranges_match_worked_example():
    low, high, q = entropy_split(H, M, 0.8)
    assert q.tolist() == pytest.approx([1.36, 0.70], abs=1e-6)
    assert sorted(map(tuple, high.nonzero().tolist())) == HIGH
    assert (low | high).eq(M > 0).all() and not (low & high).any()
    _, terms, _, _ = run()
    expected = torch.full_like(M, 0.2)
    for i, j in HIGH:
        expected[i, j] = 0.5
    assert torch.equal(terms.eps_low * M, expected * M) and torch.equal(terms.eps_high * M, expected * M)


def test_loss_and_gradient_match_worked_example():
    batch, terms, pg, loss = run()
    assert pg.item() == pytest.approx(PG_DUAL, abs=1e-6)
    uniform = token_mean(ppo_token_loss(LOGP, OLD, A, 0.2, 0.2))
    assert uniform.item() == pytest.approx(PG_UNIFORM, abs=1e-6)  # token (1,2) is clipped at 0.8 there
    k3 = low_var_kl(LOGP, REF, M)
    assert k3[0].tolist() == pytest.approx(K3[0], abs=1e-6) and k3[1, :3].tolist() == pytest.approx(K3[1], abs=1e-6)
    assert terms.scalar.item() == pytest.approx(1e-3 * KL_LOW, abs=1e-9)
    assert loss.item() == pytest.approx(LOSS, abs=1e-6)
    loss.backward()
    assert batch.logps.grad.tolist() == [pytest.approx(row, abs=1e-6) for row in GRAD]
    metrics = {k: v[0].item() for k, v in batch.metrics.items()}
    assert metrics["archer/kl_low"] == pytest.approx(KL_LOW, abs=1e-6)
    assert metrics["archer/kl_high"] == pytest.approx(KL_HIGH, abs=1e-6)
    assert metrics["archer/high_share"] == pytest.approx(2 / 8)
    assert metrics["archer/quantile"] == pytest.approx((1.36 + 0.70) / 2, abs=1e-6)


def test_high_entropy_kl_has_its_own_denominator():
    _, terms, _, _ = run({"kl_coef": 0.0, "high_kl_coef": 0.5})
    assert terms.scalar.item() == pytest.approx(0.5 * KL_HIGH, abs=1e-6)
    _, both, _, _ = run({"kl_coef": 0.01, "high_kl_coef": 0.5})
    assert both.scalar.item() == pytest.approx(0.01 * KL_LOW + 0.5 * KL_HIGH, abs=1e-6)


def test_padding_is_ignored():
    nan = float("nan")
    junk = M == 0
    _, terms, pg, loss = run(entropy=H.masked_fill(junk, nan), ref=REF.masked_fill(junk, 1e4),
                             logp=LOGP.masked_fill(junk, -1e4))
    assert pg.item() == pytest.approx(PG_DUAL, abs=1e-6) and loss.item() == pytest.approx(LOSS, abs=1e-6)
    assert torch.isfinite(terms.scalar)

    def pad(x, v):  # three more padding columns, holding junk
        return torch.cat([x, torch.full((2, 3), v)], 1)

    _, _, _, loss2 = run(logp=pad(LOGP, 0.0), old=pad(OLD, 0.0), adv=pad(A, 1.0), entropy=pad(H, 100.0),
                         ref=pad(REF, 0.0), mask=pad(M, 0.0))
    assert loss2.item() == pytest.approx(LOSS, abs=1e-6)


def test_ties_go_to_the_low_set_and_the_micro_batch_scope_uses_one_quantile():
    flat = torch.tensor([[0.5, 0.5, 0.5, 0.5, 0.5]])
    low, high, _ = entropy_split(flat, torch.ones(1, 5), 0.8)
    assert low.all() and not high.any()  # every token equals its quantile: all are low-entropy
    low, high, q = entropy_split(H, M, 0.8, "micro_batch")
    expected = torch.quantile(H[M > 0], 0.8)
    assert torch.allclose(q, expected.expand(2))
    assert torch.equal(high, (H > expected) & (M > 0))


def test_parameters_and_trl_settings_are_checked(caplog):
    for entry, message in [({"quantile": 1.5}, "quantile"), ({"low_entropy_clip_low": 1.0}, r"\[0, 1\)"),
                           ({"high_entropy_clip_high": -0.1}, ">= 0"), ({"kl_coef": -1.0}, "kl_coef"),
                           ({"quantile_scope": "batch"}, "not one of")]:
        with pytest.raises(MethodConfigError, match=message):
            build_method({"name": "archer", **entry})
    cpu = ["use_cpu=true", "bf16=false", "gradient_checkpointing=false", "methods=[{name: archer}]"]
    for extra, message in [("beta=0.04", "beta: 0"), ("importance_sampling_level=sequence", "importance_sampling"),
                           ("loss_type=cispo", "loss_type"), ("delta=1.4", "delta")]:
        with pytest.raises(RecipeError, match=message):
            load_recipe(None, [*cpu, extra])
    with caplog.at_level("WARNING"):
        load_recipe(None, [*cpu, "delta=10"])
    assert "never act" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        load_recipe(None, [*cpu, "num_iterations=3"])
    assert "never act" not in caplog.text


def test_composes_with_siren_and_kl_cov():
    """Archer's clip ranges and KL, SIREN's scalar and KL-Cov's extra term all survive composition."""
    from rlvr_entropy.methods.siren import peak_mask, selected_row_means, top_p_entropy

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=gen)
    hp = top_p_entropy(logits.view(-1, 11)).view(2, 5) * M

    def batch():
        return archer_batch(logit_stats={"siren/logit_stat": hp})

    entries = [{"name": "archer"}, {"name": "siren", "anchor": 0.1}, {"name": "kl_cov", "ratio": 0.3}]
    alone = {e["name"]: Pipeline([build_method(e)]).token_loss(batch()) for e in entries}
    both = Pipeline([build_method(e) for e in entries]).token_loss(batch())
    assert torch.equal(both.eps_low, alone["archer"].eps_low) and torch.equal(both.eps_high, alone["archer"].eps_high)
    assert torch.allclose(both.extra, alone["kl_cov"].extra)
    assert both.scalar.item() == pytest.approx(alone["archer"].scalar.item() + alone["siren"].scalar.item(), rel=1e-6)
    h_sel = selected_row_means(hp, peak_mask(hp, M, 0.8)).mean()
    assert alone["siren"].scalar.item() == pytest.approx(0.005 * (h_sel.item() - 0.1) ** 2, rel=1e-5)
    assert (alone["kl_cov"].extra.abs().sum() > 0) and (alone["archer"].scalar > 0)


# ----------------------------------------------------------------------------------------------------------
# In the trainer


def _perturbed_reference(out, scale=0.3):
    """Move the reference away from the policy (both start from the same weights, where every KL is 0)."""
    noise = torch.randn(out["completion_ids"].shape, generator=torch.Generator().manual_seed(5))
    out["ref_per_token_logps"] = out["ref_per_token_logps"] + scale * noise
    return out


@pytest.mark.parametrize("loss_type", ["dapo", "bnpo"])
def test_with_every_token_low_entropy_archer_is_trls_kl_loss(model_dir, tmp_path, loss_type):
    """quantile 1: every token is low-entropy, so Archer = TRL's clip 0.2 + TRL's token-mean KL with beta = kl_coef
    (without TRL's default importance weight on the KL, which the reference does not have)."""
    trl = build(model_dir, tmp_path, [], loss_type=loss_type, beta=0.04, use_bias_correction_kl=False)
    ours = build(model_dir, tmp_path, [{"name": "archer", "quantile": 1.0, "kl_coef": 0.04}], loss_type=loss_type,
                 beta=0.0)
    assert ours.ref_model is not None
    out = _perturbed_reference(off_policy(trl, generate(trl, prompt_rows(2, 4)), noise=0.5))
    (la, ga), (lb, gb) = loss_and_grads(ours, dict(out)), loss_and_grads(trl, dict(out))
    assert la.item() == pytest.approx(lb.item(), rel=1e-5, abs=1e-7)
    for name, g in ga.items():
        assert torch.allclose(g, gb[name], rtol=1e-4, atol=1e-6), name
    assert ours.epsilon_low == 0.2 and ours.epsilon_high == 0.2  # TRL's scalars again after the call


def test_trainer_loss_and_gradients_equal_the_reference_computed_on_the_trainers_forward(model_dir, tmp_path):
    """Default Archer in the trainer equals the reference formula (dual eps from the per-response entropy split,
    dual clip via delta, KL on low tokens) evaluated on the same forward pass, in value and gradient."""
    ours = build(model_dir, tmp_path, [{"name": "archer", "kl_coef": 0.05, "high_kl_coef": 0.02}], beta=0.0,
                 delta=3.0)
    out = _perturbed_reference(off_policy(ours, generate(ours, prompt_rows(2, 4)), noise=0.6))
    loss, got = loss_and_grads(ours, dict(out))

    ours.model.zero_grad(set_to_none=True)
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    attn = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    logps, entropy, _ = ours._get_per_token_logps_and_entropies(ours.model, ids, attn, out["completion_ids"].size(1),
                                                                compute_entropy=True)
    mask = out["completion_mask"].float()
    low, high, _ = entropy_split(entropy, mask, 0.8)
    assert high.any() and low.any()
    eps = torch.where(high, 0.5, 0.2)
    adv = out["advantages"].unsqueeze(1)
    ratio = torch.exp(logps - out["old_per_token_logps"])
    per_token = torch.maximum(-adv * ratio.clamp(max=3.0), -adv * ratio.clamp(1 - eps, 1 + eps))
    k3 = low_var_kl(logps, out["ref_per_token_logps"], mask)
    expected = ((per_token * mask).sum() / mask.sum() + 0.05 * (k3 * low).sum() / low.sum()
                + 0.02 * (k3 * high).sum() / high.sum())
    expected.backward()
    want = grads(ours.model)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    for name, g in got.items():
        assert torch.allclose(g, want[name], rtol=1e-4, atol=1e-6), name
    # the two clip ranges matter on this batch: a uniform 0.2 clip gives another policy loss
    uniform = torch.maximum(-adv * ratio.clamp(max=3.0), -adv * ratio.clamp(0.8, 1.2)).detach()
    assert ((uniform - per_token.detach()).abs() * mask).max() > 1e-3
    logged = ours._metrics["train"]
    assert 0 < logged["archer/high_share"][0] < 0.5 and logged["archer/kl_low"][0] > 0
