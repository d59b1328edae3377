"""Pipeline: the methods of one recipe, composed in list order.

Composition rules (each is tested in ``tests/test_pipeline.py``):
- rollout: the first listed method is outermost; each method's ``generate`` is the next method's
  rollout, and the innermost one is the trainer's generation.
- reward, advantage: folded left in list order, each method sees the previous one's output.
- token_loss: weights multiply, detach masks are OR-ed, extra and scalar terms add; each method sees the
  product of the weights returned before it in ``batch.weight``. Per-token clip ranges: a later method's
  ``eps_low``/``eps_high`` replace an earlier one's (at most one method in a recipe should set them).
- logit_stat: each method's statistic is computed separately, in the same training forward.
- trl_settings: the dicts are merged; two methods driving the same TRL setting is an error.
- state: one JSON-serialisable dict per method, keyed by the method's name; ``state_dict`` /
  ``load_state_dict`` for checkpoints, ``snapshot`` / ``restore`` (a deep copy, as a value) to undo an
  optimizer step that the guards skip.
- non-finite outputs (NaN/inf where the input was finite): with ``on_nonfinite="raise"`` a
  :class:`NonFiniteError` names the method and hook; with ``"skip"`` the method's output is dropped for
  this call (identity: the previous rewards/advantages, no weight, no extra term) and the event is
  recorded in ``nonfinite`` for the trainer, which skips the optimizer step(s) that would use it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from rlvr_entropy.methods.base import (TRL_SETTINGS, GenerateFn, LossBatch, Method, MethodConfigError, Rollout,
                                       RolloutBatch, RolloutContext, TokenTerms)


class NonFiniteError(FloatingPointError):
    """A method produced NaN or inf; the message names the method and the hook."""


@dataclass(frozen=True)
class NonFiniteEvent:
    """A method's hook produced ``count`` NaN/inf values and its output was dropped (``on_nonfinite="skip"``)."""

    method: str
    hook: str
    count: int

    def __str__(self) -> str:
        return f"method '{self.method}' produced {self.count} non-finite value(s) in its {self.hook} hook"


