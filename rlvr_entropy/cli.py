"""``rlvr-entropy``: train from a recipe, print a resolved recipe, list methods, plot runs, evaluate.

Works the same under ``torchrun`` / ``accelerate launch``: ``torchrun --nproc_per_node 2 -m rlvr_entropy
train RECIPE.yaml``.
"""

from __future__ import annotations

import argparse
import os
import sys


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

    print(recipe_to_yaml(load_recipe(args.recipe, args.overrides)), end="")
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


def _plot(args: argparse.Namespace) -> int:
    from rlvr_entropy.plotting import plot_runs, read_metrics, summarize

    path = plot_runs(args.runs, args.output)
    print(f"wrote {path}")
    for run in args.runs:
        s = summarize(read_metrics(run))
        parts = [f"{k.split('@')[0]} {s[k]:.3f} -> {s[k.replace('@start', '@end')]:.3f}" for k in s if k.endswith("@start")]
        print(f"{run} ({int(s['steps'])} steps, first vs last 10): " + ", ".join(parts))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from rlvr_entropy.runner import resolve_model
    from rlvr_entropy.config import ModelSpec
    from rlvr_entropy.tiny import evaluate_accuracy

    model = resolve_model(ModelSpec(name_or_path=args.model))
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
    p = sub.add_parser("config", help="print the resolved recipe without training")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=_config)
    p = sub.add_parser("methods", help="list the registered methods and the hooks each uses")
    p.set_defaults(func=_methods)
    p = sub.add_parser("plot", help="plot entropy, reward and length curves of one or more runs")
    p.add_argument("runs", nargs="+", help="run directories (each with a metrics.jsonl)")
    p.add_argument("-o", "--output", default="curves.png")
    p.set_defaults(func=_plot)
    p = sub.add_parser("evaluate", help="sampling accuracy of a model (a run directory, or 'tiny') on a synthetic task")
    p.add_argument("model")
    p.add_argument("--task", default="arithmetic")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--temperature", type=float, nargs="+", default=[1.0], help="0 = greedy")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_evaluate)
    args = parser.parse_args(argv)

    from rlvr_entropy.config import RecipeError
    from rlvr_entropy.methods.base import MethodConfigError

    try:
        return args.func(args)
    except (RecipeError, MethodConfigError, FileNotFoundError) as err:
        rank = os.environ.get("RANK", "0")
        if rank == "0":
            print(f"rlvr-entropy: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
