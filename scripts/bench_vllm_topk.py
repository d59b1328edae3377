"""Benchmark: what asking vLLM for top-k log-probs costs, and how close the top-k entropy estimate is.

One run, one engine, the settings interleaved (so the ratios compare like with like):
for each k in --ks, generate the same prompts with ``logprobs=k`` (0 = TRL's default, the sampled token
only), time vLLM's generate and our conversion (``topk_token_stats``), and compare the estimate with the
exact entropy of a transformers forward over the same tokens at the same temperature.

    .venv-vllm/bin/python scripts/bench_vllm_topk.py                 # the tiny model, CPU
    python scripts/bench_vllm_topk.py --model PATH --prompts 64      # any local model, e.g. on a GPU

Prints one table; ratios are against k=0 in the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="local model folder (default: the cached tiny arithmetic model)")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--ks", type=int, nargs="+", default=[0, 5, 20, -1])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.generation.vllm_generation import extract_logprobs
    from vllm import LLM, SamplingParams

    from rlvr_entropy.rollout_stats import step_entropy_and_logprobs, topk_token_stats
    from rlvr_entropy.tasks import make_dataset

    model_path = args.model
    if model_path is None:
        from rlvr_entropy.tiny import build_tiny_model

        model_path = str(build_tiny_model(task="arithmetic"))
    tok = AutoTokenizer.from_pretrained(model_path)
    rows = make_dataset("arithmetic", args.prompts, seed=11)
    prompts = [tok(rows[i]["prompt"])["input_ids"] for i in range(args.prompts)]
    llm = LLM(model=model_path, dtype="float32", enforce_eager=True, max_model_len=128, max_logprobs=-1,
              logprobs_mode="processed_logprobs", seed=0,
              distributed_executor_backend="uni" if torch.cuda.device_count() == 0 else None)
    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf.to(device)

    def run(k: int, seed: int) -> tuple[float, float, list, list]:
        params = SamplingParams(n=args.generations, temperature=args.temperature, max_tokens=args.max_tokens,
                                logprobs=k, seed=seed)
        t0 = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sampling_params=params, use_tqdm=False)
        values, ids = extract_logprobs(outs)  # TRL's parsing, part of what a request costs
        t1 = time.perf_counter()
        completions = [list(o.token_ids) for out in outs for o in out.outputs]
        stats, _ = topk_token_stats(completions, values, ids)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, completions, stats["entropy"]

    run(0, 0)  # warm-up
    times: dict[int, list[float]] = {k: [] for k in args.ks}
    convert: dict[int, list[float]] = {k: [] for k in args.ks}
    gaps: dict[int, list[float]] = {k: [] for k in args.ks}
    exact_mean: list[float] = []
    for r in range(args.repeats):
        for k in args.ks:  # interleaved: drift in machine load hits every k alike
            gen_s, conv_s, completions, entropy = run(k, seed=100 + r)
            times[k].append(gen_s)
            convert[k].append(conv_s)
            if k == 0:
                continue
            est, ent = [], []
            for row, completion in enumerate(completions):
                prompt = prompts[row // args.generations]
                ids = torch.tensor([prompt + completion], device=device)
                with torch.no_grad():
                    logits = hf(ids).logits[0, len(prompt) - 1 : -1]  # (T, V)
                ent.append(step_entropy_and_logprobs(logits, args.temperature)[0].cpu())
                est.append(entropy[row])
            e, x = torch.cat(est), torch.cat(ent)
            gaps[k].append(float((x - e).abs().mean()))
            exact_mean.append(float(x.mean()))
    base = statistics.median(times[args.ks[0]])
    print(f"device: {device}; model {model_path}; {args.prompts}x{args.generations} completions, "
          f"<= {args.max_tokens} tokens, T={args.temperature}; median of {args.repeats}; "
          f"exact mean entropy {statistics.mean(exact_mean):.4f} nats")
    print(f"{'k':>5} {'generate s':>11} {'ratio':>6} {'convert s':>10} {'mean |gap| nats':>16}")
    for k in args.ks:
        gen = statistics.median(times[k])
        gap = f"{statistics.mean(gaps[k]):.5f}" if gaps[k] else "-"
        print(f"{k:>5} {gen:>11.4f} {gen / base:>6.2f} {statistics.median(convert[k]):>10.4f} {gap:>16}")


if __name__ == "__main__":
    main()
