"""The hooks reach TRL's loss as documented: weights, detach, extra terms, advantages and rewards.

Toy methods are referenced by import path (``test_trainer_hooks.Scale``), as out-of-tree methods are.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from helpers.trainers import build, generate, loss_and_grads, off_policy, prompt_rows

from rlvr_entropy.methods import Method, MethodConfigError, TokenTerms


@dataclass
class HalfWeight(Method):
    name = "half_weight"

    def token_loss(self, batch):
        batch.log("mean_weight", 0.5)
        return TokenTerms(weight=torch.full_like(batch.mask, 0.5))


@dataclass
class DetachAll(Method):
    name = "detach_all"

    def token_loss(self, batch):
        return TokenTerms(detach=torch.ones_like(batch.mask, dtype=torch.bool))


@dataclass
class UnclippedPG(Method):
    """Extra term equal to the unclipped importance-weighted policy gradient term."""

    name = "unclipped_pg"

    def token_loss(self, batch):
        return TokenTerms(extra=-batch.advantages * torch.exp(batch.logps - batch.old_logps))


@dataclass
class DoubleAdvantage(Method):
    name = "double_advantage"

    def advantage(self, advantages, batch):
        batch.log("groups", float(batch.group_ids.max() + 1))
        return advantages * 2


@dataclass
class PerTokenAdvantage(Method):
    name = "per_token_advantage"

    def advantage(self, advantages, batch):
        return advantages.unsqueeze(1) * batch.mask  # (N, T)


@dataclass
class LengthPenalty(Method):
    name = "length_penalty"
    needs = frozenset({"entropy", "logps"})

    def reward(self, rewards, batch):
        assert batch.entropy is not None and batch.logps is not None
        return rewards - 0.1 * batch.lengths


def path(cls):
    return {"name": f"test_trainer_hooks.{cls.__name__}"}


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo", "cispo", "sapo"])
def test_weight_scales_policy_loss_and_gradients(model_dir, tmp_path, loss_type):
    base = build(model_dir, tmp_path, [], loss_type=loss_type)
    half = build(model_dir, tmp_path, [path(HalfWeight)], loss_type=loss_type)
    rows = prompt_rows(2, 4)
    out = off_policy(base, generate(base, rows))
    b_loss, b_grads = loss_and_grads(base, dict(out))
    h_loss, h_grads = loss_and_grads(half, dict(out))
    assert h_loss.item() == pytest.approx(0.5 * b_loss.item(), abs=1e-6)
    for name, g in b_grads.items():
        assert torch.allclose(h_grads[name], 0.5 * g, atol=1e-6), name
    assert half._metrics["train"]["half_weight/mean_weight"] == [0.5]
    assert out["advantages"].dim() == 1  # the buffered batch keeps its own advantages


def test_detach_keeps_loss_and_zeroes_gradients(model_dir, tmp_path):
    base = build(model_dir, tmp_path, [])
    detached = build(model_dir, tmp_path, [path(DetachAll)])
    out = off_policy(base, generate(base, prompt_rows(2, 4)))
    b_loss, _ = loss_and_grads(base, dict(out))
    d_loss, d_grads = loss_and_grads(detached, dict(out))
    assert d_loss.item() == pytest.approx(b_loss.item(), abs=1e-7)
    assert all(torch.count_nonzero(g) == 0 for g in d_grads.values())


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo", "dr_grpo", "luspo"])
def test_extra_term_uses_the_loss_type_normaliser(model_dir, tmp_path, loss_type):
    # With clipping disabled TRL's per-token loss is -A * ratio, so adding the same term doubles it.
    kwargs = dict(loss_type=loss_type, epsilon=10.0, epsilon_high=10.0)
    base = build(model_dir, tmp_path, [], **kwargs)
    extra = build(model_dir, tmp_path, [path(UnclippedPG)], **kwargs)
    out = off_policy(base, generate(base, prompt_rows(2, 4)))
    b_loss, b_grads = loss_and_grads(base, dict(out))
    e_loss, e_grads = loss_and_grads(extra, dict(out))
    assert e_loss.item() == pytest.approx(2 * b_loss.item(), rel=1e-5, abs=1e-7)
    for name, g in b_grads.items():
        assert torch.allclose(e_grads[name], 2 * g, atol=1e-6), name


def test_advantage_hook_sees_global_batch_and_feeds_the_loss(model_dir, tmp_path):
    base = build(model_dir, tmp_path, [])
    doubled = build(model_dir, tmp_path, [path(DoubleAdvantage)])
    rows = prompt_rows(2, 4)
    b_out, d_out = generate(base, rows), generate(doubled, rows)
    assert torch.allclose(d_out["advantages"], 2 * b_out["advantages"])
    assert doubled._metrics["train"]["double_advantage/groups"] == [2.0]
    assert torch.equal(d_out["group_ids"], torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]))
    assert list(doubled._logs["advantages"])[-8:] == pytest.approx(d_out["advantages"].tolist())


def test_per_token_advantages_reach_the_loss(model_dir, tmp_path):
    base = build(model_dir, tmp_path, [])
    per_token = build(model_dir, tmp_path, [path(PerTokenAdvantage)])
    rows = prompt_rows(2, 4)
    b_out, t_out = generate(base, rows), generate(per_token, rows)
    assert t_out["advantages"].shape == t_out["completion_ids"].shape
    b_loss, b_grads = loss_and_grads(base, b_out)
    t_loss, t_grads = loss_and_grads(per_token, t_out)
    assert t_loss.item() == pytest.approx(b_loss.item(), abs=1e-6)  # masked positions never count
    for name, g in b_grads.items():
        assert torch.allclose(t_grads[name], g, atol=1e-6), name


def test_reward_hook_adds_a_logged_column(model_dir, tmp_path):
    base = build(model_dir, tmp_path, [])
    shaped = build(model_dir, tmp_path, [path(LengthPenalty)])
    rows = prompt_rows(2, 4)
    generate(base, rows)
    s_out = generate(shaped, rows)
    assert shaped.reward_func_names == ["correctness", "partial_credit", "length_penalty"]
    lengths = s_out["completion_mask"].sum(1).float()
    assert shaped._metrics["train"]["rewards/length_penalty/mean"] == [pytest.approx(-0.1 * lengths.mean().item())]
    assert shaped._metrics["train"]["reward"][0] == pytest.approx(base._metrics["train"]["reward"][0] - 0.1 * lengths.mean().item(), abs=1e-5)
    # rollout entropy was computed for the method (and logged); no rollout keys reach the loss unless needed
    assert "rollout_entropy/mean" in shaped._metrics["train"]
    assert "rollout_entropy" in s_out and "rollout_logps" in s_out


@dataclass
class CarryFirstToken(Method):
    """Marks each completion's first token in the advantage hook; zero-weights it in the loss hook."""

    name = "carry_first_token"

    def advantage(self, advantages, batch):
        first = torch.zeros_like(batch.mask)
        first[:, 0] = 1.0
        batch.carry("first", first)
        batch.carry("row", torch.arange(batch.mask.size(0)))
        return advantages

    def token_loss(self, batch):
        first = batch.carried_value("first")
        assert first.shape == batch.mask.shape
        batch.log("rows_seen", batch.carried_value("row").numel(), reduce="sum")
        return TokenTerms(weight=1.0 - first)


