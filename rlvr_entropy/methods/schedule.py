"""Schedules and target entropies: the one shape every target-entropy controller and coefficient schedule shares.

A recipe gives a value as a number (constant) or as a mapping with ``kind``:

    target: 0.55                                              # constant
    target: {kind: linear, start: 0.9, end: 0.4, steps: 200}   # straight line, then ``end``
    target: {kind: cosine, start: 0.9, end: 0.4, steps: 200}   # half cosine, then ``end``
    coef:   {kind: step, start: 0.01, milestones: [100, 150], gamma: 0.5}   # x gamma at each milestone
    target: {kind: calibrated, steps: 10, scale: 0.8}          # 0.8 x the mean entropy measured over steps 0-9

Steps are 0-based optimizer steps. ``calibrated`` is for targets only (:class:`EntropyTarget`): until its
``steps`` have been measured there is no target and the controller that owns it stays inactive; the measured
sums and the fixed value are part of the owning method's state, so they are checkpointed and survive a resume.

Every controller built on :class:`EntropyTarget` logs ``<method>/target`` and ``<method>/error`` (measured
minus target), so ``rlvr-entropy plot`` draws the target against the measured entropy for any of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from rlvr_entropy.methods.base import MethodConfigError

KINDS = ("constant", "linear", "cosine", "step", "calibrated")
_KEYS = {
    "constant": {"value"},
    "linear": {"start", "end", "steps"},
    "cosine": {"start", "end", "steps"},
    "step": {"start", "milestones", "gamma"},
    "calibrated": {"steps", "scale"},
}
_REQUIRED = {"constant": {"value"}, "linear": {"start", "end", "steps"}, "cosine": {"start", "end", "steps"},
             "step": {"start", "milestones", "gamma"}, "calibrated": {"steps"}}


@dataclass(frozen=True)
class Schedule:
    """A value as a function of the optimizer step; build it with :meth:`parse`."""

    kind: str
    start: float = 0.0
    end: float = 0.0
    steps: int = 0
    milestones: tuple[int, ...] = ()
    gamma: float = 1.0
    scale: float = 1.0

    @classmethod
    def parse(cls, spec: float | dict[str, Any], where: str, *, calibrated: bool = False) -> Schedule:
        """A schedule from a recipe value; a :class:`MethodConfigError` naming ``where`` for anything malformed."""
        if isinstance(spec, bool):
            raise MethodConfigError(f"{where}: expected a number or a schedule mapping, got {spec!r}")
        if isinstance(spec, int | float):
            return cls("constant", start=_finite(spec, where), end=float(spec))
        if not isinstance(spec, dict) or "kind" not in spec:
            raise MethodConfigError(f"{where}: expected a number or a mapping with `kind` (one of {', '.join(KINDS)}), "
                                    f"got {spec!r}")
        kind = spec["kind"]
        allowed = KINDS if calibrated else tuple(k for k in KINDS if k != "calibrated")
        if kind not in allowed:
            raise MethodConfigError(f"{where}.kind: {kind!r} is not one of {list(allowed)}")
        keys = set(spec) - {"kind"}
        unknown, missing = keys - _KEYS[kind], _REQUIRED[kind] - keys
        if unknown or missing:
            raise MethodConfigError(f"{where}: a {kind} schedule takes {sorted(_KEYS[kind])}; "
                                    + (f"unknown {sorted(unknown)}" if unknown else f"missing {sorted(missing)}"))
        if kind == "constant":
            return cls("constant", start=_finite(spec["value"], f"{where}.value"), end=float(spec["value"]))
        if kind in ("linear", "cosine"):
            steps = _positive_int(spec["steps"], f"{where}.steps")
            return cls(kind, start=_finite(spec["start"], f"{where}.start"), end=_finite(spec["end"], f"{where}.end"),
                       steps=steps)
        if kind == "step":
            milestones = spec["milestones"]
            if not isinstance(milestones, list) \
                    or not all(isinstance(m, int) and not isinstance(m, bool) and m > 0 for m in milestones) \
                    or milestones != sorted(set(milestones)):
                raise MethodConfigError(f"{where}.milestones: expected increasing positive steps, got {milestones!r}")
            gamma = _finite(spec["gamma"], f"{where}.gamma")
            if gamma < 0:
                raise MethodConfigError(f"{where}.gamma must be >= 0, got {gamma}")
            return cls("step", start=_finite(spec["start"], f"{where}.start"), milestones=tuple(milestones), gamma=gamma)
        scale = _finite(spec.get("scale", 1.0), f"{where}.scale")
        if scale <= 0:
            raise MethodConfigError(f"{where}.scale must be > 0, got {scale}")
        return cls("calibrated", steps=_positive_int(spec["steps"], f"{where}.steps"), scale=scale)

    def at(self, step: int) -> float:
        """The value at 0-based optimizer step ``step`` (not for ``calibrated``: see :class:`EntropyTarget`)."""
        if self.kind == "constant":
            return self.start
        if self.kind == "linear":
            frac = min(step, self.steps) / self.steps
            return self.start + (self.end - self.start) * frac
        if self.kind == "cosine":
            frac = min(step, self.steps) / self.steps
            return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * frac))
        if self.kind == "step":
            return self.start * self.gamma ** sum(step >= m for m in self.milestones)
        raise ValueError("a calibrated schedule has no value of its own: use EntropyTarget")

    def bounds(self) -> tuple[float, float]:
        """The smallest and largest value the schedule takes (not for ``calibrated``)."""
        if self.kind == "step":
            values = [self.start * self.gamma**i for i in range(len(self.milestones) + 1)]
            return min(values), max(values)
        return min(self.start, self.end), max(self.start, self.end)


class EntropyTarget:
    """A target entropy (nats) from a schedule, or calibrated from the first steps' measured entropy.

    The owner keeps ``init_state()`` inside its own method state (checkpointed) and passes it back on every call.
    """

    def __init__(self, spec: float | dict[str, Any], where: str) -> None:
        self.schedule = Schedule.parse(spec, where, calibrated=True)
        if self.schedule.kind != "calibrated" and self.schedule.bounds()[0] < 0:
            raise MethodConfigError(f"{where}: a target entropy must be >= 0")

    @property
    def calibrated(self) -> bool:
        return self.schedule.kind == "calibrated"

    def init_state(self) -> dict[str, Any]:
        return {"sum": 0.0, "count": 0.0, "value": None} if self.calibrated else {}

    def value(self, step: int, state: dict[str, Any]) -> float | None:
        """The target at optimizer step ``step``; None while a calibrated target is still being measured."""
        if not self.calibrated:
            return self.schedule.at(step)
        if state["value"] is None and step >= self.schedule.steps and state["count"] > 0:
            state["value"] = self.schedule.scale * state["sum"] / state["count"]  # fixed from now on
        return state["value"]

    def at_step(self, step: int, state: dict[str, Any], training: bool,
                measure: Callable[[], tuple[float | Tensor, float | Tensor]]) -> float | None:
        """The target a controller's loss hook uses at ``step``, calibration included: while a calibrated target is
        still being measured, a training step adds ``measure()`` (an entropy sum and token count, global over
        processes) to ``state``; under ``evaluate()`` (``training`` False) a copy is read and nothing changes.
        ``measure`` is called only when the sums are wanted: it may be a collective, and the condition depends only
        on the (global) state, so every process calls it or none does."""
        if not training:
            return self.value(step, dict(state))
        if self.calibrated and state["value"] is None and step < self.schedule.steps:
            self.observe(step, state, *measure())
        return self.value(step, state)

    def observe(self, step: int, state: dict[str, Any], entropy_sum: float | Tensor, count: float | Tensor) -> None:
        """Add one measurement (a token sum and count, global over processes) taken at ``step``."""
        if self.calibrated and state["value"] is None and step < self.schedule.steps:
            state["sum"] += float(entropy_sum)
            state["count"] += float(count)


def _finite(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(float(value)):
        raise MethodConfigError(f"{where}: expected a finite number, got {value!r}")
    return float(value)


def _positive_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MethodConfigError(f"{where}: expected a positive integer, got {value!r}")
    return value
