"""Short real runs on the offline tiny model: weights change, entropy is logged, files land on disk."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlvr_entropy.cli import main
from rlvr_entropy.config import load_recipe
from rlvr_entropy.methods import Method
from rlvr_entropy.plotting import plot_runs, read_metrics
from rlvr_entropy.runner import train

RECIPE = Path(__file__).parent.parent / "recipes" / "tiny" / "grpo.yaml"
FAST = ["max_steps=3", "per_device_train_batch_size=16", "steps_per_generation=1", "num_generations=4", "data.num_prompts=64", "learning_rate=1e-3"]


@dataclass
class CountSteps(Method):
    """Adaptive toy method: counts generation batches in its checkpointed state."""

    name = "count_steps"
    needs = frozenset({"entropy"})

    def init_state(self):
        return {"batches": 0, "last_entropy": None}

    def advantage(self, advantages, batch):
        if batch.training:
            self.state["batches"] += 1
            self.state["last_entropy"] = float(batch.mean_entropy().mean())
        batch.log("batches", self.state["batches"])
        return advantages


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(next(directory.glob("*.safetensors"))))


def row_prompts(row: dict) -> float:
    """Prompts per generation batch in FAST's geometry (one generation batch per logged step)."""
    return 16 / 4  # per_device_train_batch_size 16, steps_per_generation 1, num_generations 4


def test_tiny_run_changes_weights_and_logs_entropy(tiny_model_path, tmp_path):
    out = tmp_path / "run"
    trainer = train(load_recipe(RECIPE, [*FAST, f"output_dir={out}"]))
    before, after = weights(Path(tiny_model_path)), weights(out)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, "training did not change any weight"
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        for key in ("loss", "reward", "entropy", "entropy/p10", "entropy/p50", "entropy/p90",
                    "rollout_entropy/mean", "rollout_entropy/p50", "completions/mean_length"):
            assert isinstance(row.get(key), float), (key, row)
        assert row["entropy/p10"] <= row["entropy/p50"] <= row["entropy/p90"]
        assert row["rollout_entropy/p10"] <= row["rollout_entropy/p50"] <= row["rollout_entropy/p90"]
        # the difficulty diagnostic: every prompt of the batch in one bucket, with its entropy where it has prompts
        buckets = ("unsolved", "hard", "medium", "easy", "solved")
        prompts = [row[f"entropy_by_difficulty/{b}/prompts"] for b in buckets]
        assert sum(prompts) == pytest.approx(row_prompts(row))
        for bucket, count in zip(buckets, prompts, strict=True):
            assert (f"entropy_by_difficulty/{bucket}/entropy" in row) == (count > 0)
    # on the first step the rollout and the training pass score the same policy on the same tokens
    assert rows[0]["rollout_entropy/mean"] == pytest.approx(rows[0]["entropy"], abs=1e-4)
    assert (out / "recipe.yaml").is_file()
    assert trainer.pipeline.names == []
    png = plot_runs([out], tmp_path / "curves.png")
    assert png.stat().st_size > 10_000


def test_method_state_is_checkpointed_and_restored(tiny_model_path, tmp_path):
    out = tmp_path / "run"
    method = "methods=[{name: test_end_to_end.CountSteps}]"
    train(load_recipe(RECIPE, [*FAST, method, f"output_dir={out}", "save_strategy=steps", "save_steps=2"]))
    saved = json.loads((out / "checkpoint-2" / "rlvr_entropy_state.json").read_text())
    assert saved["methods"]["count_steps"]["batches"] == 2
    rows = read_metrics(out)
    assert [r["count_steps/batches"] for r in rows] == [1.0, 2.0, 3.0]

    resumed_dir = tmp_path / "resumed"
    trainer = train(load_recipe(RECIPE, [
        *FAST, method, f"output_dir={resumed_dir}", f"resume_from_checkpoint={out / 'checkpoint-2'}",
    ]))
    # restored 2 batches from the checkpoint, then one more step
    assert trainer.pipeline.methods[0].state["batches"] == 3
    assert read_metrics(resumed_dir)[-1]["count_steps/batches"] == 3.0


# A method run, so that method statistics are among the scalars the trackers must receive.
TRACKED = [*FAST, "max_steps=2", "methods=[{name: clip_cov, ratio: 0.05, lb: -10.0, ub: 10.0}]"]


def logged_scalars(rows: list[dict]) -> dict[str, float]:
    """The last value of every numeric metric in metrics.jsonl, under the trackers' ``train/`` names."""
    last: dict[str, float] = {}
    for row in rows:
        last.update({f"train/{k}": float(v) for k, v in row.items() if k != "step" and isinstance(v, int | float)})
    return last


