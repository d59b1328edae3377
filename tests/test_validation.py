"""Validation before training, and bad dataset rows: each problem stops before any work with a message that
says what to change, or (``bad_rows: skip``) the rows are dropped up front and counted, never a crash mid-run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlvr_entropy.cli import main
from rlvr_entropy.config import RecipeError, load_recipe
from rlvr_entropy.data import find_bad_rows
from rlvr_entropy.methods import MethodConfigError
from rlvr_entropy.runner import build_trainer, train

RECIPE = Path(__file__).parent.parent / "recipes" / "tiny" / "grpo.yaml"
FAST = ["per_device_train_batch_size=8", "steps_per_generation=1", "num_generations=4", "reward_sandbox=none"]


@pytest.mark.parametrize(("override", "message"), [
    ("temperature=0", "temperature must be > 0"),
    ("top_p=1.5", "top_p must be in (0, 1]"),
    ("max_completion_length=0", "max_completion_length must be >= 1"),
    ("num_iterations=0", "num_iterations must be >= 1"),
    ("steps_per_generation=0", "steps_per_generation must be >= 1"),
    ("per_device_train_batch_size=0", "per_device_train_batch_size must be >= 1"),
    ("beta=-0.1", "beta must be >= 0"),
    ("reward_timeout=0", "reward_timeout must be > 0 seconds"),
    ("reward_sandbox=subprocess", "reward_sandbox: 'subprocess' is not one of"),
    ("on_nonfinite=ignore", "on_nonfinite: 'ignore' is not one of"),
    ("max_prompt_tokens=0", "max_prompt_tokens must be >= 1"),
    ("think_marker=''", "think_marker must be non-empty"),
])
def test_out_of_range_options_stop_before_training(override, message):
    with pytest.raises(RecipeError) as err:
        load_recipe(RECIPE, [override])
    assert message in str(err.value)


def test_save_steps_must_be_positive_when_saving_by_steps():
    with pytest.raises(RecipeError, match=r"save_steps must be > 0 with save_strategy: steps"):
        load_recipe(RECIPE, ["save_strategy=steps", "save_steps=0"])


def test_cli_reports_a_range_error_with_exit_code_2(capsys):
    assert main(["train", str(RECIPE), "temperature=0"]) == 2
    err = capsys.readouterr().err
    assert "temperature must be > 0" in err and "Traceback" not in err


def bad_train_inputs(tmp_path: Path) -> list[tuple[list[str], str]]:
    """What a new user gets wrong, and the one line each must end in: (train arguments, message)."""
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  name_or_path: tiny\ndata: {task: arithmetic\nmax_steps: 3\n")
    bad_rows = tmp_path / "rows.jsonl"
    bad_rows.write_text('{"prompt": "1+2=", "answer": "3"}\n{"prompt": \n')
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    out = f"output_dir={tmp_path / 'run'}"
    return [
        ([str(broken)], f"{broken}:4:10: not valid YAML: expected ',' or '}}'"),
        ([str(RECIPE), "model.name_or_path=./models/none", out], "model.name_or_path: the directory ./models/none does not exist"),
        ([str(RECIPE), "data.task=null", f"data.dataset={bad_rows}", out], f"{bad_rows}: cannot read it as JSONL"),
        ([str(RECIPE), f"output_dir={blocker}/run"], f"output_dir {blocker}/run: cannot create it"),
        ([str(RECIPE), "model.name_or_path=no-such-org/no-such-model", out], "cannot load its tokenizer"),
        ([str(RECIPE), "data.config_name=main", out], "'data.config_name' was renamed: use data.config"),
    ]


def test_bad_train_inputs_end_in_one_line_and_exit_code_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for args, message in bad_train_inputs(tmp_path):
        assert main(["train", *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("rlvr-entropy: error:") and message in err, (args, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_no_deprecation_warning_the_user_cannot_act_on():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        recipe = load_recipe(RECIPE, ["gradient_checkpointing=true"])  # TRL's name still works
    assert recipe.train.activation_checkpointing and recipe.train.gradient_checkpointing
    assert not load_recipe(RECIPE).train.activation_checkpointing


def test_think_marker_the_tokenizer_cannot_encode(tiny_model_path, tmp_path):
    recipe = load_recipe(RECIPE, [*FAST, f"output_dir={tmp_path}", "methods=[{name: pear}]", "think_marker=§"])
    with pytest.raises(MethodConfigError, match=r"think_marker '§' encodes to no tokens .* pear .* Set think_marker"):
        build_trainer(recipe)


def test_missing_answer_column_says_which_key_to_set(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"question": "1+2=", "solution": "3"}\n')
    recipe = load_recipe(RECIPE, ["data.task=null", f"data.dataset={path}", "data.prompt_column=question"])
    with pytest.raises(RecipeError, match=r"needs dataset column\(s\) \['answer'\].*Set data.answer_column"):
        build_trainer(recipe)


def write_rows(path: Path) -> Path:
    """12 rows: an empty prompt (row 3), a missing answer (row 5), a prompt far over the tiny model's context (row 7)."""
    rows = [{"prompt": f"{a}+{a}=", "answer": str(2 * a)} for a in range(12)]
    rows[3]["prompt"] = "  "
    rows[5]["answer"] = None
    rows[7]["prompt"] = "1+" * 100 + "1="  # 202 characters: 203 tokens with BOS; the limit is 128 - max_completion_length
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bad_rows_are_skipped_and_counted(tiny_model_path, tmp_path, caplog):
    data = write_rows(tmp_path / "rows.jsonl")
    out = tmp_path / "run"
    trainer = train(load_recipe(RECIPE, [*FAST, "data.task=null", f"data.dataset={data}", "max_steps=3",
                                         f"output_dir={out}"]))
    assert len(trainer.train_dataset) == 9
    assert "  " not in trainer.train_dataset["prompt"] and None not in trainer.train_dataset["answer"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["data/skipped_rows"] == 3 for r in rows)
    assert "3 of 12 rows" in caplog.text and "empty prompt" in caplog.text and "missing 'answer'" in caplog.text


