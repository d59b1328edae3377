"""EntropyGRPOTrainer: TRL's GRPOTrainer with a pipeline of composable entropy-control methods.

Hook order: the only place it is defined
----------------------------------------
Per generation batch, inside TRL's ``_generate_and_score_completions``:

0. configure   (once, when the config is built) methods may set TRL fields, e.g. to expose TRL's
               own entropy bonus or high-entropy token mask instead of re-implementing them.
1. rollout     ``_generate_single_turn``: method rollout hooks wrap generation, first listed method
               outermost; they may regenerate rows at other temperatures.
2. statistics  the union of the methods' ``needs`` (rollout token entropy, sampled-token log-probs,
               decoded answers, thinking-phase boundaries), computed once for the batch: read from
               HF generate's own forward calls, from vLLM's top-k log-probs, or from one no-grad
               forward (reusing TRL's old-logp pass when it runs). See ``rollout_stats.py`` and
               ``vllm_backend.py``.
3. reward      ``_calculate_rewards``: after TRL has scored and gathered the user reward functions,
               reward hooks reshape the scalar reward of every sample on every process, in list
               order; each method's change becomes one extra reward column named after it, which
               TRL sums with weight 1 and logs as ``rewards/<method>/mean``.
4. advantage   after TRL computed its group advantages: the advantages of all processes are
               gathered, advantage hooks rescale or replace them (per sample or per token) in list
               order, and each process keeps its slice, exactly as TRL slices its own.

Per loss micro-batch, inside TRL's ``_compute_loss``:

5. token level right after TRL's single training forward, token hooks return per-token weights
               (folded into the (B, T) advantages TRL reads next), detach masks (applied to the
               log-probs TRL receives) and extra per-token terms (aggregated with the loss_type's
               normaliser in ``losses.py`` and added to TRL's loss).

Throughout:

0. guards      reward functions run in a sandbox with a time limit (``sandbox.py``); a NaN/inf from a
               method's hook, TRL's loss or the gradients skips the optimizer step(s) that would use it on
               every process together, restoring the methods' state (``on_nonfinite``); bad dataset rows
               are dropped or rejected before training (``bad_rows``).

6. state       each method's JSON state is saved in every checkpoint (``rlvr_entropy_state.json``)
               and restored on resume, with the trainer's counters, TRL's micro-step counter and, for a
               save inside a generation cycle, the buffered generation batch: a resumed run repeats the
               uninterrupted one exactly. Checkpoints are staged and renamed once complete
               (``reliability.py``).
7. metrics     methods log ``<method>/<stat>``; rollout-phase statistics are global already, loss-phase
               ones are reduced across processes. Rollout and training-pass entropy (mean, p10, p50,
               p90 over valid tokens of all processes) and the covariance Cov(log pi, A) that drives
               entropy change are logged beside TRL's metrics, and every log line is appended to
               ``<output_dir>/metrics.jsonl``.

With no method listed every override reduces to TRL's behaviour (tested for every loss type).
Nothing here copies ``_compute_loss``: weights, detach and extra terms reach it through the override
points listed above.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.utils import broadcast_object_list, gather_object
from torch import Tensor
from transformers import TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints
from trl import GRPOTrainer
from trl.data_utils import is_conversational
from trl.trainer.utils import RepeatSampler

from rlvr_entropy.config import EntropyGRPOConfig, RecipeError
from rlvr_entropy.losses import aggregate
from rlvr_entropy.methods.base import LossBatch, MethodConfigError, Rollout, RolloutBatch, RolloutContext, _stable_hash
from rlvr_entropy.methods.pipeline import NonFiniteError, Pipeline
from rlvr_entropy.reliability import (
    STAGING_DIR,
    EpochRepeatSampler,
    find_bad_rows,
    load_buffer,
    publish_checkpoint,
    save_buffer,
    summarize_bad_rows,
    truncate_metrics,
)
from rlvr_entropy.registry import Registry
from rlvr_entropy.rollout_stats import GenerationRecorder, find_marker, masked_quantiles, pad_rows
from rlvr_entropy.sandbox import SandboxedReward, SandboxStats, sandboxed
from rlvr_entropy.tensor_ops import masked_mean, per_token
from rlvr_entropy.vllm_backend import (
    TopKTap,
    cpu_kv_cache_default,
    engine_max_logprobs,
    engine_overrides,
    install_cpu_weight_sync,
    server_problem,
    vllm_platform_is_cpu,
)

logger = logging.getLogger(__name__)

STATE_FILE = "rlvr_entropy_state.json"
GUARD_KEY = "guard/nonfinite"  # 0-d tensor in a generation batch whose methods produced NaN/inf: skip its steps
CARRY_PREFIX = "carry/"  # output-dict keys holding tensors a method passes from its advantage hook to its loss hook
QUANTILES = (0.1, 0.5, 0.9)


@dataclass
class _LossCall:
    """Scratch space shared by ``_compute_loss`` and the forward it triggers (one micro-batch)."""

    model: torch.nn.Module
    inputs: dict[str, Any]
    forward_done: bool = False
    entropies: Tensor | None = None
    logps: Tensor | None = None
    extra: Tensor | None = None
    metrics: dict[str, tuple[Tensor, str]] = field(default_factory=dict)


@dataclass
class _Generation:
    """What the current generation batch produced on this process, kept until its advantages are final."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    tool_mask: list[list[int]] | None
    completions: list[Any]
    rollout: Rollout | None
    forward_stats: dict[str, Tensor] = field(default_factory=dict)  # (B, T) from a no-grad forward
    batch: RolloutBatch | None = None


