"""The tiny benchmark: each method's claim tested on the offline tiny world, over seeds, with one budget.

Runs the baselines, every registered method and one composition (KL-Cov + STEER) with the same shared
settings (``SHARED``: learning rate, warm-up, steps, batch), two runs at a time, then writes
``docs/tiny-benchmark.md``: a table of mean +/- spread over seeds, figures drawn by ``rlvr-entropy plot``,
and each claim with what was observed, reproduced or not, against criteria fixed here before any run.

    bash scripts/reproduce_tiny.sh                  # 3 seeds x 200 steps (51 minutes on 2 cores)
    bash scripts/reproduce_tiny.sh --quick          # 1 seed x 60 steps (7.5 minutes once the tiny models are built)
    python scripts/reproduce_tiny.py --report-only  # rewrite the document from the finished runs

Runs live in ``runs/tiny_benchmark/<config>/seed<S>``; a finished run whose command is unchanged is not run
again, so an interrupted benchmark resumes where it stopped.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rlvr_entropy.analysis import (
    LENGTH,
    ROLLOUT_ENTROPY,
    AnalysisError,
    Run,
    fit_run_law,
    load_run,
    read_final,
    run_covariance_diagnostic,
    series,
    summarize_run,
)

# What every run shares, whatever its recipe says: the collapse setting of issue 16 (measured: without the
# warm-up, learning rate 1e-4 drops the reward from 0.46 to about 0.15 in the first five steps, for every
# method; with it, no drop).
SHARED = ["learning_rate=1.0e-4", "lr_scheduler_type=constant_with_warmup", "warmup_steps=20"]
# Methods whose recipe is on the arithmetic task move to the split task, where GRPO's collapse shows.
SPLIT = ["data.task=split", "eval.datasets=[task:split]"]
STEPS, QUICK_STEPS = 200, 60
SEEDS, QUICK_SEEDS = (0, 1, 2), (0,)


@dataclass(frozen=True)
class Config:
    name: str
    recipe: str                 # recipes/tiny/<recipe>.yaml
    overrides: tuple[str, ...]  # on top of SHARED
    baseline: str               # the config it is compared with
    cost: float = 1.0           # relative run time, to start the long runs first


KL_COV_STEER = ("methods=[{name: kl_cov, ratio: 9.0e-2, beta: 1.0, selection_scope: micro_batch}, "
                "{name: steer, mapping: exp, weight_min: 0.8}]")
CONFIGS = [
    Config("grpo_split", "grpo_split", (), "grpo_split"),
    Config("clip_cov", "clip_cov_split", (), "grpo_split"),
    Config("kl_cov", "kl_cov_split", (), "grpo_split"),
    Config("steer", "steer", tuple(SPLIT), "grpo_split"),
    Config("seed_grpo", "seed_grpo", tuple(SPLIT), "grpo_split"),
    Config("canon", "canon", tuple(SPLIT), "grpo_split"),
    Config("aepo_0.8", "aepo", (), "grpo_split", cost=1.5),
    Config("aepo_0.4", "aepo", ("methods.0.target=0.4",), "grpo_split", cost=1.5),
    Config("kl_cov+steer", "kl_cov_split", (KL_COV_STEER,), "grpo_split"),
    # TRL's own entropy controls, registered as methods: at their defaults
    Config("entropy_bonus", "grpo_split", ("methods=[{name: entropy_bonus, coef: 0.01}]",), "grpo_split"),
    Config("high_entropy_tokens", "grpo_split", ("methods=[{name: high_entropy_tokens, rho: 0.2}]",), "grpo_split"),
    # The second wave (issue 17), each from its tiny recipe on the split task
    Config("ter", "ter", (), "grpo_split"),
    Config("entropic", "entropic", (), "grpo_split"),
    Config("entropy_bonus_target", "entropy_bonus_target", (), "grpo_split"),
    Config("entropy_coef_schedule", "entropy_coef_schedule", (), "grpo_split"),
    Config("entropy_adv", "entropy_adv", (), "grpo_split"),
    Config("ce_gppo", "ce_gppo", (), "grpo_split"),
    Config("erc", "erc", (), "grpo_split"),
    Config("archer", "archer", (), "grpo_split"),
    Config("siren", "siren", (), "grpo_split", cost=1.2),
    Config("typical", "typical", (), "grpo_split"),
    Config("grpo_think", "grpo_think", (), "grpo_think", cost=2.5),
    Config("pear", "pear", (), "grpo_think", cost=2.5),
    Config("ares", "ares", (), "grpo_think", cost=2.5),
]
BY_NAME = {c.name: c for c in CONFIGS}


def run_dir(out: Path, config: Config, seed: int) -> Path:
    return out / config.name / f"seed{seed}"


def command(config: Config, seed: int, steps: int, directory: Path) -> list[str]:
    recipe = ROOT / "recipes" / "tiny" / f"{config.recipe}.yaml"
    return [sys.executable, "-m", "rlvr_entropy", "train", str(recipe), *SHARED, *config.overrides,
            f"max_steps={steps}", f"seed={seed}", f"output_dir={directory}"]


def is_done(directory: Path, cmd: Sequence[str]) -> bool:
    """A finished run of the very same command (so a rerun with other settings trains again)."""
    stamp = directory / "benchmark_command.json"
    return stamp.exists() and json.loads(stamp.read_text()) == list(cmd[1:]) and read_final(directory) is not None


def train_one(config: Config, seed: int, steps: int, out: Path) -> tuple[Config, int, float, int]:
    directory = run_dir(out, config, seed)
    cmd = command(config, seed, steps, directory)
    if is_done(directory, cmd):
        return config, seed, 0.0, 0
    if directory.exists():  # an interrupted run, or one with other settings: start clean
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    start = time.time()
    with open(directory.parent / f"seed{seed}.log", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, check=False).returncode
    if rc == 0:
        (directory / "benchmark_command.json").write_text(json.dumps(cmd[1:]))
    return config, seed, time.time() - start, rc


def train_all(configs: Sequence[Config], seeds: Sequence[int], steps: int, out: Path, jobs: int) -> list[str]:
    """Every (config, seed), ``jobs`` at a time, longest first; returns the failures."""
    todo = sorted(((c, s) for c in configs for s in seeds), key=lambda cs: (-cs[0].cost, cs[1]))
    failures = []
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(train_one, c, s, steps, out) for c, s in todo]
        for done, future in enumerate(as_completed(futures), 1):
            config, seed, seconds, rc = future.result()
            where = run_dir(out, config, seed)
            if rc != 0:
                failures.append(f"{config.name} seed {seed} (log: {where.parent / f'seed{seed}.log'})")
                status = "FAILED"
            elif seconds == 0.0:
                status = "already done"
            else:
                s = summarize_run(load_run(where))
                status = f"{seconds:.0f}s, accuracy {s.final:.3f}, entropy {s.entropy_start:.3f} -> {s.entropy_end:.3f}"
            print(f"[reproduce_tiny] {done}/{len(todo)} {config.name} seed {seed}: {status}", flush=True)
    return failures


# --------------------------------------------------------------------------------------------------
# Statistics over seeds


def spread(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value); NaN values are left out."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def pm(values: Sequence[float], digits: int = 3) -> str:
    m, s = spread(values)
    if math.isnan(m):
        return "-"
    return f"{m:.{digits}f}" if len(values) < 2 else f"{m:.{digits}f} ± {s:.{digits}f}"


def tail_mean(run: Run, key: str, share: float = 0.25) -> float:
    """Mean of the last ``share`` of a run's logged values of ``key`` (the plateau, not one noisy point)."""
    _, values = series(run.rows, key)
    if not values:
        return math.nan
    n = max(1, int(len(values) * share))
    return statistics.fmean(values[-n:])


