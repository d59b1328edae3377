"""High-entropy minority tokens: train only on the top-rho fraction of tokens by entropy.

Reference: Wang et al. 2025, "Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive Effective
RL for LLM Reasoning", arXiv 2506.01939 (rho = 0.2).
Reference impl: TRL 1.16 ``GRPOConfig.top_entropy_quantile`` and ``GRPOTrainer.get_high_entropy_mask``
(quantile over the valid tokens of all processes in the micro-batch).
Deviation from reference: none. This method only sets TRL's field, so TRL's mask (and its effect on
the entropy bonus) is used unchanged.

Formulas, defaults and the worked examples the tests use: ``docs/methods.md`` §9.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rlvr_entropy.methods.base import Method, MethodConfigError, register


@register("high_entropy_tokens")
@dataclass
class HighEntropyTokens(Method):
    """Policy gradient on the top-rho highest-entropy tokens only (TRL's top_entropy_quantile)."""

    rho: float = 0.2  # fraction of tokens kept, in (0, 1]

    def validate(self) -> None:
        if not 0.0 < self.rho <= 1.0:
            raise MethodConfigError(f"high_entropy_tokens.rho must be a fraction in (0, 1], got {self.rho}")

    def configure(self, args: Any) -> None:
        if args.top_entropy_quantile not in (1.0, self.rho):
            raise MethodConfigError("high_entropy_tokens sets TRL's top_entropy_quantile: do not also set it")
        args.top_entropy_quantile = self.rho
