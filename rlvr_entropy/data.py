"""Training data: where the prompts come from, and which rows can train.

- :func:`load_data`: a synthetic task of the offline tiny world, a local JSON/JSONL/CSV/Parquet file, or
  a hub dataset (with config and split), with its columns renamed to ``prompt``/``answer`` (nested fields
  flattened), a prompt template applied and, on request, plain prompts wrapped as one user message for the
  model's chat template. Training and evaluation load through it alike.
- :func:`drop_bad_rows`: the ``bad_rows`` policy, run by the trainer before training on every map-style
  dataset it holds. A row cannot train when its prompt is empty, a column a reward function reads is
  missing, or its prompt is longer than ``max_prompt_tokens``; such rows are dropped and counted
  (``skip``) or refused with the list of them (``error``).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from datasets import Dataset, load_dataset

from rlvr_entropy.config import DataSpec, RecipeError, first_line
from rlvr_entropy.tasks import make_dataset

logger = logging.getLogger(__name__)

LOCAL_FORMATS = {"json": "json", "jsonl": "json", "csv": "csv", "parquet": "parquet"}


# ----------------------------------------------------------------------------------------------------------
# Loading

# Named prompt templates: how a row's prompt is presented. {prompt} is the prompt column; any {column} works.
TEMPLATES = {
    "plain": "{prompt}",
    # The instruction the Qwen2.5-Math papers' evaluations use (MATH-500, AIME, AMC): answer in a box.
    "boxed": "{prompt}\nPlease reason step by step, and put your final answer within \\boxed{}.",
    # For models trained to think first: the answer is read after the thinking-end marker (extract_answer).
    "think": "{prompt}\nThink step by step inside <think> </think>, then write only the final answer after </think>.",
    # GSM8K's own answer format, final answer after "####" (PEAR's prompt).
    "gsm8k": "{prompt} Let's think step by step and output the final answer after \"####\".",
}
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][\w.]*)\}")  # {column}; "\\boxed{}" and "{{" are not placeholders


def load_data(spec: DataSpec, purpose: str = "train") -> Dataset:
    """Prompts with ``prompt``/``answer`` columns: a synthetic task, a local file or a hub dataset.

    ``purpose`` ("train" or "eval") picks the default split: a task's ``train``/``eval`` split (disjoint),
    a dataset's ``train``/``test``. Columns are renamed to ``prompt``/``answer`` (nested fields, written
    ``parent.child``, are flattened first); the template, if any, is applied, then the chat wrapping.
    Every problem (a file that does not parse, a missing column, a placeholder without a column) is a
    RecipeError naming the file or field and what to change.
    """
    if spec.dataset is not None:
        dataset = _read_dataset(spec, purpose)
        columns = dataset.column_names
        if any("." in c and c not in columns for c in (spec.prompt_column, spec.answer_column)):
            dataset = dataset.flatten()  # nested fields become "parent.child" columns
            columns = dataset.column_names
        for column, field_name in ((spec.prompt_column, "prompt_column"), (spec.answer_column, "answer_column")):
            if column not in columns and (field_name == "prompt_column" or purpose == "eval"):
                raise RecipeError(
                    f"{spec.dataset}: no column '{column}' (data.{field_name}); its columns are {columns}. "
                    f"Set {field_name} to the column that holds the {field_name.split('_')[0]}s."
                )
        if spec.template is not None:  # before the renaming, so that {column} names the data's own columns
            dataset = apply_template(dataset, spec.template, spec.dataset, spec.prompt_column)
        for old, new in ((spec.prompt_column, "prompt"), (spec.answer_column, "answer")):
            if old != new and old in dataset.column_names:
                if new in dataset.column_names:
                    dataset = dataset.remove_columns(new)
                dataset = dataset.rename_column(old, new)
        if spec.max_rows is not None:
            dataset = dataset.select(range(min(spec.max_rows, len(dataset))))
    elif spec.task is not None:
        split = spec.split or ("eval" if purpose == "eval" else "train")
        try:
            dataset = make_dataset(spec.task, spec.num_prompts, spec.seed, split=split)
        except ValueError as err:
            raise RecipeError(f"data.task: {err}") from err
    else:
        raise RecipeError("data needs either `task` (a synthetic task) or `dataset` (a hub id or local path)")
    if len(dataset) == 0:
        raise RecipeError(f"the {purpose} dataset is empty ({spec.dataset or spec.task})")
    if spec.template is not None and spec.dataset is None:
        dataset = apply_template(dataset, spec.template, spec.task)
    if spec.chat:
        dataset = as_user_messages(dataset)
    return dataset


def _read_dataset(spec: DataSpec, purpose: str) -> Dataset:
    """The raw rows of ``spec.dataset``: a local file (json/jsonl/csv/parquet), else a hub dataset id."""
    from datasets.exceptions import DatasetGenerationError

    path = Path(spec.dataset).expanduser()
    suffix = path.suffix.lstrip(".").lower()
    if path.exists() or suffix in LOCAL_FORMATS or spec.dataset.startswith((".", "/", "~")):
        if not path.is_file():
            raise RecipeError(f"data file not found: {spec.dataset}")
        if suffix not in LOCAL_FORMATS:
            raise RecipeError(f"{spec.dataset}: unknown data file type '.{suffix}'; use one of "
                              f"{', '.join('.' + s for s in LOCAL_FORMATS)}")
        try:
            with _quiet_datasets():  # a file that does not parse gets our one line, not datasets' log and bars
                return load_dataset(LOCAL_FORMATS[suffix], data_files=str(path), split="train")
        except (DatasetGenerationError, ValueError, OSError, UnicodeDecodeError) as err:
            cause = err.__cause__ or err.__context__ or err
            raise RecipeError(f"{spec.dataset}: cannot read it as {suffix.upper()}: {first_line(cause)}") from None
    split = spec.split or ("test" if purpose == "eval" else "train")
    try:
        return load_dataset(spec.dataset, spec.config, split=split)
    except (OSError, ValueError, ConnectionError) as err:  # offline, unknown id, unknown split or config
        raise RecipeError(
            f"dataset '{spec.dataset}' (config {spec.config!r}, split {split!r}) could not be loaded: {first_line(err)}. "
            "A local file needs a .json/.jsonl/.csv/.parquet suffix; a hub dataset needs the hub or its cache"
        ) from None


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No progress bars and no error logging from ``datasets`` while a small local file is read."""
    import datasets
    from datasets.utils import logging as ds_logging

    bars_were_on = not datasets.are_progress_bars_disabled()
    level = ds_logging.get_verbosity()
    datasets.disable_progress_bars()
    ds_logging.set_verbosity(logging.CRITICAL)
    try:
        yield
    finally:
        ds_logging.set_verbosity(level)
        if bars_were_on:
            datasets.enable_progress_bars()


