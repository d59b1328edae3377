"""SIREN against docs/methods-2.md §7.6 (verified with the official efficient_top_p_sampling, mask_by_quantile and
agg_loss), its anchor across optimizer steps and resumes, and in the trainer."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers.trainers import build, generate, grads, loss_and_grads, prompt_rows

from rlvr_entropy.config import build_method
from rlvr_entropy.methods import LossBatch, MethodConfigError, Pipeline
from rlvr_entropy.methods.siren import peak_mask, selected_row_means, top_p_entropy

PROBS = torch.tensor([
    [[.90, .04, .03, .02, .01], [.45, .25, .15, .08, .07], [.30, .22, .18, .15, .15], [.60, .30, .05, .03, .02],
     [.26, .25, .20, .17, .12]],
    [[.35, .33, .20, .07, .05], [.50, .20, .15, .10, .05], [.70, .12, .08, .05, .05], [.40, .30, .20, .05, .05],
     [.20, .20, .20, .20, .20]],  # the last position is padding
])
M = torch.tensor([[1.0, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
HP = [[0.0, 0.651757, 1.076130, 0.0, 1.092299], [0.692715, 0.598270, 0.0, 0.682908]]
FULL_H = [[0.453068, 1.378677, 1.572100, 1.000911, 1.574365], [1.391119, 1.333074, 1.005736, 1.349169]]
SELECTED = [(0, 4), (1, 0)]
H_SEL = 0.892507
GRAD_04 = [-1.606059e-05, -8.537821e-06, 2.459841e-05, 0.0, 0.0]
GRAD_10 = [-7.348700e-06, 7.348700e-06, 0.0, 0.0, 0.0]


def siren_batch(hp: torch.Tensor, mask: torch.Tensor = M, step: int = 0, training: bool = True, **kw) -> LossBatch:
    """A one-process loss micro-batch whose only input SIREN reads is its logit statistic ``hp`` (B, T)."""
    zeros = torch.zeros_like(mask)
    return LossBatch(
        logps=zeros.clone().requires_grad_(True), old_logps=zeros, on_policy=True, entropy=zeros, advantages=zeros,
        mask=mask, group_ids=torch.arange(mask.size(0)), weight=torch.ones_like(mask), loss_type="dapo",
        epsilon_low=0.2, epsilon_high=0.2, importance_sampling_level="token", step=step, micro_step=0, seed=0,
        process_index=0, num_processes=1, gather=lambda x: x, training=training,
        logit_stats={"siren/logit_stat": hp}, **kw,
    )


def example_hp(method=None):
    """(logits with grad (2, 5, 5), their top-p entropy (2, 5) as the trainer hands it: 0 where not counted)."""
    logits = PROBS.log().requires_grad_(True)
    method = method or build_method({"name": "siren"})
    return logits, method.logit_stat(logits.view(-1, 5)).view(2, 5) * M


def test_top_p_entropy_keeps_the_tokens_before_the_crossing_one():
    _, hp = example_hp()
    assert hp[0].tolist() == pytest.approx(HP[0], abs=1e-6)
    assert hp[1, :4].tolist() == pytest.approx(HP[1], abs=1e-6)
    # (0,0): the top token alone reaches p (nothing kept); (0,3): 0.6 < 0.8 <= 0.9, one token kept: both 0.
    # (0,1): 0.45 + 0.25 < 0.8 <= 0.85: two tokens (usual nucleus sampling would keep three: 1.002740).
    two = torch.tensor([0.45, 0.25]) / 0.7
    assert hp[0, 1].item() == pytest.approx(-(two * two.log()).sum().item(), abs=1e-6)
    full = -(PROBS * PROBS.log()).sum(-1)
    assert full[0].tolist() == pytest.approx(FULL_H[0], abs=1e-6)
    assert top_p_entropy(PROBS.log().view(-1, 5), top_p=1.0 + 1e-6).view(2, 5)[0].tolist() == pytest.approx(
        FULL_H[0], abs=1e-5)  # p above 1 keeps everything: the full entropy
    # top_k restricts the search: with k = 2 every kept set has at most two tokens
    assert top_p_entropy(PROBS.log().view(-1, 5), top_k=2).max().item() <= math.log(2) + 1e-6


def test_top_p_entropy_equals_a_row_by_row_reference_on_random_logits():
    logits = 3 * torch.randn(6, 300, generator=torch.Generator().manual_seed(0))
    for top_p, top_k in ((0.8, 10000), (0.95, 50), (0.3, 300)):
        expected = []
        for row in logits:  # sort, cut strictly before the crossing token, renormalise
            probs = torch.softmax(row.double(), -1).sort(descending=True).values[:top_k]
            kept = probs[: int(torch.searchsorted(probs.cumsum(0), torch.tensor(top_p, dtype=torch.float64)))]
            q = kept / (kept.sum() + 1e-12)
            expected.append(float(-(q * torch.log(q + 1e-12)).sum()))
        assert top_p_entropy(logits, top_p, top_k).tolist() == pytest.approx(expected, abs=1e-5)


def test_peak_mask_and_selective_entropy_match_worked_example():
    _, hp = example_hp()
    bounds = torch.nanquantile(hp.detach().masked_fill(M == 0, float("nan")), 0.8, dim=-1)
    assert bounds.tolist() == pytest.approx([1.079364, 0.686831], abs=1e-6)
    selected = peak_mask(hp, M, 0.8)
    assert sorted(map(tuple, selected.nonzero().tolist())) == SELECTED
    # the reference applies the mask a second time, on the zeroed values: the same positions
    again = peak_mask(hp * selected, M, 0.8)
    assert torch.equal(again, selected)
    assert selected_row_means(hp, selected).mean().item() == pytest.approx(H_SEL, abs=1e-6)


def test_penalty_and_logit_gradients_match_worked_example():
    _, hp = example_hp()
    h_sel = selected_row_means(hp, peak_mask(hp, M, 0.8)).mean().item()
    method = build_method({"name": "siren", "anchor": h_sel - 0.1})
    logits, hp = example_hp(method)
    batch = siren_batch(hp)
    terms = Pipeline([method]).token_loss(batch)
    assert terms.scalar.item() == pytest.approx(5e-5, abs=1e-10)
    terms.scalar.backward()
    assert logits.grad[0, 4].tolist() == pytest.approx(GRAD_04, abs=1e-10)
    assert logits.grad[1, 0].tolist() == pytest.approx(GRAD_10, abs=1e-10)
    others = logits.grad.clone()
    others[0, 4] = others[1, 0] = 0
    assert others.abs().max() < 1e-10  # unselected positions, and tokens outside V_p, get no gradient
    logged = {k: v[0].item() for k, v in batch.metrics.items()}
    assert logged["siren/H_sel"] == pytest.approx(H_SEL, abs=1e-6)
    assert logged["siren/penalty"] == pytest.approx(5e-5, abs=1e-10)
    assert logged["siren/anchor"] == pytest.approx(h_sel - 0.1)
    assert logged["siren/selected"] == pytest.approx(2 / 9)


def test_padding_is_ignored_and_rows_without_a_selected_token_count_as_zero():
    method = build_method({"name": "siren", "anchor": 0.0})
    _, hp = example_hp()
    junk = hp.detach().clone()
    junk[1, 4] = 100.0  # a value on padding (the trainer writes 0 there) must not be selected
    assert Pipeline([method]).token_loss(siren_batch(junk)).scalar.item() == pytest.approx(0.005 * H_SEL**2, abs=1e-8)
    flat = torch.tensor([[0.4, 0.4, 0.4, 0.4, 0.4], [0.1, 0.2, 0.3, 0.9, 0.0]])  # row 0: nothing above its quantile
    scalar = Pipeline([method]).token_loss(siren_batch(flat)).scalar
    assert scalar.item() == pytest.approx(0.005 * ((0.0 + 0.9) / 2) ** 2, abs=1e-9)


def test_anchor_is_measured_in_step_zero_then_fixed_and_survives_a_resume():
    method = build_method({"name": "siren"})
    pipe = Pipeline([method])
    a = torch.tensor([[1.0, 0.5, 0.2, 0.1, 0.0], [0.3, 0.2, 0.6, 0.1, 0.0]])  # selected: 1.0 and 0.6: H_sel 0.8
    b = torch.tensor([[0.2, 0.9, 0.1, 0.0, 0.0]])  # one row: 0.9
    mb = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0]])
    assert pipe.token_loss(siren_batch(a, M, step=0)).scalar is None  # measuring: no penalty
    assert pipe.token_loss(siren_batch(b, mb, step=0, training=False)).scalar is None
    assert method.state["count"] == 2  # evaluation does not count
    assert pipe.token_loss(siren_batch(b, mb, step=0)).scalar is None
    assert method.state["sum"] == pytest.approx(1.0 + 0.6 + 0.9) and method.state["count"] == 3
    assert method.state["anchor"] is None
    expected_anchor = (1.0 + 0.6 + 0.9) / 3  # rows weigh equally across micro-batches: seq-mean over the step
    evaluated = siren_batch(a, M, step=1, training=False)
    assert pipe.token_loss(evaluated).scalar.item() == pytest.approx(0.005 * (0.8 - expected_anchor) ** 2, abs=1e-9)
    assert method.state["anchor"] is None  # evaluation does not fix it either
    batch = siren_batch(a, M, step=1)
    assert pipe.token_loss(batch).scalar.item() == pytest.approx(0.005 * (0.8 - expected_anchor) ** 2, abs=1e-9)
    assert method.state["anchor"] == pytest.approx(expected_anchor)
    saved = json.loads(json.dumps(pipe.state_dict()))  # JSON, as checkpoints store it
    resumed = Pipeline([build_method({"name": "siren"})])
    resumed.load_state_dict(saved)
    later = resumed.token_loss(siren_batch(b, mb, step=7)).scalar
    assert later.item() == pytest.approx(0.005 * (0.9 - expected_anchor) ** 2, abs=1e-9)
    assert resumed.state_dict() == saved  # later steps leave the anchor alone
    fixed = Pipeline([build_method({"name": "siren", "anchor": 0.5})])
    assert fixed.token_loss(siren_batch(a, M, step=0)).scalar.item() == pytest.approx(0.005 * 0.3**2, abs=1e-9)


def test_parameters_are_checked():
    for entry, message in [({"coef": -1.0}, "coef"), ({"top_p": 0.0}, "top_p"), ({"top_k": 0}, "top_k"),
                           ({"mask_ratio": 1.5}, "mask_ratio"), ({"anchor": -0.1}, "anchor"),
                           ({"anchor": "high"}, "anchor")]:
        with pytest.raises(MethodConfigError, match=message):
            build_method({"name": "siren", **entry})
    assert build_method({"name": "siren", "anchor": None}).anchor is None


# ----------------------------------------------------------------------------------------------------------
# In the trainer


def _ordinary_forward_stat(trainer, out, temperature, top_p):
    """SIREN's statistic from an ordinary model forward (full logits / temperature), (B, T), 0 where not counted."""
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    attn = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    start, width = out["prompt_ids"].size(1), out["completion_ids"].size(1)
    logits = trainer.model(input_ids=ids, attention_mask=attn).logits[:, start - 1 : start + width - 1] / temperature
    hp = top_p_entropy(logits.reshape(-1, logits.size(-1)), top_p=top_p).view(ids.size(0), width)
    return hp * out["completion_mask"].float()