def mean_abs_change(run: Run, key: str = ROLLOUT_ENTROPY) -> float:
    """Mean |H[g+1] - H[g]| over consecutive generation batches: how far one rollout's updates move entropy."""
    _, values = series(run.rows, key)
    changes = [abs(b - a) for a, b in itertools.pairwise(values)]
    return statistics.fmean(changes) if changes else math.nan


def held_out(run: Run, which: str) -> float:
    s = summarize_run(run)
    value = s.eval_pass1_final if which == "pass1" else s.eval_passk_final
    return math.nan if value is None else value


# --------------------------------------------------------------------------------------------------
# Claims: each states the paper's claim, the criterion (fixed before the runs) and what was observed.


@dataclass(frozen=True)
class Claim:
    title: str
    criterion: str
    observed: str
    verdict: str    # "reproduced" (in every seed), "partly" (in some), "not reproduced"


Results = dict[str, dict[int, Run]]   # config name -> seed -> its finished run


def runs_of(results: Results, name: str) -> list[Run]:
    return [results[name][s] for s in sorted(results.get(name, {}))]


def _paired(results: Results, name: str, metric: Callable[[Run], float]) -> tuple[list[float], list[float]]:
    """``metric`` of a config's runs and of its baseline's runs, on the seeds both finished."""
    base = BY_NAME[name].baseline
    seeds = sorted(set(results[name]) & set(results[base]))
    return [metric(results[name][s]) for s in seeds], [metric(results[base][s]) for s in seeds]


