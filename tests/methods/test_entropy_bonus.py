"""entropy_bonus: TRL's static or adaptive bonus; the adaptive target as a schedule or calibrated from the first steps.

The static bonus and a constant adaptive target set TRL's fields exactly as before; a scheduled target is handed to
TRL before every optimizer step, a calibrated one is measured from the training entropy, and the controller logs its
target and error. TRL's own bonus and controller are tested by TRL and by tests/test_hook_interface.py.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from helpers.trainers import build, cpu_args

from rlvr_entropy import EntropyGRPOConfig
from rlvr_entropy.config import build_method
from rlvr_entropy.methods import LossBatch, MethodConfigError

LINEAR = {"kind": "linear", "start": 0.9, "end": 0.5, "steps": 4}
ENTROPY = torch.tensor([[0.6, 1.0, 9.9], [0.8, 9.9, 9.9]])  # 9.9: padding, never read
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # mean over the counted tokens: 2.4 / 3 = 0.8


def bonus(**params):
    return build_method({"name": "entropy_bonus", **params})


def trl_args(**kwargs):
    return SimpleNamespace(**{"entropy_coef": 0.0, "use_adaptive_entropy": False, "entropy_target": 0.2,
                              "top_entropy_quantile": 1.0, **kwargs})


def loss_batch(step=0, training=True, entropy=ENTROPY, mask=MASK):
    logps = torch.zeros_like(entropy, requires_grad=True)
    return LossBatch(
        logps=logps, old_logps=logps.detach(), on_policy=True, entropy=entropy.clone().requires_grad_(),
        advantages=torch.zeros_like(entropy), mask=mask, group_ids=torch.tensor([0, 0]), weight=torch.ones_like(mask),
        loss_type="dapo", epsilon_low=0.2, epsilon_high=0.2, importance_sampling_level="token", step=step,
        micro_step=0, seed=0, process_index=0, num_processes=1, gather=lambda x: x, training=training,
    )


def run_token_loss(method, batch):
    with batch.scope(method.name):
        out = method.token_loss(batch)
    return out, {k: float(v[0]) for k, v in batch.metrics.items()}


# -- the static bonus and a constant target: as before ----------------------------------------------------


def test_the_static_bonus_only_sets_trls_coefficient():
    method = bonus(coef=0.03)
    args = trl_args()
    method.configure(args)
    assert args.entropy_coef == 0.03 and args.use_adaptive_entropy is False and args.entropy_target == 0.2
    assert method.state == {} and method.trl_settings(0) == {} and method.trl_settings(100) == {}
    out, metrics = run_token_loss(method, loss_batch())
    assert out is None and metrics == {}  # no term, no statistic


def test_a_constant_adaptive_target_sets_trls_controller_as_before():
    method = bonus(coef=0.02, adaptive=True, target=0.85, delta=0.001, coef_min=0.0, coef_max=0.1)
    args = trl_args()
    method.configure(args)
    assert (args.entropy_coef, args.use_adaptive_entropy, args.entropy_target) == (0.02, True, 0.85)
    assert (args.entropy_coef_delta, args.entropy_coef_min, args.entropy_coef_max) == (0.001, 0.0, 0.1)
    assert method.state == {"target": {}}  # a fixed target has nothing to checkpoint (TRL keeps its controller)
    assert method.trl_settings(0) == {"entropy_target": 0.85} == method.trl_settings(500)


# -- scheduled and calibrated targets ---------------------------------------------------------------------


def test_a_scheduled_target_is_handed_to_trl_before_every_step():
    method = bonus(adaptive=True, target=LINEAR)
    args = trl_args()
    method.configure(args)
    assert args.entropy_target == 0.9  # the value at step 0, before TRL's first step
    targets = [method.trl_settings(s)["entropy_target"] for s in range(6)]
    assert targets == pytest.approx([0.9, 0.8, 0.7, 0.6, 0.5, 0.5])
    step = bonus(adaptive=True, target={"kind": "step", "start": 0.9, "milestones": [2], "gamma": 0.5})
    assert [step.trl_settings(s)["entropy_target"] for s in (1, 2)] == [0.9, 0.45]


def test_the_controller_logs_its_target_and_the_error_of_the_training_entropy():
    method = bonus(adaptive=True, target=LINEAR)
    out, metrics = run_token_loss(method, loss_batch(step=1))
    assert out is None  # logging only: TRL computes the bonus
    assert metrics["entropy_bonus/target"] == pytest.approx(0.8)
    assert metrics["entropy_bonus/error"] == pytest.approx(0.8 - 0.8, abs=1e-7)  # token mean 0.8, padding ignored
    _, metrics = run_token_loss(method, loss_batch(step=3))
    assert metrics["entropy_bonus/error"] == pytest.approx(0.8 - 0.6)


def test_a_calibrated_target_is_measured_over_the_first_steps_then_fixed():
    method = bonus(adaptive=True, target={"kind": "calibrated", "steps": 2, "scale": 0.9})
    assert method.state == {"target": {"sum": 0.0, "count": 0.0, "value": None}}
    args = trl_args()
    method.configure(args)
    assert args.entropy_target == 0.0  # TRL's gated bonus stays off while measuring (entropy > 0)
    assert method.trl_settings(0) == {"entropy_target": 0.0}
    _, metrics = run_token_loss(method, loss_batch(step=0))  # tokens 0.6, 1.0, 0.8
    assert metrics == {}  # no target yet
    # an evaluation pass measures nothing and changes nothing
    run_token_loss(method, loss_batch(step=0, training=False, entropy=torch.full((2, 3), 5.0)))
    assert method.state["target"] == {"sum": pytest.approx(2.4), "count": 3.0, "value": None}
    second = torch.tensor([[0.2, 0.4, 0.6], [0.8, 1.0, 9.9]])  # four more counted tokens, sum 1.4
    run_token_loss(method, loss_batch(step=1, entropy=second, mask=torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])))
    assert method.trl_settings(1) == {"entropy_target": 0.0}
    calibration = method.state["target"]
    assert calibration["sum"] == pytest.approx(2.4 + 0.2 + 0.6 + 0.8 + 1.0) and calibration["count"] == 7.0
    # step 2: 0.9 x (5.0 / 7) ~= 0.642857, then fixed
    expected = 0.9 * 5.0 / 7
    assert method.trl_settings(2)["entropy_target"] == pytest.approx(expected)
    _, metrics = run_token_loss(method, loss_batch(step=2))
    assert metrics["entropy_bonus/target"] == pytest.approx(expected)
    assert metrics["entropy_bonus/error"] == pytest.approx(0.8 - expected)
    assert method.trl_settings(50)["entropy_target"] == pytest.approx(expected)
    assert json.loads(json.dumps(method.state)) == method.state  # checkpointed with the method state


def test_evaluation_before_the_calibration_ends_does_not_fix_the_target():
    method = bonus(adaptive=True, target={"kind": "calibrated", "steps": 1})
    run_token_loss(method, loss_batch(step=0))
    _, metrics = run_token_loss(method, loss_batch(step=1, training=False))  # evaluate() at step 1
    assert metrics["entropy_bonus/target"] == pytest.approx(0.8)  # what the next training step will use ...
    assert method.state["target"]["value"] is None  # ... but only a training step fixes it
    assert method.trl_settings(1) == {"entropy_target": pytest.approx(0.8)}
    assert method.state["target"]["value"] == pytest.approx(0.8)


@pytest.mark.parametrize(("params", "match"), [
    ({"target": -0.1}, "entropy_bonus.target: a target entropy must be >= 0"),
    ({"target": {"kind": "linear", "start": 0.9, "end": -0.1, "steps": 10}}, "target entropy must be >= 0"),
    ({"target": {"kind": "linear", "start": 0.9, "steps": 10}}, r"missing \['end'\]"),
    ({"target": {"kind": "calibrated", "steps": 5, "scale": 0.0}}, "scale must be > 0"),
    ({"target": {"kind": "sigmoid"}}, "is not one of"),
    ({"target": "high"}, "does not match"),
    ({"coef": -0.01}, "coef and delta must be >= 0"),
    ({"delta": -0.01, "adaptive": True}, "coef and delta must be >= 0"),
    ({"coef": 0.0}, "does nothing"),
])
def test_bad_parameters_are_refused(params, match):
    with pytest.raises(MethodConfigError, match=match):
        bonus(**params)


def test_a_calibrated_target_needs_trls_full_token_set():
    method = bonus(adaptive=True, target={"kind": "calibrated", "steps": 5})
    with pytest.raises(MethodConfigError, match="top_entropy_quantile"):
        method.check(trl_args(top_entropy_quantile=0.2))
    method.check(trl_args())
    bonus(adaptive=True, target=LINEAR).check(trl_args(top_entropy_quantile=0.2))  # a given target is fine


def test_the_recipe_still_refuses_trls_fields_set_twice():
    with pytest.raises(Exception, match="do not also set them"):
        EntropyGRPOConfig(**cpu_args("/tmp/unused", methods=[{"name": "entropy_bonus", "adaptive": True}],
                                     use_adaptive_entropy=True))
    config = EntropyGRPOConfig(**cpu_args("/tmp/unused", methods=[{"name": "entropy_bonus", "adaptive": True,
                                                                   "target": LINEAR}]))
    assert config.use_adaptive_entropy and config.entropy_target == 0.9


# -- real runs --------------------------------------------------------------------------------------------


def test_trls_controller_follows_a_scheduled_target_in_a_training_run(model_dir, tmp_path):
    """Target 6 nats at step 0, then 3: the random model's ~4.5 nats are below it, then above it."""
    methods = [{"name": "entropy_bonus", "adaptive": True, "coef": 0.01, "delta": 0.005,
                "target": {"kind": "linear", "start": 6.0, "end": 3.0, "steps": 1}}]
    trainer = build(model_dir, tmp_path, methods, max_steps=3)
    trainer.train()
    logged = [e for e in trainer.state.log_history if "entropy_coef" in e]
    assert [e["entropy_bonus/target"] for e in logged] == [6.0, 3.0, 3.0]
    # TRL's controller, after each step: +delta at entropy <= target, -delta above it
    assert [e["entropy_coef"] for e in logged] == pytest.approx([0.015, 0.01, 0.005])
    assert all(e["entropy_bonus/error"] == pytest.approx(e["entropy"] - e["entropy_bonus/target"], abs=1e-5)
               for e in logged)
    assert trainer.args.entropy_target == 3.0 and trainer.pipeline.state_dict() == {"entropy_bonus": {"target": {}}}


