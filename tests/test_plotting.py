"""Figures from synthetic run directories: which panels, titles and legend entries they have (the
Figure objects are inspected, not pixels), and the plot sub-command's exit codes."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.runs import law_rows, write_run
from matplotlib.figure import Figure

from rlvr_entropy.analysis import fit_run_law, load_run, run_covariance_diagnostic
from rlvr_entropy.cli import main
from rlvr_entropy.plotting import LawPoints, covariance_figure, law_figure, plot_runs, runs_figure


def pear_rows() -> list[dict]:
    """A PEAR run: think/answer entropies, a reward shaped below the accuracy, its own statistics."""
    rows = []
    for step in range(1, 13):
        row = {"step": step, "entropy": 1.0 - 0.02 * step, "covariance/logp_adv": 0.1}
        if step % 2 == 1:
            row.update({
                "reward": 0.3 + 0.01 * step, "rewards/correctness/mean": 0.35 + 0.01 * step,
                "rewards/pear/mean": -0.05, "pear/think_entropy": 1.2 - 0.03 * step,
                "pear/answer_entropy": 0.4 - 0.01 * step, "pear/penalty": 0.1, "completions/mean_length": 12.0,
            })
        rows.append(row)
    return rows


@pytest.fixture
def runs(tmp_path) -> tuple[Path, Path, Path]:
    base = write_run(tmp_path / "grpo", law_rows())
    klc = write_run(tmp_path / "klc", law_rows(kl_cov=True), methods=[{"name": "kl_cov", "ratio": 0.02}], torn=True)
    pear = write_run(tmp_path / "think", pear_rows(), methods=[{"name": "pear", "alpha": 1.0}])
    return base, klc, pear


def titles(fig: Figure) -> list[str]:
    return [ax.get_title() for ax in fig.axes if ax.get_visible()]


def test_training_figure_has_a_panel_per_quantity_and_names_runs(runs):
    base, klc, pear = runs
    fig = runs_figure([base, klc, pear])
    t = titles(fig)
    # the headline row: mean entropy beside accuracy
    assert t[0] == "token entropy, training pass (nats): mean"
    assert t[1].startswith("accuracy (rewards/correctness/mean)")
    assert t[2].startswith("token entropy, rollouts")
    assert t[3].startswith("entropy by phase")           # PEAR's think vs answer
    # PEAR shapes the reward, so the reward is drawn apart from the accuracy
    assert any(x.startswith("reward (all reward functions") for x in t)
    assert any(x.startswith("completion length") for x in t)
    assert any(x.startswith("Cov(log pi, A)") for x in t)
    # every method statistic logged, under its own name; PEAR's phase entropies are in the phase panel only
    for key in ("kl_cov/penalty", "kl_cov/selected", "pear/penalty", "rewards/pear/mean"):
        assert any(x.startswith(key) for x in t), (key, t)
    assert not any(x.startswith("pear/think_entropy") for x in t)
    # the legend names each run and its methods
    assert [x.get_text() for x in fig.legends[0].get_texts()] == ["grpo", "klc [kl_cov]", "think [pear]"]
    # one colour per run across panels: the entropy panel's mean lines
    entropy_ax = fig.axes[0]
    colors = {line.get_color() for line in entropy_ax.get_lines() if line.get_linewidth() > 1}
    assert len(colors) == 3
    # no band drowns the means; the p10-p90 band is filled on its own panel for each run that logs it (the PEAR
    # fixture logs no percentiles)
    assert len(entropy_ax.collections) == 0
    spread_ax = fig.axes[t.index("token entropy spread, training pass: p50, p10-p90 band")]
    assert len(spread_ax.collections) == 2


def test_phase_panel_draws_think_and_answer(runs):
    *_, pear = runs
    fig = runs_figure([pear])
    ax = next(a for a in fig.axes if a.get_title().startswith("entropy by phase"))
    styles = sorted(line.get_linestyle() for line in ax.get_lines())
    assert styles == ["-", "--"]
    assert [x.get_text() for x in ax.get_legend().get_texts()] == ["solid: think", "dashed: answer"]
    think = next(line for line in ax.get_lines() if line.get_linestyle() == "-")
    assert list(think.get_ydata()) == pytest.approx([1.2 - 0.03 * s for s in range(1, 13, 2)])


def test_runs_without_methods_or_phases_get_only_the_panels_they_logged(runs):
    base, *_ = runs
    t = titles(runs_figure([base]))
    assert len(t) == 7 and not any("phase" in x or x.split(" ")[0].count("/") for x in t), t
    # method panels come from the run's recipe, and from the names given (default: the registry)
    _, klc, _ = runs
    assert any(x.startswith("kl_cov/penalty") for x in titles(runs_figure([klc], methods=[])))  # from its recipe
    klc_recipe = klc / "recipe.yaml"
    klc_recipe.write_text(klc_recipe.read_text().replace("kl_cov", "other"))
    assert not any(x.startswith("kl_cov/") for x in titles(runs_figure([klc], methods=[])))
    assert any(x.startswith("kl_cov/penalty") for x in titles(runs_figure([klc], methods=["kl_cov"])))
    assert any(x.startswith("kl_cov/penalty") for x in titles(runs_figure([klc])))  # the registry's names


def test_noisy_curves_get_a_moving_mean(runs):
    base, *_ = runs
    fig = runs_figure([base], methods=[], smooth_window=2)
    ax = next(a for a in fig.axes if a.get_title().startswith("Cov(log pi, A)"))
    assert ax.get_title().endswith("(bold: moving mean)")
    raw, smooth = ax.get_lines()
    assert len(raw.get_xdata()) == 40
    # per-step series are averaged over whole rollouts (4 steps here), so window 2 becomes 4
    assert len(smooth.get_xdata()) == 37
    assert smooth.get_ydata()[0] == pytest.approx(sum(raw.get_ydata()[:4]) / 4)
    raw_only = runs_figure([base], methods=[], smooth_window=1)
    ax = next(a for a in raw_only.axes if a.get_title().startswith("Cov(log pi, A)"))
    assert len(ax.get_lines()) == 1


def test_plot_writes_a_png(runs, tmp_path):
    out = plot_runs(list(runs), tmp_path / "sub" / "curves.png")
    assert out.is_file() and out.stat().st_size > 20_000


def test_law_figure(runs):
    base, klc, _ = runs
    items = []
    for run_dir in (base, klc):
        run = load_run(run_dir)
        fit, h_key, r_key = fit_run_law(run.rows)
        items.append(LawPoints(run, fit, h_key, r_key))
    fig = law_figure(items)
    (ax,) = fig.axes
    labels = [x.get_text() for x in ax.get_legend().get_texts()]
    assert labels[0] == "grpo: a=0.4, b=1.2, R\u00b2=1.00, ceiling 0.800"
    assert labels[1].startswith("klc [kl_cov]: a=0.4")
    # the ceiling is marked at H = 0
    stars = [line for line in ax.get_lines() if line.get_marker() == "*"]
    assert [(s.get_xdata()[0], s.get_ydata()[0]) for s in stars] == [(0, pytest.approx(0.8))] * 2
    assert "rollout_entropy/mean" in ax.get_xlabel() and "rewards/correctness/mean" in ax.get_ylabel()


def test_covariance_figure(runs):
    base, *_ = runs
    run = load_run(base)
    fig = covariance_figure([(run, run_covariance_diagnostic(run.rows))])
    left, right = fig.axes
    assert left.get_title() == "grpo: per step, corr = -1.00, sign(\u0394H) = -sign(Cov) on 100% of 39"
    assert right.get_title() == "cumulative: corr = -1.00"
    assert [x.get_text() for x in right.get_legend().get_texts()][0] == "H(t) - H(start)"


def test_cli_plot_exit_codes(runs, tmp_path, capsys):
    out = tmp_path / "c.png"
    assert main(["plot", *map(str, runs), "-o", str(out)]) == 0
    assert out.is_file() and f"wrote {out}" in capsys.readouterr().out
    small = tmp_path / "small.png"
    assert main(["plot", *map(str, runs), "-o", str(small), "--dpi", "50"]) == 0
    from PIL import Image

    assert Image.open(small).size[0] == round(Image.open(out).size[0] * 50 / 110)
    assert main(["plot", str(tmp_path / "nope"), "-o", str(out)]) == 2
    assert "metrics.jsonl not found" in capsys.readouterr().err
    empty = write_run(tmp_path / "empty", [], torn=True)   # started, nothing logged yet
    assert main(["plot", str(empty), "-o", str(tmp_path / "e.png")]) == 2
    assert "no plottable metrics" in capsys.readouterr().err


def test_eval_panels_draw_pass_at_1_and_k_with_their_points(tmp_path):
    rows = law_rows(steps=12)
    for step, p1, pk in ((4, 0.3, 0.8), (8, 0.5, 0.7), (12, 0.6, 0.65)):
        rows[step - 1].update({"eval/arith/pass@1": p1, "eval/arith/pass@8": pk, "eval/arith/entropy": 0.4})
    fig = runs_figure([write_run(tmp_path / "ev", rows), write_run(tmp_path / "plain", law_rows(steps=12))])
    t = titles(fig)
    assert "eval arith: pass@1 and pass@8" in t and "eval arith: token entropy of the samples (nats)" in t
    ax = fig.axes[t.index("eval arith: pass@1 and pass@8")]
    lines = [line for line in ax.get_lines() if len(line.get_xdata())]
    assert [list(line.get_ydata()) for line in lines] == [[0.3, 0.5, 0.6], [0.8, 0.7, 0.65]]
    assert [line.get_marker() for line in lines] == ["o", "o"] and lines[1].get_linestyle() == "--"
    assert not any(x.startswith("eval") for x in titles(runs_figure([tmp_path / "plain"])))


def difficulty_rows(steps: int = 40, per_generation: int = 4) -> list[dict]:
    """law_rows plus the trainer's entropy_by_difficulty keys on generation steps: 10 rollouts; the entropy of the
    hard bucket falls from 1.0 by 0.05 per rollout, easy stays 0.5 (weighted by prompts), 'solved' never fills and
    'unsolved' has prompts but no entropy (no rollout entropy logged for it)."""
    rows = law_rows(steps=steps, per_generation=per_generation)
    for row in rows:
        if "reward" not in row:
            continue
        k = (row["step"] - 1) // per_generation  # rollout index 0..9
        row.update({
            "entropy_by_difficulty/unsolved/prompts": 1.0, "entropy_by_difficulty/solved/prompts": 0.0,
            "entropy_by_difficulty/hard/prompts": 4.0, "entropy_by_difficulty/hard/entropy": 1.0 - 0.05 * k,
            "entropy_by_difficulty/medium/prompts": 2.0, "entropy_by_difficulty/medium/entropy": 0.8,
            "entropy_by_difficulty/easy/prompts": 1.0 + k, "entropy_by_difficulty/easy/entropy": 0.5,
        })
        if k == 0:  # a batch with its medium prompts counted three times as much as the next one
            row["entropy_by_difficulty/medium/prompts"] = 6.0
        if k == 1:
            row["entropy_by_difficulty/medium/entropy"] = 0.4
    return rows


def test_entropy_by_difficulty_panel_draws_start_and_end_per_run(tmp_path):
    rows = difficulty_rows()
    one = write_run(tmp_path / "one", rows)
    fig = runs_figure([one, write_run(tmp_path / "plain", law_rows())], methods=[])
    t = titles(fig)
    ax = fig.axes[t.index("entropy by difficulty, rollouts (nats): per-response mean")]
    # x: the buckets with data, hardest first; 'unsolved' (no entropy) and 'solved' (never filled) are skipped
    assert [x.get_text() for x in ax.get_xticklabels()] == ["hard\np < 1/3", "medium\np < 2/3", "easy\np < 1"]
    start, end = ax.get_lines()  # the run without the keys draws nothing here
    assert start.get_alpha() < end.get_alpha() and start.get_color() == end.get_color() == "C0"
    # one rollout in each window (10% of 10); the ends of the run
    assert list(start.get_ydata()) == pytest.approx([1.0, 0.8, 0.5])
    assert list(end.get_ydata()) == pytest.approx([1.0 - 0.05 * 9, 0.8, 0.5])
    assert [x.get_text() for x in ax.get_legend().get_texts()] == ["light: first 10% of rollouts", "dark: last 10%"]
    # its x axis is its own; the step panels share theirs
    entropy_ax = fig.axes[0]
    assert not entropy_ax.get_shared_x_axes().joined(entropy_ax, ax)
    assert entropy_ax.get_shared_x_axes().joined(entropy_ax, fig.axes[t.index("completion length (tokens, mean)")])
    # no keys, no panel
    assert not any("difficulty" in x for x in titles(runs_figure([tmp_path / "plain"], methods=[])))


def test_difficulty_profile_weights_batches_by_their_prompts_in_the_bucket(tmp_path):
    from rlvr_entropy.analysis import load_run
    from rlvr_entropy.plotting import difficulty_profile

    run = load_run(write_run(tmp_path / "d", difficulty_rows()))
    wide = difficulty_profile(run, share=0.2)  # two rollouts per window
    assert wide.start_steps == (1, 5) and wide.end_steps == (33, 37)
    assert wide.start["medium"] == pytest.approx((6 * 0.8 + 2 * 0.4) / 8)
    assert wide.start["hard"] == pytest.approx(0.975) and wide.end["hard"] == pytest.approx(1.0 - 0.05 * 8.5)
    assert set(wide.start) == {"hard", "medium", "easy"}
    assert difficulty_profile(load_run(write_run(tmp_path / "p", law_rows()))) is None


def test_method_targets_are_drawn_dashed_over_the_measured_entropy(tmp_path):
    rows = law_rows()
    for row in rows:
        if "reward" in row:
            row["aepo/target"] = 0.6  # logged on generation steps, as AEPO does
    aepo = write_run(tmp_path / "aepo", rows, methods=[{"name": "aepo"}])
    plain = write_run(tmp_path / "plain", law_rows())
    fig = runs_figure([plain, aepo], methods=[])
    ax = fig.axes[0]
    assert ax.get_title() == "token entropy, training pass (nats): mean and target"
    dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert len(dashed) == 1 and dashed[0].get_color() == "C1"  # the AEPO run's colour
    assert list(dashed[0].get_ydata()) == [0.6] * 10 and list(dashed[0].get_xdata()) == list(range(1, 41, 4))
    assert [x.get_text() for x in ax.get_legend().get_texts()] == ["solid: measured", "dashed: aepo target"]
    # the target keeps its own method panel too; without targets the headline panel is as before
    assert any(x.startswith("aepo/target") for x in titles(fig))
    plain_ax = runs_figure([plain], methods=[]).axes[0]
    assert plain_ax.get_title() == "token entropy, training pass (nats): mean" and plain_ax.get_legend() is None
