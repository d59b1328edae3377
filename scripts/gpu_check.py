"""GPU check: what the trainer and each method cost against TRL's GRPOTrainer, on one GPU, with nothing downloaded.

A ~0.5B Qwen2 (Qwen2.5-0.5B's shape: 24 layers, hidden 896, 14 heads, vocabulary 151,936) is built from a
config with random weights, with a character tokenizer padded to the same vocabulary, on the synthetic
arithmetic task with a dense reward (so groups have spread and every loss term is live). Configurations:
TRL's ``GRPOTrainer``, ``EntropyGRPOTrainer`` without a method, and with each registered method; all are
built the same way, and run interleaved (round 1: A B C ..., round 2: A B C ...) so drift hits each alike.
Per configuration: median optimizer-step time (generation included), completion tokens per second, peak
GPU memory; ratios against TRL (no method) and against no method (each method). With vLLM installed: the
colocated engine's generation time with top-20 log-probs against ``logprobs=0``, and the mean
rollout/training entropy gap of a short run. Writes ``gpu_check.json`` and ``gpu_check.md``.

    bash scripts/gpu_check.sh                      # one GPU, about 6-8 minutes
    bash scripts/gpu_check.sh --cpu --tiny         # the same code path on a CPU with a tiny model (tested)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, TrainerCallback  # noqa: E402
from transformers.trainer_callback import PrinterCallback, ProgressCallback  # noqa: E402

from rlvr_entropy.config import checkpointing_off  # noqa: E402

QWEN_05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                intermediate_size=4864, vocab_size=151936)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            intermediate_size=128, vocab_size=512)

#: Entries that make each method act on this batch (and pass its checks); others run with their defaults.
METHOD_ENTRIES = {
    "kl_cov": {"base_clip": True},  # keep the PPO clip of the shared settings (the reference drops it)
    "ares": {"kl": True},
    "canon": {"metric": "entropy"},
}
EXTRA = [("canon_length", {"name": "canon", "metric": "length"})]  # CANON with both metrics
#: TRL settings a method needs over the shared ones (Archer's own KL replaces TRL's: it refuses beta != 0).
METHOD_ARGS = {"archer": {"beta": 0.0}}


def method_args(methods: list[dict] | None) -> dict[str, Any]:
    """The TRL settings the listed methods need (``METHOD_ARGS``), to update the shared ``train_args`` with."""
    return {k: v for m in methods or [] for k, v in METHOD_ARGS.get(m["name"], {}).items()}


def padded_char_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """The tiny world's character tokenizer with filler tokens up to ``vocab_size`` (never produced by encoding,
    only by sampling), so the LM head and every (B, T, V) computation have a real model's width."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    from rlvr_entropy.tiny.tokenizer import BOS, CHARACTERS, EOS, PAD, SPECIAL_TOKENS, UNK

    tokens = SPECIAL_TOKENS + list(CHARACTERS)
    tokens += [f"<f{i}>" for i in range(vocab_size - len(tokens))]
    vocab = {t: i for i, t in enumerate(tokens)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    backend.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, eos_token=EOS, bos_token=BOS,
                                   unk_token=UNK, padding_side="left")


