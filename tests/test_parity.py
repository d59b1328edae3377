"""With no method listed, EntropyGRPOTrainer is TRL's GRPOTrainer: same batch, same loss and gradients.

Checked for every loss_type of TRL 1.16, off-policy (so PPO clipping and the importance ratios are
active) and with a KL term to a reference model.
"""

from __future__ import annotations

import pytest
import torch
from helpers.trainers import cpu_args, generate, loss_and_grads, partial_credit, prompt_rows
from transformers import AutoTokenizer, set_seed
from trl import GRPOConfig, GRPOTrainer

from rlvr_entropy import EntropyGRPOConfig, EntropyGRPOTrainer
from rlvr_entropy.losses import LOSS_TYPES
from rlvr_entropy.tasks import make_dataset
from rlvr_entropy.tasks.rewards import correctness


def make_pair(model_dir, tmp_path, **overrides):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dataset = make_dataset("arithmetic", 16, 0)
    kwargs = cpu_args(tmp_path, **overrides)
    trainers = []
    for trainer_cls, config_cls in ((GRPOTrainer, GRPOConfig), (EntropyGRPOTrainer, EntropyGRPOConfig)):
        set_seed(0)
        trainer = trainer_cls(
            model=str(model_dir),
            reward_funcs=[correctness, partial_credit],
            args=config_cls(**kwargs),
            train_dataset=dataset,
            processing_class=tokenizer,
        )
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps
        trainers.append(trainer)
    return trainers


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_no_methods_equals_trl(model_dir, tmp_path, loss_type):
    base, ours = make_pair(model_dir, tmp_path, loss_type=loss_type, beta=0.04, epsilon_high=0.28)
    rows = prompt_rows(2, 4)
    base_out, our_out = generate(base, rows), generate(ours, rows)
    assert torch.equal(base_out["completion_ids"], our_out["completion_ids"])
    assert torch.equal(base_out["advantages"], our_out["advantages"])
    assert set(our_out) - set(base_out) == {"group_ids"}  # nothing else travels without a method

    # Make the batch off-policy so clipping, ratios and the KL correction all matter.
    with torch.no_grad():
        ids = torch.cat([base_out["prompt_ids"], base_out["completion_ids"]], 1)
        attn = torch.cat([base_out["prompt_mask"], base_out["completion_mask"]], 1)
        logps, _, _ = base._get_per_token_logps_and_entropies(base.model, ids, attn, base_out["completion_ids"].size(1))
    gen = torch.Generator().manual_seed(0)
    base_out["old_per_token_logps"] = logps + 0.4 * torch.randn(logps.shape, generator=gen)
    our_out["old_per_token_logps"] = base_out["old_per_token_logps"].clone()

    base_loss, base_grads = loss_and_grads(base, base_out)
    our_loss, our_grads = loss_and_grads(ours, our_out)
    assert torch.isfinite(base_loss)
    assert abs(base_loss.item() - our_loss.item()) <= 1e-6
    assert base_grads.keys() == our_grads.keys() and base_grads
    for name, g in base_grads.items():
        assert torch.allclose(g, our_grads[name], atol=1e-6, rtol=0), name
    # and the logged TRL metrics agree too
    for key in ("entropy", "kl"):
        assert base._metrics["train"][key] == pytest.approx(ours._metrics["train"][key], abs=1e-6)
