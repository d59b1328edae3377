"""ARES against docs/methods.md §8 (§8.7 worked example for the code mode, the paper-mode example) and its state."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rlvr_entropy.config import build_method
from rlvr_entropy.methods import MethodConfigError, RolloutBatch
from rlvr_entropy.methods.ares import (
    EASY,
    HARD,
    MEDIUM,
    code_entropy_score,
    difficulty,
    kl_controller_step,
    paper_lambda,
    paper_penalty,
    row_quantile,
    trigger_ends,
    window_means,
)

# docs/methods.md §8.7: (bucket, correct, N_HE, target 8) -> entropy_score with alpha_entropy = 0.5
CODE_EXAMPLE = [
    (EASY, True, 12, -0.281250), (EASY, True, 9, 0.0), (EASY, False, 12, 0.240655),
    (MEDIUM, True, 3, -0.150000), (MEDIUM, False, 14, 0.332807),
    (HARD, True, 12, 0.543647), (HARD, True, 4, -0.007941), (HARD, False, 14, 0.446377), (HARD, False, 6, 0.300000),
]


def test_code_entropy_score_matches_the_worked_example():
    bucket = torch.tensor([r[0] for r in CODE_EXAMPLE])
    correct = torch.tensor([r[1] for r in CODE_EXAMPLE])
    n_he = torch.tensor([float(r[2]) for r in CODE_EXAMPLE])
    score = code_entropy_score(n_he, torch.full((9,), 8.0), bucket, correct, torch.full((3,), 0.5))
    assert score.tolist() == pytest.approx([r[3] for r in CODE_EXAMPLE], abs=1e-6)
    overall = correct.float() + score  # accuracy + entropy score
    assert overall.tolist() == pytest.approx([0.71875, 1.0, 0.240655, 0.85, 0.332807, 1.543647, 0.992059, 0.446377, 0.3], abs=1e-6)


def test_paper_penalty_matches_the_example_and_spares_right_answers():
    n_he, target = torch.tensor([12.0, 12.0]), torch.tensor([8.0, 8.0, 8.0])
    bucket, lam = torch.tensor([EASY, EASY]), torch.tensor([0.25, 0.0, 0.0])
    change = paper_penalty(n_he, bucket, torch.tensor([False, True]), target, lam)
    assert (torch.tensor([0.0, 1.0]) + change).tolist() == [-1.0, 1.0]
    # g per bucket: easy max(0, D), medium |D|, hard max(0, -D)
    n_he = torch.tensor([4.0, 4.0, 4.0, 12.0])
    bucket = torch.tensor([EASY, MEDIUM, HARD, HARD])
    change = paper_penalty(n_he, bucket, torch.zeros(4, dtype=torch.bool), target, torch.ones(3))
    assert change.tolist() == [0.0, -4.0, -4.0, 0.0]


def test_paper_lambda_per_bucket():
    n_he = torch.tensor([10.0, 12.0, 3.0, 5.0])
    bucket = torch.tensor([EASY, EASY, HARD, HARD])
    lam = paper_lambda(n_he, bucket, torch.tensor([8.0, 8.0, 8.0]), eps=1.0)
    # easy: mean 11, var 1 -> (11 - 8) / 2; medium empty -> 0; hard: mean 4 < 8 -> 0
    assert lam.tolist() == pytest.approx([1.5, 0.0, 0.0])


def test_windows_quantiles_and_difficulty():
    entropy = torch.tensor([[1.0, 2.0, 3.0, 4.0, 9.0], [5.0, 6.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0, 0.0]])
    means, counts = window_means(entropy, mask, 2, 0)
    assert means[0].tolist() == [1.5, 2.5, 3.5, 4.0, 0.0] and counts[0].tolist() == [2, 2, 2, 1, 0]
    means, counts = window_means(entropy, mask, 2, 1)  # after the token; padding (9.0) never counts
    assert means[0].tolist() == [2.5, 3.5, 4.0, 0.0, 0.0] and means[1].tolist()[:2] == [6.0, 0.0]
    q = row_quantile(entropy, mask, 0.95)
    assert q.tolist() == pytest.approx([np.percentile([1, 2, 3, 4], 95), np.percentile([5, 6], 95)])
    assert math.isnan(row_quantile(entropy, torch.zeros_like(mask), 0.5)[0])
    correct = torch.tensor([1, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0]).bool()
    bucket, acc = difficulty(correct, torch.arange(12) // 3)
    assert bucket.tolist() == [EASY] * 3 + [EASY] * 3 + [HARD] * 3 + [HARD] * 3  # accuracies 1, 2/3, 0, 0
    bucket, _ = difficulty(torch.tensor([1, 0, 0, 1, 1, 0]).bool(), torch.arange(6) // 3)
    assert bucket.tolist() == [MEDIUM] * 3 + [EASY] * 3


def test_trigger_words_split_into_several_tokens_still_match():
    ids = torch.tensor([[5, 1, 2, 3, 7, 1, 2, 3], [1, 2, 3, 0, 0, 0, 0, 0]])
    mask = torch.tensor([[1.0] * 8, [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    hits = trigger_ends(ids, mask, [[1, 2, 3], [7]])
    assert hits[0].nonzero().flatten().tolist() == [3, 4, 7]
    assert not hits[1].any()  # the match runs into padding


def test_kl_controller_moves_toward_the_target_in_log_space():
    assert kl_controller_step(1.0, 0.02, 0.01, 0.02, 0.05) == pytest.approx(math.exp(0.05 * 0.2))  # error 1 clipped
    assert kl_controller_step(1.0, 0.005, 0.01, 0.02, 0.05) == pytest.approx(math.exp(-0.05 * 0.2))
    assert kl_controller_step(1.0, 0.0101, 0.01, 0.02, 0.05) == 1.0  # inside the dead zone
    assert kl_controller_step(99.99, 1.0, 0.01, 0.02, 0.05) == 100.0


def batch(correct, entropy, mask, ids=None, training=True, group_size=2):
    n = len(correct)
    return RolloutBatch(
        rewards_per_func=torch.tensor(correct, dtype=torch.float32).unsqueeze(1), reward_names=["correctness"],
        reward_weights=torch.ones(1), group_ids=torch.arange(n) // group_size, group_size=group_size, mask=mask,
        completion_ids=torch.zeros_like(mask, dtype=torch.long) if ids is None else ids, step=0, training=training,
        entropy=entropy, encode=lambda text: [ord(c) for c in text],
    )


def test_paper_mode_targets_start_at_the_batch_mean_then_lag():
    ares = build_method({"name": "ares", "window": 1, "kl": False, "target_ema": 0.5})
    entropy = torch.tensor([[0.0, 0.0, 0.0, 1.0]] * 2 + [[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    mask = torch.ones(4, 4)
    b = batch([1.0, 1.0, 0.0, 0.0], entropy, mask)  # group 0 easy, group 1 hard
    # tau = mean of per-row 95th percentiles = (0.85 + 0.85 + 1 + 0) / 4; windows of 1 above it: entropy 1
    with b.scope("ares"):
        out = ares.reward(torch.tensor([1.0, 1.0, 0.0, 0.0]), b)
    assert b.metrics["ares/threshold"] == pytest.approx(0.675) and b.metrics["ares/hwe"] == pytest.approx(1.5)
    assert out.tolist() == [1.0, 1.0, 0.0, 0.0]  # first batch: targets = bucket means, lambda = 0
    assert ares.state["targets"] == {"easy": 1.0, "medium": None, "hard": 2.0}
    # next batch: the hard bucket's wrong answers with fewer HWE windows than its target are penalised
    entropy2 = torch.tensor([[0.0, 0.0, 0.0, 1.0]] * 2 + [[1.0, 1.0, 1.0, 1.0]] * 2)
    b2 = batch([1.0, 1.0, 0.0, 0.0], entropy2, mask)
    out = ares.reward(torch.tensor([1.0, 1.0, 0.0, 0.0]), b2)
    # hard: counts [4, 4], mean 4 > target 2, var 0 -> lambda = 2 / 1 = 2; g_hard = max(0, 2 - 4) = 0
    assert out.tolist() == [1.0, 1.0, 0.0, 0.0]
    assert ares.state["targets"]["hard"] == pytest.approx(3.0)  # 0.5 * 2 + 0.5 * 4


def test_paper_mode_penalises_wrong_answers_of_an_easy_prompt_above_target():
    ares = build_method({"name": "ares", "window": 1, "kl": False})
    ares.state["targets"]["easy"] = 0.0
    entropy = torch.tensor([[0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 1.0]])
    b = batch([1.0, 1.0, 0.0], entropy, torch.ones(3, 4), group_size=3)  # accuracy 2/3: easy
    out = ares.reward(torch.tensor([1.0, 1.0, 0.0]), b)
    counts = torch.tensor([1.0, 1.0, 3.0])  # windows above tau = (0.85 + 0.85 + 1) / 3
    lam = (counts.mean() - 0.0) / (counts.var(unbiased=False) + 1.0)
    assert out.tolist() == pytest.approx([1.0, 1.0, -float(lam) * 3.0])


def test_code_mode_counts_trigger_words_after_the_first_batch():
    ares = build_method({"name": "ares", "mode": "code", "window": 2, "kl": False, "trigger_words": ["ab"]})
    ids = torch.tensor([[ord(c) for c in "xabxx"], [ord(c) for c in "abxab"]])
    entropy = torch.tensor([[0.1, 0.1, 0.1, 2.0, 2.0], [0.1, 0.1, 0.1, 0.1, 0.1]])
    mask = torch.ones(2, 5)
    b = batch([1.0, 1.0], entropy, mask, ids=ids)
    with b.scope("ares"):
        ares.reward(torch.ones(2), b)
    # first batch: every trigger followed by some tokens counts (row 1's last "ab" has no window after it)
    assert b.metrics["ares/hwe"] == pytest.approx(1.0)
    first = ares.state["threshold"]
    assert first == pytest.approx(1.05)  # median of the rows' 95th-percentile window means (2.0, 0.1)
    assert ares.state["alpha"]["easy"] == 0.5  # the bucket mean (1) equals its rounded target
    b2 = batch([1.0, 1.0], entropy, mask, ids=ids)
    with b2.scope("ares"):
        ares.reward(torch.ones(2), b2)
    assert b2.metrics["ares/threshold"] == pytest.approx(first)
    # only "ab" of row 0 is followed by a window (2.0, 2.0) above the threshold
    assert b2.metrics["ares/hwe"] == pytest.approx(0.5)


def test_parameters_are_checked():
    with pytest.raises(MethodConfigError, match="mode"):
        build_method({"name": "ares", "mode": "papr"})
    with pytest.raises(MethodConfigError, match="window"):
        build_method({"name": "ares", "window": 0})

    class Args:
        beta = 0.0

    with pytest.raises(MethodConfigError, match="beta"):
        build_method({"name": "ares"}).check(Args())
    build_method({"name": "ares", "kl": False}).check(Args())
