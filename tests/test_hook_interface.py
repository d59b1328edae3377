"""The second-wave hook interface reaches TRL's loss as documented: scalar terms with their own denominators
(``LossBatch.global_mean``), training-pass entropy with its gradient, per-token clip ranges, a chunked logit
statistic computed inside the training forward, reference log-probs on request and TRL settings driven per step.

Toy methods are referenced by import path, as out-of-tree methods are.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from helpers.trainers import build, generate, loss_and_grads, off_policy, prompt_rows

from rlvr_entropy.methods import Method, MethodConfigError, Pipeline, TokenTerms
from rlvr_entropy.tensor_ops import LOGIT_CHUNK


@dataclass
class EntropyScalar(Method):
    """-coef * mean entropy as a scalar term: TRL's own static entropy bonus, written as a method."""

    name = "entropy_scalar"
    coef: float = 0.3

    def token_loss(self, batch):
        return TokenTerms(scalar=-self.coef * batch.global_mean(batch.entropy))


@dataclass
class LogitEntropyScalar(Method):
    """The same bonus from the entropy recomputed from the logits by a logit_stat hook."""

    name = "logit_entropy_scalar"
    coef: float = 0.3

    def logit_stat(self, logits):
        logp = torch.log_softmax(logits, dim=-1)
        return -(logp.exp() * logp).sum(-1)

    def token_loss(self, batch):
        batch.log("max_gap", (batch.logit_stat() - batch.entropy.detach()).abs().mul(batch.mask).max(), reduce="max")
        return TokenTerms(scalar=-self.coef * batch.global_mean(batch.logit_stat()))


@dataclass
class WideClip(Method):
    name = "wide_clip"
    eps: float = 0.5

    def token_loss(self, batch):
        return TokenTerms(eps_low=torch.full_like(batch.mask, self.eps), eps_high=torch.full_like(batch.mask, self.eps))


@dataclass
class NeedsReference(Method):
    name = "needs_reference"
    loss_needs = frozenset({"ref_logps"})

    def token_loss(self, batch):
        assert batch.ref_logps is not None
        batch.log("ref_gap", ((batch.ref_logps - batch.logps.detach()).abs() * batch.mask).sum(), reduce="sum")
        return None


@dataclass
class DrivesCoef(Method):
    name = "drives_coef"
    coef: float = 0.25

    def trl_settings(self, step):
        return {"entropy_coef": self.coef * (step + 1)}


def path(cls, **params):
    return {"name": f"test_hook_interface.{cls.__name__}", **params}


