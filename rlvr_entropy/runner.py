"""From a recipe to a trainer: resolve the model, load the data, look up the rewards, train.

The offline tiny world (``model.name_or_path: tiny`` and a synthetic ``data.task``) and hub models or
datasets go through the same functions; only where the files come from differs. This is the assembly
layer: it imports the trainer, and nothing in the package's core imports it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from accelerate import PartialState
from datasets import Dataset
from transformers import AutoTokenizer

from rlvr_entropy.config import ModelSpec, Recipe, RecipeError, first_line, peft_config, recipe_to_yaml
from rlvr_entropy.data import load_data
from rlvr_entropy.launch import LaunchError, check_geometry, launched_processes
from rlvr_entropy.periodic_eval import PeriodicEval
from rlvr_entropy.reward_contract import RewardFn, required_columns
from rlvr_entropy.tasks.rewards import get_reward
from rlvr_entropy.trainer import EntropyGRPOTrainer

logger = logging.getLogger(__name__)


def resolve_model(spec: ModelSpec, task: str | None = None) -> str:
    """A loadable model directory or hub id; ``tiny`` builds (or reuses) the cached offline model.

    The tiny model is warm-started on ``task`` (the recipe's ``data.task``) unless ``model.tiny.task``
    says otherwise: a task's completion format (e.g. arithmetic_think's thinking) is learned in SFT.
    """
    if spec.name_or_path == "tiny":
        from rlvr_entropy.tiny import build_tiny_model

        settings = {"task": task, **spec.tiny} if task is not None else spec.tiny
        # Under torchrun every rank gets here: the main process builds, the others then find the cache.
        with PartialState().main_process_first():
            return str(build_tiny_model(**settings))
    if spec.tiny:
        raise RecipeError("model.tiny settings apply only to model.name_or_path: tiny")
    return check_model_source(spec.name_or_path, "model.name_or_path")


def looks_like_path(name: str) -> bool:
    """Whether a model name can only be a local path: a hub id is ``name`` or ``org/name``."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def check_model_source(name: str, where: str) -> str:
    """``name`` as a model source: an existing local directory, or a hub id; a RecipeError for a missing
    directory (instead of the hub's id validation traceback) or a file."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise RecipeError(f"{where}: {name} is a file; give the directory that holds the model's config.json")
        return str(path)
    if looks_like_path(name):
        raise RecipeError(f"{where}: the directory {name} does not exist")
    return name


def model_directory(name: str, where: str = "model") -> str:
    """The model of a run directory, a checkpoint or a model directory (or a hub id, unchanged).

    A directory with ``config.json`` (or a LoRA adapter's ``adapter_config.json``) is a model; a run
    directory without one (a run stopped before its final save) gives its latest ``checkpoint-N``.
    """
    source = check_model_source(name, where)
    path = Path(source)
    if not path.is_dir():
        return source  # a hub id
    if (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
        return source
    checkpoints = sorted(
        (p for p in path.glob("checkpoint-*") if p.name.split("-")[-1].isdigit() and (p / "config.json").is_file()),
        key=lambda p: int(p.name.split("-")[-1]),
    )
    if checkpoints:
        logger.warning("%s holds no final model; using its latest checkpoint, %s", name, checkpoints[-1].name)
        return str(checkpoints[-1])
    raise RecipeError(f"{where}: {name} holds no model (no config.json, no checkpoint-N with one)")


def load_tokenizer(model_path: str, where: str = "model.name_or_path") -> AutoTokenizer:
    """The model's tokenizer; a RecipeError when neither the directory nor the hub (or its cache) has it."""
    try:
        return AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as err:
        raise RecipeError(f"{where} '{model_path}': cannot load its tokenizer: {first_line(err)}") from None


def prepare_output_dir(output_dir: str) -> None:
    """Create ``output_dir`` before any model is loaded, so that an unusable one stops the run at once."""
    path = Path(output_dir).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RecipeError(f"output_dir {output_dir}: cannot create it ({err.strerror or err})") from None
    if not os.access(path, os.W_OK):
        raise RecipeError(f"output_dir {output_dir}: not writable")


def reward_functions(names: list[str], dataset: Dataset) -> list[RewardFn]:
    """The recipe's ``rewards`` (registry names or import paths), each checked against the dataset's columns."""
    funcs = []
    for name in names:
        try:
            func = get_reward(name)
        except ValueError as err:
            raise RecipeError(f"rewards: {err}") from err
        missing = sorted(required_columns(func) - set(dataset.column_names))
        if missing:
            hint = (
                " Set data.answer_column to the column that holds the reference answers"
                if missing == ["answer"] else " Add the column(s) to the dataset or use another reward function"
            )
            raise RecipeError(
                f"reward function '{name}' needs dataset column(s) {missing}, but the dataset has {dataset.column_names}."
                + hint
            )
        funcs.append(func)
    return funcs


def build_trainer(recipe: Recipe) -> EntropyGRPOTrainer:
    # Everything that can be checked without a model first: data, rewards and their columns, batch geometry.
    dataset = load_data(recipe.data)
    rewards = reward_functions(recipe.rewards, dataset)
    check_geometry(len(dataset), recipe.train, launched_processes())
    periodic_eval = PeriodicEval(recipe.evaluation) if recipe.evaluation is not None else None  # loads its data
    if PartialState().is_main_process:
        prepare_output_dir(recipe.train.output_dir)
    model_path = resolve_model(recipe.model, recipe.data.task)  # may build the tiny model or download one
    tokenizer = load_tokenizer(model_path)
    return EntropyGRPOTrainer(
        model=model_path, reward_funcs=rewards, args=recipe.train, train_dataset=dataset, processing_class=tokenizer,
        peft_config=peft_config(recipe), periodic_eval=periodic_eval,
    )


def train(recipe: Recipe) -> EntropyGRPOTrainer:
    trainer = build_trainer(recipe)
    if trainer.accelerator.is_main_process:  # what produced this run, for plots and reruns
        output_dir = Path(recipe.train.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "recipe.yaml").write_text(recipe_to_yaml(recipe))
    trainer.train(resume_from_checkpoint=recipe.train.resume_from_checkpoint)
    if trainer.state.global_step == 0 and recipe.train.max_steps != 0:
        raise LaunchError(
            "the run ended without training a single step (transformers found no batch in the data loader); "
            "no model was saved. Check the data and the batch geometry (rlvr-entropy config RECIPE)"
        )
    trainer.save_model()  # the final policy (and tokenizer) in output_dir, whatever the checkpoint strategy
    return trainer
