"""Evaluation on held-out prompts: pass@k, maj@k, token entropy, response length and truncation.

One code path serves ``rlvr-entropy evaluate`` (any model, run or checkpoint) and evaluation during
training (``periodic_eval.py``), for the tiny model on a CPU as for a 7B checkpoint on a GPU node:

- A *sampler* turns prompts into ``n`` samples each, every sample with its per-token entropy taken from
  generation itself, as training's rollout statistics take it: :class:`HFSampler` reads the entropy of
  ``softmax(logits / T)`` from HF ``generate``'s own forward calls (exact; no extra forward pass);
  :class:`VLLMSampler` estimates it from vLLM's top-k log-probs (a lower bound, see
  ``rollout_stats.topk_entropy``).
- :func:`evaluate_dataset` cuts the prompts into fixed batches, samples each batch under its own seed
  (so the figures do not depend on how many processes share the batches, nor on their order), scores
  every sample with the rewards' own answer extraction and equivalence (``tasks.rewards``:
  last ``\\boxed{}``, ``<answer>`` tags, GSM8K's ``####``; math-verify), and summarises.

Figures of one dataset (:func:`summarize`):

- ``pass@1``: the mean correctness of all samples; ``pass@k'`` for every power of two ``k' <= k`` (and
  ``k``) with the unbiased estimator ``1 - C(n - c, k') / C(n, k')`` of Chen et al. (2021), averaged
  over prompts, where ``n`` samples of a prompt hold ``c`` correct ones;
- ``maj@k``: majority vote over the extracted answers of a prompt's first ``k`` samples, answers grouped
  by the reward's equivalence (``\\frac{1}{2}`` and ``0.5`` vote together); samples without an answer
  do not vote; a tie between groups counts as the share of tied groups that are correct (the expected
  score of breaking the tie at random), a prompt without any answer as wrong;
- ``entropy``, ``entropy/p10``, ``entropy/p50``, ``entropy/p90``: over every sampled token (EOS
  included, padding never), at the sampling temperature; ``length``: mean tokens per sample;
  ``truncated``: share of samples that hit the token budget without EOS.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from rlvr_entropy.metrics import masked_quantiles
from rlvr_entropy.rollout_stats import GenerationRecorder, topk_token_stats
from rlvr_entropy.tasks.rewards import answers_match, extract_answer
from rlvr_entropy.tensor_ops import stable_hash


class EvaluationError(ValueError):
    """Evaluation cannot run as asked; the message says what to change."""


@dataclass
class Sample:
    """One sampled completion."""

    text: str
    token_ids: list[int]
    entropy: Tensor  # (T,) float32, the entropy of each generated token's distribution (EOS included)
    truncated: bool  # the token budget ran out before EOS


class Sampler(Protocol):
    """``sampler(prompts, n, seed, max_new_tokens)`` -> per prompt, its ``n`` samples (same order)."""

    def __call__(self, prompts: list[Any], n: int, seed: int, max_new_tokens: int) -> list[list[Sample]]: ...


@dataclass
class PromptResult:
    """One prompt's samples, scored."""

    prompt: Any
    answer: str
    completions: list[str]
    extracted: list[str | None]
    correct: list[bool]
    lengths: list[int]
    truncated: list[bool]
    maj: float  # maj@k of this prompt (0, 1, or a share of tied groups)
    entropy: list[float] = field(default_factory=list)  # mean token entropy of each sample


@dataclass
class DatasetReport:
    """A dataset's figures (see the module docstring) and its scored prompts."""

    name: str
    figures: dict[str, float]
    prompts: list[PromptResult]


# ----------------------------------------------------------------------------------------------------------
# Estimators


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct: ``1 - C(n - c, k) / C(n, k)``.

    Computed as ``1 - prod_{i < k} (n - c - i) / (n - i)``, which never forms a binomial coefficient.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0  # every k-subset holds a correct sample
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def k_values(k: int) -> list[int]:
    """The k' reported for pass@k': powers of two up to ``k``, and ``k`` itself."""
    values = [2**i for i in range(k.bit_length()) if 2**i <= k]
    return values if values[-1] == k else [*values, k]


