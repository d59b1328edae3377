"""Analysis of logged runs: the compare table, the entropy-performance law and the covariance diagnostic.

Everything here works on the rows of ``<run>/metrics.jsonl`` (one dict per logged step, TRL's metric
names) and is plain Python: no numpy, torch or matplotlib, so the numbers can be checked by hand and
the module imports in milliseconds. Figures live in :mod:`rlvr_entropy.plotting`.

The law and the diagnostic are those of Cui et al. 2025, "The Entropy Mechanism of Reinforcement
Learning for Reasoning Language Models" (arXiv 2505.22617):

- performance follows entropy as R = -a * exp(H) + b over a run, so the fitted curve predicts the
  performance once entropy is exhausted, R(H = 0) = -a + b (the "ceiling");
- the entropy change of a policy-gradient step is driven by the covariance of the log-probability
  and the advantage of the sampled tokens: H(pi_{k+1}) - H(pi_k) ~ -eta * Cov(log pi, A).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

Row = dict[str, Any]

# The trainer's own metric names; see "What every run logs" in the README.
ENTROPY = "entropy"                          # training-pass token entropy, every optimizer step
ROLLOUT_ENTROPY = "rollout_entropy/mean"     # behaviour-policy entropy of the rollouts, per generation
COVARIANCE = "covariance/logp_adv"
REWARD = "reward"
ACCURACY = "rewards/correctness/mean"        # the verifiable part of the reward, before any shaping
LENGTH = "completions/mean_length"


class AnalysisError(ValueError):
    """The run cannot support the requested analysis (too few points, entropy that did not move, ...)."""


# --------------------------------------------------------------------------------------------------
# Reading runs


def read_metrics(run_dir: str | Path) -> list[Row]:
    """Training log lines of a run (eval lines and the final summary excluded), in step order.

    Tolerates a run that is still writing: a torn last line is skipped.
    """
    return _read_lines(run_dir)[0]


def read_final(run_dir: str | Path) -> Row | None:
    """The summary line TRL writes when training ends (``train_runtime`` ...), or None while running."""
    return _read_lines(run_dir)[1]


def _read_lines(run_dir: str | Path) -> tuple[list[Row], Row | None]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a run directory?")
    rows: list[Row] = []
    final: Row | None = None
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written right now
        if not isinstance(row, dict):
            continue
        if "train_runtime" in row:
            final = row
        elif not any(k.startswith("eval_") for k in row):
            rows.append(row)
    return sorted(rows, key=lambda r: r.get("step", 0)), final


def series(rows: Sequence[Row], key: str) -> tuple[list[int], list[float]]:
    """Steps and finite values of ``key`` over the rows that logged it."""
    steps, values = [], []
    for row in rows:
        value = row.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            steps.append(int(row.get("step", 0)))
            values.append(float(value))
    return steps, values


def paired(rows: Sequence[Row], x_key: str, y_key: str) -> tuple[list[int], list[float], list[float]]:
    """Steps where both keys were logged, with their values (rollout metrics appear only every
    ``steps_per_generation`` steps, training-pass ones every step)."""
    xs = dict(zip(*series(rows, x_key), strict=True))
    steps, x, y = [], [], []
    for step, value in zip(*series(rows, y_key), strict=True):
        if step in xs:
            steps.append(step)
            x.append(xs[step])
            y.append(value)
    return steps, x, y


def has(rows: Sequence[Row], key: str) -> bool:
    return any(key in row for row in rows)


@dataclass
class Run:
    """One run directory: its logged rows, its end-of-training line and the methods of its recipe."""

    path: Path
    rows: list[Row]
    final: Row | None = None
    methods: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def label(self) -> str:
        """The directory name plus the methods it used, unless the name already says it."""
        names = "+".join(self.methods) or "grpo"
        return self.name if names == self.name else f"{self.name} [{names}]"


def load_run(run_dir: str | Path) -> Run:
    path = Path(run_dir)
    rows, final = _read_lines(path)
    return Run(path=path, rows=rows, final=final, methods=recipe_methods(path))


def recipe_methods(run_dir: str | Path) -> list[str]:
    """Method names from the run's saved ``recipe.yaml`` (empty when there is none or it lists none)."""
    recipe = Path(run_dir) / "recipe.yaml"
    if not recipe.is_file():
        return []
    methods = (yaml.safe_load(recipe.read_text()) or {}).get("methods") or []
    return [str(m.get("name", "?")) for m in methods if isinstance(m, dict)]


