"""Locally typical sampling for the rollouts: sample only from the tokens whose surprisal is close to the entropy.

Reference: Meister, Pimentel, Wiher and Cotterell 2022, "Locally Typical Sampling", arXiv 2202.00666 (TACL 2023).
At each decoding step, on the distribution p = softmax(scores) after the temperature:

    H   = -sum_v p_v log p_v
    s_v = | -log p_v - H |                       (how far token v's surprisal is from the expected one)

sort the tokens by s (ascending) and keep the shortest prefix whose probability reaches the mass ``tau``
(the token at which the cumulative mass first reaches tau is kept, and every token tied with it); the rest
get -inf and the sampler draws from the renormalised remainder. Unlike top-p it can drop the mode when the
mode is much likelier than the entropy suggests (docs/methods-2.md §8 has a worked example).
Reference impl: HF transformers ``TypicalLogitsWarper`` (``typical_p`` of ``GenerationConfig``), which HF
``generate`` applies after temperature, top-k, top-p and min-p, and only when sampling.

What this method does: it is a rollout option with no loss term. ``configure`` sets TRL's
``generation_kwargs["typical_p"] = mass`` (merged with the recipe's own ``generation_kwargs``). On TRL's
HF-generate path (``use_vllm: false``) TRL builds its ``GenerationConfig`` from those kwargs and HF applies its
own warper: nothing of the warper is re-implemented there.

vLLM has no ``typical_p`` (``SamplingParams(typical_p=...)`` raises). For it this module provides a vLLM V1
batch-level logits processor, :class:`TypicalLogitsProcessor` (built lazily: vLLM is only importable in its own
environment), switched on per request by ``SamplingParams.extra_args["typical_p"]``; ``configure`` puts the mass
there instead when ``use_vllm`` is set. The engine loads the processor through the ``vllm.logits_processors``
entry point of this package (``rlvr_entropy.methods.typical:TypicalLogitsProcessor``), colocated or in a
``trl vllm-serve`` server (whose environment must then have the package installed: only the trainer's is checked);
``check`` refuses ``use_vllm`` where that entry point is not installed, since vLLM would ignore the request silently.
Differences from HF on vLLM: vLLM applies such a processor after the temperature and before its own top-k/top-p
(HF: after them), so the two agree when top_k/top_p/min_p are off (the default). The processor declares itself
argmax-invariant so that vLLM runs it after the temperature and leaves greedy requests alone, as HF leaves
greedy decoding alone; it can move the argmax of a sampled distribution, which is the point.

Deviations and choices:
- ``mass`` defaults to 0.95. The paper recommends tau = 0.95 for open-ended generation and 0.2 for
  summarisation (from the spec, the numbers not checked against the paper); tau = 0.95 only trims the atypical
  tails, which keeps the rollout closest to the policy the trainer scores (see below). HF's ``typical_p`` is off
  (1.0) by default, and a method entry that does nothing is not useful, so 1.0 is not allowed.
- Off-policy: the tokens come from the warped distribution, while TRL's old and current log-probs (and the
  importance ratio) are computed under the temperature alone. The rollout is therefore slightly off-policy with
  respect to the policy TRL scores; top_p < 1, top_k > 0 and min_p > 0 do the same today. HF generation has no
  correction for it. With vLLM, ``vllm_importance_sampling_correction`` (TRL's default) weighs by
  pi_old / pi_sampler with the processed (filtered) log-probs: for a kept token that ratio is the mass Z_t the
  filter kept at its step, and TRL's default mode (``sequence_mask``) multiplies it over the completion, so each
  completion's gradient shrinks by prod_t Z_t (0.07 on average at tau = 0.2 on the tiny task, vanishing on long
  completions). ``check`` warns about it; ``vllm_importance_sampling_correction: false`` treats the rollout as
  the HF path does.
- Statistics: the rollout entropy the trainer logs (``rollout_entropy/*``, ``entropy_by_difficulty``) on the HF
  path is read from generate's raw forward logits divided by the temperature (``GenerationRecorder``): the
  policy's entropy at the sampled prefixes, not the warped sampler's. vLLM's processed top-k log-probs describe
  the warped distribution, so with ``use_vllm`` and ``rollout_stats_source: auto`` this method switches the
  statistics to ``forward`` (the policy's entropy from TRL's old-logp pass where it runs; an extra forward pass
  only for methods that need the statistic) and refuses an explicit ``rollout_stats_source: vllm``.
- Logged: ``typical/surprisal_gap``, the mean over the rollout's tokens of |-log pi(sampled token) - H|, the
  distance the filter bounds (under pi at the temperature; computed in the advantage hook, which passes the
  advantages through, from the rollout statistics ``entropy`` and ``logps`` that HF generation records anyway).
  It falls when the filter bites; statistics of the warper itself (e.g. the mass it removed) would need work in
  the sampler.
- Periodic evaluation (``eval:``) samples without the filter: pass@k describes the policy.

Formulas, defaults and the worked example the tests use: ``docs/methods-2.md`` §8.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
from torch import Tensor

from rlvr_entropy.methods.base import Method, MethodConfigError, RolloutBatch, register

logger = logging.getLogger(__name__)

#: Where a vLLM engine finds the processor: the entry point this package registers (group ``vllm.logits_processors``).
VLLM_PLUGIN_GROUP = "vllm.logits_processors"
VLLM_PROCESSOR = "rlvr_entropy.methods.typical:TypicalLogitsProcessor"
#: The per-request switch: ``SamplingParams(extra_args={"typical_p": tau})``.
EXTRA_ARG = "typical_p"
_GREEDY_EPS = 1e-5  # vLLM's own threshold below which a temperature means greedy decoding


def typical_filter(scores: Tensor, mass: float | Tensor) -> Tensor:
    """The tokens locally typical sampling removes, (n, V) bool (True = set to -inf), HF ``TypicalLogitsWarper``'s rule.

    Args:
        scores: (n, V) logits after the temperature (tokens already at -inf stay out of the set).
        mass: tau in (0, 1), a float or (n, 1) per row.
    """
    logp = torch.log_softmax(scores.float(), dim=-1)  # (n, V)
    p = logp.exp()
    entropy = -(p * logp).nansum(dim=-1, keepdim=True)  # (n, 1); 0 * -inf -> NaN -> left out
    distance = (-logp - entropy).abs().nan_to_num(nan=float("inf"))  # (n, V); removed tokens: +inf
    sorted_distance, order = distance.sort(dim=-1)  # (n, V) ascending
    cumulative = p.gather(-1, order).cumsum(dim=-1)  # (n, V)
    mass_t = torch.as_tensor(mass, dtype=cumulative.dtype, device=cumulative.device)
    last = (cumulative < mass_t).sum(dim=-1, keepdim=True).clamp(max=scores.size(-1) - 1)  # (n, 1)
    # Ties with the last kept token are kept; the most typical token always is (HF's min_tokens_to_keep = 1).
    return distance > sorted_distance.gather(-1, last)


@register("typical")
@dataclass
class Typical(Method):
    """Locally typical sampling of the rollouts (Meister et al. 2022): TRL's generation with typical_p = mass."""

    mass: float = 0.95  # tau in (0, 1): probability mass of the most typical tokens kept at each step
    needs = frozenset({"entropy", "logps"})  # for the logged surprisal gap (free on HF generation)

    def validate(self) -> None:
        if not 0.0 < self.mass < 1.0:
            raise MethodConfigError(
                f"typical.mass must be in (0, 1) (1 keeps every token: drop the method instead), got {self.mass}"
            )

    def configure(self, args: Any) -> None:
        kwargs = _generation_kwargs(args)
        if args.use_vllm:
            # vLLM: the mass travels to the engine's logits processor per request; SamplingParams has no typical_p.
            if "typical_p" in kwargs:
                raise MethodConfigError("typical: generation_kwargs.typical_p is not a vLLM sampling parameter; "
                                        "remove it and set the method's mass")
            extra = dict(kwargs.get("extra_args") or {})
            _refuse_other_value(extra.get(EXTRA_ARG), self.mass, "generation_kwargs.extra_args.typical_p")
            extra[EXTRA_ARG] = self.mass
            kwargs["extra_args"] = extra
            if args.rollout_stats_source == "vllm":
                raise MethodConfigError(
                    "typical with use_vllm: vLLM's processed log-probs describe the typical-filtered distribution, so "
                    "rollout_stats_source: vllm would log the sampler's entropy, not the policy's. Use "
                    "rollout_stats_source: forward (or auto, which this method turns into forward)"
                )
            if args.rollout_stats_source == "auto":
                args.rollout_stats_source = "forward"
        else:
            _refuse_other_value(kwargs.get("typical_p"), self.mass, "generation_kwargs.typical_p")
            kwargs["typical_p"] = self.mass
        args.generation_kwargs = kwargs

    def advantage(self, advantages: Tensor, batch: RolloutBatch) -> Tensor:
        """Identity; logs how typical the sampled tokens were: mean |-log pi(token) - H| over the rollout."""
        if batch.entropy is not None and batch.logps is not None:
            gap = (-batch.logps - batch.entropy).abs()  # (N, T)
            batch.log("surprisal_gap", (gap * batch.mask).sum() / batch.mask.sum().clamp(min=1.0))
        return advantages

    def check(self, args: Any) -> None:
        if not args.use_vllm:
            return
        if not vllm_plugin_installed():
            raise MethodConfigError(
                "typical with use_vllm: vLLM has no typical_p sampling parameter, and this installation does not "
                f"register the package's vLLM logits processor ({VLLM_PROCESSOR}, entry point group "
                f"'{VLLM_PLUGIN_GROUP}'; reinstall the package with `pip install -e .`). Alternatives: use_vllm: false "
                "(TRL's HF generation applies typical_p itself), or vLLM's own top_p / min_p instead of this method"
            )
        if args.vllm_importance_sampling_correction and args.vllm_importance_sampling_mode.startswith("sequence"):
            logger.warning(
                "typical with vLLM: TRL's importance-sampling correction (%s) weighs each completion by the product over "
                "its tokens of the probability mass the filter kept (at least %g per token), which shrinks the gradient "
                "of long completions towards 0. Set vllm_importance_sampling_correction: false to treat the rollout as "
                "HF generation does (slightly off-policy), or vllm_importance_sampling_mode: token_truncate",
                args.vllm_importance_sampling_mode, self.mass,
            )


