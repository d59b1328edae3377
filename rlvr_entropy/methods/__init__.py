"""Entropy-control methods, one file each, registered by name in ``METHODS``.

Every method module is imported here explicitly (no auto-discovery), so the registry is complete as
soon as the package is imported. A recipe entry becomes a method in ``rlvr_entropy.config.build_method``.
"""

from rlvr_entropy.methods import (  # noqa: F401  (imported to register them)
    aepo,
    archer,
    ares,
    canon,
    ce_gppo,
    clip_cov,
    entropic,
    entropy_adv,
    entropy_bonus,
    entropy_coef_schedule,
    erc,
    high_entropy_tokens,
    kl_cov,
    pear,
    seed_grpo,
    siren,
    steer,
    ter,
    typical,
)
from rlvr_entropy.methods.base import (
    LOSS_INPUTS,
    METHODS,
    ROLLOUT_STATS,
    TRL_SETTINGS,
    LossBatch,
    Method,
    MethodConfigError,
    Rollout,
    RolloutBatch,
    RolloutContext,
    TokenTerms,
    register,
)
from rlvr_entropy.methods.pipeline import NonFiniteError, Pipeline

__all__ = [
    "LOSS_INPUTS",
    "METHODS",
    "ROLLOUT_STATS",
    "TRL_SETTINGS",
    "LossBatch",
    "Method",
    "MethodConfigError",
    "NonFiniteError",
    "Pipeline",
    "Rollout",
    "RolloutBatch",
    "RolloutContext",
    "TokenTerms",
    "register",
]
