"""Evaluation during training: the recipe's ``eval`` section, every ``every`` optimizer steps.

The same code as ``rlvr-entropy evaluate`` (``evaluation.py``) runs on the policy being trained, with HF
``generate`` on the training model (also when rollouts come from vLLM: the engine's weights are TRL's
to sync), through TRL's own context for generation (ZeRO-3 parameters gathered, FSDP2 parameters
summoned, gradient checkpointing off). The prompts are sharded over the processes in fixed batches, each
sampled under a seed fixed by (``eval.seed``, step, batch), and gathered: the figures do not depend on
the number of processes, and the training RNG is never touched, so a resumed run logs the same
figures at the same steps as the uninterrupted one.

Each evaluation adds ``eval/<dataset>/<figure>`` (``pass@1``, ``pass@k'``, ``maj@k``, ``entropy`` and its
quantiles, ``length``, ``truncated``) to the log line of its step, which goes to ``metrics.jsonl`` and
``report_to`` like every other metric; an evaluation step is always a logging step.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from accelerate.utils import gather_object
from transformers import TrainerCallback

from rlvr_entropy.config import EvalDataSpec, EvalSpec, RecipeError
from rlvr_entropy.data import find_bad_rows, load_data, summarize_bad_rows
from rlvr_entropy.evaluation import HFSampler, evaluate_dataset
from rlvr_entropy.tensor_ops import stable_hash

logger = logging.getLogger(__name__)

EVAL_PREFIX = "eval/"


def load_eval_rows(spec: EvalDataSpec, num_prompts: int | None) -> Any:
    """An evaluation dataset's rows (``prompt``, ``answer``): its first ``num_prompts`` (a task draws that many).

    Rows without a prompt or a reference answer cannot be scored: they are dropped with a warning that
    counts them (every row of the dataset missing one is an error).
    """
    if spec.dataset is None and num_prompts is not None:
        spec = dataclasses.replace(spec, num_prompts=num_prompts)
    rows = load_data(spec, purpose="eval")
    if num_prompts is not None and len(rows) > num_prompts:
        rows = rows.select(range(num_prompts))
    bad = find_bad_rows(rows, {"answer": ["evaluation"]}, None, None)
    if bad:
        summary = summarize_bad_rows(bad, len(rows))
        if len(bad) == len(rows):
            raise RecipeError(f"{spec.name}: no row can be evaluated: {summary}")
        logger.warning("%s: skipping %s", spec.name, summary)
        rows = rows.select([i for i in range(len(rows)) if i not in bad])
    return rows


class PeriodicEval(TrainerCallback):
    """Runs the ``eval`` section at its steps; the trainer merges :meth:`pop` into the step's log line.

    The datasets are loaded when this is built, so a bad dataset stops the run before training starts.
    """

    def __init__(self, spec: EvalSpec) -> None:
        self.spec = spec
        self.datasets = [(d.name, load_eval_rows(d, spec.num_prompts)) for d in spec.datasets]
        self.trainer: Any = None
        self._pending: dict[str, float] = {}

    def attach(self, trainer: Any) -> None:
        """Bind to the trainer whose policy is evaluated (its generation context, tokenizer, processes)."""
        self.trainer = trainer

    def due(self, step: int, max_steps: int) -> bool:
        return step > 0 and (step % self.spec.every == 0 or (self.spec.at_end and step == max_steps))

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.trainer is not None and self.due(state.global_step, state.max_steps):
            self._pending = self.evaluate(state.global_step)
            control.should_log = True  # the figures travel on this step's log line
        return control

    def evaluate(self, step: int) -> dict[str, float]:
        """Every dataset's figures for the policy as it is after ``step``: ``{"eval/<name>/<figure>": value}``."""
        trainer, spec, args = self.trainer, self.spec, self.trainer.args
        temperature = spec.temperature if spec.temperature is not None else args.temperature
        max_new_tokens = spec.max_new_tokens or args.max_completion_length
        accelerator = trainer.accelerator
        started = time.perf_counter()
        out: dict[str, float] = {}
        with trainer.policy_for_generation() as model:
            was_training = model.training
            model.eval()
            try:
                sampler = HFSampler(model, trainer.processing_class, temperature, spec.top_p,
                                    chat_template_kwargs=getattr(trainer, "chat_template_kwargs", None))
                for name, rows in self.datasets:
                    report = evaluate_dataset(
                        sampler, rows, name, samples=spec.samples or spec.k, k=spec.k, max_new_tokens=max_new_tokens,
                        batch_size=spec.batch_size, seed=stable_hash((spec.seed, step)),
                        process_index=accelerator.process_index, num_processes=accelerator.num_processes,
                        gather=gather_object,
                    )
                    out.update({f"{EVAL_PREFIX}{name}/{key}": value for key, value in report.figures.items()
                                if key not in ("prompts", "samples")})
            finally:
                model.train(was_training)
        out[f"{EVAL_PREFIX}seconds"] = time.perf_counter() - started
        if accelerator.is_main_process:
            shown = ", ".join(f"{k.removeprefix(EVAL_PREFIX)} {v:.3f}" for k, v in out.items() if "pass@" in k)
            logger.info("evaluation after step %d: %s", step, shown)
        return out

    def pop(self) -> dict[str, float]:
        """The figures of the latest evaluation not yet logged (empty if none)."""
        pending, self._pending = self._pending, {}
        return pending