def _seeds(n: int) -> str:
    return f"{n} seed{'s' if n != 1 else ''}"


def _verdict(hits: int, n: int, *, also: bool = True) -> str:
    """Reproduced when the claim held in all ``n`` seeds (and ``also``), partly when in some, else not."""
    return "reproduced" if hits == n and also else "partly" if hits else "not reproduced"


# A third of the entropy gone in 200 steps, still falling: the budget allows no more (300 steps: 0.43 of the
# start, measured on one seed; the 7B runs of the paper keep about 2%).
COLLAPSED = 2 / 3


def claim_collapse(results: Results) -> Claim:
    ratios = [summarize_run(r).entropy_end / summarize_run(r).entropy_start for r in runs_of(results, "grpo_split")]
    think = [summarize_run(r).entropy_end / summarize_run(r).entropy_start for r in runs_of(results, "grpo_think")]
    ok = sum(x <= COLLAPSED for x in ratios)
    observed = (f"split task: GRPO keeps {pm(ratios, 2)} of its starting training-pass entropy "
                f"(per seed: {', '.join(f'{x:.2f}' for x in ratios)})")
    if think:
        observed += f"; think task: {pm(think, 2)}"
    verdict = _verdict(ok, len(ratios))
    return Claim("GRPO's entropy collapses", f"end entropy at most {COLLAPSED:.2f} of the start, in every seed (split "
                 "task; set after the exploratory runs below, far from the paper's 7B runs, which lose about 98%)",
                 observed, verdict)


def claim_above(results: Results, name: str, label: str) -> Claim:
    ours, base = _paired(results, name, lambda r: summarize_run(r).entropy_end)
    wins = sum(a > b for a, b in zip(ours, base))
    _, base_sd = spread(base)
    gap = statistics.fmean(a - b for a, b in zip(ours, base))
    rel = statistics.fmean(a / b - 1 for a, b in zip(ours, base))
    clear = gap > 2 * base_sd if len(base) > 1 else gap > 0
    acc, acc_base = _paired(results, name, lambda r: summarize_run(r).final)
    observed = (f"end entropy {pm(ours)} against GRPO's {pm(base)} nats ({rel:+.0%} on average), higher in "
                f"{wins} of {_seeds(len(ours))}; final accuracy {pm(acc)} against {pm(acc_base)}")
    verdict = _verdict(wins, len(ours), also=clear)
    return Claim(f"{label} keeps entropy above GRPO",
                 "end entropy higher than GRPO's with the same seed in every seed, by more than twice GRPO's "
                 "inter-seed standard deviation", observed, verdict)


def claim_aepo(results: Results) -> Claim:
    parts, ok = [], True
    for name, target in (("aepo_0.8", 0.8), ("aepo_0.4", 0.4)):
        plateau = [tail_mean(r, "aepo/entropy") for r in runs_of(results, name)]
        m, _ = spread(plateau)
        ok &= abs(m - target) <= 0.1
        parts.append(f"target {target}: rollout entropy {pm(plateau)} over the last quarter")
    base = [tail_mean(r, ROLLOUT_ENTROPY) for r in runs_of(results, "grpo_split")]
    observed = "; ".join(parts) + f"; GRPO: {pm(base)}"
    return Claim("AEPO holds two targets", "mean rollout entropy over the last quarter of the run within 0.1 nats "
                 "of each target", observed, "reproduced" if ok else "not reproduced")


