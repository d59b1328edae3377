"""TER against docs/methods-2.md §1 (worked example §1.6), its target schedules, and in a trainer."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.trainers import build, generate, loss_and_grads, prompt_rows

from rlvr_entropy.config import build_method
from rlvr_entropy.methods import LossBatch, MethodConfigError, Pipeline

# Worked example: two responses, lengths 4 and 2 (N = 6), mean entropy 0.6.
H = torch.tensor([[0.2, 0.9, 1.6, 0.3], [0.5, 0.1, 0.0, 0.0]])
M = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])


def batch_of(entropy=H, mask=M, step=0, training=True, logps=None, old=None, adv=None) -> LossBatch:
    """A one-process loss micro-batch whose entropy carries a gradient."""
    entropy = entropy.clone().requires_grad_(True)
    logps = torch.full_like(mask, -0.5) if logps is None else logps
    logps = logps.clone().requires_grad_(True)
    return LossBatch(
        logps=logps, old_logps=logps.detach() if old is None else old, on_policy=old is None, entropy=entropy,
        advantages=torch.zeros_like(mask) if adv is None else adv, mask=mask,
        group_ids=torch.zeros(mask.size(0), dtype=torch.long), weight=torch.ones_like(mask), loss_type="dapo",
        epsilon_low=0.2, epsilon_high=0.2, importance_sampling_level="token", step=step, micro_step=0, seed=0,
        process_index=0, num_processes=1, gather=lambda x: x, training=training,
    )


def run(method, batch):
    with batch.scope(method.name):
        return method.token_loss(batch)


@pytest.mark.parametrize(("target", "value", "slope"), [(0.55, 0.00005, 0.001 / 6), (0.70, 0.0001, -0.001 / 6)])
def test_worked_example_value_and_per_token_gradient(target, value, slope):
    method = build_method({"name": "ter", "target": target, "coef": 0.001})
    batch = batch_of()
    terms = run(method, batch)
    assert terms.weight is None and terms.extra is None and terms.detach is None
    assert terms.scalar.item() == pytest.approx(value, abs=1e-9)
    terms.scalar.backward()
    assert torch.allclose(batch.entropy.grad, slope * M, atol=1e-9)  # +-0.00016667 on each valid token, 0 on padding
    assert batch.metrics["ter/target"][0].item() == pytest.approx(target)
    assert batch.metrics["ter/error"][0].item() == pytest.approx(0.6 - target, abs=1e-6)
    assert batch.metrics["ter/penalty"][0].item() == pytest.approx(value, abs=1e-9)


def test_defaults_are_the_papers():
    method = build_method({"name": "ter"})
    assert (method.target, method.coef) == (0.55, 0.001)
    assert run(method, batch_of()).scalar.item() == pytest.approx(0.00005, abs=1e-9)


def test_padding_is_never_read():
    junk = H.clone()
    junk[1, 2:] = torch.tensor([float("nan"), 1e6])
    method = build_method({"name": "ter", "coef": 0.001})
    batch = batch_of(entropy=junk)
    terms = run(method, batch)
    assert terms.scalar.item() == pytest.approx(0.00005, abs=1e-9)
    terms.scalar.backward()
    assert torch.allclose(batch.entropy.grad, (0.001 / 6) * M, atol=1e-9)


def test_a_scheduled_target_follows_the_step():
    target = {"kind": "linear", "start": 1.0, "end": 0.2, "steps": 4}
    method = build_method({"name": "ter", "coef": 1.0, "target": target})
    values = [run(method, batch_of(step=s)).scalar.item() for s in (0, 2, 4, 9)]
    assert values == pytest.approx([0.4, 0.0, 0.4, 0.4], abs=1e-6)  # targets 1.0, 0.6, 0.2, 0.2 around H = 0.6


def test_a_calibrated_target_is_measured_then_fixed_and_survives_a_checkpoint():
    method = build_method({"name": "ter", "coef": 1.0, "target": {"kind": "calibrated", "steps": 2, "scale": 0.5}})
    assert run(method, batch_of(step=0)) is None  # measuring: no term
    assert run(method, batch_of(entropy=2 * H, step=1)) is None
    assert run(method, batch_of(entropy=5 * H, step=1, training=False)) is None  # evaluation measures nothing
    assert method.state["target"] == {"sum": pytest.approx(3 * 3.6), "count": 12.0, "value": None}
    saved = json.loads(json.dumps(Pipeline([method]).state_dict()))
    resumed = build_method({"name": "ter", "coef": 1.0, "target": {"kind": "calibrated", "steps": 2, "scale": 0.5}})
    Pipeline([resumed]).load_state_dict(saved)
    batch = batch_of(step=2)
    terms = run(resumed, batch)  # target = 0.5 * mean(0.6, 1.2) = 0.45
    assert batch.metrics["ter/target"][0].item() == pytest.approx(0.45)
    assert terms.scalar.item() == pytest.approx(0.15, abs=1e-6)
    assert resumed.state["target"]["value"] == pytest.approx(0.45)


def test_bad_configuration_is_refused():
    with pytest.raises(MethodConfigError, match="coef"):
        build_method({"name": "ter", "coef": 0.0})
    with pytest.raises(MethodConfigError, match="target"):
        build_method({"name": "ter", "target": -0.1})
    with pytest.raises(MethodConfigError, match="target"):
        build_method({"name": "ter", "target": {"kind": "linear", "start": 0.9, "end": 0.5}})
    with pytest.raises(MethodConfigError, match="kind"):
        build_method({"name": "ter", "target": {"kind": "exponential", "start": 0.9}})


def test_composes_with_entropic_and_kl_cov_each_keeping_its_effect():
    """ter + entropic (scalar terms add) + kl_cov (its extra term): the pipeline's output is the sum of the parts."""
    logps = torch.tensor([[-0.01, -0.30, -0.02, -2.00], [-0.04, -0.06, -0.50, 0.0]])
    old = logps + torch.tensor([[0.1, 0.2, -0.15, -0.4], [0.05, 0.3, -0.1, 0.0]])
    adv = torch.tensor([[0.8] * 4, [-1.2] * 4])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
    entries = [{"name": "kl_cov", "ratio": 0.3, "base_clip": True}, {"name": "ter", "coef": 0.1},
               {"name": "entropic", "target": 0.3}]

    def terms_of(names):
        methods = [build_method(e) for e in entries if e["name"] in names]
        batch = batch_of(entropy=H, mask=mask, logps=logps, old=old, adv=adv)
        out = Pipeline(methods).token_loss(batch)
        total = sum(t.sum() for t in (out.scalar, out.extra) if t is not None)
        total.backward()
        return out, batch.logps.grad, batch.entropy.grad

    both, g_logp, g_entropy = terms_of({"kl_cov", "ter", "entropic"})
    parts = [terms_of({name}) for name in ("kl_cov", "ter", "entropic")]
    assert torch.allclose(both.extra, parts[0][0].extra)
    assert both.scalar.item() == pytest.approx(parts[1][0].scalar.item() + parts[2][0].scalar.item(), abs=1e-7)
    assert torch.allclose(g_logp, parts[0][1] + parts[2][1], atol=1e-7)  # kl_cov and entropic act on log-probs
    assert torch.allclose(g_entropy, parts[1][2], atol=1e-7)  # ter alone acts on the entropy
    assert (parts[0][0].extra.abs().sum() > 0) and parts[1][0].scalar.item() > 0 and parts[2][0].scalar.item() != 0


