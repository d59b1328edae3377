"""Figures from ``metrics.jsonl`` files: training curves of several runs, the entropy-performance law
fit and the covariance diagnostic. The numbers come from :mod:`rlvr_entropy.analysis`, except the
entropy-by-difficulty profile (:func:`difficulty_profile`), which only this figure uses.

Each figure is built by a ``*_figure`` function that returns the matplotlib Figure (so tests and
notebooks can inspect panels and legends), and saved by ``save_figure``. Files still being written
are read as they are (a torn last line is skipped), so this works during a run.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import matplotlib

matplotlib.use("Agg")  # no display on training machines
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from rlvr_entropy.analysis import (  # noqa: E402  (re-exported: older callers import them from here)
    ACCURACY,
    COVARIANCE,
    ENTROPY,
    EVAL,
    LENGTH,
    REWARD,
    ROLLOUT_ENTROPY,
    AnalysisError,
    CovarianceDiagnostic,
    LawFit,
    Row,
    Run,
    Tradeoff,
    eval_datasets,
    eval_k,
    load_run,
    method_stat_keys,
    moving_means,
    paired,
    read_metrics,
    run_label,
    series,
)

__all__ = [
    "DifficultyProfile", "Panel", "covariance_figure", "difficulty_profile", "law_figure", "plot_runs", "read_metrics",
    "run_label", "runs_figure", "save_figure", "series", "target_keys", "tradeoff_figure", "training_panels",
]

THINK, ANSWER = "pear/think_entropy", "pear/answer_entropy"
PANEL_W, PANEL_H = 5.6, 2.5   # inches per panel: two columns fit a laptop screen and a README
TARGET_SUFFIX = "/target"     # a method's entropy target (``<method>/target``), drawn over the measured entropy
# The trainer's group-accuracy buckets (rlvr_entropy.metrics.DIFFICULTY_BUCKETS, not imported: it pulls in torch),
# with the share p of a group's answers that were right, for the axis.
DIFFICULTY = (("unsolved", "p = 0"), ("hard", "p < 1/3"), ("medium", "p < 2/3"), ("easy", "p < 1"), ("solved", "p = 1"))
DIFFICULTY_KEY = "entropy_by_difficulty/{}/{}"
EDGE_SHARE = 0.1              # the profile's "start" and "end": the first and last tenth of the logged rollouts


@dataclass(frozen=True)
class Panel:
    """One subplot: its title and the keys drawn in it, each (key, line style); ``band`` is a
    (low, high) pair of keys filled around the first key; ``smooth`` adds a moving mean for noisy
    per-rollout values."""

    title: str
    keys: tuple[tuple[str, str], ...]
    band: tuple[str, str] | None = None
    note: str | None = None       # legend for line styles when a panel draws several keys per run
    smooth: bool = False
    markers: bool = False         # sparse series (evaluations every N steps): draw each point
    targets: bool = False         # also draw each run's ``<method>/target`` series, dashed, in the run's colour
    kind: Literal["steps", "difficulty"] = "steps"  # x = optimizer step, or x = accuracy bucket (a profile)


def known_methods() -> list[str]:
    """Registered method names (imported lazily: the registry pulls in torch)."""
    from rlvr_entropy.methods import METHODS

    return list(METHODS)


def _logged(runs: Sequence[Run], key: str) -> bool:
    return any(series(run.rows, key)[0] for run in runs)


def target_keys(run: Run) -> list[str]:
    """The run's entropy targets: every logged key ending in ``/target`` (``<method>/target``), first-logged order."""
    keys = dict.fromkeys(k for row in run.rows for k in row if k.endswith(TARGET_SUFFIX) and not k.startswith(EVAL))
    return [k for k in keys if series(run.rows, k)[0]]


@dataclass(frozen=True)
class DifficultyProfile:
    """A run's mean rollout entropy per accuracy bucket over its first and its last tenth of generation batches.

    ``start``/``end`` map a bucket name to the entropy (nats), the mean over the batches of the window of each batch's
    mean per-response entropy in that bucket, weighted by the batch's prompts in it; a bucket no batch of the window
    filled is absent. ``start_steps``/``end_steps``: the first and last step of each window."""

    start: dict[str, float]
    end: dict[str, float]
    start_steps: tuple[int, int]
    end_steps: tuple[int, int]