def run_label(run_dir: str | Path) -> str:
    return Run(path=Path(run_dir), rows=[], methods=recipe_methods(run_dir)).label


def performance_key(rows: Sequence[Row]) -> str:
    """Accuracy where the correctness reward is logged, else the total reward.

    ``reward`` includes any reward shaping (PEAR's penalty, a format reward); the law and the compare
    table are about how often the answer is right.
    """
    return ACCURACY if has(rows, ACCURACY) else REWARD


def law_entropy_key(rows: Sequence[Row]) -> str:
    """Rollout entropy where logged: it is the entropy of the very policy whose samples earned the
    reward on that step, over the whole generation batch. Else the training-pass entropy."""
    return ROLLOUT_ENTROPY if has(rows, ROLLOUT_ENTROPY) else ENTROPY


def method_stat_keys(rows: Sequence[Row], methods: Iterable[str]) -> dict[str, list[str]]:
    """For each method with statistics in the rows: its keys, ``<method>/<stat>`` then
    ``rewards/<method>/mean`` (what a reward-shaping method added), in first-logged order."""
    methods = list(dict.fromkeys(methods))
    out: dict[str, list[str]] = {}
    for row in rows:
        for key in row:
            for method in methods:
                if key.startswith(f"{method}/") or key == f"rewards/{method}/mean":
                    keys = out.setdefault(method, [])
                    if key not in keys:
                        keys.append(key)
    for keys in out.values():
        keys.sort(key=lambda k: k.startswith("rewards/"))  # stable: the method's own stats first
    return out


# --------------------------------------------------------------------------------------------------
# Evaluation during training (``eval/<dataset>/<figure>``, written by periodic_eval.py)

EVAL = "eval/"


def eval_datasets(rows: Sequence[Row]) -> list[str]:
    """The datasets a run evaluated on during training, in first-logged order."""
    names: list[str] = []
    for row in rows:
        for key in row:
            if key.startswith(EVAL) and key.count("/") >= 2:
                name = key.split("/")[1]
                if name not in names:
                    names.append(name)
    return names


def eval_k(rows: Sequence[Row], dataset: str) -> int | None:
    """The largest k of the ``pass@k`` the run logged for ``dataset`` (None if it logged none above 1)."""
    ks = {int(key.rsplit("@", 1)[1]) for row in rows for key in row
          if key.startswith(f"{EVAL}{dataset}/pass@") and key.rsplit("@", 1)[1].isdigit()}
    ks.discard(1)
    return max(ks) if ks else None


def pass_curve(rows: Sequence[Row], dataset: str) -> tuple[list[int], list[float], list[float], int | None]:
    """Steps at which ``dataset`` was evaluated, its pass@1 and pass@k there, and k."""
    k = eval_k(rows, dataset)
    if k is None:
        return [], [], [], None
    steps, p1, pk = paired(rows, f"{EVAL}{dataset}/pass@1", f"{EVAL}{dataset}/pass@{k}")
    return steps, p1, pk, k


@dataclass(frozen=True)
class Tradeoff:
    """pass@1 against pass@k over a run's evaluations: did pass@k hold while pass@1 rose?"""

    label: str
    dataset: str
    k: int
    steps: list[int]
    pass1: list[float]
    passk: list[float]

    @property
    def delta_pass1(self) -> float:
        return self.pass1[-1] - self.pass1[0]

    @property
    def delta_passk(self) -> float:
        return self.passk[-1] - self.passk[0]