def claim_pear(results: Results) -> Claim:
    length, base_len = _paired(results, "pear", lambda r: tail_mean(r, LENGTH))
    acc, base_acc = _paired(results, "pear", lambda r: summarize_run(r).final)
    shorter = statistics.fmean(a / b - 1 for a, b in zip(length, base_len))
    d_acc = statistics.fmean(a - b for a, b in zip(acc, base_acc))
    observed = (f"length {pm(length, 1)} against GRPO's {pm(base_len, 1)} tokens ({shorter:+.0%}); final accuracy "
                f"{pm(acc)} against {pm(base_acc)} ({d_acc:+.3f})")
    verdict = ("reproduced" if shorter <= -0.10 and abs(d_acc) <= 0.05 else
               "partly" if shorter <= -0.10 else "not reproduced")
    return Claim("PEAR shortens responses at similar accuracy", "length over the last quarter at least 10% shorter "
                 "than GRPO's (think task) with final accuracy within 0.05", observed, verdict)


def claim_steadier(results: Results, name: str = "steer", label: str = "STEER") -> Claim:
    ours, base = _paired(results, name, mean_abs_change)
    narrower = sum(a < b for a, b in zip(ours, base))
    observed = (f"mean |change of rollout entropy| per rollout {pm(ours, 4)} against GRPO's {pm(base, 4)} nats, "
                f"smaller in {narrower} of {_seeds(len(ours))}")
    verdict = _verdict(narrower, len(ours))
    return Claim(f"{label} narrows the per-step entropy change", "mean absolute change of the rollout entropy between "
                 "consecutive rollouts smaller than GRPO's, in every seed", observed, verdict)


def claim_accuracy(results: Results, name: str, label: str, paper: str, which: str = "pass1") -> Claim:
    metric = "pass@1" if which == "pass1" else "pass@8"
    ours, base = _paired(results, name, lambda r: held_out(r, which))
    better = sum(a > b for a, b in zip(ours, base))
    ent, ent_base = _paired(results, name, lambda r: summarize_run(r).entropy_end)
    observed = (f"held-out {metric} {pm(ours)} against GRPO's {pm(base)}, higher in {better} of "
                f"{_seeds(len(ours))}; end entropy {pm(ent)} against {pm(ent_base)}")
    verdict = _verdict(better, len(ours))
    return Claim(f"{label}: {paper}", f"held-out {metric} at the end higher than GRPO's with the same seed, in every "
                 "seed", observed, verdict)


TARGET_TOLERANCE = 0.05  # nats: how close the last quarter's mean training-pass entropy must be to the target


def claim_target(results: Results, name: str, label: str, method: str) -> Claim:
    """A controller of the training-pass entropy holds the target it logs (``<method>/target``) over the last quarter."""
    plateau = [tail_mean(r, "entropy") for r in runs_of(results, name)]
    targets = [tail_mean(r, f"{method}/target") for r in runs_of(results, name)]
    hits = sum(abs(h - t) <= TARGET_TOLERANCE for h, t in zip(plateau, targets))
    base = [tail_mean(r, "entropy") for r in runs_of(results, "grpo_split")]
    observed = (f"training-pass entropy over the last quarter {pm(plateau)} against a target of {pm(targets, 2)}, "
                f"within {TARGET_TOLERANCE} nats in {hits} of {_seeds(len(plateau))}; GRPO: {pm(base)}")
    return Claim(f"{label} holds its target entropy", f"mean training-pass entropy over the last quarter within "
                 f"{TARGET_TOLERANCE} nats of the logged target, in every seed", observed, _verdict(hits, len(plateau)))


