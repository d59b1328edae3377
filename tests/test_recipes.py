"""Every recipe under recipes/ loads and validates; bad keys, types and methods fail before training."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from rlvr_entropy.cli import main
from rlvr_entropy.config import RecipeError, load_recipe, recipe_to_yaml

CPU = ["use_cpu=true", "bf16=false", "gradient_checkpointing=false"]
RECIPE_ROOT = Path(__file__).parent.parent / "recipes"
LAUNCH_CONFIGS = sorted((RECIPE_ROOT / "accelerate").glob("*.yaml"))
RECIPES = sorted(p for p in RECIPE_ROOT.rglob("*.yaml") if p.parent.name not in ("accelerate", "eval"))
EVAL_SETS = sorted((RECIPE_ROOT / "eval").glob("*.yaml"))


def test_there_are_recipes():
    assert any(p.name == "grpo.yaml" for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_recipe_loads(path):
    # GPU recipes are validated here with the CPU switched on (bf16 needs a GPU at config time).
    gpu = path.parent.name != "tiny"
    recipe = load_recipe(path, [*CPU, "use_vllm=false"] if gpu else [])
    assert recipe.rewards
    first, second = path.read_text().splitlines()[:2]
    # the first line says what the recipe is for (`rlvr-entropy recipes` lists it), the rest of the header how
    assert first.startswith("# ") and first.endswith(".") and len(first) <= 110, first
    assert second.startswith("#")
    assert "model:" in recipe_to_yaml(recipe)


@pytest.mark.parametrize("path", LAUNCH_CONFIGS, ids=lambda p: p.name)
def test_accelerate_configs_load_and_say_when_to_use_them(path):
    from accelerate.commands.config.config_args import load_config_from_file

    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and first.endswith("."), first
    config = load_config_from_file(str(path))  # accelerate's own reader: unknown keys or values fail here
    expected = {"ddp": "MULTI_GPU", "fsdp2": "FSDP"}.get(path.stem, "DEEPSPEED")
    assert config.distributed_type.value == expected
    if config.distributed_type.value == "DEEPSPEED":
        assert config.deepspeed_config["zero_stage"] == (2 if path.stem == "zero2" else 3)


def test_there_are_launch_configs_for_every_engine():
    assert {p.stem for p in LAUNCH_CONFIGS} >= {"ddp", "zero2", "zero3", "zero3_offload", "fsdp2"}
    assert any("multinode" in p.stem for p in LAUNCH_CONFIGS)


def test_sharded_recipes_name_their_launch_config():
    for path in RECIPES:
        if path.parent.name == "paper":
            header = "".join(line for line in path.read_text().splitlines() if line.startswith("#"))
            assert "recipes/accelerate/" in header, f"{path.name}: its run line names no accelerate config"
            if "32b" in path.name:
                assert "zero3" in header and "--multi_gpu" not in header


def test_recipes_command_lists_every_shipped_recipe_with_its_summary(capsys, tmp_path):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for path in [*RECIPES, *LAUNCH_CONFIGS]:
        rel = str(path.relative_to(path.parents[1]))
        summary = path.read_text().splitlines()[0].lstrip("# ")
        assert any(rel in line and summary in line for line in out.splitlines()), rel
    (tmp_path / "mine.yaml").write_text("# My experiment.\nmax_steps: 3\n")
    assert main(["recipes", str(tmp_path)]) == 0
    assert "mine.yaml  My experiment." in capsys.readouterr().out
    assert main(["recipes", str(tmp_path / "none")]) == 2


def test_overrides_reach_sections_and_lists(tmp_path):
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text("# test\nmethods:\n  - {name: entropy_bonus, coef: 0.01}\nmax_steps: 5\n")
    recipe = load_recipe(recipe_file, [*CPU, "max_steps=7", "data.num_prompts=12", "methods.0.coef=0.03", "output_dir=x"])
    assert recipe.train.max_steps == 7 and recipe.data.num_prompts == 12 and recipe.train.output_dir == "x"
    assert recipe.train.methods == [{"name": "entropy_bonus", "coef": 0.03}]
    assert recipe.train.entropy_coef == pytest.approx(0.03)  # the method set TRL's own field


def test_exponent_without_dot_is_a_number():
    # PyYAML parses 2e-4 as a string (YAML 1.1); a float field must still accept it.
    recipe = load_recipe(None, [*CPU, "learning_rate=2e-4", "methods=[{name: entropy_bonus, coef: 1e-3}]"])
    assert recipe.train.learning_rate == 2e-4 and recipe.train.methods[0]["coef"] == "1e-3"
    assert recipe.train.entropy_coef == pytest.approx(1e-3)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["max_stepz=3"], "unknown key 'max_stepz'. Did you mean 'max_steps'"),
        (["learning_rate=fast"], "learning_rate: expected a number"),
        (["bf16=maybe"], "bf16.*maybe"),
        (["data.taks=arithmetic"], "unknown key 'data.taks'. Did you mean 'task'"),
        (["methods=[{name: clipcov}]"], "unknown method 'clipcov'"),
        (["methods=[{name: entropy_bonus, coeff: 1}]"], "Did you mean 'coef'"),
        (["methods=[{name: high_entropy_tokens, rho: 3}]"], "fraction in \\(0, 1\\]"),
        (["methods.3.coef=1"], "out of range"),
        (["rewards=[]"], "non-empty list"),
        (["loss_type=drgrpo"], "loss_type='drgrpo' is not one of .*Did you mean 'dr_grpo'"),
        (["max_steps"], "key=value"),
    ],
)
def test_bad_input_fails_with_a_clear_message(overrides, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(None, CPU + overrides)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(bad)


TINY = [p for p in RECIPES if p.parent.name == "tiny"]


@pytest.mark.parametrize("path", TINY, ids=lambda p: p.stem)
def test_tiny_recipes_leave_room_for_their_task_completions(path):
    from rlvr_entropy.tasks import completion_budget

    recipe = load_recipe(path)
    assert recipe.train.max_completion_length >= completion_budget(recipe.data.task)


def without_method(path: Path) -> dict:
    """The resolved recipe at ``path`` less what a method recipe may change: methods and output_dir."""
    tree = yaml.safe_load(recipe_to_yaml(load_recipe(path)))
    return {k: v for k, v in tree.items() if k not in ("methods", "output_dir")}


def test_pear_tiny_recipe_differs_from_its_baseline_only_in_the_method():
    tiny = Path(__file__).parent.parent / "recipes" / "tiny"
    pear, baseline = load_recipe(tiny / "pear.yaml"), load_recipe(tiny / "grpo_think.yaml")
    assert pear.data.task == "arithmetic_think" and pear.train.methods == [{"name": "pear", "alpha": 1.0}]
    assert baseline.train.methods == []
    assert without_method(tiny / "pear.yaml") == without_method(tiny / "grpo_think.yaml")
    # ... and from grpo.yaml only in the task and the room its thinking needs
    grpo = without_method(tiny / "grpo.yaml")
    grpo["data"]["task"], grpo["max_completion_length"] = "arithmetic_think", 48
    grpo["eval"]["datasets"][0].update(task="arithmetic_think", name="arithmetic_think")
    assert grpo == without_method(tiny / "grpo_think.yaml")


def test_tiny_model_follows_the_recipe_task(monkeypatch):
    import rlvr_entropy.tiny as tiny
    from rlvr_entropy.config import ModelSpec
    from rlvr_entropy.runner import resolve_model

    built: list[dict] = []
    monkeypatch.setattr(tiny, "build_tiny_model", lambda **settings: built.append(settings) or "dir")
    resolve_model(ModelSpec(), "arithmetic_think")
    resolve_model(ModelSpec(tiny={"task": "arithmetic", "sft_steps": 5}), "arithmetic_think")  # explicit wins
    resolve_model(ModelSpec())  # a dataset run: the default task
    assert built == [{"task": "arithmetic_think"}, {"task": "arithmetic", "sft_steps": 5}, {}]


def test_pear_paper_recipe_reads_gsm8k(tmp_path):
    """The recipe's data spec on a local copy of GSM8K's layout: chat prompts, '####' references."""
    from rlvr_entropy.config import DataSpec
    from rlvr_entropy.data import load_data
    from rlvr_entropy.tasks import correctness

    recipe = load_recipe(Path(__file__).parent.parent / "recipes" / "paper" / "pear_qwen3-4b.yaml", [*CPU, "use_vllm=false"])
    spec = recipe.data
    assert (spec.dataset, spec.config, spec.prompt_column, spec.answer_column) == ("openai/gsm8k", "main", "question", "answer")
    assert recipe.train.methods == [{"name": "pear", "alpha": 1.0}] and recipe.model.name_or_path == "Qwen/Qwen3-4B"
    rows = tmp_path / "gsm8k.jsonl"
    rows.write_text(json.dumps({"question": "Natalia sold 48 clips in April and half as many in May. How many in all?",
                                "answer": "In May she sold 48/2 = <<48/2=24>>24.\nIn all 48+24 = <<48+24=72>>72.\n#### 72"}) + "\n")
    local = dataclasses.replace(spec, dataset=str(rows))
    dataset = load_data(local)
    prompt = dataset[0]["prompt"]
    assert prompt == [{"role": "user", "content": "Natalia sold 48 clips in April and half as many in May. How many in all? "
                       "Let's think step by step and output the final answer after \"####\"."}]
    completion = "<think>\n48/2 = 24, 48 + 24 = 72.\n</think>\n\nShe sold 72 clips.\n#### 72"
    assert correctness([prompt] * 2, [completion, "#### 48"], answer=[dataset[0]["answer"]] * 2) == [1.0, 0.0]
    with pytest.raises(RecipeError, match="\\{prompt\\}"):
        load_data(dataclasses.replace(local, template="no placeholder"))
    with pytest.raises(RecipeError, match="already messages"):
        load_data(DataSpec(task=None, dataset=str(write_chat_rows(tmp_path)), template="{prompt}!"))
    with pytest.raises(RecipeError, match="already messages"):
        load_data(DataSpec(task=None, dataset=str(write_chat_rows(tmp_path)), chat=True))
    with pytest.raises(RecipeError, match=r"\{level\} name no column"):
        load_data(dataclasses.replace(local, template="{prompt} ({level})"))
    # braces in the template are kept as written
    boxed = load_data(dataclasses.replace(local, template="{prompt} Put it in \\boxed{}."))
    assert boxed[0]["prompt"][0]["content"].endswith("many in all? Put it in \\boxed{}.")


def write_chat_rows(directory: Path) -> Path:
    path = directory / "chat.jsonl"
    path.write_text(json.dumps({"prompt": [{"role": "user", "content": "1+2?"}], "answer": "3"}) + "\n")
    return path


TINY = Path(__file__).parent.parent / "recipes" / "tiny"
# The baseline each tiny task's method recipes are compared with, and what a method may change beyond
# `methods` because it needs it: ARES scales TRL's KL term (beta > 0); Clip-Cov and KL-Cov unclip PPO.
TASK_BASELINES = {"arithmetic": "grpo", "arithmetic_think": "grpo_think", "split": "grpo_split"}
METHOD_NEEDS = {"ares": {"beta"}, "clip_cov": {"epsilon", "epsilon_high"}, "kl_cov": {"epsilon", "epsilon_high"}}


@pytest.mark.parametrize("path", sorted(p for p in TINY.glob("*.yaml") if not p.stem.startswith("grpo")),
                         ids=lambda p: p.stem)
def test_every_tiny_method_recipe_differs_from_its_task_baseline_only_in_the_method(path):
    recipe = load_recipe(path)
    baseline = TINY / f"{TASK_BASELINES[recipe.data.task]}.yaml"
    assert load_recipe(baseline).train.methods == []
    ours, theirs = without_method(path), without_method(baseline)
    for key in set().union(*(METHOD_NEEDS.get(m["name"], set()) for m in recipe.train.methods)):
        ours.pop(key, None), theirs.pop(key, None)  # recipe_to_yaml may leave out a default
    assert ours == theirs


@pytest.mark.parametrize("path", [p for p in RECIPES if p.parent.name == "paper"], ids=lambda p: p.name)
def test_gpu_recipes_validate_on_a_machine_without_one(path, capsys):
    """`rlvr-entropy config` checks a cluster job on a laptop: what only a GPU can tell is a note, not a failure."""
    import torch

    assert main(["config", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "bf16: true" in out and "use_cpu" not in out  # printed as the recipe asks, not as validated here
    if torch.cuda.is_available():
        return
    assert "note: not checked on this machine, checked at launch" in err and "bf16" in err
    with pytest.raises(RecipeError, match="bf16/gpu"):  # training keeps the hardware check
        load_recipe(path)