def assert_same(a, b):
    (la, ga), (lb, gb) = a, b
    assert la.item() == pytest.approx(lb.item(), rel=1e-5, abs=1e-7)
    assert ga.keys() == gb.keys()
    for name, g in ga.items():
        assert torch.allclose(g, gb[name], rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo"])
def test_a_scalar_entropy_term_equals_trls_entropy_bonus(model_dir, tmp_path, loss_type):
    """The training-pass entropy carries its gradient, and a scalar term is added as TRL adds its bonus."""
    trl = build(model_dir, tmp_path, [], loss_type=loss_type, entropy_coef=0.3)
    ours = build(model_dir, tmp_path, [path(EntropyScalar)], loss_type=loss_type)
    plain = build(model_dir, tmp_path, [], loss_type=loss_type)
    out = off_policy(trl, generate(trl, prompt_rows(2, 4)))
    expected = loss_and_grads(trl, dict(out))
    assert_same(loss_and_grads(ours, dict(out)), expected)
    base_loss, _ = loss_and_grads(plain, dict(out))
    assert abs(base_loss.item() - expected[0].item()) > 1e-4  # the term is not negligible here


def test_a_logit_statistic_is_computed_in_the_training_forward_with_its_gradient(model_dir, tmp_path, monkeypatch):
    """Recomputing the entropy from the logits, in chunks smaller than the batch, gives TRL's entropy and its gradient."""
    monkeypatch.setattr("rlvr_entropy.tensor_ops.LOGIT_CHUNK", 5)
    assert LOGIT_CHUNK >= 256  # the default keeps few chunks
    fused = build(model_dir, tmp_path, [path(EntropyScalar)])
    logit = build(model_dir, tmp_path, [path(LogitEntropyScalar)])
    out = off_policy(fused, generate(fused, prompt_rows(2, 4)))
    assert_same(loss_and_grads(logit, dict(out)), loss_and_grads(fused, dict(out)))
    assert logit._metrics["train"]["logit_entropy_scalar/max_gap"][0] < 1e-5


def test_a_per_token_clip_range_acts_inside_trls_loss_and_is_restored(model_dir, tmp_path):
    wide = build(model_dir, tmp_path, [path(WideClip, eps=0.5)], epsilon=0.2)
    trl = build(model_dir, tmp_path, [], epsilon=0.5)
    narrow = build(model_dir, tmp_path, [], epsilon=0.2)
    out = off_policy(trl, generate(trl, prompt_rows(2, 4)), noise=0.6)
    expected = loss_and_grads(trl, dict(out))
    assert_same(loss_and_grads(wide, dict(out)), expected)
    assert wide.epsilon_low == 0.2 and wide.epsilon_high == 0.2  # TRL's scalars again after the call
    assert wide._metrics["train"]["clip_ratio/region_mean"] == trl._metrics["train"]["clip_ratio/region_mean"]
    assert loss_and_grads(narrow, dict(out))[0].item() != pytest.approx(expected[0].item(), abs=1e-6)


def test_a_per_token_clip_range_is_refused_where_trl_does_not_clip_per_token(model_dir, tmp_path):
    trainer = build(model_dir, tmp_path, [path(WideClip)], loss_type="cispo")
    out = off_policy(trainer, generate(trainer, prompt_rows(2, 4)))
    with pytest.raises(ValueError, match="per-token clip range"):
        loss_and_grads(trainer, dict(out))
    assert trainer.epsilon_low == trainer.args.epsilon  # restored even when the loss fails


def test_reference_logps_are_computed_on_request_without_a_kl_in_the_loss(model_dir, tmp_path):
    asks = build(model_dir, tmp_path, [path(NeedsReference)], beta=0.0)
    plain = build(model_dir, tmp_path, [], beta=0.0)
    assert asks.beta == 0.0 and asks.args.beta == 0.0 and asks.ref_model is not None
    out = generate(asks, prompt_rows(2, 4))
    assert "ref_per_token_logps" in out
    assert_same(loss_and_grads(asks, dict(out)), loss_and_grads(plain, dict(out)))
    assert asks._metrics["train"]["needs_reference/ref_gap"][0] < 1e-4  # the reference is the initial policy
    assert "kl" not in asks._metrics["train"]


def test_methods_drive_trls_settings_before_each_optimizer_step(model_dir, tmp_path):
    trainer = build(model_dir, tmp_path, [path(DrivesCoef)], entropy_coef=1.0)
    assert trainer.pipeline.trl_settings(3) == {"entropy_coef": 1.0}
    trainer._apply_trl_settings(trainer.pipeline.trl_settings(1))
    assert trainer.entropy_coef == 0.5
    twice = Pipeline([DrivesCoef(), type("Other", (DrivesCoef,), {"name": "other"})()])
    with pytest.raises(MethodConfigError, match="both drive TRL's entropy_coef"):
        twice.trl_settings(0)


def test_global_means_over_tokens_subsets_and_rows():
    from helpers.cov_example import loss_batch

    batch = loss_batch()
    values = torch.arange(batch.mask.numel(), dtype=torch.float32).view_as(batch.mask).requires_grad_()
    subset = values.detach() > 10
    mean = batch.global_mean(values, subset)
    m = batch.mask * subset
    assert mean.item() == pytest.approx(float((values.detach() * m).sum() / m.sum()))
    mean.backward()
    assert torch.allclose(values.grad, m / m.sum())
    rows = torch.tensor([1.0, 2.0, 3.0, 6.0, 8.0])[: batch.mask.size(0)].requires_grad_()
    row_mean = batch.global_mean(rows)
    assert row_mean.item() == pytest.approx(float(rows.detach().mean()))
    row_mean.backward()
    assert torch.allclose(rows.grad, torch.full_like(rows, 1 / rows.numel()))


def test_reference_logps_at_beta_zero_are_refused_for_a_peft_model(model_dir, tmp_path):
    """TRL builds no separate reference model for a PEFT policy: the trainer says so instead of failing later."""
    from helpers.trainers import cpu_args
    from peft import LoraConfig
    from transformers import AutoTokenizer

    from rlvr_entropy import EntropyGRPOConfig, EntropyGRPOTrainer
    from rlvr_entropy.tasks import make_dataset
    from rlvr_entropy.tasks.rewards import correctness

    with pytest.raises(ValueError, match="needs_reference needs reference log-probs.*PEFT.*beta"):
        EntropyGRPOTrainer(
            model=str(model_dir), reward_funcs=[correctness],
            args=EntropyGRPOConfig(**cpu_args(tmp_path, methods=[path(NeedsReference)], beta=0.0)),
            train_dataset=make_dataset("arithmetic", 16, 0), processing_class=AutoTokenizer.from_pretrained(model_dir),
            peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        )
