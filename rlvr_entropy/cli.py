"""``rlvr-entropy``: train from a recipe, print a resolved recipe, list methods and recipes, plot and analyse runs, evaluate models.

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

    path = plot_runs(args.runs, args.output, smooth_window=args.smooth, dpi=args.dpi)
    print(f"wrote {path}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from rlvr_entropy.analysis import compare_table, load_run, summarize_run, versus

    summaries = [summarize_run(load_run(run), window=args.window) for run in args.runs]
    print(compare_table(summaries, markdown=args.markdown, window=args.window))
    if args.baseline is not None:
        names = [Path(run).name for run in args.runs]
        if args.baseline not in names:
            raise FileNotFoundError(f"--baseline {args.baseline!r} is not one of the runs ({', '.join(names)})")
        print()
        print("\n".join(versus(summaries, summaries[names.index(args.baseline)])))
    return 0


def _watch(args: argparse.Namespace) -> int:
    """One line per interval about each run until every run has finished (or --once)."""
    import time

    from rlvr_entropy.analysis import progress, read_final

    started = time.monotonic()
    while True:
        line = " | ".join(progress(run) for run in args.runs)
        print(f"[{time.monotonic() - started:4.0f}s] {line}", flush=True)
        done = all((Path(run) / "metrics.jsonl").is_file() and read_final(run) is not None for run in args.runs)
        if args.once or done:
            return 0
        time.sleep(args.interval)


def _tradeoff(args: argparse.Namespace) -> int:
    from rlvr_entropy.analysis import AnalysisError, run_tradeoff, tradeoff_table
    from rlvr_entropy.plotting import save_figure, tradeoff_figure

    done, refused = _analyse_each(args.runs, lambda run: run_tradeoff(run, args.dataset))
    if done:
        print(tradeoff_table([t for _, t in done]))
        print(f"wrote {save_figure(tradeoff_figure([t for _, t in done]), args.output)}")
    if refused:
        raise AnalysisError("no pass@1 / pass@k trade-off for:\n  " + "\n  ".join(refused))
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
    import json

    from rlvr_entropy.config import check_eval_numbers, parse_data_spec
    from rlvr_entropy.evaluation import evaluate_dataset, format_table, report_json
    from rlvr_entropy.periodic_eval import load_eval_rows
    from rlvr_entropy.runner import check_model_source

    check_eval_numbers(args.k, args.samples, "--")
    given = [parse_data_spec(d) for d in args.data] if args.data else None
    reports = []
    for name in args.models:
        if name != "tiny":
            check_model_source(name, "model")  # a missing directory first, whatever else is wrong
        recipe = _run_recipe(name)
        data = given or _default_eval_data(name, recipe)
        rows = [(spec, load_eval_rows(spec, args.num_prompts)) for spec in data]  # bad data stops before the model
        sampler = _eval_sampler(name, data, args)
        for spec, dataset in rows:
            report = evaluate_dataset(
                sampler, dataset, spec.name, samples=args.samples or args.k, k=args.k,
                max_new_tokens=_eval_budget(args.max_new_tokens, spec, recipe), batch_size=args.batch_size,
                seed=args.seed, progress=not args.no_progress,
            )
            reports.append((name, report))
    print(format_table(reports, markdown=args.markdown))
    if args.backend == "vllm":
        print(f"note: entropy from vLLM's top-{args.vllm_topk} log-probs, a lower bound on the exact entropy")
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k not in ("func", "json", "markdown", "no_progress")}
        payload = report_json(reports, settings, save_samples=args.save_samples)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(payload, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


def _run_recipe(name: str):
    """The recipe a run directory (or one of its checkpoints) was trained with, if it saved one."""
    from rlvr_entropy.config import RecipeError, load_recipe

    path = Path(name)
    for candidate in (path / "recipe.yaml", path.parent / "recipe.yaml"):
        if candidate.is_file():
            try:
                return load_recipe(candidate, hardware_checks=False)
            except RecipeError:
                return None  # written by another version: evaluate without its defaults
    return None


def _default_eval_data(name: str, recipe) -> list:
    """Without --data: the run's eval datasets, else its task's held-out split; ``tiny``: task:arithmetic."""
    from rlvr_entropy.config import RecipeError, parse_data_spec

    if recipe is not None and recipe.evaluation is not None:
        return recipe.evaluation.datasets
    if recipe is not None and recipe.data.dataset is None and recipe.data.task:
        return [parse_data_spec(f"task:{recipe.data.task}")]
    if name == "tiny":
        return [parse_data_spec("task:arithmetic")]
    raise RecipeError(f"{name}: say what to evaluate on with --data (e.g. --data task:arithmetic, --data "
                      "recipes/eval/math500.yaml, --data file.jsonl,prompt=question,answer=answer)")


def _eval_budget(given: int | None, spec, recipe) -> int:
    """Tokens per sample: --max-new-tokens, else a task's own budget, else the run's, else 1024."""
    from rlvr_entropy.tasks import completion_budget

    if given is not None:
        return given
    if spec.dataset is None and spec.task:
        return completion_budget(spec.task)
    if recipe is not None and recipe.train.max_completion_length:
        return recipe.train.max_completion_length
    return 1024


def _eval_sampler(name: str, data: list, args: argparse.Namespace):
    """The sampler of one model argument (``tiny``, a run, a checkpoint, a model directory or a hub id)."""
    import torch

    from rlvr_entropy.config import ModelSpec, first_line
    from rlvr_entropy.evaluation import EvaluationError, HFSampler, VLLMSampler
    from rlvr_entropy.runner import load_tokenizer, model_directory, resolve_model

    if name == "tiny":  # the offline model, warm-started on the first task evaluated
        task = next((d.task for d in data if d.dataset is None and d.task), "arithmetic")
        model_path = resolve_model(ModelSpec(name_or_path="tiny"), task)
    else:
        model_path = model_directory(name, "model")
    tokenizer = load_tokenizer(model_path, "model")
    if args.backend == "vllm":
        return VLLMSampler.build(model_path, tokenizer, args.temperature, args.top_p, topk=args.vllm_topk,
                                 seed=args.seed)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars between the tables
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype="auto" if device == "cuda" else torch.float32)
    except (OSError, ValueError) as err:
        raise EvaluationError(f"model '{model_path}': cannot load it: {first_line(err)}") from None
    return HFSampler(model.to(device).eval(), tokenizer, args.temperature, args.top_p)


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
    p.add_argument("--dpi", type=int, default=110, help="resolution of a PNG (lower: a smaller file)")
    p.set_defaults(func=_plot)
    p = sub.add_parser("compare", help="table of final/best accuracy, entropy start/end/min, length, steps, wall time")
    p.add_argument("runs", nargs="+", help="run directories (each with a metrics.jsonl)")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.add_argument("--window", type=int, default=5, help="logged values averaged for start/final/best/min")
    p.add_argument("--baseline", help="a run's directory name: one line per other run saying what it did against it")
    p.set_defaults(func=_compare)
    p = sub.add_parser("watch", help="one line per interval with each run's step, accuracy, entropy and latest "
                       "evaluation, until every run has finished")
    p.add_argument("runs", nargs="+", help="run directories (a run not started yet shows as waiting)")
    p.add_argument("--interval", type=float, default=15.0, help="seconds between lines")
    p.add_argument("--once", action="store_true", help="print one line and exit")
    p.set_defaults(func=_watch)
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
    p = sub.add_parser("tradeoff", help="pass@1 against pass@k over each run's evaluations during training: "
                       "did pass@k hold while pass@1 rose?")
    p.add_argument("runs", nargs="+", help="run directories whose recipe had an eval section")
    p.add_argument("-o", "--output", default="tradeoff.png")
    p.add_argument("--dataset", help="eval dataset name (default: each run's first)")
    p.set_defaults(func=_tradeoff)
    p = sub.add_parser("evaluate", help="pass@k, maj@k, token entropy and length of models, runs or checkpoints on "
                       "tasks, local files or hub datasets")
    p.add_argument("models", nargs="+", metavar="MODEL", help="'tiny', a run directory, a checkpoint, a model "
                   "directory or a hub id; one table row per model and dataset")
    p.add_argument("--data", action="append", metavar="SPEC", help="task:NAME, an eval YAML (recipes/eval/), or a "
                   "file / hub id with options: 'file.jsonl,prompt=question,answer=answer,template=boxed'; repeat for "
                   "more (default: the run's eval datasets or task)")
    p.add_argument("--k", type=int, default=8, help="pass@k' for powers of two k' <= k, and maj@k")
    p.add_argument("--samples", type=int, default=None, help="samples per prompt (default: k)")
    p.add_argument("--num-prompts", type=int, default=256, help="prompts per dataset (its first ones)")
    p.add_argument("--temperature", type=float, default=0.6, help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="tokens per sample (default: a task's budget, else the run's max_completion_length, else 1024)")
    p.add_argument("--batch-size", type=int, default=32, help="prompts per generate call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=("hf", "vllm"), default="hf", help="hf: batched HF generate (exact entropy); "
                   "vllm: vLLM (entropy from its top-k log-probs, a lower bound)")
    p.add_argument("--vllm-topk", type=int, default=20, help="log-probs per token vLLM returns (-1: all)")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.add_argument("--json", metavar="PATH", help="write the figures (and with --save-samples every sample) as JSON")
    p.add_argument("--save-samples", action="store_true", help="with --json: each prompt's samples, extracted "
                   "answers and correctness")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_evaluate)
    args = parser.parse_args(argv)

    from rlvr_entropy.analysis import AnalysisError
    from rlvr_entropy.config import RecipeError
    from rlvr_entropy.evaluation import EvaluationError
    from rlvr_entropy.methods.base import MethodConfigError

    try:
        return args.func(args)
    except (RecipeError, MethodConfigError, FileNotFoundError, AnalysisError, EvaluationError) as err:
        rank = os.environ.get("RANK", "0")
        if rank == "0":
            print(f"rlvr-entropy: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