def difficulty_profile(run: Run, share: float = EDGE_SHARE) -> DifficultyProfile | None:
    """:class:`DifficultyProfile` of a run from its ``entropy_by_difficulty/<bucket>/{entropy,prompts}`` keys (logged by
    the trainer on every generation batch); None when it logged none. Each window holds ``share`` of the batches that
    logged an entropy (at least one; a run with a single batch has the same start and end)."""
    names = [name for name, _ in DIFFICULTY]
    rows = [r for r in run.rows if any(_finite(r.get(DIFFICULTY_KEY.format(b, "entropy"))) for b in names)]
    if not rows:
        return None
    size = max(1, round(share * len(rows)))

    def window(part: Sequence[Row]) -> dict[str, float]:
        out = {}
        for bucket in names:
            total = weight = 0.0
            for row in part:
                value = row.get(DIFFICULTY_KEY.format(bucket, "entropy"))
                prompts = row.get(DIFFICULTY_KEY.format(bucket, "prompts"), 1.0)
                if _finite(value) and _finite(prompts) and prompts > 0:
                    total += prompts * value
                    weight += prompts
            if weight > 0:
                out[bucket] = total / weight
        return out

    def steps(part: Sequence[Row]) -> tuple[int, int]:
        return int(part[0].get("step", 0)), int(part[-1].get("step", 0))

    first, last = rows[:size], rows[-size:]
    return DifficultyProfile(window(first), window(last), steps(first), steps(last))


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def training_panels(runs: Sequence[Run], methods: Iterable[str] = ()) -> list[Panel]:
    """The panels these runs have data for: mean entropy (with every method's ``<method>/target``) beside accuracy,
    rollout entropy, entropy by phase, reward, length, Cov(log pi, A), the entropy spread (p10-p90), the rollout
    entropy per accuracy bucket at the start and the end of the run, evaluations, then every statistic of every
    method (``<method>/<stat>``)."""
    # The headline row: mean entropy beside accuracy, lines only, so that runs that differ look apart; the
    # per-token spread (p10-p90, which reaches 0 and would drown the means) has panels of its own below.
    accuracy = ACCURACY if any(_logged([run], ACCURACY) for run in runs) else REWARD
    targets = list(dict.fromkeys(k for run in runs for k in target_keys(run)))
    target_note = f"solid: measured, dashed: {' / '.join(k.removesuffix(TARGET_SUFFIX) for k in targets)} target"
    candidates = [
        Panel("token entropy, training pass (nats): mean" + (" and target" if targets else ""), ((ENTROPY, "-"),),
              targets=bool(targets), note=target_note if targets else None),
        Panel(f"accuracy ({accuracy})" if accuracy == ACCURACY else "reward", ((accuracy, "-"),), smooth=True),
        Panel("token entropy, rollouts (nats): mean", ((ROLLOUT_ENTROPY, "-"),)),
        Panel("entropy by phase (nats): think vs answer", ((THINK, "-"), (ANSWER, "--")),
              note="solid: think, dashed: answer"),
    ]
    # The total reward gets its own panel only when it differs from the accuracy (shaping or several functions).
    if accuracy == ACCURACY and any(r.get(ACCURACY) != r.get(REWARD) for run in runs for r in run.rows if ACCURACY in r):
        candidates.append(Panel("reward (all reward functions and shaping)", ((REWARD, "-"),), smooth=True))
    candidates += [
        Panel("completion length (tokens, mean)", ((LENGTH, "-"),)),
        Panel("Cov(log pi, A) of valid tokens (> 0: entropy falls)", ((COVARIANCE, "-"),), smooth=True),
        Panel("token entropy spread, training pass: p50, p10-p90 band", (("entropy/p50", "-"),),
              ("entropy/p10", "entropy/p90")),
        Panel("token entropy spread, rollouts: p50, p10-p90 band", (("rollout_entropy/p50", "-"),),
              ("rollout_entropy/p10", "rollout_entropy/p90")),
    ]
    if any(difficulty_profile(run) is not None for run in runs):
        pct = round(100 * EDGE_SHARE)
        candidates.append(Panel("entropy by difficulty, rollouts (nats): per-response mean", (), kind="difficulty",
                                note=f"light: first {pct}% of rollouts, dark: last {pct}%"))
    for name in dict.fromkeys(d for run in runs for d in eval_datasets(run.rows)):
        k = max((eval_k(run.rows, name) or 1 for run in runs), default=1)
        pass_keys = ((f"{EVAL}{name}/pass@1", "-"),) + (((f"{EVAL}{name}/pass@{k}", "--"),) if k > 1 else ())
        candidates += [
            Panel(f"eval {name}: pass@1" + (f" and pass@{k}" if k > 1 else ""), pass_keys,
                  note=f"solid: pass@1, dashed: pass@{k}" if k > 1 else None, markers=True),
            Panel(f"eval {name}: token entropy of the samples (nats)", ((f"{EVAL}{name}/entropy", "-"),), markers=True),
        ]
    panels = [p for p in candidates if p.kind != "steps" or any(_logged(runs, k) for k, _ in p.keys)]
    stats: dict[str, list[str]] = {}
    for run in runs:
        for method, keys in method_stat_keys(run.rows, [*methods, *run.methods]).items():
            stats.setdefault(method, [])
            stats[method] += [k for k in keys if k not in stats[method] and k not in (THINK, ANSWER)]
    for keys in stats.values():
        panels += [Panel(key, ((key, "-"),), smooth=True) for key in keys if _logged(runs, key)]
    return panels


