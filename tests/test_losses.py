"""The extra-term aggregator reproduces TRL's loss_type normalisers (hand-computed values)."""

import pytest
import torch

from rlvr_entropy.losses import LOSS_TYPES, aggregate

L = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])  # (B=2, T=4)
M = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
KW = dict(num_items_in_batch=torch.tensor(16.0), num_processes=2, gradient_accumulation_steps=2, steps_per_generation=4, max_completion_length=8)

EXPECTED = {
    # mean over sequences of per-sequence token means, / accumulation: ((6/3 + 4/1) / 2) / 2
    "grpo": 1.5,
    "sapo": 1.5,
    # global token mean / accumulation: (10 / 4) / 2
    "bnpo": 1.25,
    # sum / (B * max_len) / accumulation: 10 / 16 / 2
    "dr_grpo": 0.3125,
    # sum / (items / processes * accumulation / steps_per_generation): 10 / (8 * 2 / 4)
    "dapo": 2.5,
    "cispo": 2.5,
    "vespo": 2.5,
    # mean of per-sequence sums / accumulation: (6 + 4) / 2 / 2
    "luspo": 2.5,
}


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_aggregate_matches_hand_computed(loss_type):
    got = aggregate(L, M, loss_type, training=True, **KW)
    assert got.item() == pytest.approx(EXPECTED[loss_type])


def test_padding_values_never_count():
    junk = L.clone()
    junk[M == 0] = 1e6
    for loss_type in LOSS_TYPES:
        assert aggregate(junk, M, loss_type, training=True, **KW).item() == pytest.approx(EXPECTED[loss_type])


def test_eval_has_no_accumulation_scaling():
    assert aggregate(L, M, "bnpo", training=False, **KW).item() == pytest.approx(2.5)
    assert aggregate(L, M, "dapo", training=False, **KW).item() == pytest.approx(10 / 8)


def test_unknown_loss_type():
    with pytest.raises(ValueError, match="unknown loss_type"):
        aggregate(L, M, "ppo", training=True, **KW)
