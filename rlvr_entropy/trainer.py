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
               HF generate's own forward calls, or from one no-grad forward (reusing TRL's old-logp
               pass when it runs). See ``rollout_stats.py``.
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

6. state       each method's JSON state is saved in every checkpoint (``rlvr_entropy_state.json``)
               and restored on resume.
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
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.utils import gather_object
from torch import Tensor
from transformers import TrainerCallback
from trl import GRPOTrainer
from trl.data_utils import is_conversational

from rlvr_entropy.config import EntropyGRPOConfig
from rlvr_entropy.losses import aggregate
from rlvr_entropy.methods.base import LossBatch, MethodConfigError, Rollout, RolloutBatch, RolloutContext, _stable_hash
from rlvr_entropy.methods.pipeline import Pipeline
from rlvr_entropy.registry import Registry
from rlvr_entropy.rollout_stats import GenerationRecorder, find_marker, masked_quantiles, pad_rows
from rlvr_entropy.tensor_ops import masked_mean, per_token

STATE_FILE = "rlvr_entropy_state.json"
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
        if args.log_rollout_entropy and self._stats_source == "generate":
            self._needs.add("entropy")  # free: read from generation's own forward calls
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
            self._marker_ids = self._tokenizer.encode(args.think_marker, add_special_tokens=False)
            if not self._marker_ids:
                raise ValueError(f"think_marker {args.think_marker!r} encodes to no tokens with this tokenizer")

        self._generation: _Generation | None = None
        self._rollout_inputs: list[dict[str, Any]] | None = None
        self._loss_call: _LossCall | None = None
        self._capture_old_pass = False
        self._micro_step = 0
        self._micro_step_of = -1
        if args.metrics_jsonl:
            self.add_callback(MetricsJsonlCallback(os.path.join(args.output_dir, "metrics.jsonl")))

    # ------------------------------------------------------------------------------------------------------
    # setup helpers

    def _resolve_stats_source(self, args: EntropyGRPOConfig) -> str:
        hf_generate = not (
            self.use_vllm or self.use_transformers_continuous_batching or self.rollout_func is not None or self.tools
        )
        if args.rollout_stats_source == "generate" and not hf_generate:
            raise ValueError(
                "rollout_stats_source='generate' needs plain HF generation (no vLLM, continuous batching, "
                "rollout_func or tools); use 'forward' or 'auto'"
            )
        if args.rollout_stats_source == "auto":
            return "generate" if hf_generate else "forward"
        return args.rollout_stats_source

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
            with self._sampling_temperature(temperature), self._recorder(record) as recorder:
                completion_ids, logprobs = GRPOTrainer._generate_single_turn(
                    self, ids, images, multimodal_fields, num_generations, has_tool_images
                )
            stats = recorder.rows(completion_ids, self._tokenizer.pad_token_id) if recorder else {}
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
            if value is not None and key in self.pipeline.needs:
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
        self._log_reduced(call.metrics)
        self._micro_step += 1
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
        super()._save_checkpoint(model, trial)
        if not self.args.should_save:
            return
        folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
        path = os.path.join(folder, STATE_FILE)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"methods": self.pipeline.state_dict()}, f, indent=2)
        os.replace(tmp, path)  # a crash mid-write never leaves a truncated state file

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, STATE_FILE)
        if os.path.exists(path):
            with open(path) as f:
                self.pipeline.load_state_dict(json.load(f)["methods"])
        elif any(m.state for m in self.pipeline.methods):
            raise FileNotFoundError(f"{path} is missing: cannot restore the methods' adaptive state")

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

    def _log_entropy(self, prefix: str, values: Tensor, mask: Tensor, gathered: bool, mean: bool = True) -> None:
        """Mean and p10/p50/p90 of token entropy over the valid tokens of all processes."""
        if not gathered:
            values, mask = self._gather_padded(values.float()), self._gather_padded(mask.float())
        mode = self._mode()
        if mean:
            self._metrics[mode][f"{prefix}/mean"].append(float(masked_mean(values, mask)))
        for q, v in zip(QUANTILES, masked_quantiles(values, mask, QUANTILES), strict=True):
            self._metrics[mode][f"{prefix}/p{int(q * 100)}"].append(v)
