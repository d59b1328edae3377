"""From a recipe to a trainer: resolve the model, load the data, check the rewards, train.

The offline tiny world (``model.name_or_path: tiny`` and a synthetic ``data.task``) and hub models or
datasets go through the same functions; only where the files come from differs.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from accelerate import PartialState
from datasets import Dataset, load_dataset
from transformers import AutoTokenizer

from rlvr_entropy.config import DataSpec, ModelSpec, Recipe, RecipeError, recipe_to_yaml
from rlvr_entropy.sandbox import RewardContractError
from rlvr_entropy.trainer import EntropyGRPOTrainer

logger = logging.getLogger(__name__)

LOCAL_FORMATS = {"json": "json", "jsonl": "json", "csv": "csv", "parquet": "parquet"}
RewardFn = Callable[..., list[float | None]]

# Keyword arguments TRL passes to every reward function besides the dataset columns.
TRL_REWARD_KWARGS = {"prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric", "environments"}


class RewardFunctionError(RewardContractError):
    """A reward function broke its contract (wrong number or type of values); a RecipeError."""


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
    return spec.name_or_path


def load_data(spec: DataSpec) -> Dataset:
    """The training prompts: a synthetic task, or a dataset with its columns renamed to prompt/answer."""
    if spec.dataset is not None:
        suffix = Path(spec.dataset).suffix.lstrip(".")
        if suffix in LOCAL_FORMATS and Path(spec.dataset).is_file():  # a local file: json/jsonl/csv/parquet
            dataset = load_dataset(LOCAL_FORMATS[suffix], data_files=spec.dataset, split="train")
        else:
            dataset = load_dataset(spec.dataset, spec.config_name, split=spec.split)
        if "." in spec.answer_column and spec.answer_column not in dataset.column_names:
            dataset = dataset.flatten()  # nested fields become "parent.child" columns
        rename = {spec.prompt_column: "prompt", spec.answer_column: "answer"}
        for old, new in rename.items():
            if old != new and old in dataset.column_names:
                dataset = dataset.rename_column(old, new)
    elif spec.task is not None:
        from rlvr_entropy.tasks import make_dataset

        try:
            dataset = make_dataset(spec.task, spec.num_prompts, spec.seed)
        except ValueError as err:
            raise RecipeError(f"data.task: {err}") from err
    else:
        raise RecipeError("data needs either `task` (a synthetic task) or `dataset` (a hub id or local path)")
    if spec.max_rows is not None:
        dataset = dataset.select(range(min(spec.max_rows, len(dataset))))
    if len(dataset) == 0:
        raise RecipeError(f"the training dataset is empty ({spec.dataset or spec.task})")
    if "prompt" not in dataset.column_names:
        raise RecipeError(
            f"the dataset has no prompt column '{spec.prompt_column}'; columns: {dataset.column_names}. "
            "Set data.prompt_column."
        )
    if spec.user_message is not None:
        dataset = as_user_messages(dataset, spec.user_message)
    return dataset


def as_user_messages(dataset: Dataset, template: str) -> Dataset:
    """Plain-text prompts as one-message conversations ``[{"role": "user", "content": ...}]``.

    ``{prompt}`` in ``template`` is replaced by the prompt text (str.replace, not str.format, so the
    template may hold braces such as ``\\boxed{}``).
    """
    if "{prompt}" not in template:
        raise RecipeError(f"data.user_message must contain '{{prompt}}' where the prompt goes, got {template!r}")
    if not isinstance(dataset[0]["prompt"], str):
        raise RecipeError("data.user_message applies to plain-text prompts; this dataset's prompts are already messages")
    return dataset.map(lambda row: {"prompt": [{"role": "user", "content": template.replace("{prompt}", row["prompt"])}]})


def required_columns(func: RewardFn) -> set[str]:
    """Dataset columns a reward function names as parameters (explicitly or via ``required_columns``)."""
    declared = getattr(func, "required_columns", None)
    if declared is not None:
        return set(declared)
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return set()
    return {
        p.name
        for p in params
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty and p.name not in TRL_REWARD_KWARGS
    }


class CheckedReward:
    """A reward function whose results are checked against the contract, so a violation names the function
    and what it returned. An object rather than a closure so that it pickles (the reward sandbox runs it in a
    worker process); it carries the function's name and attributes (``required_columns``)."""

    def __init__(self, func: RewardFn) -> None:
        self.func = func
        functools.update_wrapper(self, func)

    def __call__(self, *args: Any, **kwargs: Any) -> list[float | None]:
        out = self.func(*args, **kwargs)
        expected = len(kwargs.get("prompts", args[0] if args else []))
        name = getattr(self.func, "__name__", repr(self.func))
        if not isinstance(out, list | tuple):
            raise RewardFunctionError(f"reward function '{name}' returned {type(out).__name__}, expected a list of floats")
        if len(out) != expected:
            raise RewardFunctionError(
                f"reward function '{name}' returned {len(out)} values for {expected} completions; "
                "it must return one float (or None) per completion"
            )
        bad = [v for v in out if v is not None and not isinstance(v, int | float)]
        if bad:
            raise RewardFunctionError(f"reward function '{name}' returned non-numeric values such as {bad[0]!r}")
        return list(out)


def checked_reward(func: RewardFn) -> RewardFn:
    """Wrap a reward function so a contract violation names the function and what it returned."""
    if inspect.iscoroutinefunction(func):
        return func  # TRL checks async results itself
    return CheckedReward(func)


def reward_functions(names: list[str], dataset: Dataset) -> list[RewardFn]:
    from rlvr_entropy.tasks.rewards import get_reward

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
        funcs.append(checked_reward(func))
    return funcs


def build_trainer(recipe: Recipe) -> EntropyGRPOTrainer:
    dataset = load_data(recipe.data)  # first: an unknown data.task is reported before a tiny build starts
    model_path = resolve_model(recipe.model, recipe.data.task)
    rewards = reward_functions(recipe.rewards, dataset)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    return EntropyGRPOTrainer(
        model=model_path, reward_funcs=rewards, args=recipe.train, train_dataset=dataset, processing_class=tokenizer
    )


def train(recipe: Recipe) -> EntropyGRPOTrainer:
    trainer = build_trainer(recipe)
    if trainer.accelerator.is_main_process:  # what produced this run, for plots and reruns
        output_dir = Path(recipe.train.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "recipe.yaml").write_text(recipe_to_yaml(recipe))
    trainer.train(resume_from_checkpoint=recipe.train.resume_from_checkpoint)
    trainer.save_model()  # the final policy (and tokenizer) in output_dir, whatever the checkpoint strategy
    return trainer
