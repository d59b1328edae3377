"""Configuration: ``EntropyGRPOConfig`` (TRL's GRPOConfig plus a method list) and YAML recipes.

A recipe is one YAML mapping. Three sections describe the run's world, every other key is a field of
:class:`EntropyGRPOConfig` (so every TRL option keeps its TRL name)::

    model: {name_or_path: tiny}          # "tiny" = the offline tiny model, else a hub id or a local path
    data: {task: arithmetic, num_prompts: 256}
    rewards: [correctness]
    methods:                              # composed in list order
      - {name: clip_cov, ratio: 2.0e-4}
    max_steps: 30                         # ... any GRPOConfig field

Command-line overrides ``key=value`` are parsed as YAML values; dotted keys reach into sections and
lists (``data.num_prompts=64``, ``methods.0.ratio=1e-3``). Unknown keys, wrong types and unknown
method names fail before anything is built, naming the closest valid key: every value is checked
against its field's type annotation (:func:`coerce`), recipe sections and method parameters alike, and
each ``methods`` entry becomes a method here (:func:`build_method`), so the method interface itself
(``methods/base.py``) knows nothing of YAML.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from trl import GRPOConfig

from rlvr_entropy.losses import LOSS_TYPES
from rlvr_entropy.methods import METHODS, Method, MethodConfigError, Pipeline
from rlvr_entropy.registry import closest
from rlvr_entropy.rollout_stats import SOURCES

# Closed sets of values for options that TRL itself validates only mid-run (and this package's own).
CHOICES: dict[str, tuple] = {
    "loss_type": LOSS_TYPES,
    "importance_sampling_level": ("token", "sequence"),
    "scale_rewards": ("group", "batch", "none", True, False),
    "multi_objective_aggregation": ("sum_then_normalize", "normalize_then_sum"),
    "reward_sandbox": ("process", "thread", "none"),
    "on_nonfinite": ("skip", "raise"),
    "bad_rows": ("skip", "error"),
}


# Numeric TRL/HF options that TRL accepts but that fail, or silently do nothing, only mid-run:
# (test, what the value must be). Checked when the config is built.
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "temperature": (lambda v: v > 0, "> 0 (sampling divides the logits by it; use e.g. 0.01 for near-greedy)"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1] (1.0 keeps every token)"),
    "top_k": (lambda v: v >= 0, ">= 0 (0 turns top-k filtering off)"),
    "min_p": (lambda v: v is None or 0 <= v <= 1, "in [0, 1], or null"),
    "repetition_penalty": (lambda v: v > 0, "> 0 (1.0 = no penalty)"),
    "max_completion_length": (lambda v: v is None or v >= 1, ">= 1 (tokens)"),
    "num_iterations": (lambda v: v >= 1, ">= 1"),
    "steps_per_generation": (lambda v: v is None or v >= 1, ">= 1"),
    "per_device_train_batch_size": (lambda v: v >= 1, ">= 1"),
    "gradient_accumulation_steps": (lambda v: v >= 1, ">= 1"),
    "learning_rate": (lambda v: v >= 0, ">= 0"),
    "beta": (lambda v: v >= 0, ">= 0 (the KL coefficient; 0 turns the KL term off)"),
    "epsilon": (lambda v: v >= 0, ">= 0 (the PPO clip range)"),
    "epsilon_high": (lambda v: v is None or v >= 0, ">= 0, or null (= epsilon)"),
    "max_grad_norm": (lambda v: v >= 0, ">= 0 (0 turns clipping off)"),
    "reward_timeout": (lambda v: v is None or v > 0, "> 0 seconds, or null for no limit"),
    "max_prompt_tokens": (lambda v: v is None or v >= 1, ">= 1 (tokens), or null (context - max_completion_length)"),
}


def checkpointing_off() -> dict[str, Any]:
    """TrainingArguments keywords that turn activation (gradient) checkpointing off under the name this
    transformers uses: ``activation_checkpointing`` since 5.2x (the old name then warns), else the old one."""
    from transformers import TrainingArguments

    if "activation_checkpointing" in {f.name for f in dataclasses.fields(TrainingArguments)}:
        return {"activation_checkpointing": False, "gradient_checkpointing": None}
    return {"gradient_checkpointing": False}


class RecipeError(ValueError):
    """A recipe or override is invalid; the message says what to change."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty), for one-line errors."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@dataclass