def test_the_trainers_logit_statistic_and_penalty_equal_an_ordinary_forwards(model_dir, tmp_path):
    entry = {"name": "siren", "coef": 1.0, "anchor": 0.0, "top_p": 0.6}
    ours = build(model_dir, tmp_path, [entry], temperature=0.7)
    plain = build(model_dir, tmp_path, [], temperature=0.7)
    out = generate(ours, prompt_rows(2, 4))
    seen = {}
    real = ours.pipeline.token_loss

    def spy(batch):
        seen["hp"] = batch.logit_stats["siren/logit_stat"].detach().clone()
        return real(batch)

    ours.pipeline.token_loss = spy
    loss, got = loss_and_grads(ours, dict(out))
    base_loss, base = loss_and_grads(plain, dict(out))

    ours.model.zero_grad(set_to_none=True)
    hp = _ordinary_forward_stat(ours, out, 0.7, 0.6)
    mask = out["completion_mask"].float()
    assert torch.allclose(seen["hp"], hp.detach(), atol=1e-5)
    assert (hp.detach() * mask).max() > 0.1  # not trivially zero
    h_sel = selected_row_means(hp, peak_mask(hp, mask, 0.8)).mean()
    penalty = h_sel**2
    penalty.backward()
    want = grads(ours.model)
    assert loss.item() - base_loss.item() == pytest.approx(penalty.item(), rel=1e-4, abs=1e-6)
    for name, g in got.items():
        assert torch.allclose(g - base[name], want.get(name, torch.zeros_like(g)), rtol=1e-3, atol=1e-6), name
    assert ours._metrics["train"]["siren/H_sel"][0] == pytest.approx(h_sel.item(), rel=1e-5)


