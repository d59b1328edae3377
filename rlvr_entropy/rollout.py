"""Steps 1-2 of the hook order (``trainer.py``): generation through the methods' rollout hooks, and the
rollout statistics read on the way.

A mixin of :class:`EntropyGRPOTrainer` over TRL's generation override points (it comes before TRL's
``GRPOTrainer`` in the trainer's bases). Per generation batch:

- ``_generate_single_turn`` runs TRL's generation inside the methods' rollout hooks (first listed method
  outermost); a hook may regenerate rows at another temperature or score extra samples with the run's
  reward functions (``RolloutContext.score``, a collective);
- the statistics the methods need are taken from the cheapest source (``rollout_stats.resolve_source``):
  HF ``generate``'s own forward calls (``GenerationRecorder``), vLLM's top-k log-probs
  (``vllm_backend.topk_tap``), TRL's old-logp pass when it runs, or one no-grad forward (``_forward_stats``);
- what the batch produced on this process is kept (``Generation``) until the trainer has built the
  gathered :class:`RolloutBatch` for the reward and advantage hooks (steps 3-4).

It expects the trainer's ``pipeline``, ``_group_size``, ``_record`` and ``_calculate_rewards``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from trl import GRPOTrainer
from trl.data_utils import is_conversational

from rlvr_entropy import vllm_backend
from rlvr_entropy.methods import MethodConfigError, Rollout, RolloutBatch, RolloutContext
from rlvr_entropy.registry import import_object
from rlvr_entropy.rollout_stats import GenerationRecorder, encode_marker, forward_inputs, pad_rows, resolve_source
from rlvr_entropy.tensor_ops import fit_width, stable_hash


@dataclass
class Generation:
    """What the current generation batch produced on this process, kept until its advantages are final."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    tool_mask: list[list[int]] | None
    completions: list[Any]
    rollout: Rollout | None
    forward_stats: dict[str, Tensor] = field(default_factory=dict)  # (B, T) from a no-grad forward
    batch: RolloutBatch | None = None


@contextlib.contextmanager
def _overridden(mapping: dict[str, Any], key: str, value: Any) -> Iterator[None]:
    """``mapping[key] = value`` for the duration of the block (an object's ``vars()`` sets its attribute)."""
    saved = mapping.get(key)
    mapping[key] = value
    try:
        yield
    finally:
        mapping[key] = saved