class EntropyGRPOConfig(GRPOConfig):
    """TRL's ``GRPOConfig`` plus the entropy-control method list and rollout-statistics options."""

    methods: list[dict[str, Any]] = field(
        default_factory=list,
        metadata={"help": "Entropy-control methods, composed in list order: [{name: <registry key>, <param>: <value>}]."},
    )
    log_rollout_entropy: bool = field(
        default=True,
        metadata={
            "help": "Log behaviour-policy (rollout) token entropy whenever it costs no extra forward pass "
            "(HF generation, or a batch for which TRL computes old log-probs anyway). Methods that need it "
            "always get it."
        },
    )
    log_entropy_by_difficulty: bool = field(
        default=True,
        metadata={
            "help": "Log, per generation batch, the prompts, mean length and mean per-response rollout entropy in each "
            "group-accuracy bucket (unsolved, hard, medium, easy, solved) as entropy_by_difficulty/<bucket>/<stat> "
            "(free: computed from numbers the batch already has)."
        },
    )
    difficulty_threshold: float = field(
        default=0.5,
        metadata={"help": "A response counts as solved for entropy_by_difficulty when its reward (the weighted sum of "
                  "the user reward functions) is at least this."},
    )
    rollout_stats_source: Literal["auto", "generate", "vllm", "forward"] = field(
        default="auto",
        metadata={
            "help": "Where rollout statistics come from: 'generate' reads them from HF generate's own forward "
            "calls; 'vllm' from vLLM's top-k log-probs (entropy: a lower-bound estimate, see vllm_entropy_topk); "
            "'forward' runs one no-grad pass per generation batch (exact); 'auto' picks 'generate' with HF "
            "generate, 'vllm' with use_vllm, else 'forward'."
        },
    )
    vllm_entropy_topk: int = field(
        default=20,
        metadata={
            "help": "With rollout_stats_source 'vllm': how many top log-probs vLLM returns per generated token. The "
            "entropy estimate counts the tokens outside them as one bucket, a lower bound on the exact entropy; -1 "
            "asks for the whole vocabulary (exact, affordable for small vocabularies only)."
        },
    )
    answer_extractor: str = field(
        default="rlvr_entropy.tasks.rewards.extract_answer",
        metadata={"help": "Import path of `f(text) -> str | None` used for the 'answers' rollout statistic."},
    )
    think_marker: str = field(
        default="</think>",
        metadata={"help": "Text that ends the thinking phase, for the 'phases' rollout statistic."},
    )
    metrics_jsonl: bool = field(
        default=True, metadata={"help": "Append every logged step to <output_dir>/metrics.jsonl."}
    )
    reward_timeout: float | None = field(
        default=60.0,
        metadata={
            "help": "Seconds one reward-function call may take (TRL calls each function once per generation batch on "
            "each process; after a call that raises or times out, each completion is scored on its own with the same "
            "limit). A completion whose call raises or times out gets no reward, counted in reward/errors and "
            "reward/timeouts. null: no limit and no sandbox (a direct call, its results still checked)."
        },
    )
    reward_sandbox: Literal["process", "thread", "none"] = field(
        default="process",
        metadata={
            "help": "Where reward functions run: 'process' (a worker process, killed when a call times out; the "
            "function must be importable), 'thread' (a worker thread; a timed-out call is abandoned and keeps "
            "running), 'none' (a direct call, no limit; results still checked). See rlvr_entropy/sandbox.py."
        },
    )
    on_nonfinite: Literal["skip", "raise"] = field(
        default="skip",
        metadata={
            "help": "When a method's reward, advantage, token weight or extra term, TRL's loss or the gradients are "
            "NaN/inf: 'skip' the optimizer step(s) that would use them (all processes together; counted in "
            "guard/skipped_steps, logged with the method's name) or 'raise' (stop the run, on every process)."
        },
    )
    bad_rows: Literal["skip", "error"] = field(
        default="skip",
        metadata={
            "help": "Dataset rows with an empty prompt, a missing value in a column a reward reads, or a prompt over "
            "max_prompt_tokens: 'skip' them before training (counted in data/skipped_rows) or 'error' (stop before "
            "training, listing them)."
        },
    )
    max_prompt_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Longest prompt, in tokens, a row may have (bad_rows decides what happens to longer ones). null: "
            "the model's max_position_embeddings minus max_completion_length (or the context alone when completions "
            "may fill it), when the model config has it."
        },
    )

    def __post_init__(self) -> None:
        if self.rollout_stats_source not in ("auto", *SOURCES):
            raise ValueError(
                "rollout_stats_source must be 'auto', 'generate', 'vllm' or 'forward', "
                f"got {self.rollout_stats_source!r}"
            )
        if not (self.vllm_entropy_topk == -1 or self.vllm_entropy_topk >= 1):
            raise ValueError(f"vllm_entropy_topk must be >= 1, or -1 for the whole vocabulary, got {self.vllm_entropy_topk}")
        # TRL checks these only when the first loss is computed, after a whole generation batch.
        for name, choices in CHOICES.items():
            value = getattr(self, name)
            if value not in choices:
                raise ValueError(
                    f"{name}={value!r} is not one of {list(choices)}.{closest(str(value), [str(c) for c in choices])}"
                )
        for name, (ok, expected) in RANGES.items():
            value = getattr(self, name)
            try:
                valid = bool(ok(value))
            except TypeError:
                valid = False
            if not valid:
                raise ValueError(f"{name} must be {expected}, got {value!r}")
        if not self.think_marker:
            raise ValueError("think_marker must be non-empty text (the end of the thinking phase, e.g. '</think>')")
        # Build the methods once here so that a bad entry fails before TRL does any work, and so that
        # methods exposing TRL features can set TRL fields before GRPOConfig validates them.
        pipeline = build_pipeline(self.methods)
        pipeline.configure(self)
        # transformers 5 renamed gradient_checkpointing to activation_checkpointing and warns (a FutureWarning
        # the user cannot act on) when only the old name is set, which TRL's GRPOConfig does by default: hand
        # it the current names. A recipe may use either; the old name then mirrors the new one as before.
        for old, new in (("gradient_checkpointing", "activation_checkpointing"),
                         ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")):
            if hasattr(self, new) and getattr(self, new) is None and getattr(self, old) is not None:
                setattr(self, new, getattr(self, old))
                setattr(self, old, None)
        super().__post_init__()
        if self.save_strategy == "steps" and not self.save_steps > 0:
            raise ValueError(
                f"save_steps must be > 0 with save_strategy: steps (a value below 1 is a fraction of max_steps), "
                f"got {self.save_steps}"
            )
        pipeline.check(self)


@dataclass
class ModelSpec:
    name_or_path: str = "tiny"  # "tiny" builds (or reuses) the offline warm-started tiny model
    tiny: dict[str, Any] = field(default_factory=dict)  # settings for rlvr_entropy.tiny.build_tiny_model


@dataclass
class DataSpec:
    task: str | None = "arithmetic"  # a synthetic task of rlvr_entropy.tasks; None to load `dataset`
    num_prompts: int = 256
    seed: int = 0
    dataset: str | None = None  # hub id or local JSON/JSONL/CSV/Parquet file, read with datasets.load_dataset
    config: str | None = None  # the hub dataset's configuration (e.g. "main" for openai/gsm8k)
    # None: "train" for training; for evaluation "eval" (a task's held-out split) or "test" (a dataset).
    split: str | None = None
    prompt_column: str = "prompt"  # a nested field is written "parent.child"
    answer_column: str = "answer"
    max_rows: int | None = None
    # How a row becomes the prompt: a named template (TEMPLATES in data.py: plain, boxed, think, gsm8k) or text
    # in which {column} is replaced by that column's value ({prompt}: the prompt column).
    template: str | None = None
    # Send the prompt as one user message, so TRL and evaluation apply the model's chat template.
    chat: bool = False


@dataclass
class EvalDataSpec(DataSpec):
    """One evaluation dataset: a :class:`DataSpec` with the name its figures are logged under."""

    name: str | None = None  # default: the task, the file's stem or the hub id's last part


@dataclass
class EvalSpec:
    """The recipe's ``eval`` section: evaluation every ``every`` steps during training (see periodic_eval.py)."""

    # Data specs: "task:arithmetic", a file or hub id with ",key=value" options, an eval YAML file, or mappings of
    # EvalDataSpec fields; parsed into EvalDataSpec when the recipe is built (parse_data_spec).
    datasets: list[Any] = field(default_factory=list)
    every: int = 50  # optimizer steps between evaluations
    k: int = 8  # pass@k' for every power of two k' <= k, and maj@k
    samples: int | None = None  # samples per prompt (n of the pass@k estimator); None: k
    num_prompts: int | None = 256  # prompts per dataset (its first ones); None: all
    temperature: float | None = None  # None: the training temperature
    top_p: float = 1.0
    max_new_tokens: int | None = None  # None: the training max_completion_length
    batch_size: int = 32  # prompts per generate call (each with `samples` completions)
    seed: int = 0
    at_end: bool = True  # also evaluate after the last step


@dataclass
class Recipe:
    model: ModelSpec
    data: DataSpec
    rewards: list[str]
    train: EntropyGRPOConfig
    source: str | None = None
    train_keys: list[str] = field(default_factory=list)  # training fields the recipe sets explicitly
    peft: dict[str, Any] | None = None  # LoRA: peft.LoraConfig fields (TRL's peft_config); None = full training
    notes: list[str] = field(default_factory=list)  # checks left to the launch machine (hardware_checks=False)
    evaluation: EvalSpec | None = None  # the `eval` section (datasets parsed); None: no evaluation during training


SECTIONS = {"model": ModelSpec, "data": DataSpec}

# Keys that an earlier version of the recipe format used, and what replaced them.
RENAMED = {
    "data.config_name": "data.config",
    "data.user_message": "data.template (the same text, with {prompt}) and data.chat: true",
}


def train_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(EntropyGRPOConfig) if f.init}


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a.b": 1, "c": "x"}`` with YAML-parsed values."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"override '{item}' is not of the form key=value")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise RecipeError(f"override '{item}': value is not valid YAML ({err})") from err
    return out