def claim_covariance(results: Results) -> Claim:
    per_step, cumulative, agree = [], [], []
    for run in runs_of(results, "grpo_split"):
        try:
            d = run_covariance_diagnostic(run.rows)
        except AnalysisError as err:
            return Claim("ΔH tracks −Cov(log π, A)", "negative correlation, per step on average and cumulative in "
                         "every seed", f"not measured: {err}", "not reproduced")
        per_step.append(d.correlation), cumulative.append(d.cumulative_correlation), agree.append(d.sign_agreement)
    ok = sum(c < 0 for c in cumulative)
    observed = (f"GRPO (split): per-step corr(ΔH, Cov) {pm(per_step, 2)}, cumulative corr(H − H0, ΣCov) "
                f"{pm(cumulative, 2)}, sign agreement of ΔH and −Cov {pm(agree, 2)}")
    verdict = _verdict(ok, len(cumulative), also=statistics.fmean(per_step) < 0)
    return Claim("ΔH tracks −Cov(log π, A)", "negative correlation, per step on average and cumulative in every seed",
                 observed, verdict)


def claim_law(results: Results) -> Claim:
    r2, ceiling, best = [], [], []
    for run in runs_of(results, "grpo_split"):
        try:
            fit, _, _ = fit_run_law(run.rows)
        except AnalysisError as err:
            return Claim("R = −a·exp(H) + b fits GRPO", "R² ≥ 0.5 on average", f"not fitted: {err}", "not reproduced")
        r2.append(fit.r2), ceiling.append(fit.ceiling), best.append(summarize_run(run).best)
    observed = f"R² {pm(r2, 2)}; predicted ceiling (H = 0) {pm(ceiling)} against the best accuracy reached {pm(best)}"
    return Claim("R = −a·exp(H) + b fits GRPO", "R² ≥ 0.5 on average over seeds (split task)", observed,
                 "reproduced" if statistics.fmean(r2) >= 0.5 else "not reproduced")


# Each claim with the configs it reads (besides their baselines) and how it is judged.
CLAIMS: list[tuple[tuple[str, ...], Callable[[Results], Claim]]] = [
    (("grpo_split",), claim_collapse),
    (("clip_cov",), lambda r: claim_above(r, "clip_cov", "Clip-Cov")),
    (("kl_cov",), lambda r: claim_above(r, "kl_cov", "KL-Cov")),
    (("kl_cov+steer",), lambda r: claim_above(r, "kl_cov+steer", "KL-Cov + STEER (composed)")),
    (("aepo_0.8", "aepo_0.4", "grpo_split"), claim_aepo),
    (("pear",), claim_pear),
    (("steer",), claim_steadier),
    (("seed_grpo",), lambda r: claim_accuracy(r, "seed_grpo", "SEED-GRPO", "uncertainty-scaled advantages raise accuracy")),
    (("canon",), lambda r: claim_accuracy(r, "canon", "CANON (entropy)", "favouring the better entropy half raises accuracy")),
    (("grpo_split",), claim_covariance),
    (("grpo_split",), claim_law),
    # the second wave
    (("ter",), lambda r: claim_target(r, "ter", "TER", "ter")),
    (("entropic",), lambda r: claim_target(r, "entropic", "EntroPIC", "entropic")),
    (("entropy_bonus_target",), lambda r: claim_target(r, "entropy_bonus_target", "TRL's adaptive bonus (Skywork-OR1)",
                                                       "entropy_bonus")),
    (("ce_gppo",), lambda r: claim_above(r, "ce_gppo", "CE-GPPO (beta1 < beta2)")),
    (("siren",), lambda r: claim_above(r, "siren", "SIREN")),
    (("erc",), lambda r: claim_steadier(r, "erc", "ERC")),
    (("archer",), lambda r: claim_accuracy(r, "archer", "Archer", "dual-token constraints raise accuracy")),
    (("entropy_adv",), lambda r: claim_accuracy(r, "entropy_adv", "Entropy advantage",
                                                 "an entropy bonus in the advantage raises pass@k", which="passk")),
]


def claims(results: Results) -> list[Claim]:
    """The claims whose configs (and their baselines) have finished runs; the others are left out."""
    out = []
    for needs, judge in CLAIMS:
        wanted = set(needs) | {BY_NAME[n].baseline for n in needs}
        if wanted <= set(results):
            out.append(judge(results))
    return out


# --------------------------------------------------------------------------------------------------
# The document

