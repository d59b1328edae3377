"""Numeric guards: a NaN or inf never reaches the optimizer, and every process decides the same.

One :class:`StepGuard` window spans the micro-batches of one optimizer step:

1. ``open(restore)`` at its first micro-batch, with a function that undoes what the step may change
   besides the parameters (the methods' state, TRL's adaptive entropy coefficient);
2. ``flag`` / ``check_micro_batch`` record what went wrong on this process: a method's hook produced
   NaN/inf (the pipeline dropped that output and reported it), the generation batch was marked bad
   (``check_generation``, which sets :data:`GUARD_KEY` in the batch), TRL's loss is not finite;
3. ``close(parameters)`` after the last micro-batch adds "the gradients are not finite", all-reduces one
   flag, and on every process together either lets the step happen or skips it: gradients are dropped
   (so the optimizer leaves the parameters and its state alone), ``restore`` runs, and the counts go
   into the run totals (``guard/skipped_steps``, ``guard/nonfinite/<method|loss|grad>``).

With ``policy="raise"`` the same decision raises :class:`NonFiniteError` on every process instead.

Sharding engines: under FSDP2 gradients are DTensors and each process checks its own shard (a non-finite
value anywhere is seen by the process that holds it, and the flag is all-reduced). DeepSpeed takes the optimizer
step inside the backward pass and keeps gradients in its own buffers; it skips a step whose global gradient norm
is not finite by itself (ZeRO-1/2/3, fp32, fp16 and bf16 with its default ``check_grad_overflow``), which
``close(..., engine_skipped=...)`` turns into the same counts and state restore. A method's non-finite output is
dropped by the pipeline as everywhere, but under DeepSpeed the step then runs without it (counted and logged).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from rlvr_entropy.methods.pipeline import NonFiniteError, NonFiniteEvent

logger = logging.getLogger(__name__)

#: Key of a 0-d tensor in a generation batch whose methods produced NaN/inf: every step on it is skipped.
GUARD_KEY = "guard/nonfinite"


def _identity_gather(objects: list[Any]) -> list[Any]:
    return objects


class StepGuard:
    """Skip-or-step for one optimizer step at a time; see the module docstring.

    Args:
        policy: ``"skip"`` or ``"raise"`` (the recipe's ``on_nonfinite``).
        counters: the run totals it adds to (checkpointed and logged by the trainer).
        reduce_sum: all-reduce (sum) of a tensor over processes; identity on one process.
        gather_objects: all-gather of a list of picklable objects; identity on one process.
        device: where ``reduce_sum`` needs its tensors.
    """

    def __init__(
        self,
        policy: str,
        counters: dict[str, int],
        reduce_sum: Callable[[Tensor], Tensor] = lambda t: t,
        gather_objects: Callable[[list[Any]], list[Any]] = _identity_gather,
        device: torch.device | str = "cpu",
    ) -> None:
        if policy not in ("skip", "raise"):
            raise ValueError(f"on_nonfinite must be 'skip' or 'raise', got {policy!r}")
        self.policy = policy
        self.counters = counters
        self.counters.setdefault("guard/skipped_steps", 0)
        self.reduce_sum = reduce_sum
        self.gather_objects = gather_objects
        self.device = device
        self.is_open = False
        self._flags: list[str] = []
        self._counts: dict[str, int] = {}
        self._restore: Callable[[], None] | None = None

    def open(self, restore: Callable[[], None] | None = None) -> None:
        """First micro-batch of an optimizer step; ``restore`` undoes the step's side effects if it is skipped."""
        self.is_open = True
        self._flags, self._counts, self._restore = [], {}, restore

    def flag(self, reason: str, counter: str | None = None, count: int = 1) -> None:
        """A non-finite value on this process in this step; ``counter`` counts it (summed over processes)."""
        self._flags.append(reason)
        if counter is not None:
            self._counts[counter] = self._counts.get(counter, 0) + count

    def check_generation(self, events: list[NonFiniteEvent], step: int, training: bool) -> bool:
        """Rollout-phase events (computed from gathered data, so equal on every process): True when every
        optimizer step on this generation batch must be skipped. Raises under ``policy="raise"``."""
        if not events:
            return False
        if self.policy == "raise":
            raise NonFiniteError(f"step {step}: {events[0]}")
        for event in events:
            logger.warning("step %d: %s; the optimizer steps on this generation batch are skipped", step, event)
            if training:
                key = f"guard/nonfinite/{event.method}"
                self.counters[key] = self.counters.get(key, 0) + event.count
        return training

    def check_micro_batch(self, events: list[NonFiniteEvent], batch_flagged: bool, loss: Tensor, step: int,
                          training: bool) -> None:
        """Loss-phase events of one micro-batch, the generation batch's mark, and the loss itself."""
        if not training:  # evaluation: no optimizer step to protect
            for event in events:
                logger.warning("evaluation after step %d: %s", step - 1, event)
            return
        for event in events:
            if self.policy == "skip":
                logger.warning("step %d: %s; this optimizer step is skipped", step, event)
            self.flag(str(event), f"guard/nonfinite/{event.method}", event.count)
        if batch_flagged:
            self.flag("its generation batch holds non-finite method outputs")
        value = loss.detach()
        if not bool(torch.isfinite(value).all()):
            logger.warning("step %d: TRL's loss is %s; this optimizer step is skipped", step, float(value))
            self.flag(f"TRL's loss is {float(value)}", "guard/nonfinite/loss")

    def close(self, parameters: Iterable[torch.nn.Parameter], step: int, engine_skipped: bool | None = None) -> bool:
        """End of the step's micro-batches: True (and the step undone) if any process saw NaN/inf.

        ``engine_skipped`` is for an engine that runs the optimizer step itself, inside the backward pass
        (DeepSpeed): whether it skipped the step for non-finite gradients (its own check, global). The step is
        then over: when the engine skipped it, the methods' state is restored and the skip counted; when it ran
        with a method's dropped output, that cannot be undone and is only counted and logged.
        """
        self.is_open = False
        params = list(parameters)
        grads = [_local(p.grad) for p in params if p.grad is not None]  # FSDP2: this process's shard
        if grads and not bool(torch.isfinite(torch.nn.utils.get_total_norm(grads))):
            self.flag("the gradients are not finite", "guard/nonfinite/grad")
        if engine_skipped:
            self.flag("the gradients are not finite (the engine skipped the optimizer step)", "guard/nonfinite/grad")
        local = torch.tensor(float(bool(self._flags)), device=self.device)
        skip = bool(self.reduce_sum(local) > 0)  # one all-reduce: every process decides the same
        reasons, counts, restore = self._flags, self._counts, self._restore
        self._flags, self._counts, self._restore = [], {}, None
        if not skip:
            return False
        for process_counts in self.gather_objects([counts]):
            for key, value in process_counts.items():
                self.counters[key] = self.counters.get(key, 0) + value
        why = "; ".join(dict.fromkeys(reasons)) or "NaN/inf on another process"
        if self.policy == "raise":  # after the all-reduce: every process raises, none waits
            raise NonFiniteError(f"step {step}: {why}")
        if engine_skipped is False:
            logger.warning("step %d: %s; the engine has already taken the optimizer step (without the dropped "
                           "method outputs), so it is not skipped", step, why)
            return False
        for p in params:  # the optimizer leaves parameters without a gradient (and their state) alone
            p.grad = None
        if restore is not None:
            restore()
        self.counters["guard/skipped_steps"] += 1
        logger.warning("step %d skipped (%s); parameters, optimizer and method states are unchanged", step, why)
        return True


def _local(tensor: Tensor) -> Tensor:
    """A DTensor's local shard (FSDP2 gradients), a plain tensor as it is: no collective per parameter."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor
