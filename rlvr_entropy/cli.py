"""``rlvr-entropy``: train from a recipe, print a resolved recipe, list methods and recipes, plot and analyse runs, evaluate.

Works the same under ``torchrun`` / ``accelerate launch``: ``torchrun --nproc_per_node 2 -m rlvr_entropy
train RECIPE.yaml``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Where `rlvr-entropy recipes` looks: the checkout this package runs from, then the working directory.
RECIPE_ROOTS = (Path(__file__).resolve().parents[1] / "recipes", Path.cwd() / "recipes")


def _train(args: argparse.Namespace) -> int:
    from rlvr_entropy.config import load_recipe
    from rlvr_entropy.runner import train

    recipe = load_recipe(args.recipe, args.overrides)
    trainer = train(recipe)
    # Tear the process group down before exit: left to interpreter shutdown, gloo's threads can
    # abort a rank ("terminate called without an active exception") after a successful run.
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
    return 0


def _config(args: argparse.Namespace) -> int:
    from rlvr_entropy.config import load_recipe, recipe_to_yaml

    recipe = load_recipe(args.recipe, args.overrides, hardware_checks=False)  # a GPU recipe checks on a laptop too
    print(recipe_to_yaml(recipe), end="")
    for note in recipe.notes:
        print(f"rlvr-entropy: note: {note}", file=sys.stderr)
    return 0


def _methods(args: argparse.Namespace) -> int:
    from rlvr_entropy.methods import METHODS

    rows = [(name, ", ".join(METHODS.get(name).hooks()), METHODS.get(name).summary()) for name in METHODS]
    width = max((len(r[0]) for r in rows), default=4)
    hooks_width = max((len(r[1]) for r in rows), default=5)
    print(f"{'name':<{width}}  {'hooks':<{hooks_width}}  description")
    for name, hooks, summary in rows:
        print(f"{name:<{width}}  {hooks:<{hooks_width}}  {summary}")
    return 0


def recipe_summaries(root: Path) -> list[tuple[str, str]]:
    """``(path relative to root, first line of its header comment)`` for every ``*.yaml`` under ``root``."""
    rows = []
    for path in sorted(root.rglob("*.yaml")):
        first = path.read_text().splitlines()[:1]
        summary = first[0].lstrip("#").strip() if first and first[0].startswith("#") else "(no header comment)"
        rows.append((str(path.relative_to(root)), summary))
    return rows


def _recipes(args: argparse.Namespace) -> int:
    root = Path(args.root) if args.root else next((p for p in RECIPE_ROOTS if p.is_dir()), RECIPE_ROOTS[-1])
    rows = recipe_summaries(root) if root.is_dir() else []
    if not rows:
        print(f"rlvr-entropy: error: no recipes under {root}", file=sys.stderr)
        return 2
    width = max(len(path) for path, _ in rows)
    print(f"recipes in {root}:")
    for path, summary in rows:
        print(f"  {path:<{width}}  {summary}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from rlvr_entropy.plotting import plot_runs

    path = plot_runs(args.runs, args.output, smooth_window=args.smooth)
    print(f"wrote {path}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from rlvr_entropy.analysis import compare_table, load_run, summarize_run

    summaries = [summarize_run(load_run(run), window=args.window) for run in args.runs]
    print(compare_table(summaries, markdown=args.markdown, window=args.window))
    return 0


def _analyse_each(runs: list[str], analyse):
    """``analyse(run)`` for each run directory: ``[(run, result)]`` and the refusals (``"dir: reason"``).

    A run the analysis refuses (AnalysisError) does not stop the others; the caller reports it.
    """
    from rlvr_entropy.analysis import AnalysisError, load_run

    done, refused = [], []
    for run_dir in runs:
        run = load_run(run_dir)
        try:
            done.append((run, analyse(run)))
        except AnalysisError as err:
            refused.append(f"{run_dir}: {err}")
    return done, refused


def _fit_law(args: argparse.Namespace) -> int:
    from rlvr_entropy.analysis import AnalysisError, fit_run_law
    from rlvr_entropy.plotting import LawPoints, law_figure, save_figure

    done, refused = _analyse_each(args.runs, lambda run: fit_run_law(
        run.rows, entropy_key=args.entropy_key, performance=args.metric,
        min_points=args.min_points, min_entropy_range=args.min_entropy_range))
    fitted = []
    for run, (fit, h_key, r_key) in done:
        fitted.append(LawPoints(run, fit, h_key, r_key))
        print(f"{run.label}: R = -a*exp(H) + b on {fit.n} points ({r_key} vs {h_key}, "
              f"H from {fit.entropy_min:.3f} to {fit.entropy_max:.3f} nats)")
        print(f"  a = {fit.a:.4f}  b = {fit.b:.4f}  R^2 = {fit.r2:.3f}  "
              f"predicted ceiling -a + b = {fit.ceiling:.4f} (performance at H = 0)")
        if fit.a <= 0:
            print("  note: a <= 0, performance did not rise as entropy fell; the ceiling is not an upper bound")
    if fitted:
        print(f"wrote {save_figure(law_figure(fitted), args.output)}")
    if refused:
        raise AnalysisError("refused to fit the law:\n  " + "\n  ".join(refused))
    return 0


def _covariance(args: argparse.Namespace) -> int:
    from rlvr_entropy.analysis import AnalysisError, run_covariance_diagnostic
    from rlvr_entropy.plotting import covariance_figure, save_figure

    results, refused = _analyse_each(
        args.runs, lambda run: run_covariance_diagnostic(run.rows, min_points=args.min_points))
    for run, d in results:
        print(f"{run.label}: {d.n} steps; per step corr(dH, Cov) = {d.correlation:.3f}, slope {d.slope:.3g}, "
              f"sign(dH) = -sign(Cov) on {100 * d.sign_agreement:.0f}%; cumulative H(t) - H(0) ~ -eta * sum Cov: "
              f"eta = {d.eta:.3g}, corr = {d.cumulative_correlation:.3f}")
    if results:
        print(f"wrote {save_figure(covariance_figure(results), args.output)}")
    if refused:
        raise AnalysisError("no covariance diagnostic for:\n  " + "\n  ".join(refused))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from rlvr_entropy.config import ModelSpec
    from rlvr_entropy.runner import resolve_model
    from rlvr_entropy.tiny import evaluate_accuracy

    model = resolve_model(ModelSpec(name_or_path=args.model), args.task)  # tiny: the model warm-started on --task
    for temperature in args.temperature:
        acc = evaluate_accuracy(model, args.task, args.num_prompts, temperature=temperature, seed=args.seed)
        print(f"{args.model}: {args.task} accuracy {acc:.3f} ({args.num_prompts} held-out prompts, temperature {temperature})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlvr-entropy", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train with a recipe: rlvr-entropy train RECIPE.yaml [key=value ...]")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key=value overrides (YAML values; dotted keys reach into sections)")
    p.set_defaults(func=_train)
    p = sub.add_parser("config", help="validate a recipe and print it resolved, without training (hardware-only "
                       "checks such as bf16 support are left to the launch machine and reported as notes)")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=_config)
    p = sub.add_parser("methods", help="list the registered methods and the hooks each uses")
    p.set_defaults(func=_methods)
    p = sub.add_parser("recipes", help="list the shipped recipes with what each is for")
    p.add_argument("root", nargs="?", default=None, help="folder to list (default: recipes/ of this checkout, else of the working directory)")
    p.set_defaults(func=_recipes)
    p = sub.add_parser("plot", help="plot entropy, reward, length and method-statistic curves of one or more runs")
    p.add_argument("runs", nargs="+", help="run directories (each with a metrics.jsonl)")
    p.add_argument("-o", "--output", default="curves.png")
    p.add_argument("--smooth", type=int, default=5, help="moving-mean window of noisy curves, in logged points (1: raw)")
    p.set_defaults(func=_plot)
    p = sub.add_parser("compare", help="table of final/best accuracy, entropy start/end/min, length, steps, wall time")
    p.add_argument("runs", nargs="+", help="run directories (each with a metrics.jsonl)")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.add_argument("--window", type=int, default=5, help="logged values averaged for start/final/best/min")
    p.set_defaults(func=_compare)
    p = sub.add_parser("fit-law", help="fit R = -a*exp(H) + b (Cui et al. 2025) to a run's entropy and accuracy; "
                       "print a, b, R^2 and the ceiling -a + b, draw the fit")
    p.add_argument("runs", nargs="+", help="run directories; each is fitted on its own")
    p.add_argument("-o", "--output", default="entropy_law.png")
    p.add_argument("--metric", help="performance key (default: rewards/correctness/mean, else reward)")
    p.add_argument("--entropy-key", help="entropy key (default: rollout_entropy/mean, else entropy)")
    p.add_argument("--min-points", type=int, default=5)
    p.add_argument("--min-entropy-range", type=float, default=0.05, help="refuse when entropy spans less (nats)")
    p.set_defaults(func=_fit_law)
    p = sub.add_parser("covariance", help="entropy change per step against the logged Cov(log pi, A): correlation and plot")
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("-o", "--output", default="covariance.png")
    p.add_argument("--min-points", type=int, default=3)
    p.set_defaults(func=_covariance)
    p = sub.add_parser("evaluate", help="sampling accuracy of a model (a run directory, or 'tiny') on a synthetic task")
    p.add_argument("model")
    p.add_argument("--task", default="arithmetic")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--temperature", type=float, nargs="+", default=[1.0], help="0 = greedy")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_evaluate)
    args = parser.parse_args(argv)

    from rlvr_entropy.analysis import AnalysisError
    from rlvr_entropy.config import RecipeError
    from rlvr_entropy.methods.base import MethodConfigError

    try:
        return args.func(args)
    except (RecipeError, MethodConfigError, FileNotFoundError, AnalysisError) as err:
        rank = os.environ.get("RANK", "0")
        if rank == "0":
            print(f"rlvr-entropy: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