def apply_override(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``tree[a][b][0]...`` for ``dotted = "a.b.0"``, creating mappings for missing sections."""
    parts = dotted.split(".")
    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            node = node[_list_index(part, node, where)]
        else:
            if part not in node or node[part] is None:
                if parts[i + 1].isdigit():
                    raise RecipeError(f"override '{dotted}': index {parts[i + 1]} is out of range ('{where}' is empty)")
                node[part] = {}
            node = node[part]
        if not isinstance(node, dict | list):
            raise RecipeError(f"override '{dotted}': '{where}' is a value, not a section")
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(last, node, dotted)] = value
    else:
        node[last] = value


def _list_index(part: str, node: list, where: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise RecipeError(f"override '{where}': index {part} is out of range for a list of {len(node)}")
    return int(part)


def load_recipe(
    path: str | Path | None, overrides: list[str] | dict[str, Any] | None = None, hardware_checks: bool = True
) -> Recipe:
    """Read a recipe file (or start empty when ``path`` is None), apply overrides, validate, build configs.

    ``hardware_checks=False`` validates a recipe meant for other hardware (a GPU recipe on a laptop): what only
    the launch machine can tell (bf16 support) becomes a note in ``Recipe.notes`` instead of an error.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe file not found: {path}")
        loaded = _read_yaml(path)
        if loaded is not None and not isinstance(loaded, dict):
            raise RecipeError(f"{path}: a recipe must be a YAML mapping, got {type(loaded).__name__}")
        tree = loaded or {}
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    for key, value in (overrides or {}).items():
        apply_override(tree, key, value)
    return build_recipe(tree, source=str(path) if path else None, hardware_checks=hardware_checks)


def _read_yaml(path: Path) -> Any:
    """A YAML file's contents; a RecipeError naming the file, line and column where it does not parse."""
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or first_line(err)
        raise RecipeError(f"{path}{at}: not valid YAML: {problem}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError(f"{path}: cannot read the file ({err})") from None


# Errors transformers raises in TrainingArguments.__post_init__ when this machine lacks what the config asks for.
HARDWARE_ERRORS = ("doesn't support bf16/gpu",)


def _raised_in(err: BaseException, package: str) -> bool:
    """Whether the innermost frame of ``err``'s traceback is in ``package`` (e.g. accelerate's launch config)."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and f"{os.sep}{package}{os.sep}" in tb.tb_frame.f_code.co_filename


def _build_train_config(kwargs: dict[str, Any], where: str, hardware_checks: bool, notes: list[str]) -> EntropyGRPOConfig:
    try:
        return EntropyGRPOConfig(**kwargs)
    except MethodConfigError as err:
        raise RecipeError(f"{where}{err}") from err
    except ValueError as err:
        if any(h in str(err) for h in HARDWARE_ERRORS) and not hardware_checks:
            # Validate everything else as the CPU would, then put back what the recipe asked for.
            train = _build_train_config({**kwargs, "use_cpu": True}, where, hardware_checks, notes)
            train.use_cpu = kwargs.get("use_cpu", False)
            notes.append(f"not checked on this machine, checked at launch: {err}")
            return train
        if _raised_in(err, "accelerate"):
            raise RecipeError(
                f"{where}the accelerate launch configuration (accelerate launch --config_file, or ACCELERATE_* "
                f"environment variables) is invalid, not the recipe: {err}"
            ) from err
        raise RecipeError(f"{where}invalid configuration: {err}") from err


def build_recipe(tree: dict[str, Any], source: str | None = None, hardware_checks: bool = True) -> Recipe:
    tree = dict(tree)
    where = f"{source}: " if source else ""
    sections = {}
    for name, cls in SECTIONS.items():
        sections[name] = _build_section(cls, tree.pop(name, None) or {}, name, where)
    rewards = tree.pop("rewards", ["correctness"])
    if isinstance(rewards, str):
        rewards = [rewards]
    if not isinstance(rewards, list) or not rewards or not all(isinstance(r, str) for r in rewards):
        raise RecipeError(f"{where}`rewards` must be a non-empty list of reward function names, got {rewards!r}")

    peft = _peft_section(tree.pop("peft", None), where)
    evaluation = _eval_section(tree.pop("eval", None), where)

    fields = train_fields()
    hints = typing.get_type_hints(EntropyGRPOConfig)
    valid = sorted([*fields, *SECTIONS, "rewards", "peft", "eval"])
    kwargs = {}
    for key, value in tree.items():
        if key not in fields:
            raise RecipeError(f"{where}unknown key '{key}'.{closest(key, valid)}")
        kwargs[key] = coerce(value, hints[key], key, RecipeError)
    notes: list[str] = []
    train = _build_train_config(kwargs, where, hardware_checks, notes)
    return Recipe(
        model=sections["model"], data=sections["data"], rewards=rewards, train=train, source=source,
        train_keys=list(kwargs), peft=peft, notes=notes, evaluation=evaluation,
    )


CHECKOUT = Path(__file__).resolve().parents[1]  # where recipes/ lives in a source checkout
# Named in a data spec string, these stand for the column fields.
SPEC_ALIASES = {"prompt": "prompt_column", "answer": "answer_column"}
_SPEC_OPTION = re.compile(r",(?=\s*[A-Za-z_]+\s*=)")  # a comma that starts a "key=value" option


def parse_data_spec(spec: Any, where: str = "--data") -> EvalDataSpec:
    """An evaluation dataset from its recipe entry or command-line text.

    Text is ``SOURCE[,key=value...]`` where SOURCE is ``task:NAME`` (a synthetic task), a YAML file of
    :class:`EvalDataSpec` fields (``recipes/eval/*.yaml``), or else a local data file or hub dataset id; the
    options are EvalDataSpec fields (``prompt``/``answer`` stand for ``prompt_column``/``answer_column``),
    with YAML values: ``openai/gsm8k,config=main,split=test,prompt=question,template=gsm8k``. A mapping is
    the same fields written out. Nothing is downloaded or read here but an eval YAML file.
    """
    if isinstance(spec, dict):
        values = dict(spec)
    elif isinstance(spec, str) and spec.strip():
        head, *options = _SPEC_OPTION.split(spec.strip())
        head = head.strip()
        if head.startswith("task:"):
            values = {"task": head[len("task:"):], "dataset": None}
        elif head.endswith((".yaml", ".yml")):
            path = Path(head)
            if not path.is_file() and not path.is_absolute() and (CHECKOUT / path).is_file():
                path = CHECKOUT / path  # recipes/eval/... of this checkout, from any working directory
            if not path.is_file():
                raise RecipeError(f"{where}: evaluation dataset file not found: {head}")
            loaded = _read_yaml(path)
            if not isinstance(loaded, dict):
                raise RecipeError(f"{head}: an evaluation dataset file must be a YAML mapping of data fields")
            values = {"task": None, **loaded}
            where = head
        else:
            values = {"task": None, "dataset": head}
        for option in options:
            key, _, raw = option.partition("=")
            values[SPEC_ALIASES.get(key.strip(), key.strip())] = _option_value(raw.strip())
    else:
        raise RecipeError(f"{where}: expected a data spec such as 'task:arithmetic' or 'data.jsonl,prompt=question', "
                          f"got {spec!r}")
    fields = [f.name for f in dataclasses.fields(EvalDataSpec)]
    for key in values:
        if key not in fields and key not in SPEC_ALIASES and f"data.{key}" not in RENAMED:
            raise RecipeError(f"{where}: unknown key 'data.{key}'.{closest(key, [*SPEC_ALIASES, *fields])}")
    for alias, field_name in SPEC_ALIASES.items():
        if alias in values:
            values[field_name] = values.pop(alias)
    data = _build_section(EvalDataSpec, values, "data", f"{where}: ")
    if data.dataset is None and data.task is None:
        raise RecipeError(f"{where}: names neither a task nor a dataset")
    if data.name is None:
        if data.dataset is None:
            data.name = data.task
        elif isinstance(spec, str) and spec.strip().split(",")[0].endswith((".yaml", ".yml")):
            data.name = Path(spec.split(",")[0].strip()).stem
        else:
            source = Path(data.dataset)
            data.name = source.stem if source.suffix else data.dataset.rstrip("/").rsplit("/", 1)[-1]
    if not re.fullmatch(r"[\w.@+-]+", data.name):
        raise RecipeError(f"{where}: name {data.name!r} must be letters, digits and _.@+- (it names logged keys)")
    return data


def _option_value(raw: str) -> Any:
    """A ``key=value`` option's value: a YAML scalar (number, true/false, null), else the text as written
    (a template such as ``{prompt} Answer in \\boxed{}.`` is text, not a YAML mapping)."""
    if not raw:
        return None
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    return value if isinstance(value, int | float | bool) or value is None else raw


def _eval_section(values: Any, where: str) -> EvalSpec | None:
    """The recipe's ``eval`` section, with every dataset spec parsed (nothing is loaded here)."""
    if values is None:
        return None
    spec = _build_section(EvalSpec, values, "eval", where)
    if not spec.datasets:
        raise RecipeError(f"{where}eval.datasets: list at least one dataset (e.g. task:arithmetic)")
    spec.datasets = [parse_data_spec(d, f"{where}eval.datasets[{i}]") for i, d in enumerate(spec.datasets)]
    names = [d.name for d in spec.datasets]
    if len(set(names)) < len(names):
        raise RecipeError(f"{where}eval.datasets: two datasets are named alike ({names}); give each a name")
    check_eval_numbers(spec.k, spec.samples, where + "eval.")
    for key, low in (("every", 1), ("batch_size", 1), ("num_prompts", 1), ("max_new_tokens", 1)):
        value = getattr(spec, key)
        if value is not None and value < low:
            raise RecipeError(f"{where}eval.{key} must be >= {low}, got {value}")
    if spec.temperature is not None and spec.temperature < 0:
        raise RecipeError(f"{where}eval.temperature must be >= 0 (0: greedy), got {spec.temperature}")
    if not 0 < spec.top_p <= 1:
        raise RecipeError(f"{where}eval.top_p must be in (0, 1], got {spec.top_p}")
    return spec


def check_eval_numbers(k: int, samples: int | None, where: str) -> None:
    """``k`` and the samples per prompt it is estimated from: a RecipeError naming what to change."""
    if k < 1:
        raise RecipeError(f"{where}k must be >= 1, got {k}")
    if samples is not None and samples < k:
        raise RecipeError(f"{where}k ({k}) is larger than the samples per prompt ({samples}): pass@k needs at least k "
                          "samples; raise samples or lower k")


def _peft_section(values: Any, where: str) -> dict[str, Any] | None:
    """The recipe's ``peft`` section, checked against ``peft.LoraConfig`` (``task_type`` defaults to CAUSAL_LM)."""
    if values is None:
        return None
    if not isinstance(values, dict):
        raise RecipeError(f"{where}`peft` must be a mapping of peft.LoraConfig fields, got {values!r}")
    try:
        from peft import LoraConfig
    except ImportError:
        raise RecipeError(f"{where}the recipe has a `peft` section, which needs peft: pip install "
                          "'rlvr-entropy[peft]'") from None
    fields = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
    try:
        hints = typing.get_type_hints(LoraConfig)
    except Exception:  # noqa: BLE001 - annotations peft cannot resolve: LoraConfig checks the values itself
        hints = {}
    checked = {}
    for key, value in values.items():
        if key not in fields:
            raise RecipeError(f"{where}unknown key 'peft.{key}'.{closest(key, sorted(fields))} (peft.LoraConfig fields)")
        checked[key] = coerce(value, hints[key], f"peft.{key}", RecipeError) if key in hints else value
    checked.setdefault("task_type", "CAUSAL_LM")
    try:
        LoraConfig(**checked)
    except (TypeError, ValueError) as err:
        raise RecipeError(f"{where}peft: {err}") from err
    return checked


def peft_config(recipe: Recipe) -> Any:
    """TRL's ``peft_config`` for the recipe: a ``peft.LoraConfig``, or None without a ``peft`` section."""
    if recipe.peft is None:
        return None
    from peft import LoraConfig

    return LoraConfig(**recipe.peft)


def _build_section(cls: type, values: Any, name: str, where: str) -> Any:
    if not isinstance(values, dict):
        raise RecipeError(f"{where}`{name}` must be a mapping, got {values!r}")
    fields = {f.name for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if f"{name}.{key}" in RENAMED:
            raise RecipeError(f"{where}'{name}.{key}' was renamed: use {RENAMED[f'{name}.{key}']}")
        if key not in fields:
            raise RecipeError(f"{where}unknown key '{name}.{key}'.{closest(key, sorted(fields))}")
        kwargs[key] = coerce(value, hints[key], f"{name}.{key}", RecipeError)
    return cls(**kwargs)


def recipe_to_yaml(recipe: Recipe) -> str:
    """The resolved recipe: every section with its defaults filled in, plus the training fields it sets."""
    train = {}
    for name in recipe.train_keys:
        # JSON round trip: str-valued enums become plain strings, anything exotic its str()
        train[name] = json.loads(json.dumps(getattr(recipe.train, name), default=str))
    tree = {
        "model": dataclasses.asdict(recipe.model),
        "data": dataclasses.asdict(recipe.data),
        "rewards": recipe.rewards,
        "methods": recipe.train.methods,
        **({"peft": recipe.peft} if recipe.peft is not None else {}),
        **({"eval": dataclasses.asdict(recipe.evaluation)} if recipe.evaluation is not None else {}),
        **{k: v for k, v in train.items() if k != "methods"},
    }
    return yaml.safe_dump(tree, sort_keys=False)


# ----------------------------------------------------------------------------------------------------------
# YAML typing, and methods from recipe entries


def coerce(value: Any, annotation: Any, where: str, error: type[Exception] = ValueError) -> Any:
    """Check ``value`` against a type annotation, widening int to float; raise ``error`` naming ``where``.

    Handles the annotations recipes use: bool, int, float, str, Literal, Optional/Union, list, dict.
    """
    origin = typing.get_origin(annotation)
    if annotation is Any or annotation is typing.Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(value, option, where, error)
            except error:  # type: ignore[misc]
                pass
        raise error(f"{where}: {value!r} does not match {_type_name(annotation)}")
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise error(f"{where}: {value!r} is not one of {list(choices)}.{closest(str(value), [str(c) for c in choices])}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise error(f"{where}: expected a list, got {value!r}")
        (item_type, *_) = typing.get_args(annotation) or (Any,)
        return [coerce(v, item_type, f"{where}[{i}]", error) for i, v in enumerate(value)]
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise error(f"{where}: expected a mapping, got {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise error(f"{where}: expected true/false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise error(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string: accept what float() accepts
            try:
                value = float(value)
            except ValueError:
                raise error(f"{where}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise error(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(float(value)):
            raise error(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise error(f"{where}: expected a string, got {value!r}")
        return value
    if isinstance(annotation, type) and not isinstance(value, annotation):
        raise error(f"{where}: expected {annotation.__name__}, got {value!r}")
    return value


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def build_method(entry: dict[str, Any]) -> Method:
    """One method from a recipe entry ``{name: <registry key or import path>, <param>: <value>, ...}``.

    Parameter names and types are checked against the method's dataclass fields before it is built;
    its own ``validate`` then checks ranges. Every problem is a :class:`MethodConfigError`.
    """
    if not isinstance(entry, dict) or "name" not in entry:
        raise MethodConfigError(f"each entry of `methods` needs a `name` key, got {entry!r}")
    params = dict(entry)
    name = params.pop("name")
    try:
        cls = METHODS.get(name)
    except ValueError as err:
        raise MethodConfigError(str(err)) from err
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise MethodConfigError(f"'{name}' is not a Method subclass")
    fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
    hints = typing.get_type_hints(cls) if fields else {}
    kwargs = {}
    for key, value in params.items():
        if key not in fields:
            raise MethodConfigError(
                f"method '{cls.name}' has no parameter '{key}'.{closest(key, list(fields))} "
                f"Valid parameters: {', '.join(fields) or '(none)'}"
            )
        kwargs[key] = coerce(value, hints[key], f"{cls.name}.{key}", MethodConfigError)
    try:
        return cls(**kwargs)
    except MethodConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise MethodConfigError(f"method '{cls.name}': {err}") from err


def build_pipeline(entries: list[dict[str, Any]] | None) -> Pipeline:
    """The recipe's ``methods`` list as a :class:`Pipeline`, composed in list order."""
    return Pipeline(build_method(e) for e in entries or [])
