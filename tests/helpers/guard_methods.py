"""Toy methods that turn non-finite at one step, referenced by import path from recipes (in-process and in workers)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlvr_entropy.methods import Method, TokenTerms

BAD_STEP = 1  # global step (0-based) whose generation batch / loss turns non-finite: the 2nd optimizer step


@dataclass
class NaNAdvantage(Method):
    """Counts generation batches in its state; NaN advantages on the batch of BAD_STEP."""

    name = "nan_advantage"

    def init_state(self):
        return {"batches": 0}

    def advantage(self, advantages, batch):
        if batch.training:
            self.state["batches"] += 1
        return advantages * float("nan") if batch.step == BAD_STEP else advantages


@dataclass
class InfWeight(Method):
    name = "inf_weight"
    rank: int = -1  # -1: every process

    def token_loss(self, batch):
        bad = batch.step == BAD_STEP and self.rank in (-1, batch.process_index)
        return TokenTerms(weight=torch.full_like(batch.mask, float("inf") if bad else 1.0))


@dataclass
class NaNExtra(Method):
    name = "nan_extra"

    def token_loss(self, batch):
        value = float("nan") if batch.step == BAD_STEP else 0.0
        return TokenTerms(extra=batch.logps * 0.0 + value)