def apply_template(dataset: Dataset, template: str, source: str | None = None, prompt_column: str = "prompt") -> Dataset:
    """Each row's prompt (``prompt_column``) made from ``template``: a name in TEMPLATES, or text with
    ``{column}`` placeholders, where ``{prompt}`` is the prompt column whatever its name.

    Placeholders are replaced by str.replace, not str.format, so the text may hold braces (``\\boxed{}``).
    A template without any placeholder, or one that names no column of the data, is a RecipeError.
    """
    text = TEMPLATES.get(template, template)
    names = sorted(set(_PLACEHOLDER.findall(text)))
    if not names:
        raise RecipeError(f"data.template {template!r} has no placeholder: write {{prompt}} where the prompt goes, "
                          f"or use a named template ({', '.join(TEMPLATES)})")
    columns = {name: prompt_column if name == "prompt" and name not in dataset.column_names else name for name in names}
    missing = [n for n, column in columns.items() if column not in dataset.column_names]
    if missing:
        raise RecipeError(f"data.template: placeholder(s) {', '.join('{' + n + '}' for n in missing)} name no column "
                          f"of {source or 'the data'}; its columns are {dataset.column_names}")
    if not all(isinstance(v, str) for v in dataset[:1][prompt_column]):
        raise RecipeError("data.template applies to plain-text prompts; this dataset's prompts are already messages")

    def fill(row: dict[str, Any]) -> dict[str, Any]:
        out = text
        for name, column in columns.items():
            out = out.replace("{" + name + "}", "" if row[column] is None else str(row[column]))
        return {prompt_column: out}

    return dataset.map(fill)


def as_user_messages(dataset: Dataset) -> Dataset:
    """Plain-text prompts as one-message conversations ``[{"role": "user", "content": ...}]`` (``data.chat``)."""
    if not isinstance(dataset[0]["prompt"], str):
        raise RecipeError("data.chat wraps plain-text prompts; this dataset's prompts are already messages")
    return dataset.map(lambda row: {"prompt": [{"role": "user", "content": row["prompt"]}]})


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