def test_a_calibrated_target_in_a_training_run_beside_a_calibrated_aepo_and_steer(model_dir, tmp_path):
    """Two controllers calibrate their targets over the first two steps (plain GRPO meanwhile), then act."""
    methods = [{"name": "entropy_bonus", "adaptive": True, "coef": 0.01, "delta": 0.005,
                "target": {"kind": "calibrated", "steps": 2, "scale": 0.5}},
               {"name": "aepo", "target": {"kind": "calibrated", "steps": 2, "scale": 2.0}, "num_samples": 4,
                "prompt_fraction": 0.5},
               {"name": "steer"}]
    trainer = build(model_dir, tmp_path, methods, max_steps=3)
    trainer.train()
    logged = [e for e in trainer.state.log_history if "entropy_coef" in e]
    assert [e["step"] for e in logged] == [1, 2, 3]
    state = trainer.pipeline.state_dict()
    assert json.loads(json.dumps(state)) == state
    bonus_state = state["entropy_bonus"]["target"]
    target = bonus_state["value"]
    assert target == pytest.approx(0.5 * bonus_state["sum"] / bonus_state["count"])
    measured = [e["entropy"] for e in logged[:2]]
    assert min(measured) - 1e-5 <= target / 0.5 <= max(measured) + 1e-5  # the mean of the first two steps
    assert "entropy_bonus/target" not in logged[0] and "entropy_bonus/target" not in logged[1]
    assert logged[2]["entropy_bonus/target"] == pytest.approx(target) and trainer.args.entropy_target == target
    # entropy > 0 = TRL's target while calibrating, and > the calibrated half after: the coefficient only falls
    assert [e["entropy_coef"] for e in logged] == pytest.approx([0.005, 0.0, 0.0], abs=1e-12)
    # AEPO: no extra samples while calibrating; then twice the estimate's mean, so it samples hot
    assert [e.get("aepo/temperature") for e in logged] == [None, None, 1.2]
    assert [e["aepo/injected"] for e in logged][:2] == [0.0, 0.0]
    aepo = state["aepo"]["target"]
    assert aepo["value"] == pytest.approx(2.0 * aepo["sum"] / aepo["count"])
    assert logged[2]["aepo/target"] == pytest.approx(aepo["value"])
    assert all(0.0 < e["steer/mean_weight"] <= 1.0 for e in logged)


def test_a_state_saved_before_targets_had_state_still_resumes():
    method = bonus(adaptive=True, target=0.85)
    method.state = {}  # what a checkpoint of the adaptive bonus held before
    assert method.trl_settings(3) == {"entropy_target": 0.85} and method.state == {"target": {}}
