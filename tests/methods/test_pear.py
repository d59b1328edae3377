"""PEAR against docs/methods.md §6.6 (alpha 1, score 1, format score 0), both missing-marker variants."""

from __future__ import annotations

import pytest
import torch

from rlvr_entropy.config import build_method
from rlvr_entropy.methods import RolloutBatch
from rlvr_entropy.methods.pear import pear_rewards, phase_entropies

# marker token sits between the phases (its entropy 9.9 is junk that must not count); -1 = padding
ENTROPY = torch.tensor([
    [1.0, 0.8, 0.6, 9.9, 0.2, 0.4],   # y1: think, marker, answer
    [0.3, 0.2, 0.1, 9.9, 0.5, 0.3],   # y2
    [0.7, 0.7, 9.9, 0.7, 0.0, 0.0],   # y3 (wrong)
    [0.5, 0.3, 0.4, 0.2, 5.0, 5.0],   # y4: no marker, 4 tokens
])
MASK = torch.tensor([[1.0] * 6, [1.0] * 6, [1.0] * 4 + [0.0] * 2, [1.0] * 4 + [0.0] * 2])
PHASES = torch.tensor([3, 3, 2, -1])
CORRECT = torch.tensor([1.0, 1.0, 0.0, 1.0])


def batch(phases=PHASES, marker_length=1, extra=None):
    funcs = CORRECT.unsqueeze(1) if extra is None else torch.stack([CORRECT, extra], 1)
    names = ["correctness"] if extra is None else ["correctness", "format"]
    return RolloutBatch(
        rewards_per_func=funcs, reward_names=names, reward_weights=torch.ones(len(names)),
        group_ids=torch.zeros(4, dtype=torch.long), group_size=4, mask=MASK,
        completion_ids=torch.zeros(4, 6, dtype=torch.long), step=0, training=True,
        entropy=ENTROPY, phases=phases, marker_length=marker_length,
    )


def grpo(r):
    return (r - r.mean()) / (r.std() + 1e-6)  # the spec's verl-style advantages (unbiased std)


@pytest.mark.parametrize(("missing", "y4", "adv"), [
    ("all_tokens", 0.65, [-0.090344, 1.114240, -1.294927, 0.271031]),
    ("exclude_last", 0.6, [-0.060783, 1.154875, -1.276441, 0.182349]),
])
def test_worked_example(missing, y4, adv):
    method = build_method({"name": "pear", "missing_marker": missing})
    b = batch()
    rewards = method.reward(b.weighted_rewards(), b)
    assert rewards.tolist() == pytest.approx([0.5, 1.0, 0.0, y4], abs=1e-6)
    assert grpo(rewards).tolist() == pytest.approx(adv, abs=1e-5)
    assert b.metrics["missing_marker"] == pytest.approx(0.25)


def test_phase_means_and_alpha_zero():
    h_think, h_answer = phase_entropies(ENTROPY, MASK, PHASES, 1)
    assert h_think[:2].tolist() == pytest.approx([0.8, 0.2]) and h_answer[:2].tolist() == pytest.approx([0.3, 0.4])
    assert h_answer[3].item() == 0.0  # no marker: no answer phase
    r, _ = pear_rewards(CORRECT > 0.5, h_think, h_answer, alpha=0.0, score=1.0, format_score=0.0)
    assert r[:2].tolist() == pytest.approx([0.2, 0.8])


def test_multi_token_marker_tokens_belong_to_no_phase():
    # y1's marker as two tokens at positions 3-4: the answer phase is position 5 alone
    h_think, h_answer = phase_entropies(ENTROPY, MASK, PHASES, 2)
    assert h_think[0].item() == pytest.approx(0.8) and h_answer[0].item() == pytest.approx(0.4)


def test_other_rewards_are_kept_and_unscored_rows_untouched():
    fmt = torch.tensor([0.5, 0.5, 0.5, 0.5])
    b = batch(extra=fmt)
    b.rewards_per_func[2, 0] = float("nan")  # y3 not scored by correctness
    out = build_method({"name": "pear"}).reward(b.weighted_rewards(), b)
    assert out.tolist() == pytest.approx([1.0, 1.5, 0.5, 1.15], abs=1e-6)


def test_validation():
    with pytest.raises(Exception, match="capped at 1"):
        build_method({"name": "pear", "score": 2.0})
