"""What each method costs: step time, its split, and peak memory against TRL's GRPOTrainer, ratios in one run.

Configurations: TRL's ``GRPOTrainer`` ("trl"), ``EntropyGRPOTrainer`` with no method ("none"), and with each
registered method alone (CANON with both metrics). Each (round, configuration) runs in a fresh process, so
its peak resident memory is its own, and the rounds are interleaved (A B C ..., A B C ...) so that drift on
a shared machine hits every configuration alike; the figures are medians over rounds of per-round medians
over the measured steps. A step is split into generation (TRL's ``_generate_single_turn``, which includes
reading rollout statistics from generate's forward calls), rollout statistics computed after generation
(a forward pass where no cheaper source exists), reward (``_calculate_rewards``, the reward hooks
included), loss (``compute_loss``: the training forward, token hooks and TRL's loss) and backward.

    python scripts/bench_overhead.py                        # the tiny model on this machine (about 6 minutes)
    python scripts/bench_overhead.py --model PATH --batch 64 --max-tokens 256    # any local model
    python scripts/bench_overhead.py --quick                # two rounds, fewer steps (a smoke run)

Writes ``<out>/bench_overhead.{json,md}``. Targets (from issue 16), as ratios in one run: no method
<= 1.02 x TRL; Clip-Cov, KL-Cov, SEED-GRPO, CANON-length <= 1.03 x no method; STEER, PEAR, CANON-entropy,
ARES <= 1.05 x; AEPO is reported with its extra samples. The model, batch and task come from gpu_check.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

PHASES = ("generation", "rollout_stats", "reward", "loss", "backward", "hooks")
# (configuration, methods); None: TRL's own trainer.
TARGETS = {"none": 1.02, "clip_cov": 1.03, "kl_cov": 1.03, "seed_grpo": 1.03, "canon_length": 1.03,
           "steer": 1.05, "pear": 1.05, "canon": 1.05, "ares": 1.05}


def configurations(names: list[str] | None) -> list[tuple[str, list[dict] | None]]:
    from gpu_check import EXTRA, METHOD_ENTRIES

    from rlvr_entropy.methods import METHODS

    names = list(METHODS) if names is None else names
    configs: list[tuple[str, list[dict] | None]] = [("trl", None), ("none", [])]
    configs += [(n, [{"name": n, **METHOD_ENTRIES.get(n, {})}]) for n in names]
    configs += [(label, [entry]) for label, entry in EXTRA if entry["name"] in names]
    return configs


class PhaseClock:
    """Adds the wall time of wrapped methods to per-phase totals; ``lap()`` returns and resets them."""

    def __init__(self) -> None:
        self.totals = dict.fromkeys(PHASES, 0.0)

    def wrap(self, owner: Any, name: str, phase: str) -> None:
        original = getattr(owner, name, None)
        if original is None:
            return

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.totals[phase] += time.perf_counter() - start

        setattr(owner, name, timed)

    def lap(self) -> dict[str, float]:
        out, self.totals = self.totals, dict.fromkeys(PHASES, 0.0)
        return out


def worker(opts: argparse.Namespace) -> int:
    """One configuration in this process: warm-up steps, measured steps; prints one JSON line."""
    import torch
    from gpu_check import StepTimer, spread, train_args
    from transformers import AutoTokenizer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlvr_entropy import EntropyGRPOConfig, EntropyGRPOTrainer
    from rlvr_entropy.tasks import make_dataset
    from rlvr_entropy.tasks.rewards import correctness

    if opts.cpu:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    methods = json.loads(opts.worker_methods)
    tokenizer = AutoTokenizer.from_pretrained(opts.model)
    common = dict(model=opts.model, reward_funcs=[correctness, spread], train_dataset=make_dataset("arithmetic", 256, 0),
                  processing_class=tokenizer)
    out = Path(opts.out) / "scratch" / opts.worker
    if methods is None:
        trainer = GRPOTrainer(args=GRPOConfig(**train_args(opts, out)), **common)
    else:
        trainer = EntropyGRPOTrainer(args=EntropyGRPOConfig(**train_args(
            opts, out, methods=methods, metrics_jsonl=False, reward_sandbox="none")), **common)
    clock = PhaseClock()
    clock.wrap(trainer, "_generate_single_turn", "generation")
    clock.wrap(trainer, "_forward_stats", "rollout_stats")
    clock.wrap(trainer, "_calculate_rewards", "reward")
    clock.wrap(trainer, "compute_loss", "loss")
    clock.wrap(trainer.accelerator, "backward", "backward")
    # Time inside this project's code for the methods (inside the reward and loss phases above): measured in
    # the same process, so it is free of the process-to-process variance the step ratios suffer.
    clock.wrap(trainer, "_rollout_batch", "hooks")
    clock.wrap(trainer, "_apply_token_hooks", "hooks")
    pipeline = getattr(trainer, "pipeline", None)
    for stage in ("reward", "advantage"):
        if pipeline is not None and pipeline.uses(stage):
            clock.wrap(pipeline, stage, "hooks")
    laps: list[dict[str, float]] = []

    class Laps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            laps.append(clock.lap())

    timer = StepTimer()
    trainer.add_callback(timer)
    trainer.add_callback(Laps())
    for quiet in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(quiet)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    steps, phases = timer.times[opts.warmup:], laps[opts.warmup:]
    result = {
        "step_s": statistics.median(steps),
        **{p: statistics.median(lap[p] for lap in phases) for p in PHASES},
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
    }
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def run_round(name: str, methods: list[dict] | None, opts: argparse.Namespace, argv: list[str]) -> dict[str, float]:
    cmd = [sys.executable, __file__, *argv, "--worker", name, "--worker-methods", json.dumps(methods)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def reference(name: str) -> str | None:
    """What a configuration's ratio is taken against: TRL for "none", "none" for a method, nothing for TRL."""
    return None if name == "trl" else "trl" if name == "none" else "none"


