"""STEER against docs/methods.md §3.6 (verified with the official compute_token_weights)."""

from __future__ import annotations

import pytest
import torch
from helpers.cov_example import loss_batch

from rlvr_entropy.config import build_method
from rlvr_entropy.methods import MethodConfigError
from rlvr_entropy.methods.steer import magnitude_bounds, steer_omega, steer_weights

A = torch.tensor([[1.0, 1.0, 1.0, 1.0], [-0.5, -0.5, -0.5, -0.5]])
P = torch.tensor([[0.95, 0.50, 0.10, 0.70], [0.90, 0.30, 0.60, 0.99]])
P_OLD = torch.tensor([[0.95, 0.50, 0.10, 0.70], [0.90, 0.30, 0.50, 0.99]])
H = torch.tensor([[0.20, 1.50, 2.00, 0.80], [0.30, 1.20, 1.00, 0.05]])
M = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
OMEGA = [[0.007435, 0.403426, -0.272327, 0.132998], [-0.009732, 0.001390, -0.117402]]
W_EXP = [[0.995896, 0.800000, 0.860166, 0.929077], [0.994632, 0.999231, 0.937126, 0.0]]
W_LIN = [[1.193986, 0.800000, 0.930436, 1.069060], [1.191701, 1.200000, 1.084576, 0.0]]


def omega():
    return steer_omega(P.log(), P_OLD.log(), A, H)


def test_omega_matches_worked_example():
    om = omega()
    assert om[0].tolist() == pytest.approx(OMEGA[0], abs=2e-6)
    assert om[1, :3].tolist() == pytest.approx(OMEGA[1], abs=2e-6)


def test_exp_and_linear_weights_match_worked_example():
    assert steer_weights(omega(), M, "exp", 0.8, 1.0).tolist() == [pytest.approx(r, abs=2e-6) for r in W_EXP]
    assert steer_weights(omega(), M, "linear", 0.8, 1.2).tolist() == [pytest.approx(r, abs=2e-6) for r in W_LIN]


def test_hook_weights_and_metrics():
    method = build_method({"name": "steer"})
    batch = loss_batch(logp=P.log(), old=P_OLD.log(), adv=A, rollout_entropy=H)
    batch.mask = M
    terms = method.token_loss(batch)
    assert terms.weight.tolist() == [pytest.approx(r, abs=2e-6) for r in W_EXP]
    assert batch.metrics["min_weight"][0].item() == pytest.approx(0.8)
    assert batch.metrics["frac_below_0.9"][0].item() == pytest.approx(2 / 7)


def test_padding_and_degenerate_inputs_stay_finite():
    junk_h = H.clone()
    junk_h[1, 3] = float("nan")
    w = steer_weights(steer_omega(P.log(), P_OLD.log(), A, junk_h), M, "exp", 0.8, 1.0)
    assert w.tolist() == [pytest.approx(r, abs=2e-6) for r in W_EXP]  # a NaN on padding changes nothing
    zero = steer_weights(torch.zeros(2, 4), M, "linear", 0.8, 1.2)  # all |Omega| equal
    assert torch.allclose(zero, torch.tensor([[1.0] * 4, [1.0, 1.0, 1.0, 0.0]]))
    tiny = steer_weights(torch.full((2, 4), 1e-4), M, "exp", 0.8, 1.0)  # floor 0.02: no spurious down-weighting
    assert (tiny[M > 0] > 0.99).all()
    assert steer_weights(torch.zeros(2, 4), torch.zeros(2, 4), "exp", 0.8, 1.0).sum() == 0


def test_clip_indicator_variant_gives_clipped_tokens_weight_one():
    method = build_method({"name": "steer", "use_clip_indicator": True})
    old = P.log().clone()
    old[0, 1] = torch.log(torch.tensor(0.2))  # ratio 2.5 with A > 0: PPO clips this token
    batch = loss_batch(logp=P.log(), old=old, adv=A, rollout_entropy=H)
    batch.mask = M
    assert batch.ppo_clipped()[0, 1]
    assert method.token_loss(batch).weight[0, 1].item() == pytest.approx(1.0)


def test_validation():
    with pytest.raises(MethodConfigError, match="weight_min"):
        build_method({"name": "steer", "weight_min": 0.0})
    with pytest.raises(MethodConfigError, match="weight_max"):
        build_method({"name": "steer", "mapping": "linear", "weight_min": 0.9, "weight_max": 0.8})


def test_global_normalizer_gives_each_process_the_weights_of_the_whole_micro_step():
    """Rows split over two processes: with normalizer_scope global each half gets the weights of the whole."""
    whole = steer_weights(omega(), M, "linear", 0.8, 1.2)
    halves = []
    for rows in ([0], [1]):
        other = [1 - rows[0]]
        peer = magnitude_bounds(omega()[other], M[other]) * torch.tensor([1.0, -1.0])

        def gather(t, peer=peer):  # (1, 2) -> (2, 2): this process's (max, -min), then the other's
            return torch.cat([t, peer.view(1, 2)])

        method = build_method({"name": "steer", "mapping": "linear", "weight_max": 1.2, "normalizer_scope": "global"})
        batch = loss_batch(logp=P.log()[rows], old=P_OLD.log()[rows], adv=A[rows], rollout_entropy=H[rows])
        batch.mask, batch.gather = M[rows], gather
        halves.append(method.token_loss(batch).weight)
    assert torch.allclose(torch.cat(halves), whole, atol=1e-6)
    local = steer_weights(omega()[[1]], M[[1]], "linear", 0.8, 1.2)
    assert not torch.allclose(local, whole[[1]], atol=1e-3)  # the per-process scope differs: the test can tell