@dataclass
class ZeroFirstToken(Method):
    name = "zero_first_token"

    def token_loss(self, batch):
        w = torch.ones_like(batch.mask)
        w[:, 0] = 0.0
        return TokenTerms(weight=w)


def test_carried_tensors_follow_rows_into_the_loss(model_dir, tmp_path):
    carrying = build(model_dir, tmp_path, [path(CarryFirstToken)])
    direct = build(model_dir, tmp_path, [path(ZeroFirstToken)])
    rows = prompt_rows(2, 4)
    c_out, d_out = generate(carrying, rows), generate(direct, rows)
    assert "carry/carry_first_token/first" in c_out
    c_out = off_policy(carrying, c_out)
    d_out["old_per_token_logps"] = c_out["old_per_token_logps"].clone()
    c_loss, c_grads = loss_and_grads(carrying, c_out)
    d_loss, d_grads = loss_and_grads(direct, d_out)
    assert c_loss.item() == pytest.approx(d_loss.item(), abs=1e-7)
    assert carrying._metrics["train"]["carry_first_token/rows_seen"] == [8.0]


def test_pear_runs_through_the_trainer_with_a_multi_token_marker(model_dir, tmp_path):
    trainer = build(model_dir, tmp_path, [{"name": "pear"}])
    assert len(trainer._marker_ids) == len("</think>")  # the char tokenizer splits the marker
    generate(trainer, prompt_rows(2, 4))
    metrics = trainer._metrics["train"]
    assert metrics["pear/missing_marker"] == [1.0]  # a random model never writes </think>
    assert "rewards/pear/mean" in metrics and "pear/think_entropy" in metrics