class Pipeline:
    """An ordered, named chain of methods. ``Pipeline([])`` is the identity (plain GRPO)."""

    def __init__(self, methods: Iterable[Method], on_nonfinite: str = "raise") -> None:
        self.methods = list(methods)
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
        self.on_nonfinite = on_nonfinite
        self.nonfinite: list[NonFiniteEvent] = []  # dropped outputs since the trainer last read them
        names = [m.name for m in self.methods]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise MethodConfigError(f"methods listed twice in one recipe: {', '.join(duplicates)}")

    def __len__(self) -> int:
        return len(self.methods)

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.methods]

    @property
    def needs(self) -> frozenset[str]:
        """The rollout statistics any method needs."""
        return frozenset().union(*(m.needs for m in self.methods))

    @property
    def loss_needs(self) -> frozenset[str]:
        """The loss-time inputs any method needs."""
        return frozenset().union(*(m.loss_needs for m in self.methods))

    def logit_stat_methods(self) -> list[Method]:
        """The methods whose ``logit_stat`` the training forward must compute."""
        return self._with("logit_stat")

    def uses(self, hook: str) -> bool:
        return any(hook in m.hooks() for m in self.methods)

    def _with(self, hook: str) -> list[Method]:
        return [m for m in self.methods if hook in m.hooks()]

    # -- configuration --------------------------------------------------------------------------------------
    def configure(self, args: Any) -> None:
        for m in self._with("configure"):
            m.configure(args)

    def check(self, args: Any) -> None:
        for m in self.methods:
            m.check(args)

    def trl_settings(self, step: int) -> dict[str, float]:
        """The TRL settings the methods drive before optimizer step ``step``."""
        settings: dict[str, float] = {}
        owners: dict[str, str] = {}
        for m in self._with("trl_settings"):
            for key, value in m.trl_settings(step).items():
                if key not in TRL_SETTINGS:
                    raise MethodConfigError(f"method '{m.name}' drives unknown TRL setting '{key}' (known: "
                                            f"{', '.join(sorted(TRL_SETTINGS))})")
                if key in owners:
                    raise MethodConfigError(f"methods '{owners[key]}' and '{m.name}' both drive TRL's {key}")
                owners[key] = m.name
                settings[key] = float(value)
        return settings

    def reward_columns(self, reward_names: list[str]) -> list[str]:
        """The reward columns the methods add after the run's reward functions ``reward_names``: one per
        method with a reward hook, named after it. Checks that no name clashes and that every reward
        function a method reads (``reward_inputs``) is one of the run's."""
        columns = [m.name for m in self._with("reward")]
        clash = sorted(set(columns) & set(reward_names))
        if clash:
            raise ValueError(f"reward function names clash with method names: {clash}")
        for m in self.methods:
            missing = [n for n in m.reward_inputs() if n not in reward_names]
            if missing:
                raise MethodConfigError(
                    f"method '{m.name}' reads reward function {missing[0]!r}, which this run does not have "
                    f"(reward functions: {', '.join(reward_names)}); set {m.name}.correct_from "
                    "or add the reward function"
                )
        return columns

    # -- hooks ----------------------------------------------------------------------------------------------
    def rollout(self, ctx: RolloutContext, generate: GenerateFn) -> Rollout:
        chain = generate
        for m in reversed(self._with("rollout")):
            chain = _bind_rollout(m, ctx, chain)
        rollout = chain(None, None)
        if len(rollout) != len(ctx.prompt_ids):
            raise ValueError(f"rollout hooks returned {len(rollout)} completions for {len(ctx.prompt_ids)} prompts")
        return rollout

    def reward(self, batch: RolloutBatch) -> dict[str, Tensor]:
        """Run the reward hooks; return each method's additive reward column, (N,) per method."""
        rewards = batch.weighted_rewards()  # (N,)
        columns: dict[str, Tensor] = {}
        for m in self._with("reward"):
            with batch.scope(m.name):
                shaped = m.reward(rewards.clone(), batch)
            if not self._finite(shaped, rewards, m, "reward"):
                shaped = rewards  # dropped: this method shapes nothing in this batch
            columns[m.name] = shaped - rewards
            rewards = shaped
        batch.rewards = rewards
        return columns

    def advantage(self, advantages: Tensor, batch: RolloutBatch) -> Tensor:
        for m in self._with("advantage"):
            with batch.scope(m.name):
                out = m.advantage(advantages.clone(), batch)
            if out.shape[0] != advantages.shape[0] or out.dim() not in (1, 2):
                raise ValueError(f"method '{m.name}' advantage hook returned shape {tuple(out.shape)}")
            if not self._finite(out if out.dim() == 1 else out * batch.mask, None, m, "advantage"):
                continue  # dropped: the advantages stay as they were before this method
            advantages = out
        return advantages

    def token_loss(self, batch: LossBatch) -> TokenTerms:
        weight: Tensor | None = None
        detach: Tensor | None = None
        extra: Tensor | None = None
        scalar: Tensor | None = None
        eps_low: Tensor | None = None
        eps_high: Tensor | None = None
        for m in self._with("token_loss"):
            batch.weight = torch.ones_like(batch.mask) if weight is None else weight
            with batch.scope(m.name):
                terms = m.token_loss(batch)
            if terms is None:
                continue
            shape = tuple(batch.mask.shape)
            for label, t in (("weight", terms.weight), ("detach", terms.detach), ("extra", terms.extra),
                             ("eps_low", terms.eps_low), ("eps_high", terms.eps_high)):
                if t is not None and tuple(t.shape) != shape:
                    raise ValueError(f"method '{m.name}' returned {label} of shape {tuple(t.shape)}, expected {shape}")
            if terms.weight is not None:
                w = terms.weight.detach()
                if self._finite(w * batch.mask, None, m, "token weight"):
                    if bool((w < 0).any()):
                        raise ValueError(f"method '{m.name}' returned negative token weights")
                    weight = w if weight is None else weight * w
            if terms.detach is not None:
                d = terms.detach.bool()
                detach = d if detach is None else detach | d
            if terms.extra is not None and self._finite(terms.extra.detach() * batch.mask, None, m, "extra loss term"):
                extra = terms.extra if extra is None else extra + terms.extra
            if terms.scalar is not None:
                if terms.scalar.dim() != 0:
                    raise ValueError(f"method '{m.name}' returned a scalar term of shape {tuple(terms.scalar.shape)}")
                if self._finite(terms.scalar.detach(), None, m, "scalar loss term"):
                    scalar = terms.scalar if scalar is None else scalar + terms.scalar
            for label, t in (("eps_low", terms.eps_low), ("eps_high", terms.eps_high)):
                if t is not None and bool(((t < 0) & (batch.mask > 0)).any()):
                    raise ValueError(f"method '{m.name}' returned a negative {label}")
            eps_low = terms.eps_low.detach().float() if terms.eps_low is not None else eps_low
            eps_high = terms.eps_high.detach().float() if terms.eps_high is not None else eps_high
        return TokenTerms(weight=weight, detach=detach, extra=extra, scalar=scalar, eps_low=eps_low, eps_high=eps_high)

    def _finite(self, value: Tensor, reference: Tensor | None, method: Method, hook: str) -> bool:
        """True if ``value`` is finite wherever ``reference`` (if given) is; else raise or record the event."""
        try:
            _check_finite(value, reference, method, hook)
        except NonFiniteError:
            if self.on_nonfinite == "raise":
                raise
            bad = ~torch.isfinite(value)
            if reference is not None:
                bad &= torch.isfinite(reference)
            self.nonfinite.append(NonFiniteEvent(method.name, hook, int(bad.sum())))
            return False
        return True

    def take_nonfinite(self) -> list[NonFiniteEvent]:
        """The events recorded since the last call (and forget them)."""
        events, self.nonfinite = self.nonfinite, []
        return events

    # -- state ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, dict[str, Any]]:
        return {m.name: dict(m.state) for m in self.methods}

    def load_state_dict(self, states: dict[str, dict[str, Any]]) -> None:
        missing = [m.name for m in self.methods if m.name not in states]
        extra = [n for n in states if n not in self.names]
        if missing or extra:
            raise ValueError(
                f"checkpoint method states do not match the recipe: missing {missing}, unexpected {extra}"
            )
        for m in self.methods:
            m.state = dict(states[m.name])

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Every method's state as a value (a deep copy): what ``restore`` returns to."""
        return copy.deepcopy(self.state_dict())

    def restore(self, snapshot: dict[str, dict[str, Any]]) -> None:
        """Put every method's state back to ``snapshot`` (an optimizer step was skipped)."""
        self.load_state_dict(copy.deepcopy(snapshot))


def _bind_rollout(method: Method, ctx: RolloutContext, inner: GenerateFn) -> GenerateFn:
    def generate(rows: list[int] | None = None, temperature: float | None = None) -> Rollout:
        if rows is None and temperature is None:
            with ctx.scope(method.name):
                return method.rollout(ctx, inner)
        # A sub-request from an outer method goes straight to the inner chain: rollout hooks shape
        # the batch as a whole, and re-running them on a subset would apply them twice.
        return inner(rows, temperature)

    return generate


def _check_finite(value: Tensor, reference: Tensor | None, method: Method, hook: str) -> None:
    """Raise if ``value`` has NaN/inf where ``reference`` (if given) is finite."""
    bad = ~torch.isfinite(value)
    if reference is not None:
        bad &= torch.isfinite(reference)
    if bool(bad.any()):
        count = int(bad.sum())
        raise NonFiniteError(f"method '{method.name}' produced {count} non-finite value(s) in its {hook} hook")

