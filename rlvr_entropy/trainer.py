"""EntropyGRPOTrainer: TRL's GRPOTrainer with a pipeline of composable entropy-control methods.

This file only wires TRL's override points to the method pipeline (``methods/pipeline.py``); the
generation side of that wiring (steps 1-2) is the mixin in ``rollout.py``, checkpointing the mixin in
``checkpointing.py``, and each other concern it calls lives in its own module, named at its step below.

Hook order: the only place it is defined
----------------------------------------
Per generation batch, inside TRL's ``_generate_and_score_completions``:

0. configure   (once, when the config is built: ``config.py``) methods may set TRL fields, e.g. to expose
               TRL's own entropy bonus or high-entropy token mask instead of re-implementing them.
   trl_settings  (before each optimizer step) methods may drive TRL settings, e.g. a schedule for TRL's entropy
               coefficient or for its adaptive controller's target (``methods/schedule.py``).
1. rollout     ``_generate_single_turn`` (``rollout.py``): method rollout hooks wrap generation, first
               listed method outermost; they may regenerate rows at other temperatures.
2. statistics  the union of the methods' ``needs`` (rollout token entropy, sampled-token log-probs,
               decoded answers, thinking-phase boundaries), computed once for the batch: read from HF
               generate's own forward calls, from vLLM's top-k log-probs, or from one no-grad forward
               (reusing TRL's old-logp pass when it runs): wired in ``rollout.py``, computed in
               ``rollout_stats.py`` and ``vllm_backend.py``.
3. reward      ``_calculate_rewards``: after TRL has scored and gathered the user reward functions (each
               call checked and time-limited: ``reward_contract.py``, ``sandbox.py``), reward hooks
               reshape the scalar reward of every sample on every process, in list order; each method's
               change becomes one extra reward column named after it, which TRL sums with weight 1 and
               logs as ``rewards/<method>/mean``.
4. advantage   after TRL computed its group advantages: the advantages of all processes are gathered,
               advantage hooks rescale or replace them (per sample or per token) in list order, and each
               process keeps its slice, exactly as TRL slices its own. Reference-model log-probs, when a
               method's ``loss_needs`` asks for them and TRL's ``beta`` is 0, are computed here once per batch
               with the reference model TRL builds (TRL computes them itself when ``beta != 0``).

Per loss micro-batch, inside TRL's ``_compute_loss``:

5. logit_stat  inside TRL's single training forward, right after the backbone: each method's per-token statistic
               of the temperature-scaled logits, computed on chunks of positions with gradient and recomputed
               in backward (no (B, T, V) tensor is kept beyond one chunk).
   token level right after that forward, token hooks return per-token weights (folded into the (B, T)
               advantages TRL reads next), detach masks (applied to the log-probs TRL receives), per-token clip
               ranges (TRL's epsilon_low/high for this micro-batch), extra per-token terms (aggregated with the
               loss_type's normaliser, ``losses.py``) and scalar terms with their own denominators (divided by
               the accumulation steps only), both added to TRL's loss.

Throughout:

6. guards      the launch produced the processes, sharding engine and batch geometry it asked for
               (``launch.py``); a NaN/inf from a method's hook, TRL's loss or the gradients skips the
               optimizer step(s) that would use it on every process together and restores the methods'
               state (``guards.py``, ``on_nonfinite``); bad dataset rows are dropped or refused before
               training (``data.py``, ``bad_rows``).
7. state       each method's JSON state, the run totals, TRL's micro-step counter and, for a save inside a
               generation cycle, the buffered generation batch are saved in every checkpoint, which is
               staged and renamed once complete: a resumed run repeats the uninterrupted one exactly
               (``checkpointing.py``).
8. metrics     methods log ``<method>/<stat>``; rollout-phase statistics are global already, loss-phase
               ones are reduced across processes. Rollout and training-pass entropy, the covariance
               Cov(log pi, A) that drives entropy change and the rollout/training entropy gap are logged
               beside TRL's metrics, and every log line goes to ``<output_dir>/metrics.jsonl``
               (``metrics.py``).
9. evaluation  with a recipe ``eval`` section, after every ``eval.every`` optimizer steps the policy is
               sampled on held-out prompts (pass@k, maj@k, entropy, length) and the figures join that
               step's log line as ``eval/<dataset>/<figure>`` (``periodic_eval.py``, ``evaluation.py``).

With no method listed every override reduces to TRL's behaviour (tested for every loss type).
Nothing here copies ``_compute_loss``: weights, detach and extra terms reach it through the override
points listed above.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.utils import gather_object
from datasets import Dataset
from torch import Tensor
from trl import GRPOTrainer

from rlvr_entropy import vllm_backend
from rlvr_entropy.checkpointing import CheckpointMixin
from rlvr_entropy.config import EntropyGRPOConfig, build_pipeline
from rlvr_entropy.data import drop_bad_rows, prompt_token_limit
from rlvr_entropy.guards import GUARD_KEY, StepGuard
from rlvr_entropy.launch import check_engine, check_geometry
from rlvr_entropy.losses import CLIPPED_LOSS_TYPES, aggregate
from rlvr_entropy.methods import LossBatch, RolloutBatch
from rlvr_entropy.metrics import (MetricsJsonlCallback, entropy_by_difficulty, entropy_gap, entropy_summary,
                                  logp_adv_covariance, reduce_across)
from rlvr_entropy.periodic_eval import PeriodicEval
from rlvr_entropy.reward_contract import RewardStats, columns_read
from rlvr_entropy.rollout import Generation, RolloutMixin
from rlvr_entropy.rollout_stats import completion_grid, find_marker
from rlvr_entropy.sandbox import SandboxedReward, sandboxed
from rlvr_entropy.tensor_ops import fit_width, logit_stats, per_token

# TRL's generation context reads model.is_gradient_checkpointing, which transformers 5 deprecated: a
# FutureWarning on every run that no setting of the user's can avoid.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

CARRY_PREFIX = "carry/"  # output-dict keys holding tensors a method passes from its advantage hook to its loss hook


@contextlib.contextmanager
def _reference_model_built(args: EntropyGRPOConfig, wanted: bool) -> Iterator[None]:
    """TRL builds (and prepares for DeepSpeed/FSDP) a reference model only when ``beta != 0``: while ``wanted``, show
    it a non-zero beta for the duration of its ``__init__``; the caller then sets the trainer's beta back."""
    if not wanted:
        yield
        return
    args.beta = 1.0
    try:
        yield
    finally:
        args.beta = 0.0