class RolloutMixin:
    """Generation through the rollout hooks and the rollout statistics; see the module docstring."""

    _generation: Generation | None = None
    _rollout_inputs: list[dict[str, Any]] | None = None
    _capture_old_pass: bool = False

    def _setup_rollout_stats(self, args: Any, vllm_on_cpu: bool) -> None:
        """After TRL's ``__init__``: where the statistics come from, and what the methods' needs require."""
        hf_generate = not (self.use_vllm or self.use_transformers_continuous_batching or self.rollout_func or self.tools)
        self._stats_source = resolve_source(
            args.rollout_stats_source, hf_generate, self.use_vllm and self.rollout_func is None and not self.tools
        )
        self._needs = set(self.pipeline.needs)
        if args.log_rollout_entropy and self._stats_source in ("generate", "vllm"):
            self._needs.add("entropy")  # free: read from generation's own forward calls, or vLLM's log-probs
        self._vllm_topk = self._stats_source == "vllm" and bool(self._needs & {"entropy", "logps"})
        # The estimate is worth comparing with the training pass's exact entropy: carry it into the loss.
        self._log_gap = self._vllm_topk and "entropy" in self._needs and args.log_rollout_entropy
        if self._vllm_topk:
            vocab_size = int(self.accelerator.unwrap_model(self.model).config.vocab_size)
            vllm_backend.request_topk(self.vllm_generation, args.vllm_entropy_topk, vocab_size, self.temperature)
        if vllm_on_cpu:
            vllm_backend.install_cpu_weight_sync(self.vllm_generation)
        if self.pipeline.uses("rollout") and (self.rollout_func is not None or self.tools):
            raise ValueError(
                f"methods {self.pipeline.names} change sampling, which needs TRL's own generation: "
                "it cannot be combined with `rollout_func` or tool calling"
            )
        self._answer_fn: Callable[[str], str | None] | None = None
        if "answers" in self._needs:
            self._answer_fn = import_object(args.answer_extractor, "answer extractor")
        self._marker_ids: list[int] = []
        if "phases" in self._needs:
            users = ", ".join(m.name for m in self.pipeline.methods if "phases" in m.needs) or "the phases statistic"
            try:
                self._marker_ids = encode_marker(self._tokenizer, args.think_marker, users)
            except ValueError as err:
                raise MethodConfigError(str(err)) from None

    def _generate_and_score_completions(self, inputs):
        """TRL's generation and scoring of one batch, with the old-logp pass captured when it gives the statistics."""
        wants_tokens = bool(self.pipeline.needs & {"entropy", "logps"}) or self.args.log_rollout_entropy
        self._capture_old_pass = self._stats_source == "forward" and wants_tokens and self._old_logps_computed()
        try:
            self._rollout_inputs = inputs  # for rollout hooks that score extra samples (_score_rows)
            return super()._generate_and_score_completions(inputs)
        finally:
            self._capture_old_pass = False
            self._rollout_inputs = None

    def _generate(self, prompts: list) -> tuple:
        self._generation = None
        self._pending_rollout: Rollout | None = None
        out = super()._generate(prompts)
        prompt_ids, completion_ids, tool_mask, completions = out[0], out[1], out[2], out[3]
        self._generation = Generation(prompt_ids, completion_ids, tool_mask, completions, self._pending_rollout)
        return out

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        record = self._stats_source == "generate" and bool(self._needs & {"entropy", "logps"})

        def generate(rows: list[int] | None = None, temperature: float | None = None) -> Rollout:
            if rows is not None and (images is not None or multimodal_fields or self.use_vllm):
                raise ValueError("regenerating a subset of rows is supported for text-only HF generation only")
            ids = prompt_ids if rows is None else [prompt_ids[i] for i in rows]
            with self._sampling_temperature(temperature), self._recorder(record) as recorder, (
                vllm_backend.topk_tap(self.vllm_generation, self.temperature) if self._vllm_topk
                else contextlib.nullcontext()
            ) as tap:
                completion_ids, logprobs = GRPOTrainer._generate_single_turn(
                    self, ids, images, multimodal_fields, num_generations, has_tool_images
                )
            stats = recorder.rows(completion_ids, self._tokenizer.pad_token_id) if recorder else {}
            if tap is not None:
                stats = {k: v for k, v in tap.stats.items() if k in self._needs}
            return Rollout(completion_ids, logprobs, stats)

        if self.pipeline.uses("rollout"):
            training, step, rank = self.model.training, self.state.global_step, self.accelerator.process_index
            ctx = RolloutContext(
                prompt_ids=prompt_ids, group_size=self._group_size(), temperature=self.temperature, step=step,
                training=training, process_index=rank, num_processes=self.accelerator.num_processes,
                score=self._score_rows,
                generator=torch.Generator().manual_seed(stable_hash((self.args.seed, step, rank, training))),
            )
            rollout = self.pipeline.rollout(ctx, generate)
            self._record(ctx.metrics)
        else:
            rollout = generate(None, None)
        self._pending_rollout = rollout
        return rollout.completion_ids, rollout.logprobs

    def _score_rows(self, rows: list[int], rollout: Rollout) -> Tensor:
        """``RolloutContext.score``: the user reward functions on extra completions for some rows of the batch
        being generated, through ``_calculate_rewards`` (gathered across processes). Returns this process's
        part: the weighted sum per row, NaN where no function scored it."""
        inputs = self._rollout_inputs
        if inputs is None:
            raise RuntimeError("scoring inside a rollout hook is only possible during _generate_and_score_completions")
        rows_inputs = [inputs[i] for i in rows]
        prompts = [x["prompt"] for x in rows_inputs]
        texts = self.processing_class.batch_decode(rollout.completion_ids, skip_special_tokens=True)
        conversational = is_conversational({"prompt": prompts[0]})
        completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
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
        with contextlib.ExitStack() as stack:
            if self.use_vllm:
                stack.enter_context(_overridden(vars(self.vllm_generation), "temperature", temperature))
            else:
                stack.enter_context(_overridden(vars(self.generation_config), "temperature", temperature))
                stack.enter_context(_overridden(self.generation_kwargs, "temperature", temperature))
            yield

    @contextlib.contextmanager
    def policy_for_generation(self) -> Iterator[Any]:
        """The policy, ready for ``generate`` outside TRL's rollouts (evaluation during training): TRL's own
        context for it (ZeRO-3 parameters gathered, FSDP2 parameters summoned, gradient checkpointing off),
        without gradients. Every process must enter it together."""
        from trl.models import unwrap_model_for_generation

        with (
            unwrap_model_for_generation(
                self.model_wrapped, self.accelerator, gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
            ) as model,
            torch.no_grad(),
            self._dist.summon_full_params(self.model_wrapped, recurse=False),
        ):
            yield model

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

    def _forward_stats(self, gen: Generation) -> dict[str, Tensor]:
        """Rollout entropy and log-probs from one no-grad forward over this process's batch, (B, T) each."""
        if gen.forward_stats:
            return gen.forward_stats
        device = self.accelerator.device
        ids, attn, c_len = forward_inputs(gen.prompt_ids, gen.completion_ids, self._tokenizer.pad_token_id)
        batch_size = self.args.per_device_train_batch_size if self.model.training else self.args.per_device_eval_batch_size
        with torch.no_grad():
            logps, entropies, _ = GRPOTrainer._get_per_token_logps_and_entropies(
                self, self.model, ids.to(device), attn.to(device), c_len, batch_size=batch_size, compute_entropy=True
            )
        gen.forward_stats = {"entropy": entropies.float(), "logps": logps.float()}
        return gen.forward_stats

    def _local_stats(self, gen: Generation, width: int, wanted: set[str]) -> dict[str, Tensor]:
        """This process's ``wanted`` token statistics as (B, width) float32 tensors on the device."""
        if not wanted:
            return {}
        device = self.accelerator.device
        if gen.rollout is not None and gen.rollout.stats:
            return {k: pad_rows(gen.rollout.stats[k], width).to(device) for k in wanted}
        stats = self._forward_stats(gen)
        return {k: fit_width(stats[k], width).to(device) for k in wanted}

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
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
