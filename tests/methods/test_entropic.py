"""EntroPIC against docs/methods-2.md §6 (worked examples §6.6), its controller state, and in a trainer."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers.trainers import build, generate, loss_and_grads, prompt_rows

from rlvr_entropy.config import build_method
from rlvr_entropy.methods import LossBatch, MethodConfigError, Pipeline
from rlvr_entropy.methods.entropic import pi_alpha

# Loss-term example: ln 0.95 = -0.051293, so the high-probability tokens are (0,0), (0,2) and (1,0); N = 7, N_hi = 3.
LOGP = torch.tensor([[-0.01, -0.30, -0.02, -2.00], [-0.04, -0.06, -0.50, 0.0]])
M = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
ADV = torch.tensor([[0.8] * 4, [-1.2] * 4])
HIGH = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])

# Controller example: target 0.1, kp 1, ki 0.01, one micro-batch per optimizer step.
H_MB = [0.30, 0.25, 0.12, 0.05, 0.02]
ALPHA = [0.200000, 0.152000, 0.023500, -0.046300, -0.076800]
ACC = [0.200000, 0.350000, 0.370000, 0.320000, 0.240000]


def batch_of(mean_entropy=0.3, logps=LOGP, old=None, adv=ADV, mask=M, step=0, training=True, entropy=None,
             accumulation=1) -> LossBatch:
    """A one-process loss micro-batch whose valid tokens all have entropy ``mean_entropy`` (unless ``entropy``)."""
    logps = logps.clone().requires_grad_(True)
    entropy = torch.full_like(mask, mean_entropy) if entropy is None else entropy.clone()
    return LossBatch(
        logps=logps, old_logps=logps.detach() if old is None else old, on_policy=old is None,
        entropy=entropy.requires_grad_(True), advantages=adv, mask=mask,
        group_ids=torch.zeros(mask.size(0), dtype=torch.long), weight=torch.ones_like(mask), loss_type="dapo",
        epsilon_low=0.2, epsilon_high=0.2, importance_sampling_level="token", step=step, micro_step=0, seed=0,
        process_index=0, num_processes=1, gather=lambda x: x, training=training, accumulation_steps=accumulation,
    )


def run(method, batch):
    with batch.scope(method.name):
        return method.token_loss(batch)


def entropic(**params):
    """The method as the trainer sets it up: built from a recipe entry."""
    return build_method({"name": "entropic", **params})


def test_controller_table():
    method = entropic(target=0.1, kp=1.0, ki=0.01)
    for step, (h, alpha, acc) in enumerate(zip(H_MB, ALPHA, ACC, strict=True)):
        batch = batch_of(h, step=step)
        run(method, batch)
        assert method.state["alpha"] == pytest.approx(alpha, abs=1e-6)
        assert method.state["acc"] == pytest.approx(acc, abs=1e-6)
        assert batch.metrics["entropic/alpha"][0].item() == pytest.approx(alpha, abs=1e-6)
        assert batch.metrics["entropic/error"][0].item() == pytest.approx(h - 0.1, abs=1e-6)
        assert batch.metrics["entropic/integral"][0].item() == pytest.approx(acc, abs=1e-6)
        assert batch.metrics["entropic/target"][0].item() == pytest.approx(0.1)
    assert pi_alpha(0.0, 3.0, 1.0, 0.01, 1.0) == 1.0 and pi_alpha(-500.0, 0.0, 1.0, 0.01, 0.5) == -0.5


@pytest.mark.parametrize(("target", "h", "alpha"), [(0.1, 0.3, 0.2), (0.3, 0.1, -0.2)])
def test_loss_term_and_gradients(target, h, alpha):
    """alpha = +-0.2 (entropy 0.2 above / below the target): term = alpha * mean_hi(-|A|) = alpha * -0.933333."""
    method = entropic(target=target)
    batch = batch_of(mean_entropy=h)
    terms = run(method, batch)
    assert method.state["alpha"] == pytest.approx(alpha, abs=1e-7)
    assert terms.weight is None and terms.extra is None
    assert terms.scalar.item() == pytest.approx(alpha * -0.933333, abs=1e-6)  # -0.186667 / +0.186667
    terms.scalar.backward()
    expected = alpha / 0.2 * torch.tensor([[-0.053333, 0, -0.053333, 0], [-0.08, 0, 0, 0]])
    assert torch.allclose(batch.logps.grad, expected, atol=1e-6)
    assert batch.entropy.grad is None  # the entropy only drives the controller
    assert batch.metrics["entropic/high_prob_frac"][0].item() == pytest.approx(3 / 7)
    assert batch.metrics["entropic/adjustment"][0].item() == pytest.approx(alpha * -0.933333, abs=1e-6)
    # Beside GRPO's token-mean term -A r / N: weights 1 + alpha N / N_hi (A > 0) and 1 - alpha N / N_hi (A < 0).
    grpo = -(ADV * M) / 7
    total = (grpo + batch.logps.grad) / grpo
    assert total[0, 0].item() == pytest.approx(1 + alpha * 7 / 3, abs=1e-5)  # x1.466667 at alpha 0.2
    assert total[1, 0].item() == pytest.approx(1 - alpha * 7 / 3, abs=1e-5)  # x0.533333 at alpha 0.2
    assert total[0, 1].item() == pytest.approx(1.0)


def test_off_policy_ratio_is_unclipped_and_carries_the_gradient():
    old = LOGP - torch.tensor([[0.7, 0.0, -0.5, 0.0], [0.4, 0.0, 0.0, 0.0]])  # ratios e^0.7, e^-0.5, e^0.4
    method = entropic(target=0.1)
    batch = batch_of(0.3, old=old)
    terms = run(method, batch)
    ratio = torch.exp(LOGP - old)
    adjust = -(ratio * ADV.abs() * HIGH).sum() / 3
    assert terms.scalar.item() == pytest.approx(0.2 * adjust.item(), abs=1e-6)
    terms.scalar.backward()
    assert torch.allclose(batch.logps.grad, 0.2 * -(ratio * ADV.abs() * HIGH) / 3, atol=1e-6)


def test_the_integral_steps_by_the_error_over_the_micro_batches_of_an_optimizer_step():
    method = entropic(target=0.1, ki=0.5)
    run(method, batch_of(0.3, accumulation=2))  # alpha 0.2 (acc 0 before), acc 0.1
    assert (method.state["alpha"], method.state["acc"]) == (pytest.approx(0.2), pytest.approx(0.1))
    run(method, batch_of(0.5, accumulation=2))  # alpha 0.5 * 0.1 + 0.4, acc 0.1 + 0.2
    assert (method.state["alpha"], method.state["acc"]) == (pytest.approx(0.45), pytest.approx(0.3))


def test_evaluation_leaves_the_state_alone():
    method = entropic(target=0.1)
    run(method, batch_of(0.3))
    before = json.dumps(method.state)
    batch = batch_of(0.6, training=False)
    terms = run(method, batch)
    assert json.dumps(method.state) == before
    assert batch.metrics["entropic/alpha"][0].item() == pytest.approx(0.502)  # 0.01 * 0.2 + 0.5, not stored
    assert terms.scalar.item() == pytest.approx(0.502 * -0.933333, abs=1e-6)


def test_padding_is_never_read():
    junk_h = torch.full_like(M, 0.3)
    junk_h[1, 3] = float("nan")
    logps = LOGP.clone()
    logps[1, 3] = 7.7  # "high probability" junk
    old = LOGP.clone()
    old[1, 3] = -90.0  # a huge ratio on padding
    clean = run(entropic(target=0.1), batch_of(0.3))
    batch = batch_of(logps=logps, old=old, entropy=junk_h)
    terms = run(entropic(target=0.1), batch)
    assert terms.scalar.item() == pytest.approx(clean.scalar.item(), abs=1e-7)
    terms.scalar.backward()
    assert torch.isfinite(batch.logps.grad).all() and batch.logps.grad[1, 3] == 0


def test_a_calibrated_target_only_observes_until_it_is_fixed():
    method = entropic(target={"kind": "calibrated", "steps": 2, "scale": 0.5})
    assert run(method, batch_of(0.3, step=0)) is None
    assert run(method, batch_of(0.5, step=1)) is None
    assert method.state["acc"] == 0.0
    batch = batch_of(0.3, step=2)
    run(method, batch)  # target 0.5 * 0.4 = 0.2
    assert batch.metrics["entropic/target"][0].item() == pytest.approx(0.2)
    assert method.state["alpha"] == pytest.approx(0.1)


def test_state_is_json_and_restored_from_a_checkpoint():
    method = entropic(target=0.1)
    for step, h in enumerate(H_MB[:3]):
        run(method, batch_of(h, step=step))
    saved = json.loads(json.dumps(Pipeline([method]).state_dict()))
    resumed = entropic(target=0.1)
    Pipeline([resumed]).load_state_dict(saved)
    for step, h in enumerate(H_MB[3:], start=3):
        run(resumed, batch_of(h, step=step))
    assert resumed.state["alpha"] == pytest.approx(ALPHA[-1], abs=1e-6)
    assert resumed.state["acc"] == pytest.approx(ACC[-1], abs=1e-6)


def test_bad_configuration_is_refused():
    for params, match in [({"target": 0.0}, "target"), ({"target": -1.0}, "target"),
                          ({"target": {"kind": "linear", "start": 0.5, "end": 0.0, "steps": 10}}, "target"),
                          ({"kp": -1.0}, "kp"), ({"ki": -0.1}, "ki"), ({"high_prob": 1.0}, "high_prob"),
                          ({"high_prob": 0.0}, "high_prob"), ({"alpha_max": 0.0}, "alpha_max")]:
        with pytest.raises(MethodConfigError, match=match):
            build_method({"name": "entropic", **params})
    method = build_method({"name": "entropic"})
    assert (method.target, method.kp, method.ki, method.high_prob, method.alpha_max) == (0.1, 1.0, 0.01, 0.95, 1.0)


def test_composes_with_ter_and_clip_cov_each_keeping_its_effect():
    """clip_cov (token weights) + entropic + ter (scalar terms add): the pipeline's output is its parts'."""
    old = LOGP + torch.tensor([[0.1, 0.2, -0.15, -0.4], [0.05, 0.3, -0.1, 0.0]])
    entropy = torch.tensor([[0.2, 0.9, 1.6, 0.3], [0.5, 0.1, 0.0, 0.0]])
    entries = [{"name": "clip_cov", "ratio": 0.3, "lb": -10.0, "ub": 10.0}, {"name": "entropic", "target": 0.3},
               {"name": "ter", "coef": 0.1}]

    def terms_of(names):
        methods = [build_method(e) for e in entries if e["name"] in names]
        batch = batch_of(old=old, entropy=entropy.clone())
        out = Pipeline(methods).token_loss(batch)
        if out.scalar is not None:
            out.scalar.backward()
        return out, batch

    both, batch = terms_of({"clip_cov", "entropic", "ter"})
    (cov, _), (pic, pic_batch), (ter, ter_batch) = (terms_of({n}) for n in ("clip_cov", "entropic", "ter"))
    assert cov.weight is not None and (cov.weight * M == 0).any() and (cov.weight * M == 1).any()
    assert torch.equal(both.weight, cov.weight)  # clip_cov's zero weights, untouched by the scalar terms
    assert both.scalar.item() == pytest.approx(pic.scalar.item() + ter.scalar.item(), abs=1e-7)
    assert pic.scalar.item() != 0 and ter.scalar.item() != 0
    assert torch.allclose(batch.logps.grad, pic_batch.logps.grad, atol=1e-7)
    assert torch.allclose(batch.entropy.grad, ter_batch.entropy.grad, atol=1e-7)


def _high_prob_threshold(trainer, out):
    """A threshold with about half the sampled tokens above it (a random model is never 95% sure)."""
    with torch.no_grad():
        ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
        attn = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
        width = out["completion_ids"].size(1)
        logps = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attn, width)[0]
    mask = out["completion_mask"].bool()
    return logps, float(logps[mask].median().exp())


def test_in_the_trainer_the_term_and_the_integral_follow_the_controller(model_dir, tmp_path):
    """loss(entropic) - loss(GRPO) = alpha * mean_hi(-|A|) on-policy, alpha from TRL's logged entropy; the integral
    advances by the error of each micro-batch and feeds the next alpha."""
    plain = build(model_dir, tmp_path, [])
    out = generate(plain, prompt_rows(2, 4))
    logps, high_prob = _high_prob_threshold(plain, out)
    target, kp, ki = 1.0, 0.05, 0.1
    trainer = build(model_dir, tmp_path, [{"name": "entropic", "target": target, "kp": kp, "ki": ki,
                                           "high_prob": high_prob}])
    method = trainer.pipeline.methods[0]
    base_loss, base_grads = loss_and_grads(plain, dict(out))
    mask = out["completion_mask"].float()
    high = (logps > math.log(high_prob)).float() * mask
    adjust = -(out["advantages"].abs().unsqueeze(1) * high).sum() / high.sum()  # r = 1 on-policy
    assert 0 < high.sum() < mask.sum() and adjust.item() != 0

    acc = 0.0
    for call in range(2):
        loss, grads = loss_and_grads(trainer, dict(out))
        error = trainer._metrics["train"]["entropy"][-1] - target
        alpha = max(-1.0, min(1.0, ki * acc + kp * error))
        acc += error
        assert loss.item() - base_loss.item() == pytest.approx(alpha * adjust.item(), rel=1e-4, abs=1e-6), call
        assert method.state["alpha"] == pytest.approx(alpha, rel=1e-5)
        assert method.state["acc"] == pytest.approx(acc, rel=1e-5)
        assert trainer._metrics["train"]["entropic/alpha"][-1] == pytest.approx(alpha, rel=1e-5)
        assert trainer._metrics["train"]["entropic/integral"][-1] == pytest.approx(acc, rel=1e-5)
    assert abs(alpha) > 0.05 and any(not torch.allclose(g, base_grads[n], atol=1e-6) for n, g in grads.items())


def test_the_trainer_tells_entropic_its_gradient_accumulation_steps(model_dir, tmp_path):
    trainer = build(model_dir, tmp_path, [{"name": "entropic", "target": 0.5}], gradient_accumulation_steps=2)
    trainer.current_gradient_accumulation_steps = 2
    out = generate(trainer, prompt_rows(2, 4))
    loss_and_grads(trainer, dict(out))
    error = trainer._metrics["train"]["entropic/error"][-1]
    assert trainer.pipeline.methods[0].state["acc"] == pytest.approx(error / 2, rel=1e-5)
