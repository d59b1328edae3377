"""Rollout statistics: generation-time entropy/log-probs equal the training pass on the same tokens."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from helpers.trainers import build, generate, prompt_rows

from rlvr_entropy.methods import Method
from rlvr_entropy.rollout_stats import (
    find_marker,
    pad_rows,
    step_entropy,
    step_entropy_and_logprobs,
    topk_entropy,
    topk_token_stats,
)
from rlvr_entropy.vllm_backend import TopKTap


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
    assert torch.equal(step_entropy(logits, 1.0), entropy)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_step_entropy_equals_the_log_softmax_definition(temperature):
    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(0)) * 4
    logp = torch.log_softmax(logits / temperature, dim=-1)
    expected = -(logp.exp() * logp).sum(-1)
    entropy, got_logp = step_entropy_and_logprobs(logits, temperature)
    assert torch.allclose(entropy, expected, atol=1e-5) and torch.allclose(got_logp, logp, atol=1e-5)
    assert torch.allclose(step_entropy(logits, temperature), expected, atol=1e-5)


def test_find_marker_multi_token_first_occurrence():
    ids = torch.tensor([[5, 1, 2, 3, 1, 2], [1, 2, 9, 9, 9, 9], [7, 7, 1, 2, 0, 0], [1, 3, 1, 2, 0, 0]])
    mask = torch.tensor([[1] * 6, [1] * 6, [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]])
    got = find_marker(ids, mask, [1, 2])
    assert got.tolist() == [1, 0, -1, 2]  # row 2's match runs into padding: not a match


def test_pad_rows():
    out = pad_rows([torch.tensor([1.0, 2.0]), torch.tensor([3.0]), torch.tensor([])], 3)
    assert out.tolist() == [[1, 2, 0], [3, 0, 0], [0, 0, 0]]


# --------------------------------------------------------------------------------------------------
# vLLM top-k log-probs (real vLLM: tests/test_vllm.py)


def test_topk_entropy_worked_example():
    # p = (1/2, 1/4, 1/8, 1/8); top-2 listed: head = 1/2 ln 2 + 1/4 ln 4, tail bucket 1/4 -> 1/4 ln 4.
    lp = torch.tensor([[0.5, 0.25, 0.125, 0.125]]).log()
    exact = float(-(lp.exp() * lp).sum())
    assert torch.allclose(topk_entropy(lp), torch.tensor([exact]), atol=1e-6)  # whole vocabulary: exact
    two = 0.5 * np.log(2) + 0.25 * np.log(4) + 0.25 * np.log(4)
    assert torch.allclose(topk_entropy(lp[:, :2]), torch.tensor([two], dtype=torch.float32), atol=1e-6)
    assert topk_entropy(lp[:, :2]).item() <= exact  # a lower bound


def test_topk_entropy_is_a_lower_bound_tight_as_k_grows():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50, generator=g) * 2
    lp = torch.log_softmax(logits, -1)
    exact = -(lp.exp() * lp).sum(-1)
    top = torch.sort(lp, dim=-1, descending=True).values
    previous = torch.zeros(64)
    for k in (1, 5, 20, 50):
        est = topk_entropy(top[:, :k])
        assert (est <= exact + 1e-5).all()
        assert (est >= previous - 1e-5).all()  # more listed tokens: never a looser bound
        previous = est
    assert torch.allclose(previous, exact, atol=1e-5)
    # Padding (-inf or NaN) counts as unlisted; a masked (-inf) token is just a zero-probability one.
    padded = torch.cat([top[:, :5], torch.full((64, 3), float("-inf")), torch.full((64, 2), float("nan"))], dim=1)
    assert torch.equal(topk_entropy(padded), topk_entropy(top[:, :5]))


def test_topk_token_stats_finds_sampled_token_wherever_it_is():
    # Row 0: the sampled token (3) second in the list, then a position whose sampled token (1) came back as None
    # (vLLM's NaN) outside the top-2; row 1: empty completion; row 2: one token listed first.
    completion_ids = [[3, 1], [], [2]]
    logprobs = [[[-0.1, -2.5], [-1.0, -3.0, None]], [], [[-0.7, -0.7]]]
    token_ids = [[[1, 3], [2, 5, 1]], [], [[2, 4]]]
    stats, sampled = topk_token_stats(completion_ids, logprobs, token_ids)
    assert sampled[0][0] == -2.5 and np.isnan(sampled[0][1]) and sampled[1] == [] and sampled[2] == [-0.7]
    assert [t.numel() for t in stats["entropy"]] == [2, 0, 1]
    expected = topk_entropy(torch.tensor([[-0.1, -2.5], [-1.0, -3.0], [-0.7, -0.7]], dtype=torch.float64))
    assert torch.allclose(torch.cat(stats["entropy"]), expected)
    assert stats["logps"][0].dtype == torch.float32
    with pytest.raises(ValueError, match="different number of tokens"):
        topk_token_stats([[3, 1]], [[[-0.1]]], [[[3]]])


def test_tap_hands_trl_the_sampled_logprob_and_keeps_stats_only_at_training_temperature():
    out = ([[7]], [[3, 1]], [[[-0.1, -2.5], [-1.0, -3.0]]], [[[1, 3], [1, 5]]])
    tap = TopKTap(lambda *a, **k: out, consistent=True)
    prompt_ids, completion_ids, logprobs, ids = tap([[7]], None, 1)
    assert (prompt_ids, completion_ids) == ([[7]], [[3, 1]])
    assert logprobs == [[[-2.5], [-1.0]]]  # what TRL's `lp[0]` reads: the sampled token's, not the top token's
    assert ids == [[[3], [1]]]
    assert set(tap.stats) == {"entropy", "logps"}
    hot = TopKTap(lambda *a, **k: out, consistent=False)  # sampled at another temperature
    assert hot([[7]], None, 1)[2] == [[[-2.5], [-1.0]]] and hot.stats == {}


def test_vllm_source_and_topk_are_validated(tmp_path):
    from rlvr_entropy.config import EntropyGRPOConfig

    with pytest.raises(ValueError, match="vllm_entropy_topk"):
        EntropyGRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, vllm_entropy_topk=0)
    with pytest.raises(ValueError, match="rollout_stats_source"):
        EntropyGRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, rollout_stats_source="vlm")


def test_vllm_source_needs_use_vllm(model_dir, tmp_path):
    with pytest.raises(ValueError, match="needs use_vllm"):
        build(model_dir, tmp_path, [], rollout_stats_source="vllm")


class FakeClient:
    def __init__(self, **model_config):
        self.model_config = model_config

    def get_server_info(self):
        return {"model_config": self.model_config}


def test_server_check_refuses_what_would_make_the_estimate_wrong():
    from types import SimpleNamespace

    from rlvr_entropy.vllm_backend import server_problem

    ok = SimpleNamespace(vllm_client=FakeClient(logprobs_mode="processed_logprobs", max_logprobs=-1))
    assert server_problem(ok, 20, 0.7) is None
    raw = SimpleNamespace(vllm_client=FakeClient(logprobs_mode="raw_logprobs", max_logprobs=-1))
    assert "processed_logprobs" in server_problem(raw, 20, 0.7)
    assert server_problem(raw, 20, 1.0) is None  # raw and processed agree at temperature 1 (no truncation)
    few = SimpleNamespace(vllm_client=FakeClient(logprobs_mode="processed_logprobs", max_logprobs=5))
    assert "--max-logprobs 20" in server_problem(few, 20, 1.0)
    assert "--max-logprobs -1" in server_problem(few, -1, 1.0)
    assert server_problem(SimpleNamespace(), 20, 0.7) is None  # processes other than the main one have no client
