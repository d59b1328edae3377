"""The reward contract: how TRL calls a reward function, what it must return, and how a bad value is treated.

TRL calls each reward function once per generation batch on each process, as
``f(prompts=..., completions=..., completion_ids=..., trainer_state=..., log_extra=..., log_metric=...,
**columns)``: every other dataset column arrives as a list aligned with ``completions``. The function
returns one float per completion, or None where it does not apply (TRL leaves those out of the sum).

Every call goes through one check (:func:`check_output`), whether it runs directly (:class:`CheckedReward`)
or in the sandbox (``sandbox.py``):

- a value that is not a list, the wrong number of values, or a value that is neither a number nor None
  is a bug in the function: :class:`RewardContractError`, raised, never skipped;
- an inf or NaN is a bad sample: it gets no reward (None) and counts in ``reward/errors``
  (:func:`drop_nonfinite`).

Which dataset columns a function reads (:func:`required_columns`) is checked before training, and rows
missing them are dropped or refused (``data.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import math
from collections.abc import Callable
from typing import Any

import torch

from rlvr_entropy.config import RecipeError

logger = logging.getLogger(__name__)

RewardFn = Callable[..., list[float | None]]

#: Keyword arguments TRL passes to every reward function besides the dataset columns.
TRL_REWARD_KWARGS = frozenset(
    {"prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric", "environments"}
)


class RewardContractError(RecipeError):
    """A reward function broke its contract (wrong number or type of values): a bug, raised, never skipped."""


@dataclasses.dataclass
class RewardStats:
    """Samples left without a reward since the trainer last drained the counts (this process only)."""

    errors: int = 0
    timeouts: int = 0

    def drain(self) -> tuple[int, int]:
        out = (self.errors, self.timeouts)
        self.errors = self.timeouts = 0
        return out


def function_name(func: Callable[..., Any]) -> str:
    return getattr(func, "__name__", None) or type(func).__name__


def required_columns(func: RewardFn) -> set[str]:
    """Dataset columns a reward function reads: its ``required_columns`` attribute if it has one, else the
    parameters it names without a default (other than TRL's own keyword arguments)."""
    declared = getattr(func, "required_columns", None)
    if declared is not None:
        return set(declared)
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return set()
    return {
        p.name
        for p in params
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty and p.name not in TRL_REWARD_KWARGS
    }


def columns_read(funcs: list[Any], names: list[str]) -> dict[str, list[str]]:
    """``{dataset column: [names of the reward functions that read it]}`` (reward models read none)."""
    required: dict[str, list[str]] = {}
    for func, name in zip(funcs, names, strict=False):
        if not isinstance(func, torch.nn.Module):
            for column in sorted(required_columns(func)):
                required.setdefault(column, []).append(name)
    return required


def check_output(out: Any, n: int, name: str) -> list[float | None]:
    """``out`` as a list of ``n`` floats or None; :class:`RewardContractError` naming ``name`` otherwise."""
    if not isinstance(out, list | tuple):
        raise RewardContractError(f"reward function '{name}' returned {type(out).__name__}, expected a list of floats")
    if len(out) != n:
        raise RewardContractError(
            f"reward function '{name}' returned {len(out)} values for {n} completions; "
            "it must return one float (or None) per completion"
        )
    bad = [v for v in out if v is not None and not isinstance(v, int | float)]
    if bad:
        raise RewardContractError(f"reward function '{name}' returned non-numeric values such as {bad[0]!r}")
    return list(out)


def drop_nonfinite(values: list[float | None], name: str, stats: RewardStats) -> list[float | None]:
    """inf/NaN values become None (that sample gets no reward) and count as errors in ``stats``."""
    bad = [i for i, v in enumerate(values) if v is not None and not math.isfinite(v)]
    if not bad:
        return values
    stats.errors += len(bad)
    logger.warning("reward function '%s' returned %d non-finite value(s) (e.g. %r): those samples get no reward",
                   name, len(bad), values[bad[0]])
    drop = set(bad)
    return [None if i in drop else v for i, v in enumerate(values)]


class CheckedReward:
    """A reward function called directly (``reward_sandbox: none`` or no ``reward_timeout``), its results
    checked against the contract. It keeps the function's name and attributes (``required_columns``)."""

    def __init__(self, func: RewardFn, stats: RewardStats | None = None) -> None:
        self.func = func
        self.stats = stats if stats is not None else RewardStats()
        functools.update_wrapper(self, func)
        self.__name__ = function_name(func)

    def __call__(self, *args: Any, **kwargs: Any) -> list[float | None]:
        out = self.func(*args, **kwargs)
        n = len(kwargs.get("prompts", args[0] if args else []))
        return drop_nonfinite(check_output(out, n, self.__name__), self.__name__, self.stats)
