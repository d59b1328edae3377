"""TER (Targeted Entropy Regularization): an absolute-deviation penalty that pulls the entropy toward a target.

Reference: Wu et al. 2025, "Confucius3-Math: A Lightweight High-Performance Reasoning LLM for Chinese K-12
Mathematics Learning", arXiv 2506.18330, §6.1 (stage 1 of its RL training: GRPO, 4K context). An ordinary entropy
bonus only pushes entropy up; the paper links runaway entropy to mixed-language answers and replaces the bonus by

    L = L_GRPO + coef * | H_bar - target |,      H_bar = token mean of the current policy's entropy

so entropy is pushed down when above the target and up when below it, with a constant-size push
(dL/dH_t = coef * sign(H_bar - target) / N on every counted token; no dead zone, no proportional part).
Defaults are the paper's: ``target`` 0.55 nats ("set empirically"), ``coef`` 0.001.

Here ``H_bar`` is the training-pass entropy (with its gradient) averaged over the counted tokens of the loss
micro-batch on every process together (``LossBatch.global_mean``), and the penalty is a scalar loss term divided
by the gradient-accumulation steps, as verl adds its ``entropy_loss`` per micro-batch.
Reference impl: none released (netease-youdao/Confucius3-Math ships inference code only); the paper's
``entropy_loss`` is verl's name for the token-mean entropy of the training forward.

Deviations and choices, none in the arithmetic:
- Aggregation is not stated in the paper: token mean (verl's default ``loss_agg_mode``), over the micro-batch of all
  processes together rather than per process, so a run gives the same result on 1 and N processes (per process,
  sign(H_bar - target) could differ between ranks).
- ``target`` may also be a schedule or ``{kind: calibrated, steps, scale}`` (``methods/schedule.py``): the paper's
  0.55 is specific to its model and temperature. While a calibrated target is being measured the method only
  observes the entropy and adds no term.
- The paper implies it replaces the usual entropy bonus; nothing stops a recipe from listing ``entropy_bonus`` too,
  but the paper recipe leaves TRL's ``entropy_coef`` at 0.

Logs ``ter/target``, ``ter/error`` (= H_bar - target) and ``ter/penalty`` (coef * |error|).
Formulas, defaults and the worked example the tests use: ``docs/methods-2.md`` (TER).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rlvr_entropy.methods.base import LossBatch, Method, MethodConfigError, TokenTerms, register
from rlvr_entropy.methods.schedule import EntropyTarget


@register("ter")
@dataclass
class TER(Method):
    """TER: penalty coef * |mean entropy - target| on the training-pass entropy, pulling it toward the target."""

    target: float | dict[str, Any] = 0.55  # nats, or a schedule / calibrated target (methods/schedule.py)
    coef: float = 0.001  # entropy_coeff of the paper

    def __post_init__(self) -> None:
        self._target = EntropyTarget(self.target, "ter.target")  # a MethodConfigError if malformed; init_state needs it
        super().__post_init__()

    def validate(self) -> None:
        if not self.coef > 0:
            raise MethodConfigError(f"ter.coef must be > 0 (the paper uses 0.001), got {self.coef}")

    def init_state(self) -> dict[str, Any]:
        return {"target": self._target.init_state()}  # a calibrated target's sums and fixed value ({} otherwise)

    def token_loss(self, batch: LossBatch) -> TokenTerms | None:
        entropy = torch.where(batch.mask > 0, batch.entropy.float(), 0.0)  # (B, T), with grad; padding never read
        target = self._target.at_step(batch.step, self.state["target"], batch.training,
                                      lambda: batch.global_sum_count(entropy))
        if target is None:  # a calibrated target still being measured: observe only
            return None
        mean_entropy = batch.global_mean(entropy)  # (), with grad; the same value on every process
        error = mean_entropy - target
        penalty = self.coef * error.abs()  # (), d/dH_t = coef * sign(error) / N on each counted token
        batch.log("target", target)
        batch.log("error", error)
        batch.log("penalty", penalty)
        return TokenTerms(scalar=penalty)