def test_bad_rows_error_lists_them(tiny_model_path, tmp_path):
    data = write_rows(tmp_path / "rows.jsonl")
    recipe = load_recipe(RECIPE, [*FAST, "data.task=null", f"data.dataset={data}", "bad_rows=error",
                                  f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(RecipeError) as err:
        build_trainer(recipe)
    message = str(err.value)
    for part in ("3 of 12 rows", "empty prompt (1 row: 3)", "missing 'answer' (read by correctness) (1 row: 5)",
                 "prompt of 203 tokens, over the limit of 120", "set bad_rows: skip", "Raise max_prompt_tokens"):
        assert part in message, message


class Columns(dict):
    """The two things find_bad_rows reads from a dataset: columns by name and their names (rows may mix types)."""

    @property
    def column_names(self):
        return list(self)


def test_bad_row_rules():
    ds = Columns(
        prompt=[
            [{"role": "user", "content": "1+1="}],
            [{"role": "system", "content": " "}, {"role": "user", "content": ""}],  # no content anywhere
            [{"role": "user", "content": [{"type": "image"}]}],  # an image is content
            "2+2=",
            "3+3=",
        ],
        answer=["2", "2", "2", "", 0],  # "" is missing, 0 is an answer
    )
    bad = find_bad_rows(ds, {"answer": ["correctness"]}, prompt_lengths=None, max_prompt_tokens=None)
    assert bad == {1: "empty prompt", 3: "missing 'answer' (read by correctness)"}
    long = find_bad_rows(ds, {}, prompt_lengths=lambda prompts: [10] * len(prompts), max_prompt_tokens=5)
    assert sorted(long) == [0, 1, 2, 3, 4] and long[0] == "prompt of 10 tokens, over the limit of 5"
    assert long[1] == "empty prompt"  # the first reason wins; empty prompts are never tokenized


def test_prompt_limit_when_completions_may_fill_the_context(tiny_model_path, tmp_path, caplog):
    """max_completion_length >= the context (RoPE models extrapolate): prompts must fit the context alone."""
    data = write_rows(tmp_path / "rows.jsonl")
    recipe = load_recipe(RECIPE, [*FAST, "data.task=null", f"data.dataset={data}", "bad_rows=error",
                                  "max_completion_length=200", f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(RecipeError, match="prompt of 203 tokens, over the limit of 128"):
        build_trainer(recipe)
    assert "prompts are checked against the context alone" in caplog.text
