"""entropy_coef_schedule: TRL's entropy bonus with a scheduled coefficient (trl#5584). The values it hands TRL per
step, what it sets at construction, the recipes it refuses, and a real run whose logged coefficient follows it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from helpers.trainers import build, cpu_args, generate, loss_and_grads, prompt_rows

from rlvr_entropy import EntropyGRPOConfig
from rlvr_entropy.config import build_method, build_pipeline
from rlvr_entropy.methods import MethodConfigError

STEP = {"kind": "step", "start": 0.05, "milestones": [1, 2], "gamma": 0.5}


def method(coef):
    return build_method({"name": "entropy_coef_schedule", "coef": coef})


def trl_args(**kwargs):
    return SimpleNamespace(**{"entropy_coef": 0.0, "use_adaptive_entropy": False, **kwargs})


def test_it_hands_trl_the_scheduled_coefficient_before_each_step():
    cosine = method({"kind": "cosine", "start": 0.02, "end": 0.0, "steps": 200})
    coefs = [cosine.trl_settings(s)["entropy_coef"] for s in (0, 100, 200, 300)]
    assert coefs == pytest.approx([0.02, 0.01, 0.0, 0.0], abs=1e-15)
    step = method(STEP)
    assert [step.trl_settings(s) for s in (0, 1, 2, 50)] == [
        {"entropy_coef": 0.05}, {"entropy_coef": 0.025}, {"entropy_coef": 0.0125}, {"entropy_coef": 0.0125}]
    assert method(0.01).trl_settings(7) == {"entropy_coef": 0.01}  # a number: TRL's static bonus
    default = build_method({"name": "entropy_coef_schedule"})  # trl#5584's example: 0.02 -> 0 over 1000 steps
    assert [default.trl_settings(s)["entropy_coef"] for s in (0, 500, 1000)] == pytest.approx([0.02, 0.01, 0.0])
    assert default.state == {}  # nothing to checkpoint: the value is a function of the step


def test_configure_switches_trls_bonus_on_with_the_first_or_largest_value():
    args = trl_args()
    method(STEP).configure(args)
    assert args.entropy_coef == 0.05 and args.use_adaptive_entropy is False
    # a warm-up from 0: TRL must still be built with its bonus on (entropy_coef != 0 at construction)
    rising = method({"kind": "linear", "start": 0.0, "end": 0.01, "steps": 10})
    args = trl_args()
    rising.configure(args)
    assert args.entropy_coef == 0.01 and rising.trl_settings(0) == {"entropy_coef": 0.0}
    # configuring twice (the config rebuilt from its own fields) is harmless
    rising.configure(args)
    assert args.entropy_coef == 0.01


def test_the_recipe_gets_trls_fields_through_the_method():
    config = EntropyGRPOConfig(**cpu_args("/tmp/unused", methods=[{"name": "entropy_coef_schedule", "coef": STEP}]))
    assert config.entropy_coef == 0.05 and not config.use_adaptive_entropy


@pytest.mark.parametrize(("coef", "match"), [
    ({"kind": "linear", "start": 0.01, "end": -0.01, "steps": 10}, "must stay >= 0"),
    (-0.01, "must stay >= 0"),
    (0.0, "0 at every step"),
    ({"kind": "step", "start": 0.0, "milestones": [5], "gamma": 2.0}, "0 at every step"),
    ({"kind": "calibrated", "steps": 10}, r"coef.kind: 'calibrated' is not one of"),
    ({"kind": "linear", "start": 0.01, "end": 0.0}, r"missing \['steps'\]"),
    ({"kind": "linear", "start": 0.01, "end": 0.0, "steps": 10, "warmup": 3}, r"unknown \['warmup'\]"),
    ({"kind": "step", "start": 0.01, "milestones": [5, 3], "gamma": 0.5}, "increasing positive steps"),
    ("big", "does not match"),
])
def test_bad_coefficients_are_refused(coef, match):
    with pytest.raises(MethodConfigError, match=match):
        method(coef)


@pytest.mark.parametrize("trl_fields", [{"entropy_coef": 0.03}, {"use_adaptive_entropy": True}])
def test_it_refuses_a_recipe_that_also_sets_trls_bonus(trl_fields):
    with pytest.raises(MethodConfigError, match="drives TRL's entropy_coef itself"):
        method(STEP).configure(trl_args(**trl_fields))
    with pytest.raises(Exception, match="drives TRL's entropy_coef itself"):
        EntropyGRPOConfig(**cpu_args("/tmp/unused", methods=[{"name": "entropy_coef_schedule"}], **trl_fields))


def test_it_cannot_be_combined_with_the_entropy_bonus_method():
    for entries in ([{"name": "entropy_bonus"}, {"name": "entropy_coef_schedule"}],
                    [{"name": "entropy_coef_schedule"}, {"name": "entropy_bonus", "adaptive": True}]):
        with pytest.raises(MethodConfigError, match="entropy_coef"):
            build_pipeline(entries).configure(trl_args())


def test_each_step_applies_the_scheduled_coefficient_in_trls_loss(model_dir, tmp_path):
    """After the trainer applies step s's settings, the loss and gradients are TRL's static bonus at c(s)."""
    scheduled = build(model_dir, tmp_path, [{"name": "entropy_coef_schedule", "coef": STEP}])
    out = generate(scheduled, prompt_rows(2, 4))
    for step, coef in ((0, 0.05), (2, 0.0125)):
        scheduled._apply_trl_settings(scheduled.pipeline.trl_settings(step))
        assert scheduled.entropy_coef == coef
        static = build(model_dir, tmp_path, [], entropy_coef=coef)
        (loss, grads), (ref_loss, ref_grads) = loss_and_grads(scheduled, dict(out)), loss_and_grads(static, dict(out))
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6, abs=1e-8)
        assert all(bool((grads[k] - ref_grads[k]).abs().max() <= 1e-6) for k in ref_grads)
    plain = build(model_dir, tmp_path, [])
    assert abs(loss_and_grads(plain, dict(out))[0].item() - loss.item()) > 1e-4  # the bonus is not negligible


def test_a_training_run_logs_the_scheduled_coefficient_at_every_step_beside_other_methods(model_dir, tmp_path):
    """A real run (3 optimizer steps) with a stepwise schedule, composed with AEPO (a scheduled target) and STEER."""
    methods = [{"name": "entropy_coef_schedule", "coef": STEP},
               {"name": "aepo", "target": {"kind": "linear", "start": 2.0, "end": 0.0, "steps": 2},
                "num_samples": 4, "prompt_fraction": 0.5},
               {"name": "steer"}]
    trainer = build(model_dir, tmp_path, methods, max_steps=3)
    trainer.train()
    logged = [e for e in trainer.state.log_history if "entropy_coef" in e]
    assert [e["step"] for e in logged] == [1, 2, 3]
    assert [e["entropy_coef"] for e in logged] == pytest.approx([0.05, 0.025, 0.0125])  # TRL's own log
    assert [e["entropy_coef_schedule/coef"] for e in logged] == pytest.approx([0.05, 0.025, 0.0125])
    assert trainer.entropy_coef == pytest.approx(0.0125)
    # the others keep their effect: AEPO follows its own target schedule, STEER reweights tokens
    assert [e["aepo/target"] for e in logged] == pytest.approx([2.0, 1.0, 0.0])
    # the first rollout samples hot (estimate 0 <= 2); the random model's ~4.5 nats are above 1 and 0 after it
    assert [e["aepo/temperature"] for e in logged] == [1.2, 0.8, 0.8]
    assert all(e["aepo/error"] == pytest.approx(e["aepo/nll"] - e["aepo/target"]) for e in logged)
    assert all(0.0 < e["steer/mean_weight"] <= 1.0 for e in logged)