def majority_vote(
    answers: Sequence[str | None], reference: str, same: Callable[[str, str], bool] = answers_match
) -> float:
    """maj@k of one prompt: the correctness of the most frequent answer (see the module docstring).

    ``same(a, b)`` groups answers (the reward's equivalence); a group's answer is its first member, and
    is correct when ``same(answer, reference)``. None answers do not vote.
    """
    groups: list[list[str]] = []
    for answer in answers:
        if answer is None:
            continue
        for group in groups:
            if same(answer, group[0]):
                group.append(answer)
                break
        else:
            groups.append([answer])
    if not groups:
        return 0.0
    top = max(len(g) for g in groups)
    tied = [g for g in groups if len(g) == top]
    return sum(same(g[0], reference) for g in tied) / len(tied)


def score(completions: Sequence[str], reference: str) -> tuple[list[str | None], list[bool]]:
    """Each completion's extracted answer and whether it is correct, exactly as the correctness reward scores."""
    extracted = [extract_answer(c) for c in completions]
    return extracted, [a is not None and answers_match(a, reference) for a in extracted]


def summarize(results: Sequence[PromptResult], token_entropy: Tensor, k: int) -> dict[str, float]:
    """The figures of one dataset from its scored prompts and every sampled token's entropy (N,)."""
    n = len(results[0].correct)
    figures: dict[str, float] = {"prompts": float(len(results)), "samples": float(n)}
    counts = [sum(r.correct) for r in results]
    for kk in k_values(k):
        figures[f"pass@{kk}"] = sum(pass_at_k(n, c, kk) for c in counts) / len(results)
    figures[f"maj@{k}"] = sum(r.maj for r in results) / len(results)
    entropy = token_entropy.float()
    if entropy.numel():
        mask = torch.ones_like(entropy)
        p10, p50, p90 = masked_quantiles(entropy, mask, (0.1, 0.5, 0.9))
        figures.update({"entropy": float(entropy.mean()), "entropy/p10": p10, "entropy/p50": p50, "entropy/p90": p90})
    else:  # every sample empty: no token to describe
        figures.update({"entropy": math.nan, "entropy/p10": math.nan, "entropy/p50": math.nan, "entropy/p90": math.nan})
    lengths = [x for r in results for x in r.lengths]
    figures["length"] = sum(lengths) / len(lengths)
    figures["truncated"] = sum(t for r in results for t in r.truncated) / len(lengths)
    return figures


# ----------------------------------------------------------------------------------------------------------
# Running a sampler over a dataset


def batch_seed(seed: int, index: int) -> int:
    """The sampling seed of batch ``index``: fixed by the batch, whichever process samples it."""
    return stable_hash((0x6576616C, seed, index)) % (2**31)  # 0x6576616C: "eval", apart from other seed streams


