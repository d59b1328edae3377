"""Rollout statistics: generation-time entropy/log-probs equal the training pass on the same tokens."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from test_parity import generate
from test_trainer_hooks import build
from trainer_utils import prompt_rows

from rlvr_entropy.methods import Method
from rlvr_entropy.rollout_stats import find_marker, masked_quantiles, pad_rows, step_entropy_and_logprobs


@dataclass
class NeedsTokens(Method):
    """Declares token statistics so they travel into the loss inputs."""

    name = "needs_tokens"
    needs = frozenset({"entropy", "logps"})

    def advantage(self, advantages, batch):
        return advantages


def training_pass(trainer, out):
    with torch.no_grad():
        ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
        attn = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
        return trainer._get_per_token_logps_and_entropies(
            trainer.model, ids, attn, out["completion_ids"].size(1), compute_entropy=True
        )[:2]


@pytest.mark.parametrize("source", ["generate", "forward"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rollout_stats_match_training_pass(model_dir, tmp_path, source, temperature):
    trainer = build(
        model_dir, tmp_path, [{"name": "test_rollout_stats.NeedsTokens"}],
        rollout_stats_source=source, temperature=temperature,
    )
    out = generate(trainer, prompt_rows(2, 4))
    logps, entropy = training_pass(trainer, out)
    mask = out["completion_mask"].bool()
    assert out["rollout_entropy"].shape == out["completion_ids"].shape
    assert torch.allclose(out["rollout_entropy"][mask], entropy[mask].float(), atol=1e-4)
    assert torch.allclose(out["rollout_logps"][mask], logps[mask].float(), atol=1e-4)
    assert (out["rollout_entropy"][~mask] == 0).all()  # padding holds zeros
    metrics = trainer._metrics["train"]
    mean = (entropy * mask).sum() / mask.sum()
    assert metrics["rollout_entropy/mean"][0] == pytest.approx(mean.item(), abs=1e-4)
    assert metrics["rollout_entropy/p10"][0] <= metrics["rollout_entropy/p50"][0] <= metrics["rollout_entropy/p90"][0]


def test_logging_only_costs_no_forward_and_adds_no_keys(model_dir, tmp_path):
    trainer = build(model_dir, tmp_path, [])
    calls = []
    original = trainer._forward_stats
    trainer._forward_stats = lambda gen: calls.append(1) or original(gen)
    out = generate(trainer, prompt_rows(2, 4))
    assert calls == []
    assert "rollout_entropy/mean" in trainer._metrics["train"]
    assert "rollout_entropy" not in out


def test_forward_source_logs_nothing_unless_free_or_needed(model_dir, tmp_path):
    trainer = build(model_dir, tmp_path, [], rollout_stats_source="forward")
    generate(trainer, prompt_rows(2, 4))
    assert "rollout_entropy/mean" not in trainer._metrics["train"]  # no extra pass just to log


def test_forward_source_reuses_trl_old_logp_pass(model_dir, tmp_path):
    # steps_per_generation > gradient accumulation makes TRL compute old log-probs: reuse that pass.
    trainer = build(
        model_dir, tmp_path, [{"name": "test_rollout_stats.NeedsTokens"}],
        rollout_stats_source="forward", steps_per_generation=2, per_device_train_batch_size=4,
    )
    calls = []
    original = trainer._forward_stats
    trainer._forward_stats = lambda gen: calls.append(bool(gen.forward_stats)) or original(gen)
    out = generate(trainer, prompt_rows(2, 4))
    assert calls == [True]  # stats were already captured from TRL's own pass
    mask = out["completion_mask"].bool()
    assert torch.allclose(out["rollout_logps"][mask], out["old_per_token_logps"][mask], atol=1e-6)


def test_step_entropy_handles_masked_logits():
    logits = torch.tensor([[0.0, 0.0, float("-inf")], [1.0, 1.0, 1.0]])
    entropy, logp = step_entropy_and_logprobs(logits, 1.0)
    assert torch.allclose(entropy, torch.tensor([np.log(2), np.log(3)], dtype=torch.float32))
    assert torch.isfinite(entropy).all() and logp.shape == (2, 3)


def test_masked_quantiles_match_numpy_and_ignore_padding():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -7.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    expected = np.quantile([1, 2, 3, 4, 5], [0.1, 0.5, 0.9])
    assert masked_quantiles(values, mask, (0.1, 0.5, 0.9)) == pytest.approx(expected.tolist())
    assert all(np.isnan(masked_quantiles(values, torch.zeros_like(mask), (0.5,))))


def test_find_marker_multi_token_first_occurrence():
    ids = torch.tensor([[5, 1, 2, 3, 1, 2], [1, 2, 9, 9, 9, 9], [7, 7, 1, 2, 0, 0], [1, 3, 1, 2, 0, 0]])
    mask = torch.tensor([[1] * 6, [1] * 6, [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]])
    got = find_marker(ids, mask, [1, 2])
    assert got.tolist() == [1, 0, -1, 2]  # row 2's match runs into padding: not a match


def test_pad_rows():
    out = pad_rows([torch.tensor([1.0, 2.0]), torch.tensor([3.0]), torch.tensor([])], 3)
    assert out.tolist() == [[1, 2, 0], [3, 0, 0], [0, 0, 0]]
