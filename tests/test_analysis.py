"""Run analysis on synthetic runs with known answers: the entropy-performance law, the covariance
diagnostic, the compare table and their CLI sub-commands."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
from helpers.runs import A, B, law_rows, write_run

from rlvr_entropy.analysis import (
    AnalysisError,
    compare_table,
    covariance_diagnostic,
    fit_entropy_law,
    fit_run_law,
    load_run,
    method_stat_keys,
    moving_means,
    paired,
    pearson,
    read_final,
    read_metrics,
    run_covariance_diagnostic,
    run_tradeoff,
    summarize_run,
)
from rlvr_entropy.cli import main

# ------------------------------------------------------------------------------------------ the law


def test_law_fit_recovers_a_and_b_from_noisy_points():
    rng = random.Random(0)
    hs = [1.6 - 1.3 * i / 59 for i in range(60)]
    rs = [-A * math.exp(h) + B + rng.gauss(0, 0.003) for h in hs]
    fit = fit_entropy_law(hs, rs)
    assert fit.a == pytest.approx(A, rel=0.01)
    assert fit.b == pytest.approx(B, rel=0.01)
    assert fit.ceiling == pytest.approx(B - A, rel=0.01)
    assert fit.r2 > 0.99
    assert fit.n == 60 and fit.entropy_min == pytest.approx(0.3) and fit.entropy_max == pytest.approx(1.6)
    assert fit.predict(0.0) == pytest.approx(fit.ceiling)


def test_law_fit_is_exact_on_exact_points():
    hs = [0.2, 0.5, 0.9, 1.4, 2.0]
    fit = fit_entropy_law(hs, [-2.5 * math.exp(h) + 7.0 for h in hs])
    assert (fit.a, fit.b, fit.r2) == (pytest.approx(2.5, rel=1e-9), pytest.approx(7.0, rel=1e-9), pytest.approx(1.0))


def test_law_fit_refuses_too_few_points():
    with pytest.raises(AnalysisError, match="too few points.*4 .*at least 5"):
        fit_entropy_law([1.0, 0.8, 0.6, 0.4], [0.1, 0.2, 0.3, 0.4])
    # non-finite points do not count
    with pytest.raises(AnalysisError, match="too few points"):
        fit_entropy_law([1.0, 0.8, 0.6, 0.4, math.nan], [0.1, 0.2, 0.3, 0.4, 0.5])


def test_law_fit_refuses_flat_entropy():
    hs = [0.80, 0.81, 0.79, 0.80, 0.805, 0.795]
    with pytest.raises(AnalysisError, match="entropy hardly moved"):
        fit_entropy_law(hs, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    # the threshold is a parameter
    assert fit_entropy_law(hs, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], min_entropy_range=0.01).n == 6


def test_law_on_a_run_pairs_rollout_entropy_with_accuracy():
    rows = law_rows()
    fit, h_key, r_key = fit_run_law(rows)
    assert (h_key, r_key) == ("rollout_entropy/mean", "rewards/correctness/mean")
    assert fit.n == 10  # generation steps only
    assert fit.a == pytest.approx(A, rel=1e-6) and fit.b == pytest.approx(B, rel=1e-6)
    # the total reward carries a constant shaping term of -0.05: same a, b lower by 0.05
    fit, _, _ = fit_run_law(rows, performance="reward")
    assert fit.b == pytest.approx(B - 0.05, rel=1e-6)
    with pytest.raises(AnalysisError, match="never logged 'nope'"):
        fit_run_law(rows, performance="nope")


# ------------------------------------------------------------------------------ the covariance check


def test_covariance_diagnostic_on_an_exact_linear_relation():
    eta = 0.01
    covs = [0.3, 0.1, 0.5, 0.2, 0.4, 0.25]
    h = [1.0]
    for c in covs:
        h.append(h[-1] - eta * c)
    steps = list(range(1, len(h) + 1))
    d = covariance_diagnostic(steps, h, covs + [0.0])  # the last step's covariance has no next entropy
    assert d.n == 6 and d.covariance == covs
    assert d.correlation == pytest.approx(-1.0)
    assert d.slope == pytest.approx(-eta)
    assert d.eta == pytest.approx(eta)
    assert d.sign_agreement == 1.0
    assert d.cumulative_correlation == pytest.approx(-1.0)
    assert d.cumulative_covariance[-1] == pytest.approx(sum(covs))


def test_covariance_diagnostic_known_correlation():
    # deltas [1, -1, 1, -1] against covariances [1, 1, -1, -1]: orthogonal, correlation 0;
    # deltas and -cov agree in sign on steps 2 and 3 only
    h = [0.0, 1.0, 0.0, 1.0, 0.0]
    d = covariance_diagnostic([1, 2, 3, 4, 5], h, [1.0, 1.0, -1.0, -1.0, 9.0])
    assert d.correlation == pytest.approx(0.0)
    assert d.sign_agreement == 0.5
    # a half-correlated case: r = 0.5 by construction (x, x + orthogonal noise of the same norm / sqrt(3))
    x = [1.0, -1.0, 1.0, -1.0]
    y = [1.0 + math.sqrt(3), -1.0 + math.sqrt(3), 1.0 - math.sqrt(3), -1.0 - math.sqrt(3)]
    assert pearson(x, y) == pytest.approx(0.5)


def test_covariance_diagnostic_on_a_run_and_its_refusals():
    d = run_covariance_diagnostic(law_rows())
    assert d.n == 39
    assert d.correlation == pytest.approx(-1.0)  # law_rows: dH = -0.015 - 0.01 * Cov
    assert d.slope == pytest.approx(-0.01)
    with pytest.raises(AnalysisError, match="never logged 'covariance/logp_adv'"):
        run_covariance_diagnostic([{"step": 1, "entropy": 1.0}, {"step": 2, "entropy": 0.9}])
    with pytest.raises(AnalysisError, match="too few steps"):
        run_covariance_diagnostic(law_rows(steps=3))


# --------------------------------------------------------------------------------- reading, compare


def test_reading_a_run_that_is_still_writing(tmp_path):
    run = write_run(tmp_path / "live", law_rows(steps=6), torn=True)
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4, 5, 6]
    assert read_final(run) is None
    steps, h, r = paired(read_metrics(run), "rollout_entropy/mean", "reward")
    assert steps == [1, 5]


def test_method_stats_are_found_by_method_name():
    rows = [{"step": 1, "kl_cov/penalty": 0.1, "clip_ratio/low_mean": 0.0, "rewards/pear/mean": -0.1, "pear/think_entropy": 1.0}]
    assert method_stat_keys(rows, ["kl_cov", "pear", "clip_cov"]) == {
        "kl_cov": ["kl_cov/penalty"], "pear": ["pear/think_entropy", "rewards/pear/mean"],
    }


def test_moving_means():
    assert moving_means([1.0, 2.0, 3.0, 4.0], 2) == [1.5, 2.5, 3.5]
    assert moving_means([1.0, 3.0], 5) == [2.0]
    assert moving_means([], 3) == []


def two_runs(tmp_path: Path) -> tuple[Path, Path]:
    """A finished baseline and a KL-Cov run still going, with hand-checkable numbers."""
    base = [{"step": s, "entropy": 1.0 - 0.1 * s, "reward": 0.1 * s, "rewards/correctness/mean": 0.1 * s,
             "completions/mean_length": 4.0} for s in range(1, 7)]
    # entropy dips to 0.3 at step 4 and recovers; accuracy peaks at step 3
    kl = [{"step": s, "entropy": h, "rewards/correctness/mean": r, "reward": r - 0.5, "completions/mean_length": n}
          for s, h, r, n in [(1, 0.9, 0.2, 2.0), (2, 0.5, 0.6, 4.0), (3, 0.4, 0.9, 6.0), (4, 0.3, 0.5, 8.0)]]
    a = write_run(tmp_path / "grpo", base, final={"step": 6, "train_runtime": 125.4})
    b = write_run(tmp_path / "klc", kl, methods=[{"name": "kl_cov", "ratio": 0.02}])
    return a, b


def test_compare_values_on_two_runs(tmp_path):
    a, b = two_runs(tmp_path)
    sa, sb = summarize_run(load_run(a), window=2), summarize_run(load_run(b), window=2)
    assert sa.label == "grpo" and sb.label == "klc [kl_cov]"
    assert (sa.steps, sa.finished, sa.wall_time) == (6, True, 125.4)
    assert sa.final == pytest.approx(0.55) and sa.best == pytest.approx(0.55)
    assert (sa.entropy_start, sa.entropy_end, sa.entropy_min) == (pytest.approx(0.85), pytest.approx(0.45), pytest.approx(0.45))
    assert sa.mean_length == 4.0
    assert (sb.steps, sb.finished, sb.wall_time) == (4, False, None)
    assert sb.performance_key == "rewards/correctness/mean"   # accuracy, not the shaped reward
    assert sb.final == pytest.approx(0.7) and sb.best == pytest.approx(0.75)
    assert (sb.entropy_start, sb.entropy_end, sb.entropy_min) == (pytest.approx(0.7), pytest.approx(0.35), pytest.approx(0.35))
    assert sb.mean_length == 5.0

    text = compare_table([sa, sb], window=2)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["run", "steps", "final"]
    assert lines[2].split() == ["grpo", "6", "0.550", "0.550", "0.850", "0.450", "0.450", "4.00", "2m05s"]
    assert lines[3].split() == ["klc", "[kl_cov]", "4*", "0.700", "0.750", "0.700", "0.350", "0.350", "5.00", "running"]
    assert "still running" in text and "rewards/correctness/mean" in text

    md = compare_table([sa, sb], markdown=True, window=2).splitlines()
    assert md[0] == "| run | steps | final acc | best acc | H start | H end | H min | mean len | wall time |"
    assert md[1].startswith("|---|--:|")
    assert md[3] == "| klc [kl_cov] | 4* | 0.700 | 0.750 | 0.700 | 0.350 | 0.350 | 5.00 | running |"


# ------------------------------------------------------------------------------------------- the CLI


def test_cli_compare(tmp_path, capsys):
    a, b = two_runs(tmp_path)
    assert main(["compare", str(a), str(b), "--window", "2"]) == 0
    assert "klc [kl_cov]" in capsys.readouterr().out
    assert main(["compare", str(a), "--markdown"]) == 0
    assert capsys.readouterr().out.startswith("| run | steps |")
    assert main(["compare", str(tmp_path / "missing")]) == 2
    assert "metrics.jsonl not found" in capsys.readouterr().err


def test_cli_fit_law(tmp_path, capsys):
    run = write_run(tmp_path / "run", law_rows())
    out = tmp_path / "law.png"
    assert main(["fit-law", str(run), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "a = 0.4000" in text and "b = 1.2000" in text and "ceiling -a + b = 0.8000" in text
    assert out.stat().st_size > 10_000

    flat = write_run(tmp_path / "flat", [
        {"step": s, "rollout_entropy/mean": 0.8 + 0.001 * (s % 2), "reward": 0.1 * s} for s in range(1, 20)])
    assert main(["fit-law", str(flat), "-o", str(tmp_path / "flat.png")]) == 2
    err = capsys.readouterr().err
    assert "entropy hardly moved" in err and "Traceback" not in err
    short = write_run(tmp_path / "short", law_rows(steps=8))   # 2 generation steps
    assert main(["fit-law", str(short), "-o", str(tmp_path / "short.png")]) == 2
    assert "too few points" in capsys.readouterr().err
    # one refused run among fitted ones: the others are still fitted and drawn, the exit code says 2
    assert main(["fit-law", str(run), str(short), "-o", str(tmp_path / "both.png")]) == 2
    assert (tmp_path / "both.png").is_file()


def test_cli_covariance(tmp_path, capsys):
    run = write_run(tmp_path / "run", law_rows())
    assert main(["covariance", str(run), "-o", str(tmp_path / "cov.png")]) == 0
    assert "corr(dH, Cov) = -1.000" in capsys.readouterr().out
    assert (tmp_path / "cov.png").stat().st_size > 10_000
    bare = write_run(tmp_path / "bare", [{"step": s, "entropy": 1.0 - 0.1 * s} for s in range(1, 6)])
    assert main(["covariance", str(bare), "-o", str(tmp_path / "bare.png")]) == 2
    assert "covariance/logp_adv" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- evaluation during training


def eval_rows(pass1: list[float], passk: list[float], every: int = 4, steps: int = 12) -> list[dict]:
    """law_rows with an evaluation every ``every`` steps (pass@1, pass@2, pass@4 and entropy on 'arith')."""
    rows = law_rows(steps=steps)
    for i, step in enumerate(range(every, steps + 1, every)):
        rows[step - 1].update({"eval/arith/pass@1": pass1[i], "eval/arith/pass@2": (pass1[i] + passk[i]) / 2,
                               "eval/arith/pass@4": passk[i], "eval/arith/maj@4": pass1[i], "eval/arith/entropy": 0.5})
    return rows


def test_compare_adds_eval_columns_when_a_run_evaluated(tmp_path, capsys):
    write_run(tmp_path / "grpo", eval_rows([0.3, 0.5, 0.6], [0.8, 0.7, 0.65]))
    write_run(tmp_path / "plain", law_rows(steps=12))
    summary = summarize_run(load_run(tmp_path / "grpo"))
    assert (summary.eval_dataset, summary.eval_k) == ("arith", 4)
    assert (summary.eval_pass1_final, summary.eval_pass1_best) == (0.6, 0.6)
    assert (summary.eval_passk_final, summary.eval_passk_best) == (0.65, 0.8)
    assert summarize_run(load_run(tmp_path / "plain")).eval_dataset is None
    assert main(["compare", str(tmp_path / "grpo"), str(tmp_path / "plain")]) == 0
    out = capsys.readouterr().out
    header, _, grpo, plain = out.splitlines()[:4]
    assert header.rstrip().endswith("eval p@1 end  eval p@1 best  eval p@k end  eval p@k best")
    assert grpo.split()[-4:] == ["0.600", "0.600", "0.650", "0.800"]
    assert plain.split()[-4:] == ["-", "-", "-", "-"]
    assert "arith (k=4)" in out
    assert main(["compare", str(tmp_path / "plain")]) == 0
    assert "eval p@1" not in capsys.readouterr().out  # no evaluation, no eval columns


def test_tradeoff_table_and_figure(tmp_path, capsys):
    write_run(tmp_path / "grpo", eval_rows([0.3, 0.5, 0.6], [0.8, 0.7, 0.65]))
    write_run(tmp_path / "kept", eval_rows([0.3, 0.45, 0.55], [0.8, 0.8, 0.82]), methods=[{"name": "kl_cov"}])
    write_run(tmp_path / "none", law_rows(steps=12))
    t = run_tradeoff(load_run(tmp_path / "grpo"))
    assert (t.dataset, t.k, t.steps) == ("arith", 4, [4, 8, 12])
    assert t.delta_pass1 == pytest.approx(0.3) and t.delta_passk == pytest.approx(-0.15)
    with pytest.raises(AnalysisError, match="did not evaluate on 'gsm8k'"):
        run_tradeoff(load_run(tmp_path / "grpo"), "gsm8k")
    out_png = tmp_path / "tradeoff.png"
    code = main(["tradeoff", str(tmp_path / "grpo"), str(tmp_path / "kept"), str(tmp_path / "none"), "-o", str(out_png)])
    captured = capsys.readouterr()
    assert code == 2 and "logged no evaluation" in captured.err  # the run without eval is named, the others drawn
    lines = captured.out.splitlines()
    assert lines[1].split()[-6:] == ["0.300", "0.600", "+0.300", "0.800", "0.650", "-0.150"]
    assert lines[2].split()[-6:] == ["0.300", "0.550", "+0.250", "0.800", "0.820", "+0.020"]
    assert out_png.stat().st_size > 10_000


def test_watch_and_versus_lines(tmp_path, capsys):
    write_run(tmp_path / "grpo", eval_rows([0.3, 0.5, 0.6], [0.8, 0.7, 0.65]))
    write_run(tmp_path / "kept", eval_rows([0.3, 0.45, 0.55], [0.8, 0.8, 0.82]), methods=[{"name": "kl_cov"}],
              final={"step": 12, "train_runtime": 30.0})
    assert main(["watch", str(tmp_path / "grpo"), str(tmp_path / "kept"), str(tmp_path / "later"), "--once"]) == 0
    line = capsys.readouterr().out
    assert "grpo 12 acc" in line and "eval pass@1 0.600 pass@4 0.650 |" in line
    assert "kept 12 acc" in line and "pass@4 0.820 done" in line and "later: waiting" in line
    assert main(["compare", str(tmp_path / "grpo"), str(tmp_path / "kept"), "--baseline", "grpo"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("kept [kl_cov]: end entropy") and "(+0% vs grpo)" in last
    assert "eval pass@1 0.550 (-0.050), pass@4 0.820 (+0.170)" in last
    assert main(["compare", str(tmp_path / "grpo"), "--baseline", "nope"]) == 2