def run_tradeoff(run: Run, dataset: str | None = None) -> Tradeoff:
    """The run's pass@1/pass@k trajectory on ``dataset`` (default: its first eval dataset)."""
    names = eval_datasets(run.rows)
    if not names:
        raise AnalysisError("the run logged no evaluation (add an `eval` section to its recipe)")
    dataset = dataset or names[0]
    if dataset not in names:
        raise AnalysisError(f"the run did not evaluate on '{dataset}'; it evaluated on {names}")
    steps, p1, pk, k = pass_curve(run.rows, dataset)
    if k is None or len(steps) < 1:
        raise AnalysisError(f"the run logged no pass@k above k = 1 on '{dataset}' (eval.k >= 2)")
    return Tradeoff(label=run.label, dataset=dataset, k=k, steps=steps, pass1=p1, passk=pk)


def tradeoff_table(tradeoffs: Sequence[Tradeoff]) -> str:
    """Per run: pass@1 and pass@k at the first and last evaluation, and their changes."""
    header = ["run", "dataset", "evals", "pass@1 first", "pass@1 last", "d pass@1", "pass@k first", "pass@k last",
              "d pass@k"]
    rows = [[t.label, f"{t.dataset} (k={t.k})", str(len(t.steps)), f"{t.pass1[0]:.3f}", f"{t.pass1[-1]:.3f}",
             f"{t.delta_pass1:+.3f}", f"{t.passk[0]:.3f}", f"{t.passk[-1]:.3f}", f"{t.delta_passk:+.3f}"]
            for t in tradeoffs]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))  # noqa: E731
    return "\n".join([line(header), *(line(r) for r in rows)]) + (
        "\n\nfirst/last: the run's first and last evaluation during training (eval section); an entropy method "
        "claims to keep pass@k from falling while pass@1 rises"
    )


def progress(run_dir: str | Path) -> str:
    """One compact line about a run that may still be training: step / max_steps, latest accuracy and entropy."""
    path = Path(run_dir)
    if not (path / "metrics.jsonl").is_file():
        return f"{path.name}: waiting"
    rows, final = _read_lines(path)
    recipe = path / "recipe.yaml"
    total = (yaml.safe_load(recipe.read_text()) or {}).get("max_steps") if recipe.is_file() else None
    step = int(rows[-1].get("step", 0)) if rows else 0
    perf = series(rows, performance_key(rows))[1]
    entropy = series(rows, ENTROPY)[1]
    parts = [f"{path.name} {step}" + (f"/{total}" if total else "")]
    if perf:
        parts.append(f"acc {mean(perf[-5:]):.3f}")
    if entropy:
        parts.append(f"H {mean(entropy[-5:]):.3f}")
    for name in eval_datasets(rows)[:1]:
        _, p1, pk, k = pass_curve(rows, name)
        if p1:
            parts.append(f"eval pass@1 {p1[-1]:.3f} pass@{k} {pk[-1]:.3f}")
    if final is not None:
        parts.append("done")
    return " ".join(parts)


# --------------------------------------------------------------------------------------------------
# Small statistics


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation; NaN when either side is constant (no linear relation can be measured)."""
    if len(x) != len(y):
        raise ValueError(f"pearson: {len(x)} x values, {len(y)} y values")
    if len(x) < 2:
        return math.nan
    mx, my = mean(x), mean(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return math.nan
    return sxy / math.sqrt(sxx * syy)


def moving_means(values: Sequence[float], window: int) -> list[float]:
    """Means of every ``window`` consecutive values (all of them when there are fewer)."""
    if not values:
        return []
    window = max(1, min(window, len(values)))
    return [mean(values[i : i + window]) for i in range(len(values) - window + 1)]


# --------------------------------------------------------------------------------------------------
# The entropy-performance law


@dataclass(frozen=True)
class LawFit:
    """R = -a * exp(H) + b fitted by least squares; ``ceiling`` is the prediction at H = 0."""

    a: float
    b: float
    r2: float
    n: int
    entropy_min: float
    entropy_max: float

    @property
    def ceiling(self) -> float:
        return self.b - self.a

    def predict(self, entropy: float) -> float:
        return -self.a * math.exp(entropy) + self.b


def fit_entropy_law(
    entropy: Sequence[float],
    performance: Sequence[float],
    *,
    min_points: int = 5,
    min_entropy_range: float = 0.05,
) -> LawFit:
    """Fit R = -a * exp(H) + b to (entropy, performance) points.

    For fixed x = exp(H) the model is linear in (a, b), so ordinary least squares on x is the exact
    least-squares fit (no iterative solver). Refuses, with the reason, when there are fewer than
    ``min_points`` points or entropy spans less than ``min_entropy_range`` nats: exp(H) then barely
    varies and a and b are not identified (any slope fits the noise).
    """
    if len(entropy) != len(performance):
        raise ValueError(f"{len(entropy)} entropy values but {len(performance)} performance values")
    points = [(h, r) for h, r in zip(entropy, performance, strict=True) if math.isfinite(h) and math.isfinite(r)]
    if len(points) < min_points:
        raise AnalysisError(
            f"too few points to fit R = -a*exp(H) + b: {len(points)} (entropy, performance) pairs, "
            f"at least {min_points} needed (log more steps, or wait for the run to progress)"
        )
    hs = [h for h, _ in points]
    spread = max(hs) - min(hs)
    if spread < min_entropy_range:
        raise AnalysisError(
            f"entropy hardly moved ({min(hs):.4f} to {max(hs):.4f} nats, a range of {spread:.4f} < "
            f"{min_entropy_range}): the fit would not identify a and b"
        )
    xs = [math.exp(h) for h in hs]
    rs = [r for _, r in points]
    mx, mr = mean(xs), mean(rs)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (r - mr) for x, r in zip(xs, rs, strict=True)) / sxx
    a, b = -slope, mr - slope * mx
    ss_res = sum((r - (-a * x + b)) ** 2 for x, r in zip(xs, rs, strict=True))
    ss_tot = sum((r - mr) ** 2 for r in rs)
    # Constant performance: the fit (a = 0) is exact but explains no variance; R^2 is undefined.
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else math.nan
    return LawFit(a=a, b=b, r2=r2, n=len(points), entropy_min=min(hs), entropy_max=max(hs))


def fit_run_law(
    rows: Sequence[Row],
    *,
    entropy_key: str | None = None,
    performance: str | None = None,
    min_points: int = 5,
    min_entropy_range: float = 0.05,
) -> tuple[LawFit, str, str]:
    """The law on a run's logged points; returns the fit and the entropy and performance keys used."""
    entropy_key = entropy_key or law_entropy_key(rows)
    performance = performance or performance_key(rows)
    for key in (entropy_key, performance):
        if not has(rows, key):
            raise AnalysisError(f"the run never logged '{key}'")
    _, h, r = paired(rows, entropy_key, performance)
    fit = fit_entropy_law(h, r, min_points=min_points, min_entropy_range=min_entropy_range)
    return fit, entropy_key, performance


# --------------------------------------------------------------------------------------------------
# The covariance diagnostic


@dataclass(frozen=True)
class CovarianceDiagnostic:
    """Entropy change per logged step against Cov(log pi, A) on that step.

    ``delta[i] = H[i + 1] - H[i]`` is the change over the update(s) of step ``steps[i]``, whose
    covariance is ``covariance[i]``. The paper predicts delta ~ -eta * Cov: ``correlation`` should be
    negative and ``sign_agreement`` (steps where delta and -Cov have the same sign) high.

    The per-step correlation is noisy when each step's entropy is measured on different samples (a
    micro-batch of a rollout), so the cumulative view is reported too: H[t] - H[0] against the summed
    covariance before t, with ``eta`` from the least-squares fit through the origin
    H[t] - H[0] = -eta * sum_{s<t} Cov[s] and ``cumulative_correlation`` of those two series.
    """

    steps: list[int]
    entropy: list[float]          # H at steps[0..n]: one more value than delta
    delta: list[float]
    covariance: list[float]
    correlation: float
    slope: float                  # least-squares slope of delta on covariance
    sign_agreement: float
    eta: float
    cumulative_correlation: float

    @property
    def n(self) -> int:
        return len(self.delta)

    @property
    def cumulative_covariance(self) -> list[float]:
        """sum_{s<t} Cov[s] for every t in steps (0 at the first)."""
        out = [0.0]
        for c in self.covariance:
            out.append(out[-1] + c)
        return out


def covariance_diagnostic(
    steps: Sequence[int],
    entropy: Sequence[float],
    covariance: Sequence[float],
    *,
    min_points: int = 3,
) -> CovarianceDiagnostic:
    """The diagnostic from per-step entropy and covariance series logged at the same ``steps``."""
    if not (len(steps) == len(entropy) == len(covariance)):
        raise ValueError(f"{len(steps)} steps, {len(entropy)} entropy and {len(covariance)} covariance values")
    deltas = [entropy[i + 1] - entropy[i] for i in range(len(entropy) - 1)]
    covs = list(covariance[:-1])
    if len(deltas) < min_points:
        raise AnalysisError(
            f"too few steps for the covariance diagnostic: {len(deltas)} entropy changes, at least {min_points} needed"
        )
    correlation = pearson(deltas, covs)
    mc, md = mean(covs), mean(deltas)
    scc = sum((c - mc) ** 2 for c in covs)
    slope = sum((c - mc) * (d - md) for c, d in zip(covs, deltas, strict=True)) / scc if scc > 0 else math.nan
    agree = sum(1 for d, c in zip(deltas, covs, strict=True) if d * c < 0) / len(deltas)
    cum_cov, cum_dh = [0.0], [0.0]
    for d, c in zip(deltas, covs, strict=True):
        cum_cov.append(cum_cov[-1] + c)
        cum_dh.append(cum_dh[-1] + d)
    sxx = sum(x * x for x in cum_cov)
    eta = -sum(x * y for x, y in zip(cum_cov, cum_dh, strict=True)) / sxx if sxx > 0 else math.nan
    return CovarianceDiagnostic(
        steps=list(steps), entropy=list(entropy), delta=deltas, covariance=covs,
        correlation=correlation, slope=slope, sign_agreement=agree,
        eta=eta, cumulative_correlation=pearson(cum_cov, cum_dh),
    )


def run_covariance_diagnostic(rows: Sequence[Row], *, entropy_key: str = ENTROPY, min_points: int = 3) -> CovarianceDiagnostic:
    """The diagnostic over a run: training-pass entropy, logged every optimizer step beside the
    covariance of that step's loss (rollout entropy is logged once per generation batch only)."""
    if not has(rows, COVARIANCE):
        raise AnalysisError(f"the run never logged '{COVARIANCE}'")
    steps, h, cov = paired(rows, entropy_key, COVARIANCE)
    return covariance_diagnostic(steps, h, cov, min_points=min_points)


# --------------------------------------------------------------------------------------------------
# The compare table


@dataclass(frozen=True)
class RunSummary:
    """One row of the compare table. Accuracy and entropy values are means over ``window`` logged
    values (start: the first ones, final/end: the last ones, best/min: over every window)."""

    label: str
    steps: int
    finished: bool
    performance_key: str
    final: float | None
    best: float | None
    entropy_start: float | None
    entropy_end: float | None
    entropy_min: float | None
    mean_length: float | None
    wall_time: float | None       # seconds, from TRL's train_runtime; None while running
    # Evaluation during training on the run's first eval dataset: last and best logged values (None: none).
    eval_dataset: str | None = None
    eval_k: int | None = None
    eval_pass1_final: float | None = None
    eval_pass1_best: float | None = None
    eval_passk_final: float | None = None
    eval_passk_best: float | None = None


def summarize_run(run: Run, window: int = 5) -> RunSummary:
    rows = run.rows
    perf_key = performance_key(rows)
    _, perf = series(rows, perf_key)
    _, ent = series(rows, ENTROPY)
    _, length = series(rows, LENGTH)
    perf_means, ent_means = moving_means(perf, window), moving_means(ent, window)
    last_step = int(rows[-1].get("step", 0)) if rows else 0
    if run.final is not None:
        last_step = max(last_step, int(run.final.get("step", 0)))
    runtime = run.final.get("train_runtime") if run.final is not None else None
    names = eval_datasets(rows)
    evals: dict[str, Any] = {}
    if names:
        _, p1, pk, k = pass_curve(rows, names[0])
        if p1:
            evals = {"eval_dataset": names[0], "eval_k": k, "eval_pass1_final": p1[-1], "eval_pass1_best": max(p1),
                     "eval_passk_final": pk[-1], "eval_passk_best": max(pk)}
    return RunSummary(
        label=run.label,
        steps=last_step,
        finished=run.final is not None,
        performance_key=perf_key,
        final=perf_means[-1] if perf_means else None,
        best=max(perf_means) if perf_means else None,
        entropy_start=ent_means[0] if ent_means else None,
        entropy_end=ent_means[-1] if ent_means else None,
        entropy_min=min(ent_means) if ent_means else None,
        mean_length=mean(length) if length else None,
        wall_time=float(runtime) if isinstance(runtime, int | float) else None,
        **evals,
    )


COLUMNS = ["run", "steps", "final acc", "best acc", "H start", "H end", "H min", "mean len", "wall time"]


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "running"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


EVAL_COLUMNS = ["eval p@1 end", "eval p@1 best", "eval p@k end", "eval p@k best"]


def _cells(s: RunSummary, with_eval: bool = False) -> list[str]:
    def num(v: float | None, digits: int = 3) -> str:
        return "-" if v is None else f"{v:.{digits}f}"

    cells = [
        s.label, f"{s.steps}" + ("" if s.finished else "*"),
        num(s.final), num(s.best), num(s.entropy_start), num(s.entropy_end), num(s.entropy_min),
        num(s.mean_length, 2), format_duration(s.wall_time),
    ]
    if with_eval:
        cells += [num(s.eval_pass1_final), num(s.eval_pass1_best), num(s.eval_passk_final), num(s.eval_passk_best)]
    return cells


def compare_table(summaries: Sequence[RunSummary], *, markdown: bool = False, window: int = 5) -> str:
    """The runs side by side, as aligned text or a Markdown table, with a note saying what each
    column is (which key "acc" is, what the windows are); eval columns when a run evaluated during training."""
    with_eval = any(s.eval_dataset is not None for s in summaries)
    columns = COLUMNS + (EVAL_COLUMNS if with_eval else [])
    rows = [_cells(s, with_eval) for s in summaries]
    if markdown:
        lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" if i == 0 else "--:" for i in range(len(columns))) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    else:
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
        fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))  # noqa: E731
        lines = [fmt(columns), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
    keys = sorted({s.performance_key for s in summaries})
    note = (
        f"acc = {' / '.join(keys)}; H = training-pass token entropy (nats); final/end and start: mean of the "
        f"last/first {window} logged values, best/min: over every {window} consecutive values; "
        "wall time: TRL's train_runtime"
    )
    if with_eval:
        evals = sorted({f"{s.eval_dataset} (k={s.eval_k})" for s in summaries if s.eval_dataset is not None})
        note += (f"; eval p@1 / p@k: pass@1 and pass@k of the evaluation during training on {', '.join(evals)}, "
                 "at its last evaluation (end) and its best")
    if any(not s.finished for s in summaries):
        note += "; * still running (or stopped before the end)"
    return "\n".join(lines) + "\n\n" + note


def versus(summaries: Sequence[RunSummary], baseline: RunSummary) -> list[str]:
    """One line per run saying what it did against ``baseline``: end entropy (relative), final accuracy, eval."""
    lines = []
    for s in summaries:
        if s is baseline:
            continue
        parts = []
        if s.entropy_end is not None and baseline.entropy_end:
            rel = s.entropy_end / baseline.entropy_end - 1
            parts.append(f"end entropy {s.entropy_end:.3f} nats ({rel:+.0%} vs {baseline.label})")
        if s.final is not None and baseline.final is not None:
            parts.append(f"final acc {s.final:.3f} ({s.final - baseline.final:+.3f})")
        if s.eval_passk_final is not None and baseline.eval_passk_final is not None:
            parts.append(f"eval pass@1 {s.eval_pass1_final:.3f} ({s.eval_pass1_final - baseline.eval_pass1_final:+.3f}), "
                         f"pass@{s.eval_k} {s.eval_passk_final:.3f} ({s.eval_passk_final - baseline.eval_passk_final:+.3f})")
        lines.append(f"{s.label}: " + ("; ".join(parts) if parts else "nothing to compare yet"))
    return lines
