"""Training data: where the prompts come from, and which rows can train.

- :func:`load_data`: a synthetic task of the offline tiny world, a local JSON/JSONL/CSV/Parquet file, or
  a hub dataset, with its columns renamed to ``prompt``/``answer`` (nested fields flattened) and, on
  request, plain prompts wrapped as one user message for the model's chat template.
- :func:`drop_bad_rows`: the ``bad_rows`` policy, run by the trainer before training on every map-style
  dataset it holds. A row cannot train when its prompt is empty, a column a reward function reads is
  missing, or its prompt is longer than ``max_prompt_tokens``; such rows are dropped and counted
  (``skip``) or refused with the list of them (``error``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from datasets import Dataset, load_dataset

from rlvr_entropy.config import DataSpec, RecipeError
from rlvr_entropy.tasks import make_dataset

logger = logging.getLogger(__name__)

LOCAL_FORMATS = {"json": "json", "jsonl": "json", "csv": "csv", "parquet": "parquet"}


# ----------------------------------------------------------------------------------------------------------
# Loading


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


# ----------------------------------------------------------------------------------------------------------
# Rows that cannot train


def _is_empty(value: Any) -> bool:
    """None, blank text, an empty list, or a conversation none of whose messages has content."""
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, list):
        return all(_message_is_empty(m) for m in value)
    return False


def _message_is_empty(message: Any) -> bool:
    if not isinstance(message, dict):
        return _is_empty(message)
    content = message.get("content")
    if isinstance(content, list):  # content blocks: text blocks must be blank, any other block (image) counts
        return all(
            isinstance(b, dict) and b.get("type", "text") == "text" and _is_empty(b.get("text")) for b in content
        )
    return _is_empty(content)


def find_bad_rows(
    dataset: Any,
    required: dict[str, list[str]],
    prompt_lengths: Callable[[list[Any]], list[int]] | None,
    max_prompt_tokens: int | None,
) -> dict[int, str]:
    """Rows that cannot train, with the reason: ``{row index: reason}``.

    - an empty prompt (None, blank text, or a conversation without content);
    - a missing value in a column a reward function reads (``required``: column -> reward names);
    - a prompt of more than ``max_prompt_tokens`` tokens (``prompt_lengths`` tokenizes as generation will).
    """
    bad: dict[int, str] = {}
    prompts = dataset["prompt"]
    for i, prompt in enumerate(prompts):
        if _is_empty(prompt):
            bad[i] = "empty prompt"
    for column, rewards in required.items():
        if column not in dataset.column_names:
            continue  # reported as a missing column when the rewards are built
        for i, value in enumerate(dataset[column]):
            if i not in bad and _is_empty(value):
                bad[i] = f"missing {column!r} (read by {', '.join(rewards)})"
    if prompt_lengths is not None and max_prompt_tokens is not None:
        rows = [i for i in range(len(prompts)) if i not in bad]
        for start in range(0, len(rows), 1024):
            chunk = rows[start : start + 1024]
            for i, length in zip(chunk, prompt_lengths([prompts[i] for i in chunk]), strict=True):
                if length > max_prompt_tokens:
                    bad[i] = f"prompt of {length} tokens, over the limit of {max_prompt_tokens}"
    return bad


def summarize_bad_rows(bad: dict[int, str], total: int, limit: int = 3) -> str:
    """``"3 of 100 rows: empty prompt (2: rows 4, 9), ..."``."""
    by_reason: dict[str, list[int]] = {}
    for i, reason in sorted(bad.items()):
        key = reason.split(" of ")[0] if reason.startswith("prompt of") else reason
        by_reason.setdefault(key, []).append(i)
    parts = []
    for reason, rows in by_reason.items():
        shown = ", ".join(str(i) for i in rows[:limit]) + (", ..." if len(rows) > limit else "")
        example = bad[rows[0]] if reason != bad[rows[0]] else reason
        parts.append(f"{example} ({len(rows)} row{'s' if len(rows) > 1 else ''}: {shown})")
    return f"{len(bad)} of {total} rows: " + "; ".join(parts)


def prompt_token_limit(context: int | None, max_completion_length: int | None) -> int | None:
    """The default ``max_prompt_tokens``: the model's context minus the completion budget, or the context
    alone when completions may fill it (RoPE models extrapolate, but a prompt must fit); None if unknown."""
    if not isinstance(context, int):
        return None
    limit = context - (max_completion_length or 0)
    if limit < 1:
        logger.warning("max_completion_length (%s) is not below the model's max_position_embeddings (%d): prompts "
                       "are checked against the context alone; set max_prompt_tokens to choose",
                       max_completion_length, context)
        return context
    return limit


def drop_bad_rows(
    dataset: Dataset,
    split: str,
    required: dict[str, list[str]],
    prompt_lengths: Callable[[list[Any]], list[int]] | None,
    max_prompt_tokens: int | None,
    policy: str,
) -> tuple[Dataset, int]:
    """Apply ``bad_rows`` (``policy``: skip | error) to one dataset: ``(the rows that can train, rows dropped)``.

    A dataset none of whose rows can train is refused under either policy.
    """
    bad = find_bad_rows(dataset, required, prompt_lengths, max_prompt_tokens)
    if not bad:
        return dataset, 0
    summary = summarize_bad_rows(bad, len(dataset))
    if policy == "error" or len(bad) == len(dataset):
        too_long = any("tokens" in r for r in bad.values())
        hint = " Raise max_prompt_tokens, or shorten those prompts." if too_long else ""
        raise RecipeError(
            f"the {split} dataset has rows that cannot train: {summary}. Fix or remove them, or set "
            f"bad_rows: skip to drop them before training.{hint}"
            if len(bad) < len(dataset) else f"no row of the {split} dataset can train: {summary}.{hint}"
        )
    logger.warning("bad_rows: skip: dropping %s from the %s dataset", summary, split)
    return dataset.select([i for i in range(len(dataset)) if i not in bad]), len(bad)