def paired_ratios(rounds: dict[str, list[dict[str, float]]]) -> dict[str, list[float]]:
    """Per round, each configuration's step time over its reference's in the same round (run minutes apart,
    so slow drift of the machine cancels), for every configuration that has a reference."""
    return {name: [r["step_s"] / b["step_s"] for r, b in zip(runs, rounds[ref], strict=True)]
            for name, runs in rounds.items() if (ref := reference(name)) is not None}


def markdown(results: dict[str, dict[str, float]], meta: dict[str, Any],
             ratios: dict[str, list[float]]) -> str:
    lines = [
        f"Overhead on {meta['machine']} ({meta['model']}; {meta['batch']} completions of <= {meta['max_tokens']} "
        f"tokens per step; median of {meta['steps']} steps x {meta['rounds']} interleaved rounds, one process each).",
        "",
        "| configuration | step ms | ratio | range over rounds | against | target | generation | rollout stats | reward "
        "| loss | backward | method hooks | peak RSS MiB |",
        "|---|--:|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for name, r in results.items():
        ref = reference(name)
        per_round = ratios.get(name, [1.0])  # TRL, the reference of references, has none
        ratio = statistics.median(per_round)
        against = {"trl": "TRL", "none": "no method", None: "-"}[ref]
        target = TARGETS.get(name)
        mark = "" if target is None else (f"{target:.2f}" + (" ok" if ratio <= target else " **missed**"))
        span = f"{min(per_round):.3f}-{max(per_round):.3f}" if ref else "-"
        split = " | ".join(f"{1000 * r[p]:.1f}" for p in PHASES)
        lines.append(f"| {name} | {1000 * r['step_s']:.1f} | {ratio:.3f} | {span} | {against} | {mark or '-'} | {split} | "
                     f"{r['peak_rss_mib']:.0f} |")
    lines += ["", "Ratio: median over rounds of the step time over the reference's in the same round. Split: medians "
              "per step in ms (each phase's own median, so they need not add up to the step); AEPO's generation "
              "includes its extra samples at two temperatures. Method hooks: time inside the methods' hooks and the "
              "rollout batch they read (part of the reward and loss phases), measured in the process itself."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a local model directory (default: the tiny random Qwen2 of gpu_check --tiny)")
    parser.add_argument("--out", default="runs/bench_overhead")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="measured optimizer steps per configuration and round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64, help="completions per optimizer step")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--methods", nargs="*", default=None, help="registered methods to time (default: all)")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 3 steps after 1 warm-up step")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-methods", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    import torch

    opts.cpu = not torch.cuda.is_available()
    if opts.quick:
        opts.rounds, opts.steps, opts.warmup = 2, 3, 1
    if opts.worker:
        return worker(opts)

    from gpu_check import TINY, build_model, write_report

    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    if opts.model is None:
        opts.model = str(build_model(TINY, out / "model"))
        argv += ["--model", opts.model]
    if opts.quick:
        argv = [a for a in argv if a != "--quick"] + ["--rounds", "2", "--steps", "3", "--warmup", "1"]
    configs = configurations(opts.methods)
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name, _ in configs}
    started = time.perf_counter()
    for r in range(opts.rounds):
        for name, methods in configs:  # interleaved
            rounds[name].append(run_round(name, methods, opts, argv))
            print(f"[bench_overhead] round {r + 1}/{opts.rounds} {name}: {1000 * rounds[name][-1]['step_s']:.1f} ms/step",
                  flush=True)
    keys = ("step_s", *PHASES, "peak_rss_mib")
    results = {name: {k: statistics.median(x[k] for x in runs) for k in keys} for name, runs in rounds.items()}
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(opts.model)
    machine = (torch.cuda.get_device_name(0) if not opts.cpu
               else f"CPU, {os.cpu_count()} cores, {os.environ.get('OMP_NUM_THREADS', '?')} thread(s) per process")
    meta = {"machine": f"{machine}, {platform.python_implementation()} {platform.python_version()}, torch {torch.__version__}",
            "model": f"{Path(opts.model).name}: {config.model_type}, hidden {config.hidden_size}, {config.num_hidden_layers} "
                     f"layers, vocabulary {config.vocab_size}",
            "batch": opts.batch, "max_tokens": opts.max_tokens, "steps": opts.steps, "rounds": opts.rounds,
            "seconds": time.perf_counter() - started}
    ratios = paired_ratios(rounds)
    meta["ratios"] = ratios
    write_report(out, "bench_overhead", meta, results, rounds, markdown(results, meta, ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