TABLE = ["config", "task", "final acc", "held-out pass@1", "held-out pass@8", "H start", "H end", "H min",
         "length", "wall time (s)"]


def table_rows(results: Results) -> list[list[str]]:
    rows = []
    for config in CONFIGS:
        runs = runs_of(results, config.name)
        if not runs:
            continue
        s = [summarize_run(r) for r in runs]
        rows.append([config.name, _task(config), pm([x.final for x in s]), pm([held_out(r, "pass1") for r in runs]),
                     pm([held_out(r, "passk") for r in runs]), pm([x.entropy_start for x in s]),
                     pm([x.entropy_end for x in s]), pm([x.entropy_min for x in s]), pm([x.mean_length for x in s], 1),
                     pm([x.wall_time for x in s], 0)])
    return rows


def _task(config: Config) -> str:
    """The task a config trains on: its recipe's, after the overrides."""
    from rlvr_entropy.config import load_recipe

    return load_recipe(ROOT / "recipes" / "tiny" / f"{config.recipe}.yaml", [*SHARED, *config.overrides]).data.task


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "--:" for i in range(len(header))) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


FIGURES = {  # file name -> (caption, configs drawn at seed 0)
    "covariance_methods.png": ("GRPO, Clip-Cov, KL-Cov and KL-Cov + STEER on the split task",
                               ["grpo_split", "clip_cov", "kl_cov", "kl_cov+steer"]),
    "aepo_targets.png": ("AEPO at targets 0.8 and 0.4 against GRPO", ["grpo_split", "aepo_0.8", "aepo_0.4"]),
    "advantage_methods.png": ("STEER, SEED-GRPO and CANON against GRPO", ["grpo_split", "steer", "seed_grpo", "canon"]),
    "trl_methods.png": ("TRL's entropy bonus and high-entropy-token mask against GRPO",
                        ["grpo_split", "entropy_bonus", "high_entropy_tokens"]),
    "think_methods.png": ("PEAR and ARES against GRPO on the think task", ["grpo_think", "pear", "ares"]),
    "target_controllers.png": ("Target-entropy controllers (dashed: each one's target) against GRPO",
                               ["grpo_split", "ter", "entropic", "entropy_bonus_target", "aepo_0.8"]),
    "second_wave_loss.png": ("CE-GPPO, Archer, ERC, SIREN and the entropy advantage against GRPO",
                             ["grpo_split", "ce_gppo", "archer", "erc", "siren", "entropy_adv"]),
    "schedules_and_sampling.png": ("A scheduled entropy coefficient and typical sampling against GRPO",
                                   ["grpo_split", "entropy_coef_schedule", "typical"]),
}