def test_in_the_trainer_step_zero_measures_without_a_penalty(model_dir, tmp_path):
    ours = build(model_dir, tmp_path, [{"name": "siren"}])
    plain = build(model_dir, tmp_path, [])
    out = generate(ours, prompt_rows(2, 4))
    assert loss_and_grads(ours, dict(out))[0].item() == pytest.approx(loss_and_grads(plain, dict(out))[0].item(),
                                                                    abs=1e-7)
    state = ours.pipeline.state_dict()["siren"]
    assert state["count"] == 8 and state["measure_step"] == 0 and state["anchor"] is None
    assert state["sum"] / 8 == pytest.approx(ours._metrics["train"]["siren/H_sel"][0], rel=1e-5)


def test_composes_with_archer_and_steer_in_the_trainer(model_dir, tmp_path):
    methods = [{"name": "steer"}, {"name": "archer"}, {"name": "siren", "anchor": 0.0}]
    trainer = build(model_dir, tmp_path, methods, beta=0.0, num_iterations=2)
    out = generate(trainer, prompt_rows(2, 4))
    loss, _ = loss_and_grads(trainer, dict(out))
    assert torch.isfinite(loss)
    logged = trainer._metrics["train"]
    for key in ("steer/mean_weight", "archer/kl_low", "archer/high_share", "siren/penalty", "siren/H_sel"):
        assert key in logged, key
    assert logged["siren/penalty"][0] == pytest.approx(0.005 * logged["siren/H_sel"][0] ** 2, rel=1e-5)
