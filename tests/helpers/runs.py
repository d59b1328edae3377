"""Synthetic run directories with known answers, as the trainer leaves them (metrics.jsonl + recipe.yaml)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml

A, B = 0.4, 1.2          # the law the synthetic runs follow: R = -A * exp(H) + B


def write_run(
    run_dir: Path,
    rows: list[dict[str, Any]],
    methods: list[dict[str, Any]] | None = None,
    final: dict[str, Any] | None = None,
    torn: bool = False,
) -> Path:
    """A run directory as the trainer leaves it: metrics.jsonl (+ TRL's final line) and recipe.yaml."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in rows] + ([json.dumps(final)] if final else [])
    text = "\n".join(lines) + "\n"
    if torn:  # a line half written by a run that is still going
        text += '{"step": 999, "entropy": 0.'
    (run_dir / "metrics.jsonl").write_text(text)
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump({"model": {"name_or_path": "tiny"}, "methods": methods or []}))
    return run_dir


def law_rows(
    steps: int = 40, per_generation: int = 4, h0: float = 1.0, slope: float = 0.015, kl_cov: bool = False
) -> list[dict[str, Any]]:
    """Rows shaped like a real run: training-pass metrics every step, rollout metrics (reward, rollout
    entropy, length) on generation steps only; accuracy follows the law exactly, the total reward
    carries a shaping term, Cov > 0 and entropy falls by 0.01 * Cov per step. ``kl_cov``: with
    KL-Cov's statistics."""
    rows = []
    h = h0
    for step in range(1, steps + 1):
        cov = 0.2 + 0.1 * math.sin(step)
        row: dict[str, Any] = {
            "step": step, "loss": 0.0, "entropy": h, "entropy/p10": h / 10, "entropy/p50": h, "entropy/p90": 2 * h,
            "covariance/logp_adv": cov,
        }
        if kl_cov:
            row.update({"kl_cov/penalty": 0.001 * step, "kl_cov/selected": 7.0})
        if (step - 1) % per_generation == 0:
            acc = -A * math.exp(h) + B
            row.update({
                "rollout_entropy/mean": h, "rollout_entropy/p10": h / 10, "rollout_entropy/p90": 2 * h,
                "rewards/correctness/mean": acc, "reward": acc - 0.05, "completions/mean_length": 3.0 + step / 100,
            })
        rows.append(row)
        h -= slope + 0.01 * cov
    return rows
