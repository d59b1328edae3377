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

Formulas, defaults and the worked examples the tests use: ``docs/methods.md`` §9.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rlvr_entropy.methods.base import Method, MethodConfigError, register


@register("entropy_bonus")
@dataclass
class EntropyBonus(Method):
    """Entropy bonus -coef*H (TRL's), static or with Skywork-OR1's adaptive coefficient."""

    coef: float = 0.01  # static coefficient, or the initial one when adaptive
    adaptive: bool = False
    target: float = 0.2  # nats; adaptive only
    delta: float = 0.005  # adaptive step per optimizer step
    coef_min: float = 0.0
    coef_max: float = 1.0

    def validate(self) -> None:
        if self.coef < 0 or self.delta < 0 or self.target < 0:
            raise MethodConfigError("entropy_bonus: coef, delta and target must be >= 0")
        if not self.coef_min <= self.coef_max:
            raise MethodConfigError("entropy_bonus: coef_min must be <= coef_max")
        if not self.adaptive and self.coef == 0:
            raise MethodConfigError("entropy_bonus: coef=0 without adaptive does nothing; remove the method instead")

    def configure(self, args: Any) -> None:
        if args.entropy_coef not in (0.0, self.coef) or args.use_adaptive_entropy:
            raise MethodConfigError(
                "entropy_bonus sets TRL's entropy_coef/use_adaptive_entropy: do not also set them in the recipe"
            )
        args.entropy_coef = self.coef
        args.use_adaptive_entropy = self.adaptive
        if self.adaptive:
            args.entropy_target = self.target
            args.entropy_coef_delta = self.delta
            args.entropy_coef_min = self.coef_min
            args.entropy_coef_max = self.coef_max
