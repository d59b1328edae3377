"""Metric arithmetic (``rlvr_entropy.metrics``) on hand-built tensors: padding never counts, reductions over
processes are exact, and the JSONL log survives a resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rlvr_entropy.metrics import (
    entropy_gap,
    entropy_summary,
    logp_adv_covariance,
    masked_quantiles,
    reduce_across,
    truncate_metrics,
)

VALUES = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -7.0, 0.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])


def no_reduce(t: torch.Tensor) -> torch.Tensor:
    return t


def test_masked_quantiles_match_numpy_and_ignore_padding():
    expected = np.quantile([1, 2, 3, 4, 5], [0.1, 0.5, 0.9])
    assert masked_quantiles(VALUES, MASK, (0.1, 0.5, 0.9)) == pytest.approx(expected.tolist())
    assert all(np.isnan(masked_quantiles(VALUES, torch.zeros_like(MASK), (0.5,))))


def test_entropy_summary_keys_and_values():
    out = entropy_summary("rollout_entropy", VALUES, MASK)
    assert out["rollout_entropy/mean"] == pytest.approx(3.0)  # (1 + 2 + 3 + 4 + 5) / 5; 100 and -7 are padding
    assert out["rollout_entropy/p50"] == pytest.approx(3.0)
    assert out["rollout_entropy/p10"] == pytest.approx(1.4) and out["rollout_entropy/p90"] == pytest.approx(4.6)
    assert set(entropy_summary("entropy", VALUES, MASK, mean=False)) == {"entropy/p10", "entropy/p50", "entropy/p90"}


def test_covariance_of_logp_and_advantage_over_valid_tokens():
    logps = torch.tensor([[-1.0, -2.0, 9.0], [-3.0, 5.0, 5.0]])
    adv = torch.tensor([1.0, -1.0])  # per sample, broadcast over tokens
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    # valid (logp, A): (-1, 1), (-2, 1), (-3, -1): E[A logp] = (-1 - 2 + 3) / 3 = 0, E[A] = 1/3, E[logp] = -2
    out = logp_adv_covariance(logps, adv, mask, no_reduce)
    assert out["covariance/logp_adv"] == pytest.approx(0.0 - (1 / 3) * (-2.0))
    # rows split over two "processes": the all-reduced sums give the covariance of the whole
    parts: list[torch.Tensor] = []
    for i in range(2):
        logp_adv_covariance(logps[i : i + 1], adv[i : i + 1], mask[i : i + 1], lambda t: parts.append(t) or t)
    total = parts[0] + parts[1]
    assert logp_adv_covariance(logps[:1], adv[:1], mask[:1], lambda t: total)["covariance/logp_adv"] == pytest.approx(2 / 3)
    assert logp_adv_covariance(logps, adv, torch.zeros_like(mask), no_reduce) == {}


def test_entropy_gap_is_signed_train_minus_rollout():
    train = torch.tensor([[1.0, 1.0, 7.0]])
    rollout = torch.tensor([[0.5, 1.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    out = entropy_gap(rollout, train, mask, no_reduce)
    assert out == pytest.approx({"rollout_entropy/gap": 0.5, "rollout_entropy/gap_signed": 0.0})
    assert entropy_gap(rollout, train, torch.zeros_like(mask), no_reduce) == {}


def test_reduce_across_processes_by_kind():
    local = {"m/a": (torch.tensor(1.0), "mean"), "m/b": (torch.tensor(2.0), "sum"),
             "m/c": (torch.tensor(3.0), "max"), "m/d": (torch.tensor(4.0), "min")}
    # another process's values, one gather per kind in this order; a mean travels as (value * count, count)
    peers = iter([[3.0, 1.0], [5.0], [-1.0], [0.5]])

    def gather(t: torch.Tensor) -> torch.Tensor:  # (1, n) -> (2, n)
        return torch.cat([t, torch.tensor([next(peers)])])

    assert reduce_across(local, gather) == {"m/a": 2.0, "m/b": 7.0, "m/c": 3.0, "m/d": 0.5}
    assert reduce_across(local, lambda t: t) == {"m/a": 1.0, "m/b": 2.0, "m/c": 3.0, "m/d": 4.0}


def test_a_statistic_logged_on_one_process_only_is_reduced_over_those_that_have_it():
    """Every process makes the same gathers even when one has nothing to report (else the collectives hang)."""
    first = {"m/cov": (torch.tensor(2.0), "mean"), "m/n": (torch.tensor(3.0), "sum")}
    second = {"m/n": (torch.tensor(4.0), "sum")}  # this process's micro-batch had no covariance to report

    def as_seen_by(mine, peer):
        calls = []

        def gather(t: torch.Tensor) -> torch.Tensor:  # (1, n) -> (2, n): this process's row, then the peer's
            keys = [["m/cov"], ["m/n"]][len(calls)]
            calls.append(keys)
            if keys == ["m/cov"]:  # a mean: (value * count, count), count 0 where the peer has no value
                row = [float(peer["m/cov"][0]), 1.0] if "m/cov" in peer else [0.0, 0.0]
            else:
                row = [float(peer[k][0]) if k in peer else float("nan") for k in keys]
            return torch.cat([t, torch.tensor([row])])

        kinds = {k: r for k, (_, r) in peer.items()}
        return reduce_across(mine, gather, gather_objects=lambda objs: [*objs, kinds]), calls

    out1, calls1 = as_seen_by(first, second)
    out2, calls2 = as_seen_by(second, first)
    assert out1 == out2 == {"m/cov": 2.0, "m/n": 7.0}
    assert calls1 == calls2 == [["m/cov"], ["m/n"]]  # the same collectives on both processes


def test_truncate_metrics_drops_lines_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": s / 10}) for s in (1, 2, 3, 4)]
    path.write_text("\n".join(lines) + "\n" + '{"step": 5, "lo')  # the last line cut by a crash
    assert truncate_metrics(str(path), 2) == 3
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]
    assert truncate_metrics(str(tmp_path / "missing.jsonl"), 2) == 0


def test_a_mean_with_counts_is_the_mean_over_every_item_of_every_process():
    here = {"m/w": (torch.tensor(1.0), "mean", torch.tensor(3.0))}  # mean 1.0 over 3 tokens here
    peer = torch.tensor([[2.0 * 1.0, 1.0]])  # the other process: mean 2.0 over 1 token, as (value * count, count)

    def gather(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, peer])

    assert reduce_across(here, gather) == {"m/w": pytest.approx((3 * 1.0 + 1 * 2.0) / 4)}
    unweighted = {"m/w": (torch.tensor(1.0), "mean")}  # no count: each process counts once
    assert reduce_across(unweighted, lambda t: torch.cat([t, torch.tensor([[2.0, 1.0]])])) == {"m/w": 1.5}


def test_a_new_run_in_an_old_runs_directory_starts_its_own_log(tmp_path, caplog):
    """Appending would draw two runs as one curve; the old log is kept, renamed, and a resume still truncates."""
    from types import SimpleNamespace

    from rlvr_entropy.metrics import MetricsJsonlCallback

    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "loss": 9.0}) + "\n")
    (tmp_path / "metrics.1.jsonl").write_text("older\n")
    callback = MetricsJsonlCallback(str(path))
    with caplog.at_level("WARNING"):
        callback.on_train_begin(None, SimpleNamespace(is_world_process_zero=True, global_step=0), None)
    assert not path.exists() and json.loads((tmp_path / "metrics.2.jsonl").read_text())["loss"] == 9.0
    assert "kept as" in caplog.text and (tmp_path / "metrics.1.jsonl").read_text() == "older\n"
    callback.on_log(None, SimpleNamespace(is_world_process_zero=True, global_step=1), None, logs={"loss": 1.0})
    assert [json.loads(x)["loss"] for x in path.read_text().splitlines()] == [1.0]
    # a resume keeps the log up to its checkpoint
    callback.on_log(None, SimpleNamespace(is_world_process_zero=True, global_step=2), None, logs={"loss": 2.0})
    callback.on_train_begin(None, SimpleNamespace(is_world_process_zero=True, global_step=1), None)
    assert [json.loads(x)["loss"] for x in path.read_text().splitlines()] == [1.0]
    # another process never touches the file
    MetricsJsonlCallback(str(path)).on_train_begin(None, SimpleNamespace(is_world_process_zero=False, global_step=0), None)
    assert path.exists()


# ------------------------------------------------------------------ entropy by difficulty (methods-2.md §9.3)


def test_difficulty_buckets_have_exact_edges():
    from rlvr_entropy.metrics import difficulty_buckets

    # G = 6: p = 0, 1/6, 2/6 (medium: 1/3 is the edge), 3/6, 4/6 (easy: 2/3 is the edge), 5/6, 1
    rewards = torch.tensor([[1.0] * k + [0.0] * (6 - k) for k in range(7)]).flatten()
    assert difficulty_buckets(rewards, 6, 0.5).tolist() == [0, 1, 2, 2, 3, 3, 4]
    nan = torch.tensor([float("nan"), 1.0, 1.0, 1.0])  # an unscored response counts as wrong
    assert difficulty_buckets(nan, 4, 0.5).tolist() == [3]


def test_entropy_by_difficulty_reproduces_the_worked_example():
    from rlvr_entropy.metrics import entropy_by_difficulty

    rewards = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.float32).flatten()
    h = torch.tensor([[.42, .40, .45, .43], [.30, .28, .35, .50], [.38, .55, .60, .52], [.70, .65, .80, .75]]).flatten()
    lengths = torch.tensor([[100, 120, 80, 100], [200, 180, 220, 400], [300, 500, 450, 350], [600, 700, 800, 650]])
    mask = (torch.arange(800).unsqueeze(0) < lengths.flatten().unsqueeze(1)).float()  # (16, 800)
    # padding holds junk that must not count
    entropy = torch.where(mask > 0, h.unsqueeze(1).expand(-1, 800), torch.full((16, 800), 9.0))
    out = entropy_by_difficulty(rewards, 4, mask, entropy, threshold=0.5)
    expected = {"solved": (0.425, 100.0), "easy": (0.3575, 250.0), "hard": (0.5125, 400.0), "unsolved": (0.725, 687.5)}
    for bucket, (mean_entropy, length) in expected.items():
        assert out[f"entropy_by_difficulty/{bucket}/prompts"] == 1.0
        assert out[f"entropy_by_difficulty/{bucket}/entropy"] == pytest.approx(mean_entropy, abs=1e-6)
        assert out[f"entropy_by_difficulty/{bucket}/length"] == pytest.approx(length)
    assert out["entropy_by_difficulty/medium/prompts"] == 0.0
    assert "entropy_by_difficulty/medium/entropy" not in out  # an empty bucket logs no NaN
    no_entropy = entropy_by_difficulty(rewards, 4, mask, None, threshold=0.5)
    assert "entropy_by_difficulty/easy/length" in no_entropy and "entropy_by_difficulty/easy/entropy" not in no_entropy
