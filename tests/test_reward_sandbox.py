"""The reward sandbox: a hung or raising reward call costs its own sample, never the run.

Reward functions are module-level so that the process sandbox can import them in its worker
(``test_reward_sandbox.hang_on_minus`` as a recipe's import path).
"""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

import pytest

from rlvr_entropy.config import RecipeError, load_recipe
from rlvr_entropy.reward_contract import CheckedReward, RewardContractError, RewardStats, check_output, required_columns
from rlvr_entropy.sandbox import SandboxedReward, sandboxed
from rlvr_entropy.tasks.rewards import correctness

RECIPE = Path(__file__).parent.parent / "recipes" / "tiny" / "grpo.yaml"
FOREVER = 3600.0  # seconds: longer than any test, so only the sandbox can end these calls


def hang_or_raise(prompts, completions, **kwargs):
    """1.0 per completion; hangs on a completion "hang", raises on "boom"."""
    for c in completions:
        if c == "hang":
            time.sleep(FOREVER)
        if c == "boom":
            raise KeyError("no reference for 'boom'")
    return [1.0] * len(completions)


def hang_on_minus(prompts, completions, **kwargs):
    """Hangs on subtraction prompts, 0.5 elsewhere."""
    if any("-" in p for p in prompts):
        time.sleep(FOREVER)
    return [0.5] * len(prompts)


def raise_on_plus(prompts, completions, **kwargs):
    """Raises on addition prompts, 0.25 elsewhere."""
    if any("+" in p for p in prompts):
        raise ValueError("cannot score an addition")
    return [0.25] * len(prompts)


def hold_the_gil(prompts, completions, **kwargs):
    """A C-level big-integer power: holds the GIL for seconds, so no thread can interrupt it."""
    pow(3, 10**8)
    return [1.0] * len(prompts)


def wrong_length(prompts, completions, **kwargs):
    return [1.0]


def not_finite(prompts, completions, **kwargs):
    return [math.inf if c == "inf" else 1.0 for c in completions]


def logs_and_scores(prompts, completions, log_metric=None, log_extra=None, **kwargs):
    log_metric("length", float(sum(len(c) for c in completions)))
    log_extra("upper", [c.upper() for c in completions])
    if "boom" in completions:
        raise RuntimeError("boom")
    return [1.0] * len(completions)


def call_from_thread(reward: SandboxedReward, **kwargs):
    """Call ``reward`` off the main thread (where signal-based timeouts cannot work)."""
    box = {}
    thread = threading.Thread(target=lambda: box.update(out=reward(**kwargs)))
    start = time.monotonic()
    thread.start()
    thread.join()
    return box["out"], time.monotonic() - start


@pytest.mark.parametrize("mode", ["process", "thread"])
def test_a_hung_and_a_raising_sample_lose_only_their_reward(mode):
    stats = RewardStats()
    reward = SandboxedReward(hang_or_raise, timeout=1.0, mode=mode, stats=stats)
    completions = ["fine", "hang", "boom", "also fine"]
    try:
        assert reward(prompts=["p"], completions=["fine"]) == [1.0]  # the worker is up (a fork server may start)
        out, elapsed = call_from_thread(reward, prompts=["p"] * 4, completions=completions, answer=["1"] * 4)
    finally:
        reward.close()
    assert reward.mode == mode
    assert out == [1.0, None, None, 1.0]
    assert (stats.errors, stats.timeouts) == (1, 1)
    assert elapsed < 10  # one timed-out batch call, one timed-out sample call, the rest is fast


def test_process_sandbox_stops_a_call_that_holds_the_gil():
    """What a thread cannot do: C code holding the GIL is stopped by killing the worker process."""
    stats = RewardStats()
    reward = SandboxedReward(hold_the_gil, timeout=0.5, mode="process", stats=stats)
    reward._workers[0]._start()  # start-up (a fork server may start) does not count against the deadline
    start = time.monotonic()
    try:
        assert reward(prompts=["p"], completions=["c"]) == [None]
        elapsed = time.monotonic() - start
    finally:
        reward.close()
    assert elapsed < 5
    assert stats.timeouts == 1
    # the next call gets a fresh worker
    ok = SandboxedReward(hang_or_raise, timeout=5.0, mode="process")
    try:
        assert ok(prompts=["p"], completions=["fine"]) == [1.0]
    finally:
        ok.close()