def evaluate_dataset(
    sampler: Sampler,
    rows: Any,
    name: str,
    *,
    samples: int,
    k: int,
    max_new_tokens: int,
    batch_size: int = 32,
    seed: int = 0,
    process_index: int = 0,
    num_processes: int = 1,
    gather: Callable[[list], list] | None = None,
    progress: bool = False,
) -> DatasetReport:
    """Sample ``samples`` completions of every row's ``prompt``, score them against its ``answer``, summarise.

    Batch ``b`` (``batch_size`` prompts) is sampled under ``batch_seed(seed, b)`` by process
    ``b % num_processes``; each process runs the same number of sampler calls (a process short of a batch
    repeats one and drops its result, so that sharded models stay in step), and ``gather`` (accelerate's
    ``gather_object``) brings every process's results to all of them.
    """
    if k > samples:
        raise EvaluationError(f"k ({k}) is larger than the samples per prompt ({samples}); raise samples or lower k")
    prompts, answers = list(rows["prompt"]), [str(a) for a in rows["answer"]]
    if not prompts:
        raise EvaluationError(f"{name}: no prompt to evaluate")
    batches = [range(i, min(i + batch_size, len(prompts))) for i in range(0, len(prompts), batch_size)]
    mine = list(range(process_index, len(batches), num_processes))
    calls = -(-len(batches) // num_processes)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompts), desc=name, unit="prompt", leave=False, disable=None)  # None: off without a TTY
    local: list[tuple[int, list[PromptResult], list[Tensor]]] = []
    for call in range(calls):
        b = mine[call] if call < len(mine) else (mine[-1] if mine else 0)  # a repeat keeps processes in step
        batch = batches[b]
        outputs = sampler([prompts[i] for i in batch], samples, batch_seed(seed, b), max_new_tokens)
        if call >= len(mine):
            continue
        results, entropies = [], []
        for i, drawn in zip(batch, outputs, strict=True):
            texts = [s.text for s in drawn]
            extracted, correct = score(texts, answers[i])
            results.append(PromptResult(
                prompt=prompts[i], answer=answers[i], completions=texts, extracted=extracted, correct=correct,
                lengths=[len(s.token_ids) for s in drawn], truncated=[s.truncated for s in drawn],
                maj=majority_vote(extracted[:k], answers[i]),
                entropy=[float(s.entropy.mean()) if s.entropy.numel() else math.nan for s in drawn],
            ))
            entropies += [s.entropy.float().cpu() for s in drawn]
        local.append((b, results, [torch.cat(entropies)] if entropies else []))
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    everything = gather(local) if gather is not None and num_processes > 1 else local
    everything = sorted(everything, key=lambda item: item[0])
    results = [r for _, batch_results, _ in everything for r in batch_results]
    token_entropy = torch.cat([t for _, _, ts in everything for t in ts]) if everything else torch.zeros(0)
    return DatasetReport(name=name, figures=summarize(results, token_entropy, k), prompts=results)


# ----------------------------------------------------------------------------------------------------------
# Samplers


def tokenize_prompts(tokenizer: Any, prompts: Sequence[Any], chat_template_kwargs: dict | None = None) -> list[list[int]]:
    """Prompt token ids as TRL's GRPO makes them: the chat template (with the generation prompt and TRL's
    ``chat_template_kwargs``, e.g. ``enable_thinking``) for conversations, the tokenizer's own call for plain text."""
    if prompts and isinstance(prompts[0], list):
        if getattr(tokenizer, "chat_template", None) is None:
            raise EvaluationError("the prompts are chat messages (data.chat) but the tokenizer has no chat template; "
                                  "drop chat, or use the model's own tokenizer")
        out = tokenizer.apply_chat_template(list(prompts), add_generation_prompt=True, tokenize=True, return_dict=True,
                                            **(chat_template_kwargs or {}))
        return [list(ids) for ids in out["input_ids"]]
    return [list(ids) for ids in tokenizer(text=list(prompts))["input_ids"]]


def eos_token_ids(tokenizer: Any, model: Any = None) -> list[int]:
    """Every token that ends a completion: the tokenizer's EOS and the model's generation-config EOS ids."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if config_eos is not None:
        ids |= set(config_eos if isinstance(config_eos, list) else [config_eos])
    if not ids:
        raise EvaluationError("neither the tokenizer nor the model names an EOS token: completions could not end")
    return sorted(ids)


def causal_lm(model: Any) -> Any:
    """The module whose forward returns the logits generate samples from (PEFT: the wrapped model)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def cut_at_eos(completion: Tensor, eos: Sequence[int]) -> tuple[list[list[int]], list[bool]]:
    """Rows of ``completion`` (B, S) up to and including their first EOS, and whether each had none (truncated)."""
    is_eos = torch.isin(completion, torch.tensor(list(eos), device=completion.device))  # (B, S)
    has = is_eos.any(dim=1)
    first = torch.where(has, is_eos.int().argmax(dim=1), torch.full_like(has, completion.size(1), dtype=torch.long))
    lengths = torch.where(has, first + 1, first).tolist()
    rows = completion.tolist()
    return [row[:n] for row, n in zip(rows, lengths, strict=True)], (~has).tolist()


class HFSampler:
    """Samples with HF ``generate``; each token's entropy is read from generate's own forward calls.

    ``temperature == 0`` decodes greedily; the entropy is then that of ``softmax(logits)``. Sampling
    ignores the model's generation-config defaults (top-k, repetition penalty): the policy is sampled
    at ``temperature`` and ``top_p`` alone, as TRL's GRPO samples it with its defaults.
    """

    def __init__(self, model: Any, tokenizer: Any, temperature: float, top_p: float = 1.0,
                 chat_template_kwargs: dict | None = None) -> None:
        if tokenizer.pad_token_id is None:
            raise EvaluationError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to its EOS token)")
        self.model, self.tokenizer = model, tokenizer
        self.temperature, self.top_p = temperature, top_p
        self.chat_template_kwargs = chat_template_kwargs
        self.eos = eos_token_ids(tokenizer, model)

    @torch.no_grad()
    def __call__(self, prompts: list[Any], n: int, seed: int, max_new_tokens: int) -> list[list[Sample]]:
        from transformers import GenerationConfig

        pad = self.tokenizer.pad_token_id
        rows = [ids for ids in tokenize_prompts(self.tokenizer, prompts, self.chat_template_kwargs) for _ in range(n)]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (B·n, P), left-padded
        attention = torch.zeros_like(input_ids)
        for i, r in enumerate(rows):  # one copy per row
            input_ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            attention[i, width - len(r):] = 1
        device = next(self.model.parameters()).device
        greedy = self.temperature == 0
        config = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=not greedy, pad_token_id=pad, eos_token_id=self.eos,
            bos_token_id=self.tokenizer.bos_token_id,
            **({} if greedy else {"temperature": self.temperature, "top_p": self.top_p, "top_k": 0}),
        )
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), GenerationRecorder(
            causal_lm(self.model), self.temperature or 1.0, logps=False
        ) as recorder:
            torch.manual_seed(seed)  # this batch's draws depend on the batch alone, and training's RNG is untouched
            output = self.model.generate(
                input_ids=input_ids.to(device), attention_mask=attention.to(device), generation_config=config
            )
        completion_ids, truncated = cut_at_eos(output[:, width:].cpu(), self.eos)
        entropy = recorder.rows(completion_ids, pad).get("entropy") or [torch.zeros(0)] * len(completion_ids)
        texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        drawn = [Sample(t, ids, e, cut) for t, ids, e, cut in zip(texts, completion_ids, entropy, truncated, strict=True)]
        return [drawn[i * n:(i + 1) * n] for i in range(len(prompts))]


