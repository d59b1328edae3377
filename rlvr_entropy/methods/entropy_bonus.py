"""Entropy bonus: TRL's own static or adaptive entropy regulariser, selected from the method list.

Reference: the static bonus ``loss -= coef * mean(H)``; the adaptive coefficient of Skywork-OR1
(He et al. 2025, arXiv 2505.22312): each optimizer step ``coef += delta`` if the entropy is at or
below ``target`` else ``coef -= delta``, clamped to [coef_min, coef_max], applied only while the
entropy is at or below the target.
Reference impl: TRL 1.16 ``GRPOConfig.entropy_coef`` / ``use_adaptive_entropy`` and
``GRPOTrainer._compute_loss``.
Deviation from reference: none. This method only sets TRL's fields; TRL computes the bonus, keeps
the controller and checkpoints it (``entropy_ctrl_state.json``). It exists so that the bonus is one
more entry of ``methods`` and composes with the others.

The adaptive ``target`` may be a schedule or calibrated (``rlvr_entropy/methods/schedule.py``): a number,
``{kind: linear|cosine, start, end, steps}``, ``{kind: step, start, milestones, gamma}`` or
``{kind: calibrated, steps, scale}``. The method then hands TRL ``entropy_target`` before every optimizer
step (``trl_settings``). While a calibrated target is being measured it hands TRL 0, so TRL's gated bonus
stays off (the entropy is > 0) and its coefficient decays towards ``coef_min`` by ``delta`` a step; the
measurement is the training-pass token entropy over all counted tokens of all processes. The calibration
sums and the fixed value are this method's state (checkpointed with the run; TRL's controller keeps its own).
When adaptive it logs ``entropy_bonus/target`` and ``entropy_bonus/error`` (global token-mean training
entropy of the loss micro-batch minus the target) from its ``token_loss`` hook, which adds no loss term.
With ``top_entropy_quantile < 1`` TRL's controller measures only the high-entropy tokens: the logged error
still covers all of them, and a calibrated target is refused. The static bonus is untouched by all of this.

Formulas, defaults and the worked examples the tests use: ``docs/methods.md`` §9.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rlvr_entropy.methods.base import LossBatch, Method, MethodConfigError, TokenTerms, register
from rlvr_entropy.methods.schedule import EntropyTarget


@register("entropy_bonus")
@dataclass
class EntropyBonus(Method):
    """Entropy bonus -coef*H (TRL's), static or with Skywork-OR1's adaptive coefficient."""

    coef: float = 0.01  # static coefficient, or the initial one when adaptive
    adaptive: bool = False
    target: float | dict[str, Any] = 0.2  # nats, or a schedule / calibration; adaptive only
    delta: float = 0.005  # adaptive step per optimizer step
    coef_min: float = 0.0
    coef_max: float = 1.0

    def __post_init__(self) -> None:
        self.entropy_target = EntropyTarget(self.target, "entropy_bonus.target")  # init_state needs it
        super().__post_init__()

    def validate(self) -> None:
        if self.coef < 0 or self.delta < 0:
            raise MethodConfigError("entropy_bonus: coef and delta must be >= 0")
        if not self.coef_min <= self.coef_max:
            raise MethodConfigError("entropy_bonus: coef_min must be <= coef_max")
        if not self.adaptive and self.coef == 0:
            raise MethodConfigError("entropy_bonus: coef=0 without adaptive does nothing; remove the method instead")

    def init_state(self) -> dict[str, Any]:
        # state["target"]: a calibrated target's sums and fixed value ({} for a number or a schedule)
        return {"target": self.entropy_target.init_state()} if self.adaptive else {}

    def check(self, args: Any) -> None:
        if self.adaptive and self.entropy_target.calibrated and getattr(args, "top_entropy_quantile", 1.0) < 1.0:
            raise MethodConfigError(
                "entropy_bonus: a calibrated target is measured over all completion tokens, but with "
                "top_entropy_quantile < 1 TRL's controller compares only the high-entropy ones: give a number"
            )

    def configure(self, args: Any) -> None:
        if args.entropy_coef not in (0.0, self.coef) or args.use_adaptive_entropy:
            raise MethodConfigError(
                "entropy_bonus sets TRL's entropy_coef/use_adaptive_entropy: do not also set them in the recipe"
            )
        args.entropy_coef = self.coef
        args.use_adaptive_entropy = self.adaptive
        if self.adaptive:
            args.entropy_target = self._target_for_trl(0, dict(self._target_state()))
            args.entropy_coef_delta = self.delta
            args.entropy_coef_min = self.coef_min
            args.entropy_coef_max = self.coef_max

    def _target_state(self) -> dict[str, Any]:
        # a checkpoint written before targets could be calibrated has no "target": it held a number
        return self.state.setdefault("target", self.entropy_target.init_state())

    def _target_for_trl(self, step: int, state: dict[str, Any]) -> float:
        value = self.entropy_target.value(step, state)
        return 0.0 if value is None else value  # 0 while calibrating: TRL's bonus applies only at entropy <= 0

    def trl_settings(self, step: int) -> dict[str, float]:
        if not self.adaptive:
            return {}
        return {"entropy_target": self._target_for_trl(step, self._target_state())}

    def token_loss(self, batch: LossBatch) -> TokenTerms | None:
        if not self.adaptive:
            return None
        total, count = batch.global_sum_count(batch.entropy)  # detached, all processes (every one calls it)
        target = self.entropy_target.at_step(batch.step, self._target_state(), batch.training, lambda: (total, count))
        if target is not None:
            batch.log("target", target)
            batch.log("error", total / count.clamp(min=1.0) - target)
        return None