def _generation_kwargs(args: Any) -> dict[str, Any]:
    """TRL's ``generation_kwargs`` as a dict (a recipe or the command line may give it as JSON text)."""
    kwargs = args.generation_kwargs
    if kwargs is None:
        return {}
    if isinstance(kwargs, str):
        try:
            kwargs = json.loads(kwargs)
        except json.JSONDecodeError as err:
            raise MethodConfigError(f"generation_kwargs is not a JSON object: {err}") from None
    if not isinstance(kwargs, dict):
        raise MethodConfigError(f"generation_kwargs must be a mapping, got {type(kwargs).__name__}")
    return dict(kwargs)


def _refuse_other_value(current: Any, mass: float, where: str) -> None:
    if current is not None and float(current) != mass:
        raise MethodConfigError(f"typical sets {where} = mass ({mass}), but the recipe already sets it to {current}: "
                                "set it in one place only")


def vllm_plugin_installed() -> bool:
    """Whether the vLLM logits-processor entry point of this package is installed (vLLM loads it at engine start)."""
    from importlib.metadata import entry_points

    return any(ep.value.replace(" ", "") == VLLM_PROCESSOR for ep in entry_points(group=VLLM_PLUGIN_GROUP))


@cache
def _vllm_processor_class() -> type:
    """:class:`TypicalLogitsProcessor`, defined on first use (vLLM is importable only in its own environment)."""
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
    from vllm.v1.sample.logits_processor.builtin import process_dict_updates

    class TypicalLogitsProcessor(LogitsProcessor):
        """vLLM V1: locally typical filtering of the requests whose ``extra_args`` carry ``typical_p``."""

        @classmethod
        def validate_params(cls, sampling_params: Any) -> None:
            tau = (sampling_params.extra_args or {}).get(EXTRA_ARG)
            if tau is not None and not 0.0 < float(tau) < 1.0:
                raise ValueError(f"extra_args.{EXTRA_ARG} must be in (0, 1), got {tau}")

        def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
            self.mass: dict[int, float] = {}  # batch row -> tau, for the rows that asked for the filter

        def is_argmax_invariant(self) -> bool:
            # Not strictly (it can drop the mode), but declaring it makes vLLM apply it after the temperature and
            # only to sampled requests: HF's semantics, where warpers act only when sampling.
            return True

        def update_state(self, batch_update: BatchUpdate | None) -> None:
            def new_state(params: Any, prompt_ids: Any, output_ids: Any) -> float | None:
                tau = (params.extra_args or {}).get(EXTRA_ARG)
                return None if tau is None or params.temperature < _GREEDY_EPS else float(tau)

            process_dict_updates(self.mass, batch_update, new_state)

        def apply(self, logits: Tensor) -> Tensor:
            if not self.mass:
                return logits
            rows = torch.tensor(list(self.mass), dtype=torch.long, device=logits.device)  # (n,)
            tau = torch.tensor(list(self.mass.values()), dtype=torch.float32, device=logits.device).unsqueeze(1)
            sub = logits.index_select(0, rows)  # (n, V), already divided by the temperature
            logits[rows] = sub.masked_fill(typical_filter(sub, tau), float("-inf"))
            return logits

    TypicalLogitsProcessor.__module__ = __name__
    TypicalLogitsProcessor.__qualname__ = "TypicalLogitsProcessor"
    return TypicalLogitsProcessor


def __getattr__(name: str) -> Any:
    # ``rlvr_entropy.methods.typical:TypicalLogitsProcessor`` (the entry point) resolves here, inside vLLM's engine.
    if name == "TypicalLogitsProcessor":
        return _vllm_processor_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