def draw_figures(out: Path, figures: Path, seed: int, names: set[str]) -> list[tuple[str, str]]:
    """Each figure by ``rlvr-entropy plot`` on the runs with ``seed`` of the configs in ``names`` (labels: the
    config names); a figure left with only its baseline is not drawn."""
    drawn = []
    figures.mkdir(parents=True, exist_ok=True)
    for name, (caption, configs) in FIGURES.items():
        dirs = [run_dir(out, BY_NAME[c], seed) for c in configs
                if c in names and (run_dir(out, BY_NAME[c], seed) / "metrics.jsonl").exists()]
        if len(dirs) < 2:
            continue
        # plot labels runs by directory name: link each seed directory under its config's name
        view = out / "_figures" / name.removesuffix(".png")
        view.mkdir(parents=True, exist_ok=True)
        links = []
        for d in dirs:
            link = view / d.parent.name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(d.resolve(), target_is_directory=True)
            links.append(str(link))
        subprocess.run([sys.executable, "-m", "rlvr_entropy", "plot", *links, "-o", str(figures / name), "--dpi", "60"],
                       check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        drawn.append((name, caption))
    return drawn


# How SHARED was chosen: single-seed runs of the split task (128 prompts) before the benchmark, kept here
# because the document reports them (nothing below was tuned per method).
HOW_CHOSEN = """\
## How the shared setting was chosen

Single-seed exploratory runs on the split task, before the runs above; the setting is the first that makes
GRPO's entropy fall steadily within the quickstart's budget without breaking the policy.

| GRPO run | entropy | what happened |
|---|--:|---|
| learning rate 5e-5, 300 steps | 1.00 → 0.60 | still falling slowly |
| 1e-4, no warm-up, 300 steps (seeds 0, 1) | 1.00 → 0.43, 0.49 | reward drops from 0.46 to 0.10-0.18 in the first 5 steps, then recovers |
| 2e-4, no warm-up, 300 steps | 1.00 → 0.19 | held-out pass@1 0.02: the policy breaks |
| 1e-4, 20 warm-up steps, 200 steps | 0.98 → 0.62 | no early drop: **the shared setting** |
| 1.5e-4, 20 warm-up steps, 157 steps | 0.98 → 0.58 | noisier reward, no faster collapse |

The covariance methods at 1e-4 without warm-up: KL-Cov at ratio 2e-2 ended 2% above GRPO (it penalises about
11 of about 680 tokens per micro-batch; they carry half the covariance mass, but the penalty averages 0.006);
at 0.1 it ended 46% and 66% above (two seeds). Clip-Cov, with PPO clipping off as in the paper, lost its
reward in the first 20 steps at every ratio tried (2e-2, 9e-3, 0.1: from 0.46 to 0.03-0.13), and at 0.1 its
entropy diverged (3.9 nats) on one seed: the warm-up removed that drop too. The ratios used above are the
paper's, scaled to keep the number of tokens each selection treats (`recipes/tiny/kl_cov_split.yaml`).
"""


def write_document(results: Results, *, seeds: Sequence[int], steps: int, doc: Path,
                   figures: list[tuple[str, str]], failures: Sequence[str], minutes: float | None,
                   jobs: int = 2) -> list[Claim]:
    """Write the document; returns the claims it judged."""
    found = claims(results)
    lines = [
        "# The tiny benchmark",
        "",
        "Written by `bash scripts/reproduce_tiny.sh" + (" --quick" if steps == QUICK_STEPS and len(seeds) == 1 else "") +
        "`; rerun it to check every figure below. Offline tiny world (a ~1M-parameter character-level Qwen2, "
        "warm-started), CPU.",
        "",
        f"- Seeds: {', '.join(map(str, seeds))}; {steps} optimizer steps per run; {jobs} run{'s' if jobs != 1 else ''} at a time"
        + (f"; {minutes:.0f} minutes of training in all" if minutes else "") + f" on {platform.machine()} with {os.cpu_count()} cores.",
        f"- Shared by every run: `{' '.join(SHARED)}`, and from the recipes: 128 prompts, 16 prompts × 8 completions "
        "per optimizer step, 4 optimizer steps per rollout, temperature 1, `loss_type: dapo`, no KL.",
        f"- Methods whose recipe is on the arithmetic task run on the split task (`{' '.join(SPLIT)}`), where GRPO's "
        "collapse shows: any split of the number is right, so the policy can collapse onto a few answers.",
        "- Each method runs at its recipe's settings (`recipes/tiny/`), at the paper's defaults or the scaling "
        "its recipe explains; nothing was tuned per method.",
        "- Mean ± standard deviation over seeds. Accuracy: the training reward, mean of the last 5 logged values. "
        "Held-out: the evaluation during training at the last step (256 prompts × 8 samples). "
        "H: training-pass token entropy (nats), mean of the first / last 5 logged values, and the minimum of 5-step means. "
        "Length: mean completion length in tokens. Wall time: TRL's train_runtime with two runs sharing the machine.",
        "",
        markdown_table(TABLE, table_rows(results)),
        "",
        "## Claims",
        "",
        "Each criterion was fixed before the three-seed runs; the verdict applies it to the figures observed "
        "(reproduced: in every seed; partly: in some).",
        "",
    ]
    for c in found:
        lines += [f"### {c.title}: **{c.verdict}**", "", f"- Criterion: {c.criterion}.", f"- Observed: {c.observed}.", ""]
    if figures:
        lines += ["## Figures", "", f"Seed {seeds[0]} of each config, drawn by `rlvr-entropy plot`.", ""]
        rel = os.path.relpath(doc.parent / "figures" / "tiny-benchmark", doc.parent)
        lines += [f"![{caption}]({rel}/{name})\n\n*{caption}.*\n" for name, caption in figures]
    lines += [HOW_CHOSEN]
    if failures:
        lines += ["## Runs that failed", "", *[f"- {f}" for f in failures], ""]
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("\n".join(lines).rstrip() + "\n")
    return found


def collect(out: Path, configs: Sequence[Config], seeds: Sequence[int]) -> Results:
    """The finished runs of ``configs`` under ``out``, by config and seed."""
    results: Results = {}
    for config in configs:
        dirs = {s: run_dir(out, config, s) for s in seeds}
        runs = {s: load_run(d) for s, d in dirs.items() if (d / "metrics.jsonl").is_file() and read_final(d) is not None}
        if runs:
            results[config.name] = runs
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"seed {QUICK_SEEDS[0]} only, {QUICK_STEPS} steps")
    p.add_argument("--seeds", type=int, nargs="+", help=f"default: {' '.join(map(str, SEEDS))}")
    p.add_argument("--steps", type=int, help=f"optimizer steps per run (default {STEPS})")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (each single-threaded)")
    p.add_argument("--out", type=Path, help="run directories (default runs/tiny_benchmark, --quick: runs/tiny_benchmark_quick)")
    p.add_argument("--doc", type=Path, help="the document (default: docs/tiny-benchmark.md for the full benchmark, "
                   "<out>/tiny-benchmark.md for a partial one)")
    p.add_argument("--report-only", action="store_true", help="write the document from the finished runs, train nothing")
    p.add_argument("--only", nargs="+", metavar="CONFIG", help="these configs and their baselines (default: all)")
    args = p.parse_args(argv)
    seeds = args.seeds or (QUICK_SEEDS if args.quick else SEEDS)
    steps = args.steps or (QUICK_STEPS if args.quick else STEPS)
    out = args.out or ROOT / "runs" / ("tiny_benchmark_quick" if args.quick else "tiny_benchmark")
    # docs/tiny-benchmark.md is the full benchmark's; a partial one (--quick, --only, other seeds or steps)
    # writes its report beside its runs
    full = not (args.quick or args.only) and tuple(seeds) == SEEDS and steps == STEPS
    doc = args.doc or (ROOT / "docs" / "tiny-benchmark.md" if full else out / "tiny-benchmark.md")
    start = time.time()
    configs = CONFIGS
    if args.only:
        unknown = sorted(set(args.only) - set(BY_NAME))
        if unknown:
            p.error(f"--only: unknown config(s) {', '.join(unknown)}; known: {', '.join(BY_NAME)}")
        wanted = set(args.only) | {BY_NAME[n].baseline for n in args.only}
        configs = [c for c in CONFIGS if c.name in wanted]
    failures = [] if args.report_only else train_all(configs, seeds, steps, out, args.jobs)
    results = collect(out, configs, seeds)
    if not results:
        print("[reproduce_tiny] no finished runs: nothing to report", file=sys.stderr)
        return 1
    # the training time, kept so that --report-only can still state it
    timing = out / "benchmark_time.json"
    recorded = json.loads(timing.read_text()) if timing.exists() else {}
    if not args.report_only:
        minutes = (time.time() - start) / 60
        if not full and recorded.get("seeds") == list(seeds) and recorded.get("steps") == steps:
            minutes += recorded.get("minutes") or 0.0  # configs added to a finished benchmark: the total
        recorded = {"seeds": list(seeds), "steps": steps, "minutes": minutes, "jobs": args.jobs}
        timing.write_text(json.dumps(recorded))
    minutes = recorded.get("minutes") if recorded.get("seeds") == list(seeds) and recorded.get("steps") == steps else None
    figures = draw_figures(out, doc.parent / "figures" / "tiny-benchmark", seeds[0], set(results))
    found = write_document(results, seeds=seeds, steps=steps, doc=doc, figures=figures, failures=failures,
                   minutes=minutes, jobs=recorded.get("jobs", args.jobs))
    print(f"[reproduce_tiny] wrote {doc} ({(time.time() - start) / 60:.1f} min)")
    for c in found:
        print(f"  {c.title}: {c.verdict}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
