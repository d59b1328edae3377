"""AEPO (arbitrary entropy): the success filter, the temperature controller, row replacement and advantages."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rlvr_entropy.config import build_method
from rlvr_entropy.methods import MethodConfigError, Rollout, RolloutBatch, RolloutContext
from rlvr_entropy.methods.aepo import INJECTED, local_budget, successful
from rlvr_entropy.tensor_ops import grpo_advantages

NAN = float("nan")


def test_successful_is_a_positive_grpo_advantage_above_the_threshold():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, NAN, 0.0, 0.0, 0.5])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3])
    # group 0: adv = +-0.866; group 1: no spread; group 2: [1, 0, 0] scored -> +1.155 for the 1;
    # group 3: a single sample has no spread
    expected = [True, False, False, True] + [False] * 4 + [True, False, False, False] + [False]
    assert successful(rewards, groups, 0.05).tolist() == expected
    # the threshold is on the normalised advantage: 0.866 passes 0.8 but not 0.9
    assert successful(rewards[:4], groups[:4], 0.9).tolist() == [False] * 4
    assert successful(rewards[:4], groups[:4], 0.8).tolist() == [True, False, False, True]


def test_local_budgets_add_up_to_the_global_budget():
    shares = [local_budget(60, p, 8) for p in range(8)]
    assert shares == [8, 8, 8, 8, 7, 7, 7, 7] and sum(shares) == 60
    assert local_budget(60, 0, 1) == 60


def test_grpo_advantages_leave_nan_rewards_out_of_the_baseline():
    rewards = torch.tensor([1.0, 0.0, 0.0, NAN])
    adv = grpo_advantages(rewards, 4, "group")
    mean, std = 1 / 3, math.sqrt(1 / 3)
    assert adv.tolist() == pytest.approx([(1 - mean) / (std + 1e-4), -mean / (std + 1e-4), -mean / (std + 1e-4), 0.0])
    assert grpo_advantages(rewards, 4, "none").tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3, 0.0])
    assert grpo_advantages(torch.ones(4), 4, "group").tolist() == [0.0] * 4  # equal rewards: no NaN


class FakeGeneration:
    """Completion of row i is [i] normally and [100 + i] when sampled at another temperature."""

    def __init__(self, rewards):
        self.rewards = rewards
        self.calls = []

    def generate(self, rows, temperature):
        self.calls.append((rows, temperature))
        rows = list(range(16)) if rows is None else rows
        offset = 0 if temperature is None else 100
        return Rollout([[offset + i] for i in rows], stats={"entropy": [torch.tensor([float(offset)]) for _ in rows]})

    def score(self, rows, rollout):
        assert [c[0] - 100 for c in rollout.completion_ids] == rows
        return torch.tensor(self.rewards, dtype=torch.float32)


def context(fake, training=True):
    return RolloutContext(prompt_ids=[[1, 2]] * 16, group_size=4, temperature=1.0, step=0, training=training,
                          generator=torch.Generator(), score=fake.score)


def test_rollout_samples_hot_below_target_and_replaces_rows_with_kept_samples():
    aepo = build_method({"name": "aepo", "target": 0.5, "num_samples": 1})
    fake = FakeGeneration([1.0, 0.0, 1.0, 0.0])  # extra samples of the first group (first quarter of 4)
    ctx = context(fake)
    with ctx.scope("aepo"):
        out = aepo.rollout(ctx, fake.generate)
    assert fake.calls == [(None, None), ([0, 1, 2, 3], 1.2)]  # estimate 0 <= target: hot
    # rows 0 and 2 succeed; the budget keeps the first only, in place of row 0's normal sample
    assert [c[0] for c in out.completion_ids] == [100] + list(range(1, 16))
    assert out.stats["entropy"][0].item() == 100.0 and out.stats["entropy"][1].item() == 0.0
    assert out.tags[f"aepo/{INJECTED}"].tolist() == [1.0] + [0.0] * 15
    assert ctx.metrics["aepo/temperature"] == 1.2


def test_above_target_samples_cold_with_half_the_budget():
    aepo = build_method({"name": "aepo", "target": 0.5, "num_samples": 5})
    aepo.state["estimate"] = 0.7
    fake = FakeGeneration([1.0, 1.0, 1.0, 0.0])
    ctx = context(fake)
    out = aepo.rollout(ctx, fake.generate)
    assert fake.calls[1] == ([0, 1, 2, 3], 0.8)
    assert [c[0] for c in out.completion_ids][:4] == [100, 101, 2, 3]  # 3 succeed, 5 // 2 = 2 kept


def test_nothing_successful_or_evaluation_leaves_the_batch_alone():
    aepo = build_method({"name": "aepo"})
    fake = FakeGeneration([1.0, 1.0, 1.0, 1.0])  # all right: no spread, nothing beats its group
    out = aepo.rollout(context(fake), fake.generate)
    assert [c[0] for c in out.completion_ids] == list(range(16))
    fake = FakeGeneration([])
    out = aepo.rollout(context(fake, training=False), fake.generate)
    assert fake.calls == [(None, None)] and len(out) == 16


def rollout_batch(rewards, injected, logps):
    n = len(rewards)
    return RolloutBatch(
        rewards_per_func=torch.tensor(rewards).unsqueeze(1), reward_names=["correctness"],
        reward_weights=torch.ones(1), group_ids=torch.arange(n) // 4, group_size=4,
        mask=torch.tensor([[1.0, 1.0, 0.0]] * n), completion_ids=torch.zeros(n, 3, dtype=torch.long),
        step=0, training=True, logps=logps, entropy=-logps, tags={f"aepo/{INJECTED}": torch.tensor(injected)},
    )


def test_advantage_gives_injected_rows_the_reinforce_value_outside_the_baseline():
    aepo = build_method({"name": "aepo"})
    rewards = [1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    injected = [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    logps = torch.tensor([[-9.0, -9.0, -5.0]] + [[-0.5, -0.3, -7.0]] * 7)  # padding (-5, -7) never counts
    batch = rollout_batch(rewards, injected, logps)
    trl = grpo_advantages(torch.tensor(rewards), 4)
    with batch.scope("aepo"):
        out = aepo.advantage(trl.clone(), batch)
    assert out[0].item() == 1.0
    # the rest of group 0 is normalised without row 0: rewards [1, 0, 0]
    assert out[1:4].tolist() == pytest.approx(grpo_advantages(torch.tensor([NAN, 1.0, 0.0, 0.0]), 4)[1:].tolist())
    assert torch.equal(out[4:], trl[4:])  # groups without injections keep their advantages
    assert aepo.state["estimate"] == pytest.approx(0.4)  # NLL over normal rows' valid tokens only
    assert batch.metrics["aepo/injected"] == 1.0
    # per-token advantages from an earlier method: same values on every token of touched groups
    with batch.scope("aepo"):
        out2 = aepo.advantage(trl.unsqueeze(1).expand(8, 3).clone(), batch)
    assert torch.allclose(out2[:, 0], out) and torch.allclose(out2[:, 2], out)


def test_parameters_are_checked():
    with pytest.raises(MethodConfigError, match="prompt_fraction"):
        build_method({"name": "aepo", "prompt_fraction": 0.0})
    with pytest.raises(MethodConfigError, match="target"):
        build_method({"name": "aepo", "target": -1})
    with pytest.raises(MethodConfigError, match="no parameter 'temprature_high'"):
        build_method({"name": "aepo", "temprature_high": 1.5})


# -- the target as a schedule, or calibrated from the first rollouts ------------------------------------------


def context_at(fake, step):
    ctx = context(fake)
    ctx.step = step
    return ctx


def test_a_scheduled_target_decides_each_rollouts_temperature_at_its_step():
    aepo = build_method({"name": "aepo", "target": {"kind": "linear", "start": 1.0, "end": 0.0, "steps": 4},
                         "num_samples": 4})
    aepo.state["estimate"] = 0.6
    temperatures, targets = [], []
    for step in (0, 1, 2, 3, 8):
        fake = FakeGeneration([1.0, 0.0, 1.0, 0.0])
        ctx = context_at(fake, step)
        with ctx.scope("aepo"):
            aepo.rollout(ctx, fake.generate)
        temperatures.append(fake.calls[1][1])
        targets.append(ctx.metrics["aepo/target"])
    assert targets == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    assert temperatures == [1.2, 1.2, 0.8, 0.8, 0.8]  # 0.6 <= target while it is 1.0 or 0.75
    assert aepo.state == {"estimate": 0.6, "batches": 0, "target": {}}  # a schedule needs no state of its own


def test_the_advantage_hook_logs_the_error_of_the_fresh_estimate():
    aepo = build_method({"name": "aepo", "target": {"kind": "step", "start": 0.5, "milestones": [4], "gamma": 0.5}})
    logps = torch.tensor([[-0.5, -0.3, -7.0]] * 8)  # NLL 0.4 over the valid tokens
    for step, target in ((0, 0.5), (4, 0.25)):
        batch = rollout_batch([1.0, 0.0] * 4, [0.0] * 8, logps)
        batch.step = step
        with batch.scope("aepo"):
            aepo.advantage(grpo_advantages(torch.tensor([1.0, 0.0] * 4), 4), batch)
        assert batch.metrics["aepo/error"] == pytest.approx(0.4 - target)


def test_a_calibrated_target_injects_nothing_until_measured_then_holds_the_scaled_mean():
    aepo = build_method({"name": "aepo", "target": {"kind": "calibrated", "steps": 2, "scale": 0.5}})
    assert aepo.state == {"estimate": 0.0, "batches": 0, "target": {"sum": 0.0, "count": 0.0, "value": None}}
    rewards = [1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    # NLL of the valid tokens (mask [1, 1, 0]): rollout at step 0 -> 0.4 (16 tokens), at step 1 -> 1.0 (16 tokens)
    for step, logps in ((0, [[-0.5, -0.3, -7.0]] * 8), (1, [[-1.5, -0.5, -7.0]] * 8)):
        fake = FakeGeneration([])
        ctx = context_at(fake, step)
        with ctx.scope("aepo"):
            out = aepo.rollout(ctx, fake.generate)
        assert fake.calls == [(None, None)] and [c[0] for c in out.completion_ids] == list(range(16))  # plain GRPO
        assert "aepo/temperature" not in ctx.metrics and "aepo/target" not in ctx.metrics
        batch = rollout_batch(rewards, [0.0] * 8, torch.tensor(logps))
        batch.step = step
        trl = grpo_advantages(torch.tensor(rewards), 4)
        with batch.scope("aepo"):
            assert torch.equal(aepo.advantage(trl.clone(), batch), trl)
        assert "aepo/error" not in batch.metrics
    assert aepo.state["target"] == {"sum": pytest.approx(6.4 + 16.0), "count": 32.0, "value": None}
    assert aepo.state["estimate"] == pytest.approx(1.0)
    # step 2: target 0.5 x 22.4 / 32 = 0.35; the estimate 1.0 is above it: cold, half the budget
    fake = FakeGeneration([1.0, 1.0, 0.0, 0.0])
    ctx = context_at(fake, 2)
    with ctx.scope("aepo"):
        out = aepo.rollout(ctx, fake.generate)
    assert aepo.state["target"]["value"] == pytest.approx(0.35)
    assert fake.calls[1] == ([0, 1, 2, 3], 0.8) and ctx.metrics["aepo/target"] == pytest.approx(0.35)
    assert [c[0] for c in out.completion_ids][:4] == [100, 101, 2, 3]
    batch = rollout_batch(rewards, [1.0, 1.0] + [0.0] * 6, torch.tensor([[-0.5, -0.3, -7.0]] * 8))
    batch.step = 2
    with batch.scope("aepo"):
        aepo.advantage(grpo_advantages(torch.tensor(rewards), 4), batch)
    assert batch.metrics["aepo/error"] == pytest.approx(0.4 - 0.35)
    assert aepo.state["target"]["sum"] == pytest.approx(22.4)  # measurements after calibration do not count
    state = json.loads(json.dumps(aepo.state))  # checkpointed with the method state, restored on resume
    assert state == aepo.state


def test_target_schedules_are_checked():
    with pytest.raises(MethodConfigError, match="aepo.target: a target entropy must be >= 0"):
        build_method({"name": "aepo", "target": {"kind": "linear", "start": 0.5, "end": -0.5, "steps": 10}})
    with pytest.raises(MethodConfigError, match=r"aepo.target: a calibrated schedule takes .* missing \['steps'\]"):
        build_method({"name": "aepo", "target": {"kind": "calibrated"}})


def test_a_state_saved_before_targets_had_state_still_resumes():
    aepo = build_method({"name": "aepo", "target": 0.5})
    aepo.state = {"estimate": 0.7, "batches": 3}  # what an AEPO checkpoint held before
    fake = FakeGeneration([1.0, 1.0, 1.0, 0.0])
    aepo.rollout(context(fake), fake.generate)
    assert fake.calls[1][1] == 0.8 and aepo.state == {"estimate": 0.7, "batches": 3, "target": {}}
