"""Numeric guards: NaN/inf from a method, TRL's loss or the gradients never reaches the optimizer.

The step that would use them is skipped on every process, counted in ``guard/skipped_steps`` and logged
with the method's name; parameters, optimizer state and method state stay as they were before it.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers.guard_methods import BAD_STEP
from helpers.processes import torchrun, worker_env
from transformers import TrainerCallback
from trl import GRPOTrainer

from rlvr_entropy.config import load_recipe
from rlvr_entropy.guards import StepGuard
from rlvr_entropy.methods.pipeline import NonFiniteError, NonFiniteEvent
from rlvr_entropy.runner import build_trainer

HERE = Path(__file__).parent
RECIPE = HERE.parent / "recipes" / "tiny" / "grpo.yaml"
FAST = ["per_device_train_batch_size=16", "steps_per_generation=1", "num_generations=4", "data.num_prompts=64",
        "learning_rate=1e-4", "reward_sandbox=none"]


class ParamsPerStep(TrainerCallback):
    """A copy of the parameters after every optimizer step."""

    def __init__(self) -> None:
        self.params: list[dict[str, torch.Tensor]] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.params.append({n: p.detach().clone() for n, p in model.named_parameters()})


def run(tmp_path, overrides, steps=3):
    out = tmp_path / "run"
    trainer = build_trainer(load_recipe(RECIPE, [*FAST, f"max_steps={steps}", f"output_dir={out}", *overrides]))
    record = ParamsPerStep()
    trainer.add_callback(record)
    trainer.train()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return trainer, record.params, [r for r in rows if "loss" in r]


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("method", "counter"), [
    ("helpers.guard_methods.NaNAdvantage", "guard/nonfinite/nan_advantage"),
    ("helpers.guard_methods.InfWeight", "guard/nonfinite/inf_weight"),
    ("helpers.guard_methods.NaNExtra", "guard/nonfinite/nan_extra"),
], ids=["advantage", "token_weight", "extra_term"])
def test_non_finite_method_output_skips_the_step(tiny_model_path, tmp_path, caplog, method, counter):
    trainer, params, rows = run(tmp_path, [f"methods=[{{name: {method}}}]"])
    assert [r["step"] for r in rows] == [1, 2, 3]
    # step 2 was skipped: its parameters are those of step 1; steps 1 and 3 trained
    assert same(params[0], params[1])
    assert not same(params[1], params[2])
    assert all(bool(torch.isfinite(p).all()) for p in params[-1].values())
    assert [r["guard/skipped_steps"] for r in rows] == [0, 1, 1]
    assert rows[-1][counter] > 0
    name = counter.rsplit("/", 1)[1]
    assert f"method '{name}' produced" in caplog.text and "step 2 skipped" in caplog.text
    # the optimizer never saw the skipped step: two Adam updates, not three
    assert {int(s["step"]) for s in trainer.optimizer.state.values()} == {2}
    if name == "nan_advantage":  # the skipped batch's state update was rolled back
        assert trainer.pipeline.methods[0].state == {"batches": 2}


def test_non_finite_trl_loss_skips_the_step(tiny_model_path, tmp_path, monkeypatch, caplog):
    original = GRPOTrainer._compute_loss

    def nan_at_bad_step(self, model, inputs):
        loss = original(self, model, inputs)
        return loss * float("nan") if self.state.global_step == BAD_STEP else loss

    monkeypatch.setattr(GRPOTrainer, "_compute_loss", nan_at_bad_step)
    trainer, params, rows = run(tmp_path, [])
    assert same(params[0], params[1]) and not same(params[1], params[2])
    assert rows[-1]["guard/skipped_steps"] == 1 and rows[-1]["guard/nonfinite/loss"] == 1
    assert "TRL's loss is nan" in caplog.text
    assert {int(s["step"]) for s in trainer.optimizer.state.values()} == {2}


@pytest.mark.parametrize(("method", "message"), [
    ("helpers.guard_methods.NaNAdvantage", "step 2: method 'nan_advantage' produced 16 non-finite value.* advantage hook"),
    ("helpers.guard_methods.InfWeight", "step 2: method 'inf_weight' produced .* token weight hook"),
], ids=["advantage", "token_weight"])
def test_on_nonfinite_raise_stops_with_the_method_name(tiny_model_path, tmp_path, method, message):
    with pytest.raises(NonFiniteError, match=message):
        run(tmp_path, [f"methods=[{{name: {method}}}]", "on_nonfinite=raise"])


@pytest.mark.slow
@pytest.mark.multiproc
def test_processes_skip_together(tiny_model_path, tmp_path):
    """Only rank 1 sees an inf token weight: both ranks skip the step and keep identical parameters.
    The same run has a reward function that raises on some samples of every rank: the counts are summed."""
    cmd = torchrun("multiproc_guard_worker.py", RECIPE, tmp_path)
    env = worker_env(cache=Path(tiny_model_path).parent)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["checksums"] == r1["checksums"]  # the ranks never diverged
    assert r0["checksums"][0] == r0["checksums"][1] != r0["checksums"][2]  # step 2 skipped everywhere
    assert r0["counters"] == r1["counters"]
    assert r0["counters"]["guard/skipped_steps"] == 1
    assert r0["counters"]["reward/errors"] == r0["expected_errors"] + r1["expected_errors"] > 0


# ------------------------------------------------------------------------------ StepGuard, without a trainer


def linear_with_grad(value: float) -> torch.nn.Linear:
    layer = torch.nn.Linear(2, 1)
    for p in layer.parameters():
        p.grad = torch.full_like(p, value)
    return layer


def test_a_clean_step_is_taken():
    counters: dict[str, int] = {}
    guard = StepGuard("skip", counters)
    restored = []
    guard.open(lambda: restored.append(True))
    guard.check_micro_batch([], False, torch.tensor(0.5), step=1, training=True)
    layer = linear_with_grad(1.0)
    assert guard.close(layer.parameters(), step=1) is False
    assert all(p.grad is not None for p in layer.parameters()) and not restored
    assert counters == {"guard/skipped_steps": 0} and not guard.is_open


@pytest.mark.parametrize(("flag", "counter"), [
    ("loss", "guard/nonfinite/loss"), ("grad", "guard/nonfinite/grad"), ("method", "guard/nonfinite/m"),
    ("batch", None),
])
def test_any_non_finite_value_skips_the_step_and_restores(flag, counter):
    counters: dict[str, int] = {}
    guard = StepGuard("skip", counters)
    restored = []
    guard.open(lambda: restored.append(True))
    events = [NonFiniteEvent("m", "token weight", 3)] if flag == "method" else []
    loss = torch.tensor(float("nan") if flag == "loss" else 1.0)
    guard.check_micro_batch(events, flag == "batch", loss, step=2, training=True)
    layer = linear_with_grad(float("inf") if flag == "grad" else 1.0)
    assert guard.close(layer.parameters(), step=2) is True
    assert all(p.grad is None for p in layer.parameters())  # the optimizer will leave the parameters alone
    assert restored == [True] and counters["guard/skipped_steps"] == 1
    if counter is not None:
        assert counters[counter] == (3 if flag == "method" else 1)


def test_every_process_decides_together():
    """This process saw nothing, another did: the all-reduced flag skips here too, and its counts arrive."""
    counters: dict[str, int] = {}
    guard = StepGuard("skip", counters, reduce_sum=lambda t: t + 1,
                      gather_objects=lambda objs: [*objs, {"guard/nonfinite/loss": 1}])
    guard.open()
    guard.check_micro_batch([], False, torch.tensor(1.0), step=1, training=True)
    assert guard.close(linear_with_grad(1.0).parameters(), step=1) is True
    assert counters == {"guard/skipped_steps": 1, "guard/nonfinite/loss": 1}


def test_raise_policy_raises_after_the_decision():
    guard = StepGuard("raise", {})
    guard.open()
    guard.check_micro_batch([], False, torch.tensor(float("inf")), step=4, training=True)
    with pytest.raises(NonFiniteError, match="step 4: TRL's loss is inf"):
        guard.close(linear_with_grad(1.0).parameters(), step=4)
    with pytest.raises(NonFiniteError, match="method 'm'"):
        guard.check_generation([NonFiniteEvent("m", "advantage", 2)], step=5, training=True)


def test_generation_events_mark_the_batch_in_training_only():
    counters: dict[str, int] = {}
    guard = StepGuard("skip", counters)
    event = NonFiniteEvent("m", "advantage", 2)
    assert guard.check_generation([], step=1, training=True) is False
    assert guard.check_generation([event], step=1, training=True) is True
    assert counters["guard/nonfinite/m"] == 2
    assert guard.check_generation([event], step=1, training=False) is False  # evaluation: nothing to skip
    assert counters["guard/nonfinite/m"] == 2
    guard.open()
    guard.check_micro_batch([event], True, torch.tensor(float("nan")), step=1, training=False)
    assert guard.close([], step=1) is False  # nothing was flagged in evaluation


def test_an_engine_that_skipped_for_non_finite_gradients_counts_and_restores():
    """DeepSpeed checks the global gradient norm and skips the step itself; the guard records it the same way."""
    counters: dict[str, int] = {}
    guard = StepGuard("skip", counters)
    restored = []
    guard.open(lambda: restored.append(True))
    assert guard.close([], step=3, engine_skipped=True) is True
    assert counters == {"guard/skipped_steps": 1, "guard/nonfinite/grad": 1} and restored == [True]


def test_an_engine_step_that_already_ran_is_counted_not_undone():
    counters: dict[str, int] = {}
    guard = StepGuard("skip", counters)
    restored = []
    guard.open(lambda: restored.append(True))
    guard.check_micro_batch([NonFiniteEvent("m", "token weight", 3)], False, torch.tensor(1.0), step=3, training=True)
    assert guard.close([], step=3, engine_skipped=False) is False
    assert counters == {"guard/skipped_steps": 0, "guard/nonfinite/m": 3} and not restored


def test_sharded_gradients_are_checked_on_the_local_shard():
    class Shard:  # what a DTensor offers: its local part, without a collective
        def __init__(self, local):
            self.local = local

        def to_local(self):
            return self.local

    params = [SimpleNamespace(grad=Shard(torch.tensor([1.0, float("nan")]))), SimpleNamespace(grad=torch.ones(2))]
    guard = StepGuard("skip", {})
    guard.open()
    assert guard.close(params, step=1) is True
    assert all(p.grad is None for p in params)
