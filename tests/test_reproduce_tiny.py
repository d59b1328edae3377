"""scripts/reproduce_tiny.py: what it runs, and the verdict of each claim on runs with known curves."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from rlvr_entropy.analysis import Run
from rlvr_entropy.config import load_recipe

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("reproduce_tiny", ROOT / "scripts" / "reproduce_tiny.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce_tiny"] = module
    spec.loader.exec_module(module)
    return module


def resolved(bench, config):
    return load_recipe(ROOT / "recipes" / "tiny" / f"{config.recipe}.yaml", [*bench.SHARED, *config.overrides])


def test_every_registered_method_runs_and_every_config_loads_with_the_shared_settings(bench):
    from rlvr_entropy.methods import METHODS

    used = set()
    for config in bench.CONFIGS:
        recipe = resolved(bench, config)   # a typo in an override fails here, not 40 minutes into a run
        used |= {m["name"] for m in recipe.train.methods}
        assert recipe.train.learning_rate == 1.0e-4 and recipe.train.warmup_steps == 20
        baseline = resolved(bench, bench.BY_NAME[config.baseline])
        assert baseline.train.methods == [] and baseline.data.task == recipe.data.task
        assert recipe.train.per_device_train_batch_size == baseline.train.per_device_train_batch_size
    assert used == set(METHODS)
    composed = resolved(bench, bench.BY_NAME["kl_cov+steer"]).train.methods
    assert [m["name"] for m in composed] == ["kl_cov", "steer"]
    # the composition uses KL-Cov exactly as kl_cov_split.yaml does
    assert composed[0] == resolved(bench, bench.BY_NAME["kl_cov"]).train.methods[0]


def test_command_is_the_cli_with_recipe_shared_settings_seed_and_budget(bench, tmp_path):
    cmd = bench.command(bench.BY_NAME["steer"], 2, 100, tmp_path / "steer" / "seed2")
    assert cmd[1:4] == ["-m", "rlvr_entropy", "train"] and cmd[4].endswith("recipes/tiny/steer.yaml")
    assert cmd[5:5 + len(bench.SHARED)] == bench.SHARED
    assert "data.task=split" in cmd and cmd[-3:] == ["max_steps=100", "seed=2", f"output_dir={tmp_path / 'steer' / 'seed2'}"]


def test_a_finished_run_is_reused_only_for_the_same_command(bench, tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    cmd = ["python", "-m", "rlvr_entropy", "train", "x.yaml", "seed=0"]
    assert not bench.is_done(run, cmd)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "entropy": 1.0}) + "\n")
    (run / "benchmark_command.json").write_text(json.dumps(cmd[1:]))
    assert not bench.is_done(run, cmd)                     # not finished
    with (run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 1, "train_runtime": 3.0}) + "\n")
    assert bench.is_done(run, cmd)
    assert not bench.is_done(run, [*cmd[:-1], "seed=1"])   # other settings: train again


def test_spread_and_plus_minus(bench):
    assert bench.spread([1.0, 3.0]) == (2.0, math.sqrt(2.0))
    assert bench.spread([2.0]) == (2.0, 0.0)
    assert math.isnan(bench.spread([math.nan, None])[0])
    assert bench.pm([1.0, 3.0], 2) == "2.00 ± 1.41" and bench.pm([0.5]) == "0.500" and bench.pm([]) == "-"


# ---------------------------------------------------------------------------------------------------
# Claims on synthetic runs: 40 logged steps, a rollout every 4


def fake_run(name: str, *, h0: float = 1.0, h1: float = 1.0, acc: float = 0.5, length: float = 5.0,
             aepo: float | None = None, wobble: float = 0.0, pass1: float = 0.3, cov_sign: float = 1.0,
             targets: dict[str, float] | None = None) -> Run:
    """Entropy from h0 to h1 in uneven steps; Cov(log pi, A) of each step is -cov_sign times its change."""
    steps = 40
    weights = [1 + 0.5 * (i % 3) for i in range(steps - 1)]
    deltas = [(h1 - h0) * w / sum(weights) for w in weights]
    h, rows = h0, []
    for i in range(steps):
        d = deltas[i] if i < steps - 1 else deltas[-1]
        row = {"step": i + 1, "entropy": h, "rewards/correctness/mean": acc - 0.3 * (h - h1),
               "covariance/logp_adv": -cov_sign * d, **{f"{m}/target": t for m, t in (targets or {}).items()}}
        if i % 4 == 0:
            row |= {"rollout_entropy/mean": h + (wobble if i % 8 == 0 else -wobble), "completions/mean_length": length}
            if aepo is not None:
                row["aepo/entropy"] = aepo
        rows.append(row)
        h += d if i < steps - 1 else 0.0
    rows[-1] |= {"eval/split/pass@1": pass1, "eval/split/pass@8": min(1.0, 2 * pass1)}
    return Run(path=Path(name), rows=rows, final={"train_runtime": 60.0, "step": steps})


def results_for(bench, **changes):
    """Three seeds of every config; GRPO collapses 1.0 -> 0.4; ``changes`` maps a config to fake_run kwargs."""
    out = {}
    for config in bench.CONFIGS:
        kwargs = {"h1": 0.4} | changes.get(config.name, {})
        out[config.name] = {s: fake_run(config.name, **{**kwargs, "h1": kwargs["h1"] + 0.01 * s}) for s in range(3)}
    return out


def verdicts(bench, results) -> dict[str, str]:
    return {c.title: c.verdict for c in bench.claims(results)}


def test_claims_reproduced_when_the_curves_show_them(bench):
    results = results_for(
        bench,
        clip_cov={"h1": 0.7}, kl_cov={"h1": 0.8}, **{"kl_cov+steer": {"h1": 0.9}},
        **{"aepo_0.8": {"aepo": 0.82}, "aepo_0.4": {"aepo": 0.43}},
        grpo_think={"length": 20.0, "wobble": 0.05}, pear={"length": 12.0}, steer={"wobble": 0.0},
        grpo_split={"h1": 0.4, "wobble": 0.05}, seed_grpo={"pass1": 0.4}, canon={"pass1": 0.35},
        # the second wave: controllers end within 0.05 of their targets (last quarter 0.47-0.49 against 0.47)
        ter={"targets": {"ter": 0.47}}, entropic={"targets": {"entropic": 0.47}},
        entropy_bonus_target={"targets": {"entropy_bonus": 0.47}},
        ce_gppo={"h1": 0.7}, siren={"h1": 0.7}, erc={"wobble": 0.0}, archer={"pass1": 0.4}, entropy_adv={"pass1": 0.4},
    )
    v = verdicts(bench, results)
    assert v == {
        "TER holds its target entropy": "reproduced",
        "EntroPIC holds its target entropy": "reproduced",
        "TRL's adaptive bonus (Skywork-OR1) holds its target entropy": "reproduced",
        "CE-GPPO (beta1 < beta2) keeps entropy above GRPO": "reproduced",
        "SIREN keeps entropy above GRPO": "reproduced",
        "ERC narrows the per-step entropy change": "reproduced",
        "Archer: dual-token constraints raise accuracy": "reproduced",
        "Entropy advantage: an entropy bonus in the advantage raises pass@k": "reproduced",
        "GRPO's entropy collapses": "reproduced",
        "Clip-Cov keeps entropy above GRPO": "reproduced",
        "KL-Cov keeps entropy above GRPO": "reproduced",
        "KL-Cov + STEER (composed) keeps entropy above GRPO": "reproduced",
        "AEPO holds two targets": "reproduced",
        "PEAR shortens responses at similar accuracy": "reproduced",
        "STEER narrows the per-step entropy change": "reproduced",
        "SEED-GRPO: uncertainty-scaled advantages raise accuracy": "reproduced",
        "CANON (entropy): favouring the better entropy half raises accuracy": "reproduced",
        "ΔH tracks −Cov(log π, A)": "reproduced",
        "R = −a·exp(H) + b fits GRPO": "reproduced",
    }


def test_claims_not_reproduced_when_the_curves_do_not_show_them(bench):
    results = results_for(
        bench,
        grpo_split={"h1": 0.9, "wobble": 0.0, "cov_sign": -1.0},   # no collapse, entropy rises with Cov
        clip_cov={"h1": 0.85}, kl_cov={"h1": 0.95}, **{"kl_cov+steer": {"h1": 0.9}},
        **{"aepo_0.8": {"aepo": 0.6}, "aepo_0.4": {"aepo": 0.43}},
        grpo_think={"length": 20.0}, pear={"length": 19.0}, steer={"wobble": 0.05},
        seed_grpo={"pass1": 0.2}, canon={"pass1": 0.3},
        ter={"targets": {"ter": 0.8}}, entropic={"h1": 0.38, "targets": {"entropic": 0.51}},  # last quarter 0.455-0.472: two seeds in
    )
    v = verdicts(bench, results)
    assert v["TER holds its target entropy"] == "not reproduced"
    assert v["EntroPIC holds its target entropy"] == "partly"
    assert v["GRPO's entropy collapses"] == "not reproduced"
    # 0.85 + 0.01 s against 0.9 + 0.01 s: lower in every seed
    assert v["Clip-Cov keeps entropy above GRPO"] == "not reproduced"
    # higher in every seed, by 0.05: more than twice GRPO's inter-seed spread (sd 0.01)
    assert v["KL-Cov keeps entropy above GRPO"] == "reproduced"
    assert v["KL-Cov + STEER (composed) keeps entropy above GRPO"] == "not reproduced"   # equal: not higher
    assert v["AEPO holds two targets"] == "not reproduced"
    assert v["PEAR shortens responses at similar accuracy"] == "not reproduced"
    assert v["STEER narrows the per-step entropy change"] == "not reproduced"
    assert v["SEED-GRPO: uncertainty-scaled advantages raise accuracy"] == "not reproduced"
    assert v["CANON (entropy): favouring the better entropy half raises accuracy"] == "not reproduced"
    assert v["ΔH tracks −Cov(log π, A)"] == "not reproduced"


def test_a_missing_seed_is_left_out_of_the_pairs_not_matched_to_another(bench):
    results = results_for(bench, kl_cov={"h1": 0.8})
    del results["kl_cov"][1]
    ours, base = bench._paired(results, "kl_cov", lambda r: r.rows[-1]["entropy"])
    assert ours == pytest.approx([0.8, 0.82]) and base == pytest.approx([0.4, 0.42])


def test_document_has_the_table_claims_and_figures(bench, tmp_path):
    results = results_for(bench, kl_cov={"h1": 0.8})
    doc = tmp_path / "docs" / "tiny-benchmark.md"
    bench.write_document(results, seeds=[0, 1, 2], steps=200, doc=doc,
                         figures=[("aepo_targets.png", "AEPO")], failures=["pear seed 1 (log: x)"], minutes=42.0)
    text = doc.read_text()
    assert "| config | task | final acc |" in text
    assert "| kl_cov | split |" in text and "| pear | arithmetic_think |" in text
    assert "### KL-Cov keeps entropy above GRPO: **reproduced**" in text
    assert "![AEPO](figures/tiny-benchmark/aepo_targets.png)" in text
    assert "pear seed 1 (log: x)" in text and "42 minutes of training" in text and " ± " in text


@pytest.mark.slow
@pytest.mark.e2e
def test_a_partial_benchmark_trains_reports_and_resumes(bench, tmp_path, capsys):
    """--only kl_cov: KL-Cov and its baseline, two seeds of 4 steps, then the report; a rerun trains nothing."""
    argv = ["--only", "kl_cov", "--steps", "4", "--seeds", "0", "1", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("[reproduce_tiny]") == 5 and "4/4" in out and "FAILED" not in out
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["_figures", "figures", "grpo_split", "kl_cov"]
    text = (tmp_path / "tiny-benchmark.md").read_text()
    assert "| grpo_split | split |" in text and "| kl_cov | split |" in text and "| steer |" not in text
    assert "### KL-Cov keeps entropy above GRPO:" in text and "AEPO" not in text.split("## How the shared")[0]
    assert (tmp_path / "figures" / "tiny-benchmark" / "covariance_methods.png").is_file()
    assert not (ROOT / "docs" / "tiny-benchmark.md").read_text() == text   # the full benchmark's document is untouched
    assert bench.main(argv) == 0
    assert capsys.readouterr().out.count("already done") == 4