@pytest.mark.parametrize("target", [0.0, 50.0])  # below and above the random model's entropy
def test_in_the_trainer_the_penalty_is_trls_entropy_bonus_with_the_sign_of_the_error(model_dir, tmp_path, target):
    """loss(ter) - loss(GRPO) = coef * |H - target| with H TRL's logged entropy; the gradient is TRL's entropy bonus
    with coefficient -coef * sign(H - target) (here coef * sign(target - H))."""
    coef = 0.3
    ter = build(model_dir, tmp_path, [{"name": "ter", "target": target, "coef": coef}])
    plain = build(model_dir, tmp_path, [])
    out = generate(plain, prompt_rows(2, 4))
    base_loss, base_grads = loss_and_grads(plain, dict(out))
    loss, grads = loss_and_grads(ter, dict(out))
    entropy = ter._metrics["train"]["entropy"][-1]
    assert loss.item() - base_loss.item() == pytest.approx(coef * abs(entropy - target), rel=1e-5, abs=1e-6)
    assert ter._metrics["train"]["ter/error"][-1] == pytest.approx(entropy - target, rel=1e-5)
    sign = 1.0 if entropy > target else -1.0
    bonus = build(model_dir, tmp_path, [{"name": "entropy_bonus", "coef": coef}])  # loss - coef * H
    _, bonus_grads = loss_and_grads(bonus, dict(out))
    for name, g in grads.items():
        expected = base_grads[name] - sign * (bonus_grads[name] - base_grads[name])
        assert torch.allclose(g, expected, rtol=1e-4, atol=1e-6), name
    assert any(not torch.allclose(g, base_grads[n], atol=1e-5) for n, g in grads.items())  # the term matters here
