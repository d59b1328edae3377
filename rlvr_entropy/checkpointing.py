"""Checkpoints that survive a crash and resume exactly: a mixin over HF's ``Trainer`` checkpoint methods.

HF callbacks cannot choose where a checkpoint is written or add to what a resume loads, so this is a
mixin of :class:`EntropyGRPOTrainer` that overrides those methods (``CheckpointMixin`` comes before
TRL's ``GRPOTrainer`` in the trainer's bases). It expects the trainer's ``pipeline`` (the methods) and
``_counters`` (the run totals).

- Exact resume. Beside what HF saves (weights, optimizer, scheduler, RNG states, trainer state), a
  checkpoint holds every method's state, the run totals and TRL's micro-step counter
  (:data:`STATE_FILE`) and, when the save falls inside a generation cycle (``steps_per_generation`` or
  ``num_iterations`` above one optimizer step), each process's buffered generation batch
  (:data:`BUFFER_FILE`), so the resumed run trains on the very completions the uninterrupted run would
  have. The data order of epoch ``e`` is a function of (seed, e) (:class:`EpochRepeatSampler`), so
  resuming in epoch 3 does not replay epoch 0's order.
- Crash-safe checkpoints. A checkpoint is written under ``<output_dir>/.checkpoint-staging/`` and renamed
  to ``checkpoint-<step>`` only once every file (and every process's files) is on disk
  (:func:`publish_checkpoint`); ``save_total_limit`` rotation runs after the rename. A save killed halfway
  leaves the previous checkpoints untouched and no half-written ``checkpoint-<step>`` that
  ``resume_from_checkpoint: last`` (or HF's ``True``) could pick. With ``push_to_hub`` HF's direct write
  is kept: its uploads read the folder after the save returns.
- ``resume_from_checkpoint: last``: the newest complete checkpoint in ``output_dir``, or a fresh start if
  there is none (restart a preempted job with the same command).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Sized
from typing import Any

import torch
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints
from trl.trainer.utils import RepeatSampler

logger = logging.getLogger(__name__)

STATE_FILE = "rlvr_entropy_state.json"
BUFFER_FILE = "rlvr_entropy_buffer_{}.pt"
STAGING_DIR = ".checkpoint-staging"


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
# Files


def _fsync_tree(path: str) -> None:
    """Flush every file under ``path`` and the directories themselves to disk."""
    for root, _, files in os.walk(path):
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


# ----------------------------------------------------------------------------------------------------------
# The mixin


class CheckpointMixin:
    """Staged checkpoints, the run state in every checkpoint, exact resume; see the module docstring."""

    _train_sampler: EpochRepeatSampler | None = None
    _staging_dir: str | None = None

    def _generate_every(self) -> int:
        """Optimizer steps per generation batch: a save at another step falls inside a generation cycle."""
        return self.args.steps_per_generation * self.num_iterations

    def _save_checkpoint(self, model, trial):
        """HF's and TRL's checkpoint plus ours, written under a staging directory and renamed when complete."""
        run_dir = self._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        atomic = not self.args.push_to_hub  # hub uploads read the folder after this returns: keep HF's layout
        staging = os.path.join(run_dir, STAGING_DIR)
        if atomic:
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)  # what a save killed halfway left behind
                os.makedirs(staging, exist_ok=True)
            self.accelerator.wait_for_everyone()
            self._staging_dir = staging
        try:
            super()._save_checkpoint(model, trial)
            folder = os.path.join(self._get_output_dir(trial=trial), name)
            self._save_run_state(folder)
        finally:
            self._staging_dir = None
        if not atomic:
            return
        self.accelerator.wait_for_everyone()  # every process's files (RNG states, buffers) are written
        if self.args.should_save:
            final = os.path.join(run_dir, name)
            best = self.state.best_model_checkpoint
            if best is not None and os.path.abspath(best).startswith(os.path.abspath(staging)):
                self.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(best))
                self.state.save_to_json(os.path.join(folder, TRAINER_STATE_NAME))
            publish_checkpoint(folder, final)
            with contextlib.suppress(OSError):
                os.rmdir(staging)  # empty now
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.accelerator.wait_for_everyone()

    def _get_output_dir(self, trial):
        return self._staging_dir or super()._get_output_dir(trial)

    def _save_run_state(self, folder: str) -> None:
        if self.args.should_save:
            state = {
                "methods": self.pipeline.state_dict(),
                "trainer": {"trl_step": self._step, "counters": dict(self._counters)},
            }
            path = os.path.join(folder, STATE_FILE)
            with open(path + ".tmp", "w") as f:
                json.dump(state, f, indent=2)
            os.replace(path + ".tmp", path)
        if self._buffered_inputs is not None and self._step % self._generate_every() != 0:
            # Saved inside a generation cycle: the rest of the cycle trains on this buffer.
            save_buffer(self._buffered_inputs, folder, self.accelerator.process_index)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, STATE_FILE)
        if os.path.exists(path):
            with open(path) as f:
                saved = json.load(f)
            self.pipeline.load_state_dict(saved["methods"])
            trainer_state = saved.get("trainer", {})
            self._step = int(trainer_state.get("trl_step", self._step))
            counters = trainer_state.get("counters", {})
            self._counters.update({k: v for k, v in counters.items() if k != "data/skipped_rows"})  # rows: this run's
        elif any(m.state for m in self.pipeline.methods):
            raise FileNotFoundError(f"{path} is missing: cannot restore the methods' adaptive state")
        if self._train_sampler is not None:
            self._train_sampler.set_epoch(int(self.state.epoch or 0))
        if self._step % self._generate_every() != 0:
            self._buffered_inputs = load_buffer(checkpoint, self.accelerator.process_index, self.accelerator.device)
            if self._buffered_inputs is None:
                logger.warning(
                    "%s was saved inside a generation cycle but holds no buffered batch for process %d (another number "
                    "of processes, or an older checkpoint): the resumed run regenerates, so it will not repeat the "
                    "uninterrupted run exactly", checkpoint, self.accelerator.process_index,
                )

    def _get_train_sampler(self, dataset=None):
        sampler = super()._get_train_sampler(dataset)
        if type(sampler) is RepeatSampler:  # same arguments, but the shuffle of epoch e depends on (seed, e) only
            epoch_sampler = EpochRepeatSampler.__new__(EpochRepeatSampler)
            epoch_sampler.__dict__.update(sampler.__dict__)
            epoch_sampler.epoch = 0
            sampler = self._train_sampler = epoch_sampler
        return sampler

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """HF's ``train``; ``resume_from_checkpoint="last"`` resumes from the newest complete checkpoint in
        ``output_dir`` if there is one and starts afresh otherwise (for jobs that are simply restarted)."""
        if resume_from_checkpoint == "last":
            output_dir = self.args.output_dir
            resume_from_checkpoint = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
            logger.info("resume_from_checkpoint: last -> %s", resume_from_checkpoint or "none yet, starting afresh")
        return super().train(resume_from_checkpoint, *args, **kwargs)