@dataclass
class _LossCall:
    """Scratch space shared by ``_compute_loss`` and the forward it triggers (one micro-batch)."""

    model: torch.nn.Module
    inputs: dict[str, Any]
    forward_done: bool = False
    entropies: Tensor | None = None
    logps: Tensor | None = None
    extra: Tensor | None = None
    scalar: Tensor | None = None
    clip_range: tuple[Any, Any] | None = None  # TRL's (epsilon_low, epsilon_high), while a method's per-token range is set
    logit_stats: list[dict[str, Tensor]] | None = None  # one dict per model call of the forward (TRL chunks rows)
    metrics: dict[str, tuple[Tensor, str]] = field(default_factory=dict)


class EntropyGRPOTrainer(CheckpointMixin, RolloutMixin, GRPOTrainer):
    """GRPO with entropy-control methods; see the module docstring for the hook order."""

    def __init__(
        self, model: Any, reward_funcs: Any, args: EntropyGRPOConfig | None = None,
        periodic_eval: PeriodicEval | None = None, **kwargs: Any,
    ) -> None:
        if args is None:
            args = EntropyGRPOConfig(output_dir="trainer_output")
        if not isinstance(args, EntropyGRPOConfig):
            raise TypeError("EntropyGRPOTrainer needs an EntropyGRPOConfig (a GRPOConfig with `methods`)")
        self.pipeline = build_pipeline(args.methods)
        # The pipeline records NaN/inf outputs; the guard skips or raises (on every process together).
        self.pipeline.on_nonfinite = "skip"
        # A method asking for reference log-probs while TRL's beta is 0: let TRL build and prepare its reference
        # model as it does for beta > 0, then keep beta at 0 (no KL in TRL's loss) and compute the log-probs here.
        self._own_ref_logps = "ref_logps" in self.pipeline.loss_needs and args.beta == 0.0
        with vllm_backend.building_engine(args) as vllm_on_cpu, _reference_model_built(args, self._own_ref_logps):
            super().__init__(model=model, reward_funcs=reward_funcs, args=args, **kwargs)
        self.beta = args.beta
        if self._own_ref_logps and self.ref_model is None:
            raise ValueError(
                f"{', '.join(m.name for m in self.pipeline.methods if 'ref_logps' in m.loss_needs)} needs reference "
                "log-probs; with a PEFT model TRL has no separate reference model: set `beta` > 0 (TRL then computes "
                "them with the adapter disabled) or train without PEFT"
            )
        self._logit_stat_methods = self.pipeline.logit_stat_methods()  # fixed for the run: not looked up per forward
        if self._logit_stat_methods:
            self._install_logit_stats()
        check_engine(self.accelerator.distributed_type, self.accelerator.num_processes)  # launch.py
        self._engine_checked = False  # again on the prepared model, at the first training step
        self._add_method_reward_columns()
        self._setup_rollout_stats(args, vllm_on_cpu)  # rollout.py
        self._loss_call: _LossCall | None = None
        self._micro_step = 0
        self._micro_step_of = -1
        # Run totals: logged on every training line, checkpointed.
        self._counters: dict[str, int] = {"reward/errors": 0, "reward/timeouts": 0, "guard/skipped_steps": 0}
        self._counters["data/skipped_rows"] = self._drop_bad_rows(args)
        if isinstance(self.train_dataset, Dataset):
            check_geometry(len(self.train_dataset), args, self.accelerator.num_processes)
        self._reward_stats = RewardStats()
        self.reward_funcs = [
            f if isinstance(f, torch.nn.Module) else sandboxed(f, args.reward_timeout, args.reward_sandbox, self._reward_stats)
            for f in self.reward_funcs
        ]
        many = self.accelerator.num_processes > 1
        self.guard = StepGuard(args.on_nonfinite, self._counters, reduce_sum=self._reduce_sum,
                               gather_objects=gather_object if many else (lambda x: x), device=self.accelerator.device)
        if args.metrics_jsonl:
            self.add_callback(MetricsJsonlCallback(os.path.join(args.output_dir, "metrics.jsonl")))
        self.periodic_eval = periodic_eval
        if periodic_eval is not None:
            periodic_eval.attach(self)
            self.add_callback(periodic_eval)

    # ------------------------------------------------------------------------------------------------------
    # setup helpers

    def _add_method_reward_columns(self) -> None:
        """Reward-shaping methods become reward columns that TRL sums with weight 1, after the user's."""
        self._num_user_rewards = len(self.reward_funcs)
        columns = self.pipeline.reward_columns(self.reward_func_names)
        self.reward_func_names = [*self.reward_func_names, *columns]
        self.reward_weights = torch.cat([self.reward_weights, torch.ones(len(columns))])

    def _drop_bad_rows(self, args: EntropyGRPOConfig) -> int:
        """Check every row of the (map-style) train and eval datasets before training; see ``bad_rows``."""
        required = columns_read(self.reward_funcs, self.reward_func_names)
        config = getattr(self.accelerator.unwrap_model(self.model), "config", None)
        limit = args.max_prompt_tokens or prompt_token_limit(
            getattr(config, "max_position_embeddings", None), self.max_completion_length
        )
        text_only = not getattr(self, "_is_vlm", False) and getattr(self, "environment_factories", None) is None
        lengths = (lambda prompts: [len(ids) for ids in self._tokenize_prompts(prompts)[0]]) if text_only else None
        dropped = 0
        for split in ("train", "eval"):
            dataset = getattr(self, f"{split}_dataset")
            if isinstance(dataset, Dataset) and "prompt" in dataset.column_names and len(dataset) > 0:
                dataset, n = drop_bad_rows(dataset, split, required, lengths, limit, args.bad_rows)
                setattr(self, f"{split}_dataset", dataset)
                dropped += n
        return dropped

    def _mode(self) -> str:
        return "train" if self.model.training else "eval"

    def _group_size(self) -> int:
        return self.num_generations if self.model.training else self.num_generations_eval

    def _reduce_sum(self, tensor: Tensor) -> Tensor:
        return self.accelerator.reduce(tensor, reduction="sum") if self.accelerator.num_processes > 1 else tensor

    def _gather_padded(self, tensor: Tensor) -> Tensor:
        """Pad dim 1 to the longest across processes, then concatenate along dim 0."""
        if self.accelerator.num_processes == 1:
            return tensor
        return self.accelerator.gather(self.accelerator.pad_across_processes(tensor, dim=1, pad_index=0))

    def _process_slice(self, local_rows: int) -> slice:
        start = self.accelerator.process_index * local_rows
        return slice(start, start + local_rows)

    def _install_logit_stats(self) -> None:
        """Wrap the policy's fused forward (TRL's ``add_fused_lm_head``) so that, inside the training forward of a
        loss micro-batch, each ``logit_stat`` method's statistic is computed from the backbone's hidden states."""
        model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        config = model.config.get_text_config()
        if getattr(config, "final_logit_softcapping", None) is not None or any(
            getattr(config, k, None) not in (None, 1, 1.0) for k in ("logit_scale", "output_multiplier", "lm_head_multiplier")
        ) or getattr(config, "logits_scaling", None) not in (None, 1, 1.0):
            raise ValueError("methods with a logit_stat hook support only models whose logits are the LM head's "
                             "output (no soft-capping or logit scaling)")
        fused, backbone, trainer = model.forward, model.base_model, self

        @functools.wraps(fused)
        def forward(*args: Any, fused_lm_head: bool = False, labels: Tensor | None = None, **kwargs: Any) -> Any:
            call = trainer._loss_call
            if not fused_lm_head or call is None or call.logit_stats is None:
                return fused(*args, fused_lm_head=fused_lm_head, labels=labels, **kwargs)
            hidden: list[Tensor] = []
            handle = backbone.register_forward_hook(lambda _m, _a, out: hidden.append(out.last_hidden_state))
            try:
                out = fused(*args, fused_lm_head=True, labels=labels, **kwargs)
            finally:
                handle.remove()
            # Position t predicts token t + 1, as in TRL's head: (b, L-1, d) and (b, L-1).
            call.logit_stats.append(logit_stats(trainer._logit_stat_methods, hidden[-1][:, :-1],
                                                labels[:, 1:] != -100, model.get_output_embeddings(),
                                                1.0 / trainer.temperature))
            return out

        model.forward = forward

    def _record(self, metrics: dict[str, float]) -> None:
        """Append global metric values to TRL's log of the current mode."""
        store = self._metrics[self._mode()]
        for key, value in metrics.items():
            store[key].append(value)

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

    def _count_reward_failures(self) -> None:
        local = torch.tensor(self._reward_stats.drain(), dtype=torch.float32, device=self.accelerator.device)
        errors, timeouts = (int(v) for v in self._reduce_sum(local).tolist())
        self._counters["reward/errors"] += errors
        self._counters["reward/timeouts"] += timeouts

    def _rollout_batch(self, gen: Generation, rewards_per_func: Tensor) -> RolloutBatch | None:
        """Gather what the reward and advantage hooks need from every process (only what is needed)."""
        wanted = self._needs & {"entropy", "logps"}
        if self.args.log_rollout_entropy and gen.forward_stats:
            wanted.add("entropy")  # TRL's old-logp pass ran anyway: logging it is free
        if not (self.pipeline.uses("reward") or self.pipeline.uses("advantage") or self.pipeline.needs or wanted
                or self.args.log_entropy_by_difficulty):
            return None
        device = self.accelerator.device
        ids, mask = completion_grid(gen.completion_ids, self._tokenizer.pad_token_id, gen.tool_mask)
        ids, mask = ids.to(device), mask.to(device)
        stats = self._local_stats(gen, ids.size(1), wanted)
        group_size = self._group_size()
        user = slice(0, self._num_user_rewards)
        # (N, T) each. A fixed order: every process must make the same collectives in the same order, and a
        # set of names iterates in each process's own hash order.
        gathered = {k: self._gather_padded(stats[k]) for k in sorted(stats)}
        batch = RolloutBatch(
            rewards_per_func=rewards_per_func[:, user].float(), reward_names=self.reward_func_names[user],
            reward_weights=self.reward_weights[user].to(device).float(),
            group_ids=torch.arange(rewards_per_func.size(0), device=device) // group_size, group_size=group_size,
            mask=self._gather_padded(mask), completion_ids=self._gather_padded(ids), step=self.state.global_step,
            training=self.model.training, seed=self.args.seed, scale_rewards=self.scale_rewards,
            entropy=gathered.get("entropy"), logps=gathered.get("logps"),
            encode=lambda text: self._tokenizer.encode(text, add_special_tokens=False),
        )
        if gen.rollout is not None:
            for name, values in gen.rollout.tags.items():  # (B,) each -> (N,)
                batch.tags[name] = self.accelerator.gather(values.to(device))
        rows = rewards_per_func.size(0)
        if batch.mask.size(0) != rows or rows != len(gen.completion_ids) * self.accelerator.num_processes:
            raise RuntimeError("rollout batch rows do not line up with the gathered rewards")
        if "answers" in self._needs:
            texts = [c if isinstance(c, str) else c[-1]["content"] for c in gen.completions]
            batch.completions = gather_object(texts)
            batch.answers = gather_object([self._answer_fn(t) for t in texts])  # type: ignore[misc]
        if "phases" in self._needs:
            batch.phases = self._gather_padded(find_marker(ids, mask, self._marker_ids).unsqueeze(1)).squeeze(1)
            batch.marker_length = len(self._marker_ids)
        if batch.entropy is not None:
            self._record(entropy_summary("rollout_entropy", batch.entropy, batch.mask))
        if self.args.log_entropy_by_difficulty:
            self._record(entropy_by_difficulty(batch.weighted_rewards(), group_size, batch.mask, batch.entropy,
                                               self.args.difficulty_threshold))
        return batch

    # ------------------------------------------------------------------------------------------------------
    # 4. advantage (and handing rollout statistics to the loss)

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)  # steps 1-3 (rollout.py)
        gen, self._generation = self._generation, None
        local_rows, width = output["completion_ids"].shape
        local = self._process_slice(local_rows)
        output["group_ids"] = (torch.arange(local.start, local.stop, device=output["completion_ids"].device)
                               // self._group_size()).long()
        if self._own_ref_logps:
            output["ref_per_token_logps"] = self._reference_logps(output)  # TRL's key: TRL ignores it at beta 0
        batch = gen.batch if gen is not None else None
        if batch is None:
            return output
        # Rollout statistics travel with the batch into the loss (TRL shuffles and splits every (B, ...) key).
        for key, name in (("entropy", "rollout_entropy"), ("logps", "rollout_logps")):
            value = getattr(batch, key)
            if value is not None and (key in self.pipeline.needs or (key == "entropy" and self._log_gap)):
                output[name] = fit_width(value[local], width)
        if self.pipeline.uses("advantage"):
            loss_mask = output["completion_mask"] * output.get("tool_mask", 1)
            batch.mask = self._gather_padded(loss_mask.float())
            advantages = self.accelerator.gather(output["advantages"])  # (N,) exactly TRL's pre-slice values
            advantages = self.pipeline.advantage(advantages, batch)
            if advantages.dim() == 2:
                output["advantages"] = fit_width(advantages[local], width)
                shown = (advantages * batch.mask).sum(1) / batch.mask.sum(1).clamp(min=1.0)
            else:
                output["advantages"] = advantages[local]
                shown = advantages
            self._replace_logged_advantages(shown)
        for key, value in batch.carried.items():  # per-method tensors for the loss hooks
            mine = value[local]
            output[f"{CARRY_PREFIX}{key}"] = fit_width(mine, width) if mine.dim() >= 2 else mine
        self._record(batch.metrics)
        events = self.pipeline.take_nonfinite()
        if self.guard.check_generation(events, self.state.global_step + 1, self.model.training):
            output[GUARD_KEY] = torch.tensor(1.0, device=self.accelerator.device)
        return output

    def _reference_logps(self, output: dict[str, Any]) -> Tensor:
        """Reference-model log-probs of this process's completion tokens, (B, T), as TRL computes them for beta > 0."""
        ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        attention = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        rows = self.args.per_device_train_batch_size if self.model.training else self.args.per_device_eval_batch_size
        with torch.no_grad():
            ref, _, _ = self._get_per_token_logps_and_entropies(
                self.ref_model, ids, attention, output["completion_ids"].size(1), batch_size=rows
            )
        return ref

    def _replace_logged_advantages(self, advantages: Tensor) -> None:
        """TRL logged the pre-hook advantages for the completions table: show the final ones instead."""
        logged = self._logs["advantages"]
        for _ in range(min(advantages.numel(), len(logged))):
            logged.pop()
        logged.extend(advantages.tolist())

    # ------------------------------------------------------------------------------------------------------
    # 5. token level

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        call = self._loss_call
        if call is None or call.forward_done or model is not call.model:
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
        # 5. The training forward of this loss micro-batch: the one place with current log-probs.
        kwargs["compute_entropy"] = True
        if self._logit_stat_methods:
            call.logit_stats = []  # filled by the wrapped forward, once per model call
        logps, entropies, aux = super()._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
        )
        call.forward_done = True
        call.entropies = entropies.detach()
        call.logps = logps.detach()
        if self.pipeline.uses("token_loss"):
            logps = self._apply_token_hooks(call, logps, entropies)
        return logps, entropies, aux

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
            if call.clip_range is not None:  # a method's per-token clip range held for this micro-batch only
                self.epsilon_low, self.epsilon_high = call.clip_range
        mask = (inputs["completion_mask"] * inputs.get("tool_mask", 1)).float()
        training = self.model.training
        if call.extra is not None:
            loss = loss + aggregate(
                call.extra, mask, self.loss_type, num_items_in_batch=inputs["num_items_in_batch"],
                num_processes=self.accelerator.num_processes, steps_per_generation=self.args.steps_per_generation,
                gradient_accumulation_steps=self.current_gradient_accumulation_steps if training else 1,
                max_completion_length=self.max_completion_length, training=training,
            )
        if call.scalar is not None:  # its own denominator already; scaled for gradient accumulation as TRL's bonus
            loss = loss + call.scalar / (self.current_gradient_accumulation_steps if training else 1)
        if call.entropies is not None:
            entropies = self._gather_padded(call.entropies.float())
            self._record(entropy_summary("entropy", entropies, self._gather_padded(mask), mean=False))
            self._record(logp_adv_covariance(call.logps, inputs["advantages"], mask, self._reduce_sum))
            if self._log_gap and "rollout_entropy" in inputs:
                self._record(entropy_gap(inputs["rollout_entropy"], call.entropies, mask, self._reduce_sum))
        if self.pipeline.uses("token_loss"):  # loss-phase statistics; a process with none still takes part
            self._record(reduce_across(call.metrics, self.accelerator.gather, self.accelerator.device,
                                       gather_object if self.accelerator.num_processes > 1 else None))
        self._micro_step += 1
        flagged = GUARD_KEY in inputs and bool(inputs[GUARD_KEY] > 0)
        self.guard.check_micro_batch(self.pipeline.take_nonfinite(), flagged, loss, self.state.global_step + 1, training)
        return loss

    def _apply_token_hooks(self, call: _LossCall, logps: Tensor, entropies: Tensor) -> Tensor:
        inputs = call.inputs
        advantages_2d = per_token(inputs["advantages"], logps)  # (B, T)
        old = inputs.get("old_per_token_logps")
        mask = (inputs["completion_mask"] * inputs.get("tool_mask", 1)).float()
        batch = LossBatch(
            logps=logps, old_logps=logps.detach() if old is None else old, on_policy=old is None, entropy=entropies,
            advantages=advantages_2d, mask=mask, group_ids=inputs["group_ids"], weight=torch.ones_like(mask),
            loss_type=self.loss_type, epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high,
            importance_sampling_level=self.importance_sampling_level, step=self.state.global_step,
            micro_step=self._micro_step, seed=self.args.seed, process_index=self.accelerator.process_index,
            num_processes=self.accelerator.num_processes, gather=self._gather_padded, reduce_sum=self._reduce_sum, training=self.model.training,
            accumulation_steps=self.current_gradient_accumulation_steps if self.model.training else 1,
            rollout_entropy=inputs.get("rollout_entropy"), rollout_logps=inputs.get("rollout_logps"),
            ref_logps=inputs.get("ref_per_token_logps"), kl_coef=float(self.beta),
            bias_correction_kl=bool(getattr(self.args, "use_bias_correction_kl", False)),
            carried={k[len(CARRY_PREFIX) :]: v for k, v in inputs.items() if k.startswith(CARRY_PREFIX)},
            logit_stats=self._collect_logit_stats(call, logps.size(1)),
        )
        terms = self.pipeline.token_loss(batch)
        call.metrics = batch.metrics
        call.extra = terms.extra
        call.scalar = terms.scalar
        if terms.eps_low is not None or terms.eps_high is not None:
            if self.importance_sampling_level != "token" or self.loss_type not in CLIPPED_LOSS_TYPES:
                raise ValueError(
                    "a per-token clip range needs token-level importance sampling and a clipped loss type "
                    f"({', '.join(CLIPPED_LOSS_TYPES)}); this run has {self.importance_sampling_level!r} / {self.loss_type!r}"
                )
            call.clip_range = (self.epsilon_low, self.epsilon_high)
            # TRL's loss reads these two attributes right after this forward; restored in _compute_loss.
            self.epsilon_low = self.epsilon_low if terms.eps_low is None else terms.eps_low.to(logps.dtype)
            self.epsilon_high = self.epsilon_high if terms.eps_high is None else terms.eps_high.to(logps.dtype)
        if terms.weight is not None:
            inputs["advantages"] = advantages_2d * terms.weight  # TRL reads the advantages after this forward
        if terms.detach is not None:
            logps = torch.where(terms.detach, logps.detach(), logps)
        return logps

    def _collect_logit_stats(self, call: _LossCall, width: int) -> dict[str, Tensor]:
        """The chunks the wrapped forward computed, as one (B, T) tensor per method (TRL keeps the last T positions)."""
        if not call.logit_stats:
            return {}
        return {key: torch.cat([part[key] for part in call.logit_stats], dim=0)[:, -width:] for key in call.logit_stats[0]}

    # ------------------------------------------------------------------------------------------------------
    # 6. guards, and the run around them

    def training_step(self, model, inputs, num_items_in_batch):
        if not self._engine_checked:  # `model` is the prepared one: the DeepSpeed engine, or FSDP's sharded model
            check_engine(self.accelerator.distributed_type, self.accelerator.num_processes, wrapped_model=model)
            self._engine_checked = True
        if not self.guard.is_open:  # first micro-batch of an optimizer step: what a skip must restore
            self.guard.open(self._restorer())
            self._apply_trl_settings(self.pipeline.trl_settings(self.state.global_step))
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.sync_gradients:
            # DeepSpeed has stepped inside the backward pass, or skipped the step for non-finite gradients.
            engine_skipped = bool(getattr(model.optimizer, "overflow", False)) if self.is_deepspeed_enabled else None
            self.guard.close(model.parameters(), self.state.global_step + 1, engine_skipped=engine_skipped)
        return loss

    def _apply_trl_settings(self, settings: dict[str, float]) -> None:
        """What the methods drive in TRL for this optimizer step (the keys of ``methods.TRL_SETTINGS``)."""
        if "entropy_coef" in settings:
            self.entropy_coef = settings["entropy_coef"]
        if "entropy_target" in settings:
            self.args.entropy_target = settings["entropy_target"]

    def _restorer(self) -> Callable[[], None]:
        """Undo for a skipped step: the methods' state and TRL's adaptive entropy coefficient as they are now."""
        methods = self.pipeline.snapshot()
        trl_state = (self.entropy_coef, self._last_world_entropy) if self.use_adaptive_entropy else None

        def restore() -> None:
            self.pipeline.restore(methods)
            if trl_state is not None:
                self.entropy_coef, self._last_world_entropy = trl_state
                self._entropy_window_stats = None

        return restore

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training and "loss" in logs:
            logs.update(self._counters)  # run totals, on every training log line
            if self.periodic_eval is not None:
                logs.update(self.periodic_eval.pop())  # this step's evaluation, if it ran one
        super().log(logs, start_time)

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:
            for func in self.reward_funcs:
                if isinstance(func, SandboxedReward):
                    func.close()  # worker processes; a later call starts new ones