def build_model(shape: dict[str, int], out: Path) -> Path:
    """A random Qwen2 of ``shape`` and its tokenizer saved to ``out`` (built once, loaded by every configuration)."""
    tokenizer = padded_char_tokenizer(shape["vocab_size"])
    torch.manual_seed(0)
    config = Qwen2Config(**shape, max_position_embeddings=2048, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def spread(prompts: list[Any], completions: list[str], **kwargs: Any) -> list[float]:
    """A dense reward: the share of digits in the completion (random models rarely answer right)."""
    return [sum(c.isdigit() for c in text) / max(1, len(text)) for text in completions]


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step (generation included), with the device synchronised."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._start)


def train_args(opts: argparse.Namespace, out: Path, **extra: Any) -> dict[str, Any]:
    gpu = not opts.cpu
    args = dict(
        output_dir=str(out), use_cpu=not gpu, bf16=gpu, **checkpointing_off(), report_to="none",
        save_strategy="no", logging_steps=1, seed=0, dataloader_num_workers=0,
        per_device_train_batch_size=opts.batch, num_generations=8, steps_per_generation=1,
        max_completion_length=opts.max_tokens, max_steps=opts.warmup + opts.steps, learning_rate=1e-6,
        temperature=1.0, beta=0.04, epsilon=0.2, loss_type="dapo",
    )
    return args | extra | method_args(extra.get("methods"))


def run_configuration(name: str, methods: list[dict] | None, model_dir: Path, opts: argparse.Namespace,
                      dataset: Any, out: Path) -> dict[str, float]:
    """Build one trainer (not timed), train warm-up + measured steps, return step time, tokens/s, peak memory."""
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from rlvr_entropy import EntropyGRPOConfig, EntropyGRPOTrainer
    from rlvr_entropy.tasks.rewards import correctness

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    common = dict(model=str(model_dir), reward_funcs=[correctness, spread], train_dataset=dataset,
                  processing_class=tokenizer)
    if methods is None:
        trainer = GRPOTrainer(args=GRPOConfig(**train_args(opts, out / name)), **common)
    else:
        config = EntropyGRPOConfig(**train_args(opts, out / name, methods=methods, metrics_jsonl=False,
                                                reward_sandbox="none"))
        trainer = EntropyGRPOTrainer(args=config, **common)
    timer = StepTimer()
    trainer.add_callback(timer)
    for quiet in (PrinterCallback, ProgressCallback):  # one line per configuration instead of every log dict
        trainer.remove_callback(quiet)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    steps = timer.times[opts.warmup:]
    tokens = [h.get("num_tokens") for h in trainer.state.log_history if "num_tokens" in h]
    completion_tokens = [h["completions/mean_length"] * opts.batch for h in trainer.state.log_history
                         if "completions/mean_length" in h][opts.warmup:]
    median = statistics.median(steps)
    result = {
        "step_s": median,
        "tokens_per_s": statistics.mean(completion_tokens) / median if completion_tokens else float("nan"),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan"),
        "total_tokens": tokens[-1] if tokens else None,
    }
    del trainer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def vllm_section(model_dir: Path, opts: argparse.Namespace, dataset: Any, out: Path) -> dict[str, Any]:
    """Colocated vLLM: generation time with top-20 log-probs against logprobs=0, and the entropy gap of a short run."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        return {"skipped": "vLLM is not installed here"}
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [{"prompt_token_ids": tokenizer(dataset[i]["prompt"])["input_ids"]} for i in range(opts.batch)]
    llm = LLM(model=str(model_dir), dtype="bfloat16" if not opts.cpu else "float32", enforce_eager=opts.cpu,
              max_model_len=512, max_logprobs=20, gpu_memory_utilization=0.3, seed=0)
    times: dict[int, list[float]] = {0: [], 20: []}
    for r in range(opts.rounds + 1):
        for k in (0, 20):  # interleaved
            params = SamplingParams(n=8, temperature=1.0, max_tokens=opts.max_tokens, logprobs=k, seed=r)
            start = time.perf_counter()
            llm.generate(prompts, sampling_params=params, use_tqdm=False)
            if r:  # round 0 warms up
                times[k].append(time.perf_counter() - start)
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    from rlvr_entropy import EntropyGRPOConfig, EntropyGRPOTrainer
    from rlvr_entropy.tasks.rewards import correctness

    config = EntropyGRPOConfig(**train_args(opts, out / "vllm_gap", use_vllm=True, vllm_mode="colocate",
                                            vllm_gpu_memory_utilization=0.3, vllm_max_model_length=512,
                                            reward_sandbox="none"))
    trainer = EntropyGRPOTrainer(model=str(model_dir), reward_funcs=[correctness, spread], args=config,
                                 train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    gaps = [h["rollout_entropy/gap"] for h in trainer.state.log_history if "rollout_entropy/gap" in h]
    gen0, gen20 = statistics.median(times[0]), statistics.median(times[20])
    return {"generate_s_logprobs0": gen0, "generate_s_top20": gen20, "top20_ratio": gen20 / gen0,
            "entropy_gap_mean": statistics.mean(gaps) if gaps else None}


def markdown(results: dict[str, dict[str, float]], meta: dict[str, Any]) -> str:
    trl, none = results["trl"]["step_s"], results["none"]["step_s"]
    lines = [f"GPU check on {meta['device']} ({meta['model']}, {meta['batch']} completions of <= {meta['max_tokens']}"
             f" tokens per step, median of {meta['steps']} steps x {meta['rounds']} rounds, interleaved).", "",
             "| configuration | step s | vs TRL | vs no method | completion tokens/s | peak GiB |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        vs_none = "-" if name in ("trl", "none") else f"{r['step_s'] / none:.3f}"
        peak = "-" if r["peak_gib"] != r["peak_gib"] else f"{r['peak_gib']:.2f}"  # NaN on a CPU
        lines.append(f"| {name} | {r['step_s']:.3f} | {r['step_s'] / trl:.3f} | {vs_none} | "
                     f"{r['tokens_per_s']:.0f} | {peak} |")
    v = meta.get("vllm", {})
    lines.append("")
    if "skipped" in v:
        lines.append(f"vLLM: skipped ({v['skipped']}).")
    else:
        lines.append(f"vLLM colocate: generate {v['generate_s_logprobs0']:.3f} s with logprobs=0, "
                     f"{v['generate_s_top20']:.3f} s with top-20 ({v['top20_ratio']:.2f}x); mean rollout/training "
                     f"entropy gap {v['entropy_gap_mean']:.4f} nats. Random weights give near-uniform next-token "
                     "distributions, where the top-20 hold a small share of the mass and the estimate is a loose "
                     "lower bound: this gap is an upper limit, not what a trained model shows.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (with --tiny: the tested smoke mode)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model instead of the 0.5B one")
    parser.add_argument("--out", default="runs/gpu_check")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds over every configuration")
    parser.add_argument("--steps", type=int, default=2, help="measured optimizer steps per configuration and round")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps before them")
    parser.add_argument("--batch", type=int, default=None, help="completions per step (default 64 GPU, 16 tiny)")
    parser.add_argument("--max-tokens", type=int, default=None, help="completion length (default 128 GPU, 8 tiny)")
    parser.add_argument("--methods", nargs="*", default=None, help="registered methods to time (default: all)")
    parser.add_argument("--no-vllm", action="store_true")
    opts = parser.parse_args(argv)
    if not opts.cpu and not torch.cuda.is_available():
        print("gpu_check: no GPU here; use --cpu --tiny for the CPU smoke mode", file=sys.stderr)
        return 2
    if opts.cpu:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    opts.batch = opts.batch or (16 if opts.tiny else 64)
    opts.max_tokens = opts.max_tokens or (8 if opts.tiny else 128)

    from rlvr_entropy.methods import METHODS
    from rlvr_entropy.tasks import make_dataset

    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    shape = TINY if opts.tiny else QWEN_05B
    model_dir = build_model(shape, out / "model")
    params = sum(p.numel() for p in Qwen2ForCausalLM.from_pretrained(model_dir).parameters())
    dataset = make_dataset("arithmetic", 256, 0)
    names = opts.methods if opts.methods is not None else list(METHODS)
    configs: list[tuple[str, list[dict] | None]] = [("trl", None), ("none", [])]
    configs += [(n, [{"name": n, **METHOD_ENTRIES.get(n, {})}]) for n in names]
    configs += [(label, [entry]) for label, entry in EXTRA if entry["name"] in names]
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name, _ in configs}
    started = time.perf_counter()
    for r in range(opts.rounds):
        for name, methods in configs:  # interleaved: A B C ..., then again
            rounds[name].append(run_configuration(name, methods, model_dir, opts, dataset, out / f"round{r}"))
            print(f"[gpu_check] round {r + 1}/{opts.rounds} {name}: {rounds[name][-1]['step_s']:.3f} s/step",
                  flush=True)
    results = {name: {key: statistics.median(x[key] for x in runs) for key in ("step_s", "tokens_per_s", "peak_gib")}
               for name, runs in rounds.items()}
    device = torch.cuda.get_device_name(0) if not opts.cpu else f"CPU ({os.cpu_count()} cores)"
    meta = {"device": device, "model": f"Qwen2 {params / 1e6:.1f}M parameters, vocabulary {shape['vocab_size']}",
            "batch": opts.batch, "max_tokens": opts.max_tokens, "steps": opts.steps, "rounds": opts.rounds,
            "vllm": {"skipped": "--no-vllm"} if opts.no_vllm else vllm_section(model_dir, opts, dataset, out)}
    meta["seconds"] = time.perf_counter() - started
    write_report(out, "gpu_check", meta, results, rounds, markdown(results, meta))
    return 0


def write_report(out: Path, stem: str, meta: dict[str, Any], results: dict, rounds: dict, table: str) -> None:
    """``<out>/<stem>.json`` (meta, medians, every round) and ``<out>/<stem>.md`` (the table), and print the table."""
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results, "rounds": rounds}, indent=2))
    (out / f"{stem}.md").write_text(table)
    print(table)
    print(f"[{stem}] {meta['seconds']:.0f} s; wrote {out / f'{stem}.json'} and {out / f'{stem}.md'}")


if __name__ == "__main__":
    sys.exit(main())
