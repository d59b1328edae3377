"""Helpers for runs that last days: exact resume, crash-safe checkpoints, counters, bad-row checks.

What the trainer guarantees and where it is done (see the README section "Reliability"):

- Exact resume. A checkpoint holds, besides what HF's Trainer saves (weights, optimizer, scheduler,
  RNG states, trainer state): every method's state, the trainer's counters, TRL's micro-step counter and,
  when the save falls inside a generation cycle (``steps_per_generation`` or ``num_iterations`` above one
  optimizer step), this process's buffered generation batch (``rlvr_entropy_buffer_<process>.pt``), so
  the resumed run trains on the very completions the uninterrupted run would have. The data order of
  later epochs is a function of (seed, epoch) (:class:`EpochRepeatSampler`), so resuming in epoch 3 does
  not replay epoch 0's order.
- Crash-safe checkpoints. A checkpoint is written under ``<output_dir>/.checkpoint-staging/`` and renamed
  to ``checkpoint-<step>`` only once every file (and every process's files) is on disk
  (:func:`publish_checkpoint`); ``save_total_limit`` rotation runs after the rename. A save killed halfway
  leaves the previous checkpoints untouched and no half-written ``checkpoint-<step>`` that
  ``resume_from_checkpoint: last`` (or HF's ``True``) could pick.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sized
from typing import Any

import torch
from trl.trainer.utils import RepeatSampler

logger = logging.getLogger(__name__)

STAGING_DIR = ".checkpoint-staging"
BUFFER_FILE = "rlvr_entropy_buffer_{}.pt"


# ----------------------------------------------------------------------------------------------------------
# Data order


class EpochRepeatSampler(RepeatSampler):
    """TRL's ``RepeatSampler`` whose shuffle for epoch ``e`` depends only on (seed, e).

    TRL's sampler draws each epoch's permutation from one generator that lives as long as the sampler,
    so a run resumed in epoch ``e`` (a new sampler) replays epoch 0's order. Here epoch ``e`` draws the
    ``e``-th permutation of a generator seeded with ``seed``: the same sequence as TRL's for a run that
    never stops, and the right one after a resume (the trainer sets ``epoch`` from the checkpoint;
    ``set_epoch`` does the same when the data loader forwards it).
    """

    def __init__(self, data_source: Sized, *args: Any, **kwargs: Any) -> None:
        super().__init__(data_source, *args, **kwargs)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            self.generator = torch.Generator()
            if self.seed is not None:
                self.generator.manual_seed(self.seed)
            for _ in range(self.epoch):  # burn the permutations of the earlier epochs
                torch.randperm(self.num_samples, generator=self.generator)
        self.epoch += 1
        return super().__iter__()


# ----------------------------------------------------------------------------------------------------------
# Crash-safe checkpoints


def _fsync_tree(path: str) -> None:
    """Flush every file under ``path`` and the directories themselves to disk."""
    for root, dirs, files in os.walk(path):
        for name in files:
            try:
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(root)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems do not support fsync on directories
    finally:
        os.close(fd)


def publish_checkpoint(staged: str, final: str) -> None:
    """Make the fully written checkpoint directory ``staged`` appear as ``final`` in one rename.

    If ``final`` exists (a run resumed from an older checkpoint reaches the same step again), it is moved
    aside first and deleted after the rename; a crash in between leaves the older checkpoints intact.
    """
    _fsync_tree(staged)
    parent = os.path.dirname(final)
    old = None
    if os.path.exists(final):
        old = os.path.join(os.path.dirname(staged), os.path.basename(final) + ".replaced")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(staged, final)
    _fsync_dir(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_buffer(buffer: list[dict[str, Any]] | None, folder: str, process_index: int) -> None:
    path = os.path.join(folder, BUFFER_FILE.format(process_index))
    torch.save([{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in buffer or []], path)


def load_buffer(folder: str, process_index: int, device: torch.device) -> list[dict[str, Any]] | None:
    path = os.path.join(folder, BUFFER_FILE.format(process_index))
    if not os.path.exists(path):
        return None
    batches = torch.load(path, map_location="cpu", weights_only=True)
    return [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in batches]


def truncate_metrics(path: str, step: int) -> int:
    """Drop the lines of a ``metrics.jsonl`` logged after ``step`` (by a run that died after its last
    checkpoint), so a run resumed in the same directory logs each step once. Returns the lines dropped."""
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line).get("step", 0) > step:
                continue
        except json.JSONDecodeError:
            continue  # a line cut by the crash
        kept.append(line)
    if len(kept) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)
    return len(lines) - len(kept)


# ----------------------------------------------------------------------------------------------------------
# Bad dataset rows


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