class VLLMSampler:
    """Samples with vLLM; each token's entropy is estimated from its top-``topk`` log-probs, as training does.

    The estimate counts the tokens outside the top ``topk`` as one bucket: a lower bound on the exact
    entropy (equal when ``topk`` covers the vocabulary, ``-1``). On vLLM's CPU backend the engine runs in
    float32, eager, with a 1 GiB KV cache unless ``VLLM_CPU_KVCACHE_SPACE`` says otherwise.
    """

    def __init__(self, llm: Any, tokenizer: Any, temperature: float, top_p: float = 1.0, topk: int = 20) -> None:
        self.llm, self.tokenizer, self.temperature, self.top_p, self.topk = llm, tokenizer, temperature, top_p, topk

    @classmethod
    def build(cls, model_path: str, tokenizer: Any, temperature: float, top_p: float = 1.0, topk: int = 20,
              **engine: Any) -> VLLMSampler:
        """A sampler with its own engine on ``model_path`` (``engine``: more ``vllm.LLM`` arguments)."""
        try:
            from vllm import LLM
        except ImportError:
            raise EvaluationError("--backend vllm needs vLLM: pip install 'rlvr-entropy[vllm]' (GPU) or see README "
                                  "'vLLM' for the CPU build") from None
        from rlvr_entropy.vllm_backend import cpu_kv_cache_default, engine_max_logprobs, vllm_platform_is_cpu

        if vllm_platform_is_cpu():
            cpu_kv_cache_default()
            engine = {"dtype": "float32", "enforce_eager": True, **engine}
        limit = engine_max_logprobs(topk)
        llm = LLM(model=model_path, logprobs_mode="processed_logprobs",
                  **({"max_logprobs": limit} if limit is not None else {}), **engine)
        return cls(llm, tokenizer, temperature, top_p, topk)

    def __call__(self, prompts: list[Any], n: int, seed: int, max_new_tokens: int) -> list[list[Sample]]:
        from trl.generation.vllm_generation import extract_logprobs
        from vllm import SamplingParams

        params = SamplingParams(n=n, temperature=self.temperature, top_p=self.top_p, max_tokens=max_new_tokens,
                                logprobs=self.topk, seed=seed)
        ids = tokenize_prompts(self.tokenizer, prompts)
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in ids], sampling_params=params, use_tqdm=False)
        completion_ids = [list(o.token_ids) for out in outputs for o in out.outputs]
        truncated = [o.finish_reason == "length" for out in outputs for o in out.outputs]
        values, token_ids = extract_logprobs(outputs)  # TRL's own parsing of the top-k lists
        stats, _ = topk_token_stats(completion_ids, values, token_ids)
        texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        drawn = [Sample(t, c, e, cut) for t, c, e, cut in zip(texts, completion_ids, stats["entropy"], truncated, strict=True)]
        return [drawn[i * n:(i + 1) * n] for i in range(len(prompts))]


