"""EntroPIC: hold the entropy at a target with a PI controller that re-weights high-probability tokens.

Reference: Yang et al. 2025, "EntroPIC: Towards Stable Long-Term Training of LLMs via Entropy Stabilization with
Proportional-Integral Control", arXiv 2511.15248. Positive samples on high-probability tokens lower the entropy
and negative ones raise it; a controller on the entropy error sets a coefficient alpha that strengthens one side
and weakens the other. Per loss micro-batch, with H_mb the token-mean training entropy (detached):

    e      = H_mb - target
    alpha  = clip(ki * acc + kp * e, -alpha_max, alpha_max)      # acc: the integral BEFORE this micro-batch
    acc   += e / (micro-batches per optimizer step)               # about + the mean error per optimizer step
    L      = L_GRPO + alpha * mean_{hi}( -ratio_t * |A_t| ),      hi = counted tokens with pi(y_t) > high_prob

with ratio = exp(logp - logp_old), unclipped and with gradient. On-policy (ratio 1) the gradient on a
high-probability token is that of GRPO times (1 + alpha N / N_hi) for A > 0 and (1 - alpha N / N_hi) for A < 0:
entropy above target (alpha > 0) reinforces confident right tokens more, and confident wrong tokens less.
Defaults: ``target`` 0.1 nats (``run_entropic.sh``; ``config/entropic.yaml`` has -1, i.e. off), ``kp`` 1,
``ki`` 0.01, ``high_prob`` 0.95, ``alpha_max`` 1.
Reference impl: yk7333/EntroPIC, ``EntroPICDataParallelPPOActor.update_policy`` (dp_actor.py: the controller) and
``compute_policy_loss_entropic`` (core_algos.py: the loss), ``run_entropic.sh`` (settings).

Deviations from the reference, and why:
- Controller state. The reference keeps ``acc`` on each data-parallel rank's actor and integrates that rank's own
  micro-batch entropies, so alpha can differ between ranks (each rank then optimises a slightly different loss,
  and the result depends on the process count), and it never saves ``acc``: a resumed run restarts the integral
  at 0. Here H_mb is the token mean over the same micro-step's micro-batches of ALL processes
  (``LossBatch.global_sum_count``), so ``acc`` and alpha are identical on every process and on 1 or N processes,
  and ``{acc, alpha, target}`` is method state, saved in every checkpoint: a resumed run continues the integral.
  The adjustment's mean over high-probability tokens is likewise global (``LossBatch.global_mean``).
- The integral step is e / gradient_accumulation_steps; the reference's B_mb / ppo_mini_batch_size is the same
  when the micro-batches are equal, as TRL's are. The trainer passes the number (``LossBatch.accumulation_steps``).
- ``target`` must be > 0 (the reference's "disabled" value -1 reaches a crash path there); it may be a schedule or
  a calibrated target (``methods/schedule.py``): while one is being measured the method only observes.
- ``high_prob`` (a function default never wired to the reference's config) and ``alpha_max`` (1 there) are exposed.
- The adjustment uses the advantages the loss receives (after advantage hooks), not the token weights that
  methods listed before it return: it is a separate loss term, as in the reference.
- The base loss is TRL's (``loss_type``); the reference's is verl's PPO loss with dual clip, token mean.

Logs ``entropic/target``, ``entropic/error`` (= H_mb - target), ``entropic/alpha``, ``entropic/integral`` (acc
after the update), ``entropic/high_prob_frac`` (share of counted tokens above ``high_prob``) and
``entropic/adjustment`` (the term added to the loss).
Formulas, defaults and the worked examples the tests use: ``docs/methods-2.md`` (EntroPIC).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from rlvr_entropy.methods.base import LossBatch, Method, MethodConfigError, TokenTerms, register
from rlvr_entropy.methods.schedule import EntropyTarget



def pi_alpha(acc: float, error: float, kp: float, ki: float, alpha_max: float) -> float:
    """The controller's output for one micro-batch: clip(ki * acc + kp * error, -alpha_max, alpha_max)."""
    return min(alpha_max, max(-alpha_max, ki * acc + kp * error))


@register("entropic")
@dataclass
class EntroPIC(Method):
    """EntroPIC: PI control of entropy through alpha * mean over high-probability tokens of -ratio * |A|."""

    target: float | dict[str, Any] = 0.1  # nats (> 0), or a schedule / calibrated target (methods/schedule.py)
    kp: float = 1.0  # proportional gain (entropy_control_p)
    ki: float = 0.01  # integral gain (entropy_control_i)
    high_prob: float = 0.95  # tokens with pi(y_t) above this get the adjustment (high_prob_thresh)
    alpha_max: float = 1.0  # alpha is clipped to [-alpha_max, alpha_max]

    def __post_init__(self) -> None:
        self._target = EntropyTarget(self.target, "entropic.target")  # a MethodConfigError if malformed
        super().__post_init__()

    def validate(self) -> None:
        if self.kp < 0 or self.ki < 0:
            raise MethodConfigError(f"entropic.kp and entropic.ki must be >= 0, got kp={self.kp}, ki={self.ki}")
        if not 0.0 < self.high_prob < 1.0:
            raise MethodConfigError(f"entropic.high_prob is a probability in (0, 1), got {self.high_prob}")
        if not self.alpha_max > 0:
            raise MethodConfigError(f"entropic.alpha_max must be > 0, got {self.alpha_max}")
        if not self._target.calibrated and not self._target.schedule.bounds()[0] > 0:
            raise MethodConfigError(
                "entropic.target must be > 0 nats (the reference's -1 'off' value does not exist here: remove the "
                f"method instead), got {self.target!r}"
            )

    def init_state(self) -> dict[str, Any]:
        # acc: the integral of the error; alpha: the last coefficient; target: a calibrated target's sums and value
        return {"acc": 0.0, "alpha": 0.0, "target": self._target.init_state()}

    def token_loss(self, batch: LossBatch) -> TokenTerms | None:
        valid = batch.mask > 0
        entropy = torch.where(valid, batch.entropy.detach().float(), 0.0)  # (B, T); padding never read
        total, count = batch.global_sum_count(entropy)  # global over processes, detached
        entropy_sum, token_count = torch.stack([total, count]).tolist()  # the controller runs on Python floats
        target = self._target.at_step(batch.step, self.state["target"], batch.training,
                                      lambda: (entropy_sum, token_count))
        if target is None:  # a calibrated target still being measured: observe only
            return None
        if token_count == 0:  # no counted token on any process: nothing to measure or adjust
            return None
        error = entropy_sum / token_count - target
        acc = float(self.state["acc"])
        alpha = pi_alpha(acc, error, self.kp, self.ki, self.alpha_max)
        if batch.training:
            acc += error / batch.accumulation_steps  # one step's worth of error per optimizer step
            self.state["acc"] = acc
            self.state["alpha"] = alpha

        log_ratio = torch.where(valid, batch.logps.float() - batch.old_logps.float(), 0.0)  # (B, T), with grad
        ratio = torch.exp(log_ratio)  # unclipped, as in the reference
        high = valid & (batch.logps.detach() > math.log(self.high_prob))  # (B, T) bool
        adjustment = alpha * batch.global_mean(-ratio * batch.advantages.float().abs(), subset=high)  # ()

        high_count, _ = batch.global_sum_count(high.float())
        batch.log("target", target)
        batch.log("error", error)
        batch.log("alpha", alpha)
        batch.log("integral", acc)
        batch.log("high_prob_frac", high_count / token_count)
        batch.log("adjustment", adjustment)
        return TokenTerms(scalar=adjustment)
