"""Entropy-coefficient schedule: TRL's own entropy bonus with a coefficient that changes over training.

What users ask TRL for in huggingface/trl#5584 ("entropy regularization ... with an initial entropy
coefficient and optional scheduling (decay over training steps)"): the bonus of PPO-style training,

    L = L_GRPO - c(step) * H,    H = mean entropy of the counted completion tokens (TRL's definition),

with ``c`` a schedule over the 0-based optimizer step: constant, linear or cosine from ``start`` to ``end``
over ``steps``, or stepwise (x ``gamma`` at each milestone); see ``rlvr_entropy/methods/schedule.py`` for the
YAML forms. A large coefficient early keeps the policy exploring; decaying it to 0 lets it settle.

Where it acts: nowhere of its own. TRL computes the bonus (``GRPOTrainer._compute_loss``: ``loss -=
entropy_coef * H``, scaled for gradient accumulation only, over TRL's own token set including
``top_entropy_quantile``) and logs ``entropy_coef`` on every optimizer step. This method

- ``configure``: sets ``entropy_coef`` to the schedule's value at step 0 (or, if that is 0, its largest
  value): TRL switches its bonus on once, at construction, only when ``entropy_coef != 0``;
- ``trl_settings``: hands TRL ``entropy_coef = c(step)`` before each optimizer step
  (``EntropyGRPOTrainer._apply_trl_settings``), so every micro-batch of the step uses the same value;
- ``token_loss``: only logs ``entropy_coef_schedule/coef``, the value it drove (no loss term).

Defaults: a linear decay 0.02 -> 0 over 1000 steps, the example of trl#5584.
Reference impl: TRL 1.16 ``GRPOConfig.entropy_coef`` and ``GRPOTrainer._compute_loss`` (the bonus); the
schedule is ours (the issue proposes linear decay; cosine and step are the usual learning-rate shapes).
Deviation from reference: none; the bonus is TRL's, only its coefficient moves. It cannot be combined with
TRL's adaptive controller (``entropy_bonus`` with ``adaptive: true``), which also moves ``entropy_coef``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rlvr_entropy.methods.base import LossBatch, Method, MethodConfigError, TokenTerms, register
from rlvr_entropy.methods.schedule import Schedule


def _default_coef() -> dict[str, Any]:
    return {"kind": "linear", "start": 0.02, "end": 0.0, "steps": 1000}


@register("entropy_coef_schedule")
@dataclass
class EntropyCoefSchedule(Method):
    """Entropy bonus -c(step)*H (TRL's) with a scheduled coefficient: constant, linear, cosine or stepwise."""

    coef: float | dict[str, Any] = field(default_factory=_default_coef)  # a Schedule (not calibrated)

    def validate(self) -> None:
        self.schedule = Schedule.parse(self.coef, "entropy_coef_schedule.coef")
        low, high = self.schedule.bounds()
        if low < 0:
            raise MethodConfigError(f"entropy_coef_schedule.coef must stay >= 0 (a bonus, not a penalty), "
                                    f"but it reaches {low}")
        if high <= 0:
            raise MethodConfigError("entropy_coef_schedule.coef is 0 at every step: remove the method instead")

    def initial_coef(self) -> float:
        """What TRL is built with: the value at step 0, or the largest one if that is 0 (enables TRL's bonus)."""
        first = self.schedule.at(0)
        return first if first > 0 else self.schedule.bounds()[1]

    def configure(self, args: Any) -> None:
        if args.entropy_coef not in (0.0, self.initial_coef()) or args.use_adaptive_entropy:
            raise MethodConfigError(
                "entropy_coef_schedule drives TRL's entropy_coef itself: do not also set entropy_coef or "
                "use_adaptive_entropy in the recipe (nor list entropy_bonus with it)"
            )
        args.entropy_coef = self.initial_coef()

    def trl_settings(self, step: int) -> dict[str, float]:
        return {"entropy_coef": self.schedule.at(step)}

    def token_loss(self, batch: LossBatch) -> TokenTerms | None:
        if batch.training:  # TRL applies the schedule on training steps only
            batch.log("coef", self.schedule.at(batch.step))
        return None