# ----------------------------------------------------------------------------------------------------------
# Reports


def figure_columns(reports: Sequence[tuple[str, DatasetReport]]) -> list[str]:
    """The figure keys shown in the table, in a fixed order (pass@k' ascending, then maj, entropy, length)."""
    keys: list[str] = []
    for _, report in reports:
        for key in report.figures:
            if key not in keys and key not in ("prompts", "samples") and not key.startswith("entropy/"):
                keys.append(key)

    def order(key: str) -> tuple[int, int]:
        m = re.fullmatch(r"(pass|maj)@(\d+)", key)
        if m:
            return (0 if m.group(1) == "pass" else 1, int(m.group(2)))
        return (2, ["entropy", "length", "truncated"].index(key) if key in ("entropy", "length", "truncated") else 9)

    return sorted(keys, key=order)


def format_table(reports: Sequence[tuple[str, DatasetReport]], markdown: bool = False) -> str:
    """One row per (model, dataset): prompts x samples, pass@k', maj@k, entropy [p10 p50 p90], length, truncated."""
    columns = figure_columns(reports)
    header = ["model", "dataset", "prompts x n", *columns]
    rows = []
    for model, report in reports:
        f = report.figures
        cells = [model, report.name, f"{int(f['prompts'])} x {int(f['samples'])}"]
        for key in columns:
            value = f.get(key, math.nan)
            if key == "entropy":
                cells.append(f"{value:.3f} [{f['entropy/p10']:.2f} {f['entropy/p50']:.2f} {f['entropy/p90']:.2f}]")
            elif key == "length":
                cells.append(f"{value:.1f}")
            else:
                cells.append(f"{value:.3f}")
        rows.append(cells)
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header).rstrip()] + [fmt.format(*r).rstrip() for r in rows]) + (
        "\n(entropy: mean [p10 p50 p90] nats per sampled token; length: tokens per sample; "
        "truncated: share without EOS)"
    )


def report_json(
    reports: Sequence[tuple[str, DatasetReport]], settings: dict[str, Any], save_samples: bool = False
) -> dict[str, Any]:
    """The JSON written by ``--json``: settings, per (model, dataset) the figures, and on request each prompt's
    samples with their extracted answers and correctness."""
    out: dict[str, Any] = {"settings": settings, "results": []}
    for model, report in reports:
        entry: dict[str, Any] = {"model": model, "dataset": report.name, "figures": report.figures}
        if save_samples:
            entry["prompts"] = [
                {"prompt": r.prompt, "answer": r.answer, "maj": r.maj, "samples": [
                    {"completion": c, "extracted": a, "correct": ok, "tokens": n, "truncated": t, "entropy": h}
                    for c, a, ok, n, t, h in zip(
                        r.completions, r.extracted, r.correct, r.lengths, r.truncated, r.entropy, strict=True)
                ]}
                for r in report.prompts
            ]
        out["results"].append(entry)
    return out