@dataclass
class RecomputeAdvantages(Method):
    """Replaces TRL's advantages by ``batch.grpo_advantages`` of the same rewards: must change nothing."""

    name = "recompute_advantages"

    def advantage(self, advantages, batch):
        return batch.grpo_advantages(batch.total_rewards())


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_grpo_advantages_equal_trls(model_dir, tmp_path, scale_rewards):
    base = build(model_dir, tmp_path, [], scale_rewards=scale_rewards)
    again = build(model_dir, tmp_path, [path(RecomputeAdvantages)], scale_rewards=scale_rewards)
    rows = prompt_rows(2, 4)
    assert torch.allclose(generate(base, rows)["advantages"], generate(again, rows)["advantages"], atol=1e-6)


def test_aepo_injects_scored_extra_samples_through_the_trainer(model_dir, tmp_path):
    trainer = build(model_dir, tmp_path, [{"name": "aepo", "num_samples": 8, "prompt_fraction": 0.5,
                                          "injected_advantage": 3.0}], max_completion_length=4)
    out = generate(trainer, prompt_rows(4, 4))
    metrics = trainer._metrics["train"]
    injected = int(metrics["aepo/injected"][0])
    assert metrics["aepo/temperature"] == [1.2]  # the estimate starts at 0, below the target
    assert 1 <= injected <= 8  # partial_credit gives every group spread; only the first half gets extras
    marked = (out["advantages"] == 3.0).nonzero().flatten()
    assert len(marked) == injected and int(marked.max()) < 8
    assert trainer.pipeline.methods[0].state["estimate"] > 0  # updated from the rollout's log-probs


@pytest.mark.parametrize(("correction", "level"), [(True, "token"), (True, "sequence"), (False, "token")])
def test_ares_scales_trls_kl_term_per_difficulty(model_dir, tmp_path, correction, level):
    kwargs = dict(use_bias_correction_kl=correction, importance_sampling_level=level)
    base = build(model_dir, tmp_path, [], beta=0.08, **kwargs)
    ares = build(model_dir, tmp_path, [{"name": "ares", "kl_hwe_scale": 1.0}], beta=0.04, **kwargs)
    ares.pipeline.methods[0].state["beta"] = {"easy": 2.0, "medium": 2.0, "hard": 2.0}
    rows = prompt_rows(2, 4)
    b_out, a_out = generate(base, rows), generate(ares, rows)
    # first batch: bucket targets start at the bucket means, so the paper-mode reward is unchanged
    assert torch.allclose(a_out["advantages"], b_out["advantages"])
    assert "carry/ares/bucket" in a_out and "carry/ares/relax" in a_out
    # policy == reference at initialisation (KL and its gradient vanish): move the reference away
    b_out = off_policy(base, b_out)
    noise = 0.5 * torch.randn(b_out["ref_per_token_logps"].shape, generator=torch.Generator().manual_seed(2))
    b_out["ref_per_token_logps"] = b_out["ref_per_token_logps"] + noise
    a_out["ref_per_token_logps"] = b_out["ref_per_token_logps"].clone()
    a_out["old_per_token_logps"] = b_out["old_per_token_logps"].clone()
    b_loss, b_grads = loss_and_grads(base, b_out)
    a_loss, a_grads = loss_and_grads(ares, a_out)
    assert a_loss.item() == pytest.approx(b_loss.item(), rel=1e-5)  # beta 0.04 x 2 == beta 0.08
    for name, g in b_grads.items():
        assert torch.allclose(a_grads[name], g, atol=1e-6), name
    assert ares._metrics["train"]["ares/beta_easy"] == [2.0]
    assert ares.pipeline.methods[0].state["kl_calls"] == 1


@pytest.mark.parametrize("name", ["pear", "ares"])
def test_a_method_reading_a_missing_reward_function_fails_when_built(model_dir, tmp_path, name):
    with pytest.raises(MethodConfigError, match="reads reward function 'accuracy'.*correctness, partial_credit"):
        build(model_dir, tmp_path, [{"name": name, "correct_from": "accuracy", **({"kl": False} if name == "ares" else {})}])
