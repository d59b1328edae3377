"""Entropy, reward and length curves from ``metrics.jsonl`` files, one line per run, aligned by step.

Reads files that are still being written (a torn last line is skipped), so it works during a run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib
import yaml

matplotlib.use("Agg")  # no display on training machines
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Training log lines of a run (eval lines and the final summary excluded), in step order."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a run directory?")
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written right now
        if "train_runtime" in row or any(k.startswith("eval_") for k in row):
            continue
        rows.append(row)
    return sorted(rows, key=lambda r: r.get("step", 0))


def series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for row in rows:
        value = row.get(key)
        if isinstance(value, int | float) and math.isfinite(value):
            steps.append(row["step"])
            values.append(float(value))
    return steps, values


def run_label(run_dir: str | Path) -> str:
    """The run's directory name plus the methods it used (from its saved config, if any)."""
    path = Path(run_dir)
    label = path.name
    recipe = path / "recipe.yaml"
    if recipe.is_file():
        methods = (yaml.safe_load(recipe.read_text()) or {}).get("methods") or []
        names = "+".join(m.get("name", "?") for m in methods if isinstance(m, dict)) or "grpo"
        if names != label:
            label += f" [{names}]"
    return label


def summarize(rows: list[dict[str, Any]], window: int = 10) -> dict[str, float]:
    """Mean of reward and entropies over the first and the last ``window`` logged steps."""
    out: dict[str, float] = {"steps": float(rows[-1]["step"]) if rows else 0.0}
    for key in ("reward", "entropy", "rollout_entropy/mean", "completions/mean_length"):
        _, values = series(rows, key)
        if values:
            out[f"{key}@start"] = sum(values[:window]) / len(values[:window])
            out[f"{key}@end"] = sum(values[-window:]) / len(values[-window:])
    return out


PANELS = [
    ("token entropy (training pass)", "entropy", ("entropy/p10", "entropy/p90")),
    ("token entropy (rollout)", "rollout_entropy/mean", ("rollout_entropy/p10", "rollout_entropy/p90")),
    ("Cov(log pi, A) over valid tokens (drives entropy change)", "covariance/logp_adv", None),
    ("reward", "reward", None),
    ("completion length", "completions/mean_length", None),
]


def plot_runs(run_dirs: list[str | Path], output: str | Path) -> Path:
    """Draw one panel per quantity (mean line, p10-p90 band where logged) for every run."""
    runs = [(run_label(d), read_metrics(d)) for d in run_dirs]
    panels = [p for p in PANELS if any(series(rows, p[1])[0] for _, rows in runs)]
    if not panels:
        raise ValueError(f"no plottable metrics in {', '.join(map(str, run_dirs))}")
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.6 * len(panels)), sharex=True, squeeze=False)
    for ax, (title, key, band) in zip(axes[:, 0], panels, strict=True):
        for label, rows in runs:
            steps, values = series(rows, key)
            if not steps:
                continue
            (line,) = ax.plot(steps, values, label=label)
            if band is not None:
                lo_steps, lo = series(rows, band[0])
                hi_steps, hi = series(rows, band[1])
                if lo_steps and lo_steps == hi_steps:
                    alpha = 0.15 if len(runs) == 1 else 0.06  # overlapping bands stay readable
                    ax.fill_between(lo_steps, lo, hi, color=line.get_color(), alpha=alpha, linewidth=0)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output