def _rollout_period(run: Run) -> int:
    """Optimizer steps per generation batch, read off the steps that logged a reward."""
    steps, _ = series(run.rows, REWARD)
    gaps = sorted(b - a for a, b in zip(steps, steps[1:]) if b > a)
    return gaps[len(gaps) // 2] if gaps else 1


def _smoothing_window(run: Run, steps: Sequence[int], points: int) -> int:
    """``points`` logged values for once-per-rollout series; for per-step series a whole number of
    rollouts (at least ``points`` steps), so statistics that cycle with the rollout (KL-Cov is inert
    on its first update) do not leave a saw-tooth in the mean."""
    if points <= 1:
        return 1
    period = _rollout_period(run)
    per_step = len(steps) > 1 and steps[1] - steps[0] < period
    return period * -(-points // period) if per_step and period > 1 else points


def runs_figure(
    run_dirs: Sequence[str | Path] | None = None,
    *,
    runs: Sequence[Run] | None = None,
    methods: Iterable[str] | None = None,
    smooth_window: int = 5,
) -> Figure:
    """Training curves of runs aligned by step, one panel per quantity, one colour per run.

    ``methods``: names whose ``<method>/<stat>`` keys get panels (default: the registered methods);
    each run's own recipe methods are always included. Noisy series (reward, accuracy, covariance,
    method statistics) are drawn faint with a moving mean over them: of ``smooth_window`` logged
    values for once-per-rollout series, of whole rollouts (at least ``smooth_window`` steps) for
    per-step ones, where a run has more than four windows of points; ``smooth_window=1`` draws them raw.
    """
    if runs is None:
        runs = [load_run(d) for d in run_dirs or []]
    if not runs:
        raise AnalysisError("no runs to plot")
    panels = training_panels(runs, known_methods() if methods is None else methods)
    if not panels:
        raise AnalysisError(f"no plottable metrics in {', '.join(str(r.path) for r in runs)} (has a step been logged yet?)")
    ncols = 1 if len(panels) == 1 else 2
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(PANEL_W * ncols, PANEL_H * nrows + 0.6), squeeze=False)
    colors = {run.path: f"C{i % 10}" for i, run in enumerate(runs)}
    band_alpha = 0.15 if len(runs) == 1 else 0.06  # overlapping bands stay readable
    step_axes = [ax for ax, panel in zip(axes.flat, panels) if panel.kind == "steps"]
    for ax in step_axes[1:]:
        ax.sharex(step_axes[0])  # every panel over steps shares the step axis; a profile panel has its own
    for index, (ax, panel) in enumerate(zip(axes.flat, panels)):
        if panel.kind == "difficulty":
            _draw_difficulty(ax, panel, runs, colors)
            continue
        # step tick labels under the lowest panel over steps of each column only
        below = index + ncols < len(panels) and panels[index + ncols].kind == "steps"
        ax.tick_params(labelbottom=not below)
        if not below:
            ax.set_xlabel("step", fontsize=9)
        smoothed = False
        for run in runs:
            for key, style in panel.keys:
                steps, values = series(run.rows, key)
                if not steps:
                    continue
                color = colors[run.path]
                window = _smoothing_window(run, steps, smooth_window)
                if panel.smooth and window > 1 and len(values) > 4 * window:
                    ax.plot(steps, values, style, color=color, alpha=0.25, linewidth=0.8)
                    ax.plot(steps[window - 1 :], moving_means(values, window), style, color=color, linewidth=1.5)
                    smoothed = True
                else:
                    ax.plot(steps, values, style, color=color, linewidth=1.3, marker="o" if panel.markers else None,
                            markersize=3)
            if panel.targets:
                for key in target_keys(run):
                    ax.plot(*series(run.rows, key), "--", color=colors[run.path], linewidth=1.2)
            if panel.band is not None:
                lo_steps, lo = series(run.rows, panel.band[0])
                hi_steps, hi = series(run.rows, panel.band[1])
                if lo_steps and lo_steps == hi_steps:
                    ax.fill_between(lo_steps, lo, hi, color=colors[run.path], alpha=band_alpha, linewidth=0)
                    # thin edges say whose band it is where the bands of several runs overlap
                    for edge in (lo, hi):
                        ax.plot(lo_steps, edge, color=colors[run.path], alpha=0.45, linewidth=0.6)
        title = panel.title + (" (bold: moving mean)" if smoothed else "")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        if panel.note:
            line_styles = ("-", "--") if panel.targets else [s for _, s in panel.keys]
            styles = [Line2D([], [], color="0.3", linestyle=s) for s in line_styles]
            ax.legend(styles, panel.note.split(", "), fontsize=7, loc="best")
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    handles = [Line2D([], [], color=colors[run.path], linewidth=2) for run in runs]
    fig.legend(handles, [run.label for run in runs], loc="upper center", ncol=min(len(runs), 3), fontsize=9, frameon=False)
    legend_rows = -(-len(runs) // 3)
    fig.tight_layout(rect=(0, 0, 1, 1 - (0.25 + 0.22 * legend_rows) / fig.get_figheight()))
    return fig


def _draw_difficulty(ax, panel: Panel, runs: Sequence[Run], colors: dict) -> None:
    """Each run's :func:`difficulty_profile`: mean rollout entropy per accuracy bucket (x, hardest first), light at the
    start of the run, dark at its end; only buckets some run has data for."""
    profiles = [(run, difficulty_profile(run)) for run in runs]
    buckets = [(name, p) for name, p in DIFFICULTY
               if any(prof is not None and (name in prof.start or name in prof.end) for _, prof in profiles)]
    xs = list(range(len(buckets)))
    for run, prof in profiles:
        if prof is None:
            continue
        for values, alpha, style in ((prof.start, 0.4, ":"), (prof.end, 1.0, "-")):
            ys = [values.get(name, math.nan) for name, _ in buckets]  # NaN: no line through an empty bucket
            ax.plot(xs, ys, style, color=colors[run.path], alpha=alpha, linewidth=1.5, marker="o", markersize=4)
    ax.set_xticks(xs, [f"{name}\n{p}" for name, p in buckets], fontsize=8)
    ax.set_xlim(-0.3, len(buckets) - 0.7)
    ax.set_xlabel("prompt difficulty: share p of the group's answers right", fontsize=9)
    ax.set_title(panel.title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.tick_params(axis="y", labelsize=8)
    styles = [Line2D([], [], color="0.3", alpha=0.4, linestyle=":", marker="o", markersize=4),
              Line2D([], [], color="0.3", linestyle="-", marker="o", markersize=4)]
    ax.legend(styles, (panel.note or "start, end").split(", "), fontsize=7, loc="best")


def plot_runs(run_dirs: Sequence[str | Path], output: str | Path, *, dpi: int = 110, **kwargs) -> Path:
    """Draw :func:`runs_figure` to ``output`` (PNG, SVG, PDF by suffix)."""
    return save_figure(runs_figure(run_dirs, **kwargs), output, dpi=dpi)


def save_figure(fig: Figure, output: str | Path, dpi: int = 110) -> Path:
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=dpi)
    plt.close(fig)
    return output


@dataclass(frozen=True)
class LawPoints:
    """One run's fit and the points it was fitted to, for :func:`law_figure`."""

    run: Run
    fit: LawFit
    entropy_key: str
    performance_key: str

    def points(self) -> tuple[list[int], list[float], list[float]]:
        return paired(self.run.rows, self.entropy_key, self.performance_key)


def law_figure(fits: Sequence[LawPoints]) -> Figure:
    """Performance against entropy with the fitted R = -a*exp(H) + b of each run, drawn down to
    H = 0 (dotted beyond the observed entropies), and the predicted ceiling -a + b marked at H = 0."""
    import math

    fig, ax = plt.subplots(figsize=(7, 4.6))
    for i, item in enumerate(fits):
        color, fit = f"C{i % 10}", item.fit
        _, h, r = item.points()
        ax.scatter(h, r, s=12, color=color, alpha=0.45, linewidths=0)
        grid = [fit.entropy_min + (fit.entropy_max - fit.entropy_min) * k / 100 for k in range(101)]
        label = f"{item.run.label}: a={fit.a:.3g}, b={fit.b:.3g}, R\u00b2={fit.r2:.2f}, ceiling {fit.ceiling:.3f}"
        ax.plot(grid, [fit.predict(x) for x in grid], color=color, linewidth=1.8, label=label)
        below = [fit.entropy_min * k / 50 for k in range(51)]
        ax.plot(below, [fit.predict(x) for x in below], ":", color=color, linewidth=1.4)
        ax.plot([0], [fit.ceiling], "*", color=color, markersize=11, markeredgecolor="k", markeredgewidth=0.5)
        if math.isfinite(fit.ceiling):
            ax.axhline(fit.ceiling, color=color, linewidth=0.6, alpha=0.4)
    keys = sorted({f"{f.performance_key} vs {f.entropy_key}" for f in fits})
    ax.set_xlabel(f"entropy H (nats): {', '.join(sorted({f.entropy_key for f in fits}))}", fontsize=9)
    ax.set_ylabel(", ".join(sorted({f.performance_key for f in fits})), fontsize=9)
    ax.set_title("R = -a\u00b7exp(H) + b (Cui et al. 2025); \u2605 = predicted ceiling at H = 0", fontsize=10)
    ax.set_xlim(left=-0.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.text(0.01, 0.01, "dots: logged steps (" + "; ".join(keys) + "); dotted: extrapolation", fontsize=7, color="0.35")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return fig


def covariance_figure(diagnostics: Sequence[tuple[Run, CovarianceDiagnostic]]) -> Figure:
    """Per run: (left) entropy change of each step against that step's Cov(log pi, A), with the
    least-squares line and the correlation; (right) the entropy's change since the start against
    -eta * (covariance summed so far), eta fitted."""
    fig, axes = plt.subplots(len(diagnostics), 2, figsize=(11, 3.4 * len(diagnostics)), squeeze=False)
    for i, (run, d) in enumerate(diagnostics):
        color = f"C{i % 10}"
        left, right = axes[i]
        left.scatter(d.covariance, d.delta, s=10, color=color, alpha=0.5, linewidths=0)
        lo, hi = min(d.covariance), max(d.covariance)
        mc, md = sum(d.covariance) / d.n, sum(d.delta) / d.n
        if d.slope == d.slope:  # not NaN
            left.plot([lo, hi], [md + d.slope * (lo - mc), md + d.slope * (hi - mc)], color="k", linewidth=1)
        left.axhline(0, color="0.5", linewidth=0.6)
        left.set_title(f"{run.label}: per step, corr = {d.correlation:.2f}, sign(\u0394H) = -sign(Cov) on "
                       f"{100 * d.sign_agreement:.0f}% of {d.n}", fontsize=9)
        left.set_xlabel("Cov(log pi, A) of step t", fontsize=9)
        left.set_ylabel("\u0394H = H(t+1) - H(t)", fontsize=9)
        h0 = d.entropy[0]
        right.plot(d.steps, [h - h0 for h in d.entropy], color=color, linewidth=1.4, label="H(t) - H(start)")
        right.plot(d.steps, [-d.eta * c for c in d.cumulative_covariance], "--", color="k", linewidth=1.2,
                   label=f"-\u03b7\u00b7\u03a3 Cov, \u03b7 = {d.eta:.3g}")
        right.set_title(f"cumulative: corr = {d.cumulative_correlation:.2f}", fontsize=9)
        right.set_xlabel("step", fontsize=9)
        right.legend(fontsize=8)
        for ax in (left, right):
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=8)
    fig.tight_layout()
    return fig


def tradeoff_figure(tradeoffs: Sequence[Tradeoff]) -> Figure:
    """pass@k against pass@1 at each evaluation of each run, first (o) to last (star): a run moving right
    and down traded coverage (pass@k) for accuracy (pass@1); right and level or up kept both."""
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for i, t in enumerate(tradeoffs):
        color = f"C{i % 10}"
        ax.plot(t.pass1, t.passk, "-", color=color, linewidth=1.3, alpha=0.8,
                label=f"{t.label}: pass@1 {t.delta_pass1:+.3f}, pass@{t.k} {t.delta_passk:+.3f}")
        ax.plot(t.pass1[:1], t.passk[:1], "o", color=color, markersize=6)
        ax.plot(t.pass1[-1:], t.passk[-1:], "*", color=color, markersize=11, markeredgecolor="k", markeredgewidth=0.5)
    names = sorted({f"{t.dataset}" for t in tradeoffs})
    ks = sorted({t.k for t in tradeoffs})
    ax.set_xlabel(f"pass@1 ({', '.join(names)})", fontsize=9)
    ax.set_ylabel(f"pass@{'/'.join(str(k) for k in ks)}", fontsize=9)
    ax.set_title("evaluation during training: o first, \u2605 last", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig
