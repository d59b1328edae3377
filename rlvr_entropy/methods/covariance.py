"""What Clip-Cov and KL-Cov share: the selection scope, its checks, and handing a global selection to the loss.

Not a method itself (nothing is registered here): the two methods of Cui et al. 2025 (arXiv 2505.22617)
differ only in which tokens they pick and what they do to them.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor

from rlvr_entropy.losses import CLIPPED_LOSS_TYPES
from rlvr_entropy.methods.base import Method, MethodConfigError, RolloutBatch
from rlvr_entropy.tensor_ops import per_token

PPO_LOSS_TYPES = CLIPPED_LOSS_TYPES


@dataclass
class CovarianceMethod(Method, abc.ABC):
    """A token selection by logp-advantage covariance, per loss micro-batch or once per generation batch.

    With ``selection_scope: global`` the advantage hook selects over the gathered generation batch with
    the behaviour policy's log-probs and carries the (N, T) selection to ``token_loss``.
    """

    selection_scope: Literal["micro_batch", "global"] = "micro_batch"

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({"logps"}) if self.selection_scope == "global" else frozenset()

    def check(self, args: Any) -> None:
        if args.loss_type not in PPO_LOSS_TYPES:
            raise MethodConfigError(
                f"{self.name} works on the PPO surrogate: loss_type must be one of {PPO_LOSS_TYPES}, "
                f"got '{args.loss_type}'"
            )
        if args.importance_sampling_level != "token":
            raise MethodConfigError(f"{self.name} selects tokens: importance_sampling_level must be 'token'")

    def advantage(self, advantages: Tensor, batch: RolloutBatch) -> Tensor:
        if self.selection_scope == "global":
            batch.carry("selected", self.select_global(per_token(advantages, batch.mask), batch))
        return advantages

    @abc.abstractmethod
    def select_global(self, advantages: Tensor, batch: RolloutBatch) -> Tensor:
        """(N, T) bool selection over the whole generation batch (advantages are (N, T))."""
