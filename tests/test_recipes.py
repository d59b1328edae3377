"""Every recipe under recipes/ loads and validates; bad keys, types and methods fail before training."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlvr_entropy.config import RecipeError, load_recipe, recipe_to_yaml

CPU = ["use_cpu=true", "bf16=false", "gradient_checkpointing=false"]
RECIPES = sorted((Path(__file__).parent.parent / "recipes").rglob("*.yaml"))


def test_there_are_recipes():
    assert any(p.name == "grpo.yaml" for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_recipe_loads(path):
    # GPU recipes are validated here with the CPU switched on (bf16 needs a GPU at config time).
    gpu = path.parent.name != "tiny"
    recipe = load_recipe(path, [*CPU, "use_vllm=false"] if gpu else [])
    assert recipe.rewards
    text = path.read_text()
    assert text.startswith("#"), "a recipe opens with a comment: what it is and how to run it"
    assert "model:" in recipe_to_yaml(recipe)


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