class MetricsJsonlCallback(TrainerCallback):
    """Appends each log line, with its step, to ``<output_dir>/metrics.jsonl`` (main process only)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero and state.global_step > 0:  # resumed: forget what came after the checkpoint
            truncate_metrics(self.path, state.global_step)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step}
        for key, value in logs.items():
            if isinstance(value, float) and not math.isfinite(value):
                value = None  # JSON has no NaN; None keeps the line parseable everywhere
            record[key] = value
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


class EntropyGRPOTrainer(GRPOTrainer):
    """GRPO with entropy-control methods; see the module docstring for the hook order."""

    def __init__(self, model: Any, reward_funcs: Any, args: EntropyGRPOConfig | None = None, **kwargs: Any) -> None:
        if args is None:
            args = EntropyGRPOConfig(output_dir="trainer_output")
        if not isinstance(args, EntropyGRPOConfig):
            raise TypeError("EntropyGRPOTrainer needs an EntropyGRPOConfig (a GRPOConfig with `methods`)")
        self.pipeline = Pipeline.from_config(args.methods)
        # The pipeline records NaN/inf outputs; the trainer skips or raises (on every process together).
        self.pipeline.on_nonfinite = "skip"
        with self._vllm_engine_overrides(args):
            super().__init__(model=model, reward_funcs=reward_funcs, args=args, **kwargs)

        self._num_user_rewards = len(self.reward_funcs)
        reward_methods = [m.name for m in self.pipeline.methods if "reward" in m.hooks()]
        clash = sorted(set(reward_methods) & set(self.reward_func_names))
        if clash:
            raise ValueError(f"reward function names clash with method names: {clash}")
        for method in self.pipeline.methods:
            missing = [n for n in method.reward_inputs() if n not in self.reward_func_names]
            if missing:
                raise MethodConfigError(
                    f"method '{method.name}' reads reward function {missing[0]!r}, which this run does not have "
                    f"(reward functions: {', '.join(self.reward_func_names)}); set {method.name}.correct_from "
                    "or add the reward function"
                )
        # Method reward columns are summed by TRL like any reward function, with weight 1.
        self.reward_func_names = [*self.reward_func_names, *reward_methods]
        self.reward_weights = torch.cat([self.reward_weights, torch.ones(len(reward_methods))])

        self._stats_source = self._resolve_stats_source(args)
        self._needs = set(self.pipeline.needs)
        if args.log_rollout_entropy and self._stats_source in ("generate", "vllm"):
            self._needs.add("entropy")  # free: read from generation's own forward calls, or vLLM's log-probs
        self._vllm_topk = self._stats_source == "vllm" and bool(self._needs & {"entropy", "logps"})
        # The estimate is worth comparing with the training pass's exact entropy: carry it into the loss.
        self._log_gap = self._vllm_topk and "entropy" in self._needs and args.log_rollout_entropy
        if self._vllm_topk:
            topk = args.vllm_entropy_topk
            if topk == -1 and self.vllm_mode == "server":
                # The server's OpenAI endpoint answers logprobs=-1 with the sampled token alone (measured):
                # ask for the whole vocabulary by its size instead.
                topk = int(self.accelerator.unwrap_model(self.model).config.vocab_size)
            self.vllm_generation.logprobs = topk  # TRL asks for 0 (the sampled token only)
            if self.vllm_mode == "server":
                problem = [server_problem(self.vllm_generation, topk, self.temperature)]
                broadcast_object_list(problem, from_process=0)  # only the main process asks the server
                if problem[0] is not None:
                    raise ValueError(problem[0])
        if self.use_vllm and self._vllm_on_cpu:
            install_cpu_weight_sync(self.vllm_generation)
        if self.pipeline.uses("rollout") and (self.rollout_func is not None or self.tools):
            raise ValueError(
                f"methods {self.pipeline.names} change sampling, which needs TRL's own generation: "
                "it cannot be combined with `rollout_func` or tool calling"
            )
        self._answer_fn: Callable[[str], str | None] | None = None
        if "answers" in self._needs:
            self._answer_fn = Registry("answer extractor").get(args.answer_extractor)
        self._marker_ids: list[int] = []
        if "phases" in self._needs:
            self._marker_ids = self._encode_marker(args.think_marker)

        self._generation: _Generation | None = None
        self._rollout_inputs: list[dict[str, Any]] | None = None
        self._loss_call: _LossCall | None = None
        self._capture_old_pass = False
        self._micro_step = 0
        self._micro_step_of = -1
        # Reliability: run-long counters (logged every step, checkpointed), the reward sandbox, the guard window.
        self._counters: dict[str, int] = {"reward/errors": 0, "reward/timeouts": 0, "guard/skipped_steps": 0}
        self._counters["data/skipped_rows"] = self._drop_bad_rows(args)
        self._reward_stats = SandboxStats()
        self.reward_funcs = [
            f if isinstance(f, torch.nn.Module)
            else sandboxed(f, args.reward_timeout, args.reward_sandbox, self._reward_stats)
            for f in self.reward_funcs
        ]
        self._window_open = False
        self._window_flags: list[str] = []
        self._window_counts: dict[str, int] = {}
        self._window_snapshot: tuple[Any, ...] | None = None
        self._train_sampler: EpochRepeatSampler | None = None
        self._staging_dir: str | None = None
        if args.metrics_jsonl:
            self.add_callback(MetricsJsonlCallback(os.path.join(args.output_dir, "metrics.jsonl")))

    # ------------------------------------------------------------------------------------------------------
    # setup helpers

    @contextlib.contextmanager
    def _vllm_engine_overrides(self, args: EntropyGRPOConfig) -> Iterator[None]:
        """Around TRL's ``__init__``: the vLLM engine settings it does not pass (see ``vllm_backend.py``)."""
        self._vllm_on_cpu = False
        if not args.use_vllm:
            yield
            return
        self._vllm_on_cpu = vllm_platform_is_cpu()
        if self._vllm_on_cpu and args.vllm_mode == "colocate":
            cpu_kv_cache_default()
        topk = args.rollout_stats_source in ("auto", "vllm")
        cpu_trainer = args.use_cpu or not torch.cuda.is_available()
        with engine_overrides(
            max_logprobs=engine_max_logprobs(args.vllm_entropy_topk) if topk else None,
            cpu_dtype=("bfloat16" if args.bf16 else "float32") if self._vllm_on_cpu else None,
            skip_communicator=args.vllm_mode == "server" and cpu_trainer,
        ):
            yield

    def _resolve_stats_source(self, args: EntropyGRPOConfig) -> str:
        hf_generate = not (
            self.use_vllm or self.use_transformers_continuous_batching or self.rollout_func is not None or self.tools
        )
        vllm = self.use_vllm and self.rollout_func is None and not self.tools
        if args.rollout_stats_source == "generate" and not hf_generate:
            raise ValueError(
                "rollout_stats_source='generate' needs plain HF generation (no vLLM, continuous batching, "
                "rollout_func or tools); use 'forward' or 'auto'"
            )
        if args.rollout_stats_source == "vllm" and not vllm:
            raise ValueError(
                "rollout_stats_source='vllm' needs use_vllm (without rollout_func or tools); use 'forward' or 'auto'"
            )
        if args.rollout_stats_source == "auto":
            return "generate" if hf_generate else "vllm" if vllm else "forward"
        return args.rollout_stats_source

    def _encode_marker(self, marker: str) -> list[int]:
        """The thinking-end marker's token ids; stop with what to change if this tokenizer cannot encode it."""
        users = ", ".join(m.name for m in self.pipeline.methods if "phases" in m.needs) or "the phases statistic"
        ids = self._tokenizer.encode(marker, add_special_tokens=False)
        unk = self._tokenizer.unk_token_id
        decoded = self._tokenizer.decode(ids) if ids else ""
        if not ids or (unk is not None and unk in ids) or "".join(decoded.split()) != "".join(marker.split()):
            shown = "encodes to no tokens" if not ids else f"encodes to {ids}, which decodes to {decoded!r}"
            raise MethodConfigError(
                f"think_marker {marker!r} {shown} with this tokenizer, so {users} cannot find where thinking ends. "
                "Set think_marker to the text the model writes at the end of its thinking, made of characters the "
                "tokenizer knows (e.g. '</think>')"
            )
        return ids

    def _drop_bad_rows(self, args: EntropyGRPOConfig) -> int:
        """Check every row of the (map-style) train and eval datasets before training; see ``bad_rows``."""
        from datasets import Dataset

        from rlvr_entropy.runner import required_columns

        required: dict[str, list[str]] = {}
        for func, name in zip(self.reward_funcs, self.reward_func_names, strict=False):
            if not isinstance(func, torch.nn.Module):
                for column in sorted(required_columns(func)):
                    required.setdefault(column, []).append(name)
        limit = args.max_prompt_tokens
        if limit is None:
            config = getattr(self.accelerator.unwrap_model(self.model), "config", None)
            context = getattr(config, "max_position_embeddings", None)
            if isinstance(context, int):
                limit = context - (self.max_completion_length or 0)
                if limit < 1:  # completions alone may exceed the context (RoPE models extrapolate): prompts must fit
                    logger.warning("max_completion_length (%s) is not below the model's max_position_embeddings (%d): "
                                   "prompts are checked against the context alone; set max_prompt_tokens to choose",
                                   self.max_completion_length, context)
                    limit = context
        text_only = not getattr(self, "_is_vlm", False) and getattr(self, "environment_factories", None) is None
        lengths = (lambda prompts: [len(ids) for ids in self._tokenize_prompts(prompts)[0]]) if text_only else None
        dropped = 0
        for split in ("train", "eval"):
            dataset = getattr(self, f"{split}_dataset")
            if not isinstance(dataset, Dataset) or "prompt" not in dataset.column_names or len(dataset) == 0:
                continue
            bad = find_bad_rows(dataset, required, lengths, limit)
            if not bad:
                continue
            summary = summarize_bad_rows(bad, len(dataset))
            if args.bad_rows == "error" or len(bad) == len(dataset):
                too_long = any("tokens" in r for r in bad.values())
                hint = " Raise max_prompt_tokens, or shorten those prompts." if too_long else ""
                raise RecipeError(
                    f"the {split} dataset has rows that cannot train: {summary}. Fix or remove them, or set "
                    f"bad_rows: skip to drop them before training.{hint}"
                    if len(bad) < len(dataset) else f"no row of the {split} dataset can train: {summary}.{hint}"
                )
            logger.warning("bad_rows: skip: dropping %s from the %s dataset", summary, split)
            setattr(self, f"{split}_dataset", dataset.select([i for i in range(len(dataset)) if i not in bad]))
            dropped += len(bad)
        return dropped

    def _mode(self) -> str:
        return "train" if self.model.training else "eval"

    def _group_size(self) -> int:
        return self.num_generations if self.model.training else self.num_generations_eval

    def _gather_padded(self, tensor: Tensor) -> Tensor:
        """Pad dim 1 to the longest across processes, then concatenate along dim 0."""
        if self.accelerator.num_processes == 1:
            return tensor
        return self.accelerator.gather(self.accelerator.pad_across_processes(tensor, dim=1, pad_index=0))

    def _process_slice(self, local_rows: int) -> slice:
        start = self.accelerator.process_index * local_rows
        return slice(start, start + local_rows)

    # ------------------------------------------------------------------------------------------------------
    # 1-2. rollout and its statistics

    def _generate(self, prompts: list) -> tuple:
        self._generation = None
        self._pending_rollout: Rollout | None = None
        out = super()._generate(prompts)
        prompt_ids, completion_ids, tool_mask, completions = out[0], out[1], out[2], out[3]
        self._generation = _Generation(prompt_ids, completion_ids, tool_mask, completions, self._pending_rollout)
        return out

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        record = self._stats_source == "generate" and bool(self._needs & {"entropy", "logps"})

        def generate(rows: list[int] | None = None, temperature: float | None = None) -> Rollout:
            if rows is not None and (images is not None or multimodal_fields or self.use_vllm):
                raise ValueError("regenerating a subset of rows is supported for text-only HF generation only")
            ids = prompt_ids if rows is None else [prompt_ids[i] for i in rows]
            with (
                self._sampling_temperature(temperature),
                self._recorder(record) as recorder,
                self._vllm_tap(self._vllm_topk) as tap,
            ):
                completion_ids, logprobs = GRPOTrainer._generate_single_turn(
                    self, ids, images, multimodal_fields, num_generations, has_tool_images
                )
            stats = recorder.rows(completion_ids, self._tokenizer.pad_token_id) if recorder else {}
            if tap is not None:
                stats = {k: v for k, v in tap.stats.items() if k in self._needs}
            return Rollout(completion_ids, logprobs, stats)

        if self.pipeline.uses("rollout"):
            training = self.model.training
            ctx = RolloutContext(
                prompt_ids=prompt_ids,
                group_size=self._group_size(),
                temperature=self.temperature,
                step=self.state.global_step,
                training=training,
                process_index=self.accelerator.process_index,
                num_processes=self.accelerator.num_processes,
                score=self._score_rows,
                generator=torch.Generator().manual_seed(
                    _stable_hash((self.args.seed, self.state.global_step, self.accelerator.process_index, training))
                ),
            )
            rollout = self.pipeline.rollout(ctx, generate)
            self._log_global(ctx.metrics)
        else:
            rollout = generate(None, None)
        self._pending_rollout = rollout
        return rollout.completion_ids, rollout.logprobs

    def _score_rows(self, rows: list[int], rollout: Rollout) -> Tensor:
        """The user reward functions on extra completions for some rows of the batch being generated.

        Goes through ``_calculate_rewards`` (TRL's reward calling, gathered across processes) and
        returns this process's part: the weighted sum per row, NaN where no function scored it.
        """
        inputs = self._rollout_inputs
        if inputs is None:
            raise RuntimeError("scoring inside a rollout hook is only possible during _generate_and_score_completions")
        rows_inputs = [inputs[i] for i in rows]
        prompts = [x["prompt"] for x in rows_inputs]
        texts = self.processing_class.batch_decode(rollout.completion_ids, skip_special_tokens=True)
        if is_conversational({"prompt": prompts[0]}):
            completions: list[Any] = [[{"role": "assistant", "content": t}] for t in texts]
        else:
            completions = texts
        rewards_per_func = self._calculate_rewards(rows_inputs, prompts, completions, rollout.completion_ids)
        mine = rewards_per_func[self._process_slice(len(rows)), : self._num_user_rewards].float()  # (R, K)
        weights = self.reward_weights[: self._num_user_rewards].to(mine.device).float()
        total = (mine * weights).nansum(dim=1)
        return total.masked_fill(torch.isnan(mine).all(dim=1), float("nan"))

    @contextlib.contextmanager
    def _sampling_temperature(self, temperature: float | None) -> Iterator[None]:
        """Temporarily sample at another temperature (training log-probs stay at the configured one)."""
        if temperature is None or temperature == self.temperature:
            yield
            return
        if self.use_vllm:
            saved = self.vllm_generation.temperature
            self.vllm_generation.temperature = temperature
            try:
                yield
            finally:
                self.vllm_generation.temperature = saved
            return
        saved_config, saved_kwargs = self.generation_config.temperature, self.generation_kwargs.get("temperature")
        self.generation_config.temperature = temperature
        self.generation_kwargs["temperature"] = temperature
        try:
            yield
        finally:
            self.generation_config.temperature = saved_config
            self.generation_kwargs["temperature"] = saved_kwargs

    @contextlib.contextmanager
    def _recorder(self, enabled: bool) -> Iterator[GenerationRecorder | None]:
        if not enabled:
            yield None
            return
        model = self.accelerator.unwrap_model(self.model)
        if hasattr(model, "get_base_model"):  # PEFT: hook the causal LM that produces the logits
            model = model.get_base_model()
        with GenerationRecorder(model, self.temperature, logps="logps" in self._needs) as recorder:
            yield recorder

    @contextlib.contextmanager
    def _vllm_tap(self, enabled: bool) -> Iterator[TopKTap | None]:
        """For one generate call: read vLLM's top-k log-probs into rollout statistics (``vllm_backend.TopKTap``)."""
        if not enabled:
            yield None
            return
        generation = self.vllm_generation
        # vLLM's processed log-probs are at the sampling temperature; the statistics must describe the
        # training temperature, so a rollout hook sampling hotter or colder gets the forward pass instead.
        tap = TopKTap(generation.generate, consistent=generation.temperature == self.temperature)
        generation.generate = tap
        try:
            yield tap
        finally:
            del generation.generate  # the instance attribute: the class's method shows through again

    def _old_logps_computed(self) -> bool:
        """Mirror of TRL's condition for running the no-grad old-logp forward in this generation batch."""
        generate_every = self.args.steps_per_generation * self.num_iterations
        return self.args.gradient_accumulation_steps % generate_every != 0 or (
            self.use_vllm and self.vllm_importance_sampling_correction
        )

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        call = self._loss_call
        if call is not None and not call.forward_done and model is call.model:
            # 5. The training forward of this loss micro-batch: the one place with current log-probs.
            kwargs["compute_entropy"] = True
            logps, entropies, aux = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
            call.forward_done = True
            call.entropies = entropies.detach()
            call.logps = logps.detach()
            if self.pipeline.uses("token_loss"):
                logps = self._apply_token_hooks(call, logps, entropies)
            return logps, entropies, aux
        if self._capture_old_pass and model is self.model and not torch.is_grad_enabled():
            # TRL's old-logp pass for this generation batch: ask it for entropies too, and keep them.
            self._capture_old_pass = False
            wanted_entropy = kwargs.get("compute_entropy", False)
            kwargs["compute_entropy"] = True
            logps, entropies, aux = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
            if self._generation is not None:
                self._generation.forward_stats = {"entropy": entropies.float(), "logps": logps.float()}
            return logps, (entropies if wanted_entropy else None), aux
        return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)

    def _forward_stats(self, gen: _Generation) -> dict[str, Tensor]:
        """Rollout entropy and log-probs from one no-grad forward over this process's batch, (B, T) each."""
        if gen.forward_stats:
            return gen.forward_stats
        device = self.accelerator.device
        pad = self._tokenizer.pad_token_id
        prompts = [torch.tensor(p) for p in gen.prompt_ids]
        completions = [torch.tensor(c) for c in gen.completion_ids]
        p_len = max(len(p) for p in prompts)
        c_len = max(1, max(len(c) for c in completions))
        ids = torch.full((len(prompts), p_len + c_len), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):  # left-pad prompts, right-pad completions
            ids[i, p_len - len(p) : p_len] = p
            attn[i, p_len - len(p) : p_len + len(c)] = 1
            ids[i, p_len : p_len + len(c)] = c
        batch_size = self.args.per_device_train_batch_size if self.model.training else self.args.per_device_eval_batch_size
        with torch.no_grad():
            logps, entropies, _ = GRPOTrainer._get_per_token_logps_and_entropies(
                self, self.model, ids.to(device), attn.to(device), c_len, batch_size=batch_size, compute_entropy=True
            )
        gen.forward_stats = {"entropy": entropies.float(), "logps": logps.float()}
        return gen.forward_stats

    def _token_stats_wanted(self, gen: _Generation) -> set[str]:
        wanted = self._needs & {"entropy", "logps"}
        if self.args.log_rollout_entropy and gen.forward_stats:
            wanted.add("entropy")  # TRL's old-logp pass ran anyway: logging it is free
        return wanted

    def _local_stats(self, gen: _Generation, width: int, wanted: set[str]) -> dict[str, Tensor]:
        """This process's token statistics as (B, width) float32 tensors on the device."""
        if not wanted:
            return {}
        device = self.accelerator.device
        if gen.rollout is not None and gen.rollout.stats:
            return {k: pad_rows(gen.rollout.stats[k], width).to(device) for k in wanted}
        stats = self._forward_stats(gen)
        out = {}
        for k in wanted:
            t = stats[k][:, :width]
            out[k] = torch.nn.functional.pad(t, (0, width - t.size(1))).to(device)
        return out

    # ------------------------------------------------------------------------------------------------------
    # 3. reward

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        names = self.reward_func_names
        self.reward_func_names = names[: self._num_user_rewards]  # TRL zips names with its reward funcs
        try:
            rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        finally:
            self.reward_func_names = names
        self._count_reward_failures()
        gen = self._generation
        if gen is None:
            return rewards_per_func
        gen.batch = self._rollout_batch(gen, rewards_per_func)
        if gen.batch is None or not self.pipeline.uses("reward"):
            return rewards_per_func
        columns = self.pipeline.reward(gen.batch)
        extra = torch.stack([columns[n] for n in names[self._num_user_rewards :]], dim=1)  # (N, n_methods)
        return torch.cat([rewards_per_func, extra.to(rewards_per_func)], dim=1)

    def _rollout_batch(self, gen: _Generation, rewards_per_func: Tensor) -> RolloutBatch | None:
        """Gather what the reward and advantage hooks need from every process (only what is needed)."""
        wanted = self._token_stats_wanted(gen)
        if not (self.pipeline.uses("reward") or self.pipeline.uses("advantage") or self.pipeline.needs or wanted):
            return None
        device = self.accelerator.device
        lengths = [len(c) for c in gen.completion_ids]
        width = max(1, max(lengths))
        mask = (torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).float()  # (B, T)
        if gen.tool_mask is not None:
            mask = mask * pad_rows([torch.tensor(m) for m in gen.tool_mask], width)
        ids = torch.full((len(lengths), width), self._tokenizer.pad_token_id, dtype=torch.long)
        for i, c in enumerate(gen.completion_ids):  # one copy per row
            ids[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        mask, ids = mask.to(device), ids.to(device)
        stats = self._local_stats(gen, width, wanted)

        local_rows = len(lengths)
        group_size = self._group_size()
        batch = RolloutBatch(
            rewards_per_func=rewards_per_func[:, : self._num_user_rewards].float(),
            reward_names=self.reward_func_names[: self._num_user_rewards],
            reward_weights=self.reward_weights[: self._num_user_rewards].to(device).float(),
            group_ids=torch.arange(rewards_per_func.size(0), device=device) // group_size,
            group_size=group_size,
            mask=self._gather_padded(mask),
            completion_ids=self._gather_padded(ids),
            step=self.state.global_step,
            training=self.model.training,
            seed=self.args.seed,
            entropy=self._gather_padded(stats["entropy"]) if "entropy" in stats else None,
            logps=self._gather_padded(stats["logps"]) if "logps" in stats else None,
            scale_rewards=self.scale_rewards,
            encode=lambda text: self._tokenizer.encode(text, add_special_tokens=False),
        )
        if gen.rollout is not None:
            for name, values in gen.rollout.tags.items():  # (B,) each -> (N,)
                batch.tags[name] = self.accelerator.gather(values.to(device))
        if batch.mask.size(0) != rewards_per_func.size(0) or rewards_per_func.size(0) != local_rows * self.accelerator.num_processes:
            raise RuntimeError("rollout batch rows do not line up with the gathered rewards")
        if "answers" in self._needs:
            texts = [c if isinstance(c, str) else c[-1]["content"] for c in gen.completions]
            batch.completions = gather_object(texts)
            batch.answers = gather_object([self._answer_fn(t) for t in texts])  # type: ignore[misc]
        if "phases" in self._needs:
            batch.phases = self._gather_padded(find_marker(ids, mask, self._marker_ids).unsqueeze(1)).squeeze(1)
            batch.marker_length = len(self._marker_ids)
        if batch.entropy is not None:
            self._log_entropy("rollout_entropy", batch.entropy, batch.mask, gathered=True)
        return batch

    # ------------------------------------------------------------------------------------------------------
    # 4. advantage (and handing rollout statistics to the loss)

    def _generate_and_score_completions(self, inputs):
        wants_tokens = bool(self.pipeline.needs & {"entropy", "logps"}) or self.args.log_rollout_entropy
        self._capture_old_pass = self._stats_source == "forward" and wants_tokens and self._old_logps_computed()
        try:
            self._rollout_inputs = inputs  # for rollout hooks that score extra samples (_score_rows)
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._capture_old_pass = False
            self._rollout_inputs = None
        gen, self._generation = self._generation, None
        local_rows, width = output["completion_ids"].shape
        device = output["completion_ids"].device
        start = self.accelerator.process_index * local_rows
        output["group_ids"] = (torch.arange(start, start + local_rows, device=device) // self._group_size()).long()
        batch = gen.batch if gen is not None else None
        if batch is None:
            return output
        # Rollout statistics travel with the batch into the loss (TRL shuffles and splits every (B, ...) key).
        local = self._process_slice(local_rows)
        for key, name in (("entropy", "rollout_entropy"), ("logps", "rollout_logps")):
            value = getattr(batch, key)
            if value is not None and (key in self.pipeline.needs or (key == "entropy" and self._log_gap)):
                value = value[local, :width]
                output[name] = torch.nn.functional.pad(value, (0, width - value.size(1)))
        if self.pipeline.uses("advantage"):
            loss_mask = output["completion_mask"] * output.get("tool_mask", 1)
            batch.mask = self._gather_padded(loss_mask.float())
            advantages = self.accelerator.gather(output["advantages"])  # (N,) exactly TRL's pre-slice values
            advantages = self.pipeline.advantage(advantages, batch)
            if advantages.dim() == 2:
                mine = advantages[local, :width]
                output["advantages"] = torch.nn.functional.pad(mine, (0, width - mine.size(1)))
                shown = (advantages * batch.mask).sum(1) / batch.mask.sum(1).clamp(min=1.0)
            else:
                output["advantages"] = advantages[local]
                shown = advantages
            self._replace_logged_advantages(shown)
        for key, value in batch.carried.items():  # per-method tensors for the loss hooks
            mine = value[local]
            if mine.dim() >= 2:
                mine = torch.nn.functional.pad(mine[:, :width], (0, width - min(width, mine.size(1))))
            output[f"{CARRY_PREFIX}{key}"] = mine
        self._log_global(batch.metrics)
        self._guard_generation(output)
        return output

    def _replace_logged_advantages(self, advantages: Tensor) -> None:
        """TRL logged the pre-hook advantages for the completions table: show the final ones instead."""
        logged = self._logs["advantages"]
        for _ in range(min(advantages.numel(), len(logged))):
            logged.pop()
        logged.extend(advantages.tolist())

    # ------------------------------------------------------------------------------------------------------
    # 5. token level

    def _compute_loss(self, model, inputs):
        if self._micro_step_of != self.state.global_step:
            self._micro_step_of, self._micro_step = self.state.global_step, 0
        # A shallow copy: the token hooks replace its `advantages`, and the buffered batch (reused when
        # num_iterations > 1) must keep the original ones.
        call = self._loss_call = _LossCall(model=model, inputs=dict(inputs))
        try:
            loss = super()._compute_loss(model, call.inputs)
        finally:
            self._loss_call = None
        mask = inputs["completion_mask"] * inputs.get("tool_mask", 1)
        if call.extra is not None:
            training = self.model.training
            loss = loss + aggregate(
                call.extra,
                mask,
                self.loss_type,
                num_items_in_batch=inputs["num_items_in_batch"],
                num_processes=self.accelerator.num_processes,
                gradient_accumulation_steps=self.current_gradient_accumulation_steps if training else 1,
                steps_per_generation=self.args.steps_per_generation,
                max_completion_length=self.max_completion_length,
                training=training,
            )
        if call.entropies is not None:
            self._log_entropy("entropy", call.entropies, mask.float(), gathered=False, mean=False)
            self._log_covariance(call.logps, inputs["advantages"], mask.float())
            if self._log_gap and "rollout_entropy" in inputs:
                self._log_entropy_gap(inputs["rollout_entropy"], call.entropies, mask.float())
        self._log_reduced(call.metrics)
        self._micro_step += 1
        self._guard_micro_batch(inputs, loss)
        return loss

    def _apply_token_hooks(self, call: _LossCall, logps: Tensor, entropies: Tensor) -> Tensor:
        inputs = call.inputs
        mask = (inputs["completion_mask"] * inputs.get("tool_mask", 1)).float()
        advantages = inputs["advantages"]
        advantages_2d = per_token(advantages, logps)
        old = inputs.get("old_per_token_logps")
        batch = LossBatch(
            logps=logps,
            old_logps=logps.detach() if old is None else old,
            on_policy=old is None,
            entropy=entropies,
            advantages=advantages_2d,
            mask=mask,
            group_ids=inputs["group_ids"],
            weight=torch.ones_like(mask),
            loss_type=self.loss_type,
            epsilon_low=self.epsilon_low,
            epsilon_high=self.epsilon_high,
            importance_sampling_level=self.importance_sampling_level,
            step=self.state.global_step,
            micro_step=self._micro_step,
            seed=self.args.seed,
            process_index=self.accelerator.process_index,
            num_processes=self.accelerator.num_processes,
            gather=self._gather_padded,
            rollout_entropy=inputs.get("rollout_entropy"),
            rollout_logps=inputs.get("rollout_logps"),
            ref_logps=inputs.get("ref_per_token_logps"),
            kl_coef=float(self.beta),
            bias_correction_kl=bool(getattr(self.args, "use_bias_correction_kl", False)),
            carried={k[len(CARRY_PREFIX) :]: v for k, v in inputs.items() if k.startswith(CARRY_PREFIX)},
        )
        terms = self.pipeline.token_loss(batch)
        call.metrics = batch.metrics
        call.extra = terms.extra
        if terms.weight is not None:
            inputs["advantages"] = advantages_2d * terms.weight  # TRL reads the advantages after this forward
        if terms.detach is not None:
            logps = torch.where(terms.detach, logps.detach(), logps)
        return logps

    # ------------------------------------------------------------------------------------------------------
    # 6. state

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
        return self._staging_dir if getattr(self, "_staging_dir", None) else super()._get_output_dir(trial)

    def _generate_every(self) -> int:
        return self.args.steps_per_generation * self.num_iterations

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
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            for func in self.reward_funcs:
                if isinstance(func, SandboxedReward):
                    func.close()  # worker processes; a later call starts new ones

    # ------------------------------------------------------------------------------------------------------
    # 0. guards: NaN/inf never reaches the optimizer

    def training_step(self, model, inputs, num_items_in_batch):
        if not self._window_open:  # first micro-batch of an optimizer step: remember what a skip must restore
            self._window_open = True
            self._window_flags = []
            self._window_counts = {}
            trl_state = (self.entropy_coef, self._last_world_entropy) if self.use_adaptive_entropy else None
            self._window_snapshot = (copy.deepcopy(self.pipeline.state_dict()), trl_state)
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.sync_gradients:
            self._close_window(model)
        return loss

    def _flag(self, reason: str, counter: str | None = None, count: int = 1) -> None:
        """A non-finite value on this process in this optimizer step; ``counter`` counts it (summed over processes)."""
        self._window_flags.append(reason)
        if counter is not None:
            self._window_counts[counter] = self._window_counts.get(counter, 0) + count

    def _guard_generation(self, output: dict[str, Any]) -> None:
        """Methods whose rollout-phase hooks produced NaN/inf: mark every step of this generation batch."""
        events = self.pipeline.take_nonfinite()
        if not events:
            return
        if self.args.on_nonfinite == "raise":  # computed from gathered data: every process raises
            raise NonFiniteError(f"step {self.state.global_step + 1}: {events[0]}")
        for event in events:
            logger.warning("step %d: %s; the optimizer steps on this generation batch are skipped",
                           self.state.global_step + 1, event)
            if self.model.training:
                key = f"guard/nonfinite/{event.method}"
                self._counters[key] = self._counters.get(key, 0) + event.count
        if self.model.training:
            output[GUARD_KEY] = torch.tensor(1.0, device=self.accelerator.device)

    def _guard_micro_batch(self, inputs: dict[str, Any], loss: Tensor) -> None:
        events = self.pipeline.take_nonfinite()
        if not self.model.training:  # evaluation: no optimizer step to protect
            for event in events:
                logger.warning("evaluation after step %d: %s", self.state.global_step, event)
            return
        for event in events:
            if self.args.on_nonfinite == "skip":
                logger.warning("step %d: %s; this optimizer step is skipped", self.state.global_step + 1, event)
            self._flag(str(event), f"guard/nonfinite/{event.method}", event.count)
        if GUARD_KEY in inputs and bool(inputs[GUARD_KEY] > 0):
            self._flag("its generation batch holds non-finite method outputs")
        if not bool(torch.isfinite(loss.detach()).all()):
            logger.warning("step %d: TRL's loss is %s; this optimizer step is skipped", self.state.global_step + 1,
                           float(loss.detach()))
            self._flag(f"TRL's loss is {float(loss.detach())}", "guard/nonfinite/loss")

    def _close_window(self, model: torch.nn.Module) -> None:
        """End of an optimizer step's micro-batches: skip the step on every process if any process saw NaN/inf."""
        self._window_open = False
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        grads_finite = not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))
        if not grads_finite:
            self._flag("the gradients are not finite", "guard/nonfinite/grad")
        local = torch.tensor(float(bool(self._window_flags)), device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            local = self.accelerator.reduce(local, reduction="sum")  # every process decides the same
        skip = bool(local > 0)
        reasons, self._window_flags = self._window_flags, []
        counts, self._window_counts = self._window_counts, {}
        if not skip:
            return
        for local_counts in gather_object([counts]) if self.accelerator.num_processes > 1 else [counts]:
            for key, value in local_counts.items():
                self._counters[key] = self._counters.get(key, 0) + value
        if self.args.on_nonfinite == "raise":  # after the all-reduce: every process raises, none waits
            why = "; ".join(reasons) or "another process saw NaN/inf"
            raise NonFiniteError(f"step {self.state.global_step + 1}: {why}")
        for p in model.parameters():  # the optimizer leaves parameters without a gradient (and their state) alone
            p.grad = None
        methods, trl_state = self._window_snapshot or (None, None)
        if methods is not None:
            self.pipeline.load_state_dict(methods)
        if trl_state is not None:
            self.entropy_coef, self._last_world_entropy = trl_state
            self._entropy_window_stats = None
        self._counters["guard/skipped_steps"] += 1
        logger.warning("step %d skipped (%s); parameters, optimizer and method states are unchanged",
                       self.state.global_step + 1, "; ".join(dict.fromkeys(reasons)) or "NaN/inf on another process")

    def _count_reward_failures(self) -> None:
        local = torch.tensor(self._reward_stats.drain(), dtype=torch.float32, device=self.accelerator.device)
        total = self.accelerator.reduce(local, reduction="sum") if self.accelerator.num_processes > 1 else local
        errors, timeouts = (int(v) for v in total.tolist())
        self._counters["reward/errors"] += errors
        self._counters["reward/timeouts"] += timeouts

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training and "loss" in logs:
            logs.update(self._counters)  # run totals, on every training log line
        super().log(logs, start_time)

    # ------------------------------------------------------------------------------------------------------
    # 7. metrics

    def _log_global(self, metrics: dict[str, float]) -> None:
        mode = self._mode()
        for key, value in metrics.items():
            self._metrics[mode][key].append(value)

    def _log_reduced(self, metrics: dict[str, tuple[Tensor, str]]) -> None:
        """Reduce loss-phase metrics across processes with one gather per reduction kind."""
        if not metrics:
            return
        mode = self._mode()
        device = self.accelerator.device
        for kind in ("mean", "sum", "max", "min"):
            keys = sorted(k for k, (_, r) in metrics.items() if r == kind)
            if not keys:
                continue
            local = torch.stack([metrics[k][0].to(device) for k in keys])  # (n,)
            values = self.accelerator.gather(local.unsqueeze(0)).view(-1, len(keys))  # (P, n)
            reduced = {"mean": values.mean(0), "sum": values.sum(0), "max": values.max(0).values, "min": values.min(0).values}[kind]
            for key, value in zip(keys, reduced.tolist(), strict=True):
                self._metrics[mode][key].append(value)

    def _log_covariance(self, logps: Tensor, advantages: Tensor, mask: Tensor) -> None:
        """``covariance/logp_adv``: Cov(log pi, A) over the valid tokens of all processes in this micro-batch.

        The term Cui et al. (arXiv 2505.22617) show drives the entropy change of a policy-gradient
        step; logged for every run (baseline included) from four all-reduced sums.
        """
        adv = per_token(advantages, logps)
        logps, adv = logps.float() * mask, adv.float() * mask
        sums = torch.stack([mask.sum(), adv.sum(), logps.sum(), (adv * logps).sum()])
        n, sa, sl, sal = self.accelerator.reduce(sums, reduction="sum").tolist()
        if n > 0:
            self._metrics[self._mode()]["covariance/logp_adv"].append(sal / n - (sa / n) * (sl / n))

    def _log_entropy_gap(self, rollout: Tensor, training: Tensor, mask: Tensor) -> None:
        """``rollout_entropy/gap``: mean |H_rollout - H_train| over the valid tokens of all processes (and the signed
        mean, ``gap_signed`` = train - rollout, positive for a lower-bound estimate).

        H_rollout is the estimate from vLLM's top-k log-probs, H_train the exact entropy of the training
        forward on the same tokens. The first loss step after a generation compares the same weights, so
        the gap there is the estimator's error; later steps of the same generation batch include the
        policy's own change since generation.
        """
        diff = (training.detach().float() - rollout.float()) * mask  # (B, T)
        sums = torch.stack([mask.sum(), diff.abs().sum(), diff.sum()])
        n, abs_sum, signed_sum = self.accelerator.reduce(sums, reduction="sum").tolist()
        if n > 0:
            self._metrics[self._mode()]["rollout_entropy/gap"].append(abs_sum / n)
            self._metrics[self._mode()]["rollout_entropy/gap_signed"].append(signed_sum / n)

    def _log_entropy(self, prefix: str, values: Tensor, mask: Tensor, gathered: bool, mean: bool = True) -> None:
        """Mean and p10/p50/p90 of token entropy over the valid tokens of all processes."""
        if not gathered:
            values, mask = self._gather_padded(values.float()), self._gather_padded(mask.float())
        mode = self._mode()
        if mean:
            self._metrics[mode][f"{prefix}/mean"].append(float(masked_mean(values, mask)))
        for q, v in zip(QUANTILES, masked_quantiles(values, mask, QUANTILES), strict=True):
            self._metrics[mode][f"{prefix}/p{int(q * 100)}"].append(v)