def test_contract_violations_are_raised_not_skipped():
    reward = SandboxedReward(wrong_length, timeout=5.0, mode="thread")
    with pytest.raises(RewardContractError, match="returned 1 values for 3 completions"):
        reward(prompts=["a", "b", "c"], completions=["a", "b", "c"])
    assert issubclass(RewardContractError, RecipeError)  # the CLI reports it without a traceback


def test_non_finite_values_count_as_errors():
    stats = RewardStats()
    reward = SandboxedReward(not_finite, timeout=5.0, mode="thread", stats=stats)
    assert reward(prompts=["p", "q"], completions=["inf", "x"]) == [None, 1.0]
    assert stats.errors == 1


@pytest.mark.parametrize("mode", ["none", "thread", "process"])
def test_one_contract_for_every_mode(mode):
    """The direct call (``reward_sandbox: none`` or no timeout) checks what the sandbox checks."""
    stats = RewardStats()
    wrapped = sandboxed(wrong_length, 5.0, mode, stats)
    try:
        with pytest.raises(RewardContractError, match="reward function 'wrong_length' returned 1 values for 3"):
            wrapped(prompts=["a", "b", "c"], completions=["a", "b", "c"])
    finally:
        getattr(wrapped, "close", lambda: None)()
    direct = sandboxed(not_finite, None, mode, stats)
    assert isinstance(direct, CheckedReward) and direct.__name__ == "not_finite"
    assert direct(prompts=["p", "q"], completions=["inf", "x"]) == [None, 1.0]
    assert stats.errors == 1
    with pytest.raises(RewardContractError, match="non-numeric values such as 'x'"):
        check_output([1.0, "x"], 2, "f")


def test_required_columns_from_the_attribute_or_the_signature():
    def reads_answer(prompts, completions, answer, completion_ids=None, **kwargs):
        return [0.0] * len(prompts)

    assert required_columns(reads_answer) == {"answer"}  # TRL's own keyword arguments are not columns
    assert required_columns(correctness) == {"answer"}
    assert required_columns(CheckedReward(correctness)) == {"answer"}  # the wrapper keeps the attribute


def test_functions_that_cannot_be_pickled_run_in_a_thread(caplog):
    def closure(prompts, completions, **kwargs):
        return [2.0] * len(prompts)

    reward = SandboxedReward(closure, timeout=5.0, mode="process")
    assert reward.mode == "thread" and "worker thread" in caplog.text
    assert reward(prompts=["p"], completions=["c"]) == [2.0]


@pytest.mark.parametrize("mode", ["process", "thread"])
def test_log_callbacks_are_replayed_in_the_trainer(mode):
    metrics, extra = [], {}
    reward = SandboxedReward(logs_and_scores, timeout=5.0, mode=mode)
    kwargs = dict(log_metric=lambda k, v: metrics.append((k, v)), log_extra=lambda k, v: extra.update({k: v}))
    try:
        assert reward(prompts=["p", "q"], completions=["ab", "c"], **kwargs) == [1.0, 1.0]
        assert metrics == [("length", 3.0)] and extra == {"upper": ["AB", "C"]}
        metrics.clear()
        # per-sample pass after the batch call raised: one value per scored sample, None for the failed one
        assert reward(prompts=["p", "q"], completions=["ab", "boom"], **kwargs) == [1.0, None]
        assert extra == {"upper": ["AB", None]} and metrics == [("length", 2.0)]
    finally:
        reward.close()


def test_training_survives_hanging_and_raising_reward_functions(tiny_model_path, tmp_path):
    """A whole run: every sample fails one of two reward functions; the run finishes and counts them."""
    from rlvr_entropy.runner import train

    out = tmp_path / "run"
    recipe = load_recipe(RECIPE, [
        "max_steps=2", "per_device_train_batch_size=8", "steps_per_generation=1", "num_generations=4",
        "data.num_prompts=64", f"output_dir={out}", "reward_timeout=0.5",
        "rewards=[test_reward_sandbox.raise_on_plus, test_reward_sandbox.hang_on_minus, correctness]",
    ])
    start = time.monotonic()
    train(recipe)
    assert time.monotonic() - start < 60
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    last = steps[-1]
    # 16 samples, each either an addition (raises) or a subtraction (hangs)
    assert last["reward/errors"] + last["reward/timeouts"] == 16
    assert last["reward/errors"] > 0 and last["reward/timeouts"] > 0
    assert last["reward/errors"] >= steps[0]["reward/errors"]  # run totals
    assert isinstance(last["rewards/correctness/mean"], float)