def test_tensorboard_receives_the_same_scalars(tiny_model_path, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    out = tmp_path / "run"
    train(load_recipe(RECIPE, [*TRACKED, f"output_dir={out}", "report_to=[tensorboard]"]))
    events = list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = logged_scalars(read_metrics(out))
    for key in ("entropy", "entropy/p50", "rollout_entropy/mean", "reward", "covariance/logp_adv",
                "clip_cov/candidates", "clip_cov/selected"):
        assert f"train/{key}" in expected, key
    # every scalar of the JSONL (the source of truth) reaches TensorBoard, with the same last value
    assert set(expected) <= tags, sorted(set(expected) - tags)
    for tag, value in expected.items():
        assert acc.Scalars(tag)[-1].value == pytest.approx(value, rel=1e-5, abs=1e-7), tag


def test_trackio_receives_the_same_scalars(tiny_model_path, tmp_path, monkeypatch):
    """``report_to: [trackio]`` logs locally (no Space, no network); needs the ``trackio`` extra."""
    import importlib.util
    import uuid

    if importlib.util.find_spec("trackio") is None:
        pytest.skip("trackio is not installed (pip install -e '.[trackio]')")
    # TRACKIO_DIR is read when trackio is first imported, which TRL may already have done: then the
    # run goes to trackio's own directory, under a project name of its own that is removed afterwards.
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    from trackio.sqlite_storage import SQLiteStorage

    project = f"rlvr-entropy-test-{uuid.uuid4().hex[:8]}"
    out = tmp_path / "run"
    db = SQLiteStorage.get_project_db_path(project)
    try:
        train(load_recipe(RECIPE, [*TRACKED, f"output_dir={out}", "report_to=[trackio]", f"project={project}", "run_name=r"]))
        logs = [row for row in SQLiteStorage.get_logs(project, "r") if "train/entropy" in row]
    finally:
        for path in db.parent.glob(f"{project}*"):
            path.unlink()
    expected = logged_scalars(read_metrics(out))
    assert "train/clip_cov/selected" in expected and "train/covariance/logp_adv" in expected
    received: dict[str, float] = {}
    for row in logs:
        received.update({k: v for k, v in row.items() if k in expected})
    assert set(received) == set(expected)
    for key, value in expected.items():
        assert received[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


def test_cli_reports_bad_input_without_a_traceback(capsys):
    assert main(["train", str(RECIPE), "max_stepz=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'max_stepz'. Did you mean 'max_steps'" in err and "Traceback" not in err


def test_cli_methods_lists_every_registered_method(capsys):
    from rlvr_entropy.methods import METHODS

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in METHODS:
        assert name in out


def test_reward_function_contract_violation_is_named(tiny_model_path, tmp_path):
    from rlvr_entropy.config import RecipeError

    with pytest.raises(RecipeError, match="'short_reward' returned 1 values for 16 completions"):
        train(load_recipe(RECIPE, [*FAST, "rewards=[test_end_to_end.short_reward]", f"output_dir={tmp_path}"]))


def short_reward(prompts, completions, **kwargs):
    return [1.0]


def test_missing_dataset_column_is_reported(tiny_model_path, tmp_path):
    from rlvr_entropy.config import RecipeError

    with pytest.raises(RecipeError, match=r"needs dataset column\(s\) \['difficulty'\]"):
        train(load_recipe(RECIPE, [*FAST, "rewards=[test_end_to_end.needs_difficulty]", f"output_dir={tmp_path}"]))


def needs_difficulty(prompts, completions, difficulty, **kwargs):
    return [0.0] * len(prompts)


def test_local_dataset_file_with_renamed_columns(tmp_path):
    from rlvr_entropy.config import DataSpec
    from rlvr_entropy.data import load_data

    path = tmp_path / "rows.jsonl"
    path.write_text('{"question": "1+2=", "solution": "3"}\n{"question": "5-1=", "solution": "4"}\n')
    ds = load_data(DataSpec(task=None, dataset=str(path), prompt_column="question", answer_column="solution"))
    assert ds.column_names == ["prompt", "answer"] and ds[1] == {"prompt": "5-1=", "answer": "4"}


def test_dataset_problems_are_reported(tmp_path):
    from rlvr_entropy.config import DataSpec, RecipeError
    from rlvr_entropy.data import load_data

    path = tmp_path / "rows.jsonl"
    path.write_text('{"question": "1+2=", "solution": "3"}\n')
    with pytest.raises(RecipeError, match="no column 'prompt' .data.prompt_column.; its columns are \\['question'"):
        load_data(DataSpec(task=None, dataset=str(path)))
    with pytest.raises(RecipeError, match="empty"):
        load_data(DataSpec(task="arithmetic", num_prompts=0))
    with pytest.raises(RecipeError, match="data.task"):
        load_data(DataSpec(task="calculus"))


def test_missing_answer_column_is_reported(tmp_path):
    from rlvr_entropy.config import DataSpec, RecipeError
    from rlvr_entropy.data import load_data
    from rlvr_entropy.runner import reward_functions

    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "1+2="}\n')
    with pytest.raises(RecipeError, match=r"'correctness' needs dataset column\(s\) \['answer'\]"):
        reward_functions(["correctness"], load_data(DataSpec(task=None, dataset=str(path))))


def test_nested_answer_column_and_dapo_answer_line(tmp_path):
    from rlvr_entropy.config import DataSpec
    from rlvr_entropy.data import load_data
    from rlvr_entropy.tasks.rewards import correctness, extract_answer

    path = tmp_path / "dapo.jsonl"
    path.write_text('{"prompt": [{"role": "user", "content": "1+2?"}], "reward_model": {"ground_truth": "3", "style": "rule"}}\n')
    ds = load_data(DataSpec(task=None, dataset=str(path), answer_column="reward_model.ground_truth"))
    assert ds[0]["answer"] == "3" and ds[0]["prompt"][0]["content"] == "1+2?"
    assert extract_answer("Let me think.\nAnswer: 3") == "3"
    assert correctness(["q"], ["So the sum is 3.\nAnswer: 3"], answer=["3"]) == [1.0]


# Every tiny recipe with a method (grpo*.yaml are the baselines). pear.yaml trains on arithmetic_think,
# whose own warm-started tiny model is built on first use (about 3 minutes on one core, then cached).
METHOD_RECIPES = sorted(p for p in RECIPE.parent.glob("*.yaml") if not p.stem.startswith("grpo"))
# Statistics a method must log in this short run, beyond at least one of its own.
EXPECTED_STATISTICS = {
    "pear": {"pear/think_entropy", "pear/answer_entropy", "pear/penalty", "pear/missing_marker", "pear/length"},
    "aepo": {"aepo/estimate", "aepo/target", "aepo/error", "aepo/temperature", "aepo/injected", "aepo/nll", "aepo/entropy"},
    "ares": {"ares/threshold", "ares/hwe", "ares/share_easy", "ares/entropy_reward", "ares/beta_easy"},
}


@pytest.mark.parametrize("recipe", METHOD_RECIPES, ids=lambda p: p.stem)
def test_every_tiny_method_recipe_runs_and_logs_its_statistics(tiny_model_path, tmp_path, recipe):
    out = tmp_path / recipe.stem
    trainer = train(load_recipe(recipe, [*FAST, "steps_per_generation=2", "max_steps=4", f"output_dir={out}"]))
    method = trainer.pipeline.methods[0].name
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    logged = {k for r in rows for k, v in r.items() if k.startswith(f"{method}/") and v is not None}
    assert logged, f"{method} logged no statistics"
    assert EXPECTED_STATISTICS.get(method, set()) <= logged, (method, sorted(logged))
    assert all(isinstance(r["entropy"], float) and isinstance(r["covariance/logp_adv"], float) for r in rows)


def test_lora_run_with_composed_methods_trains_only_the_adapter(tiny_model_path, tmp_path):
    """A recipe `peft:` section becomes TRL's peft_config: methods act on the LoRA policy, the base stays frozen."""
    out = tmp_path / "lora"
    methods = "[{name: steer}, {name: clip_cov, selection_scope: global, ratio: 0.2, lb: 0.0, ub: 100.0}]"
    recipe = load_recipe(RECIPE, [*FAST, f"output_dir={out}", f"methods={methods}", "peft.r=4", "peft.lora_alpha=8",
                                  "peft.target_modules=[q_proj, v_proj]", "epsilon=1.0", "epsilon_high=1.0"])
    assert recipe.peft == {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"}
    trainer = train(recipe)
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    base = weights(Path(tiny_model_path))
    model = trainer.accelerator.unwrap_model(trainer.model)
    frozen = {n.replace("base_model.model.", "").replace(".base_layer", ""): p for n, p in model.named_parameters()
              if "lora_" not in n}
    assert all(torch.equal(frozen[k], base[k]) for k in base if k in frozen)  # the base model did not move
    assert any(float(p.detach().abs().sum()) > 0 for n, p in model.named_parameters() if "lora_B" in n)  # it trained
    logged = set().union(*read_metrics(out))
    assert {"steer/mean_weight", "clip_cov/selected", "clip_cov/applied"} <= logged, sorted(logged)


def test_a_peft_section_is_checked_before_anything_is_built(tmp_path):
    from rlvr_entropy.config import RecipeError

    with pytest.raises(RecipeError, match=r"unknown key 'peft.lora_alpa'.*Did you mean 'lora_alpha'"):
        load_recipe(RECIPE, [f"output_dir={tmp_path}", "peft.lora_alpa=8"])
    with pytest.raises(RecipeError, match=r"peft.r: expected an integer"):
        load_recipe(RECIPE, [f"output_dir={tmp_path}", "peft.r=four"])
