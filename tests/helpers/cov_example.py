"""The shared toy batch of docs/methods.md §1.6 / §2.6: 2 prompts x 4 responses x T=5, N=33 valid tokens."""

import torch

from rlvr_entropy.methods import LossBatch

P = float("nan")  # padding: junk that must never be read
LOGP = torch.tensor([
    [-0.10, -1.20, -0.05, -2.30, -0.40],
    [-0.30, -0.02, -1.80, -0.60, -0.90],
    [-2.50, -0.15, -0.70, -0.08, -1.10],  # the fifth value is padding (mask 0)
    [-0.01, -0.45, -3.00, P, P],
    [-0.20, -2.80, -0.03, -1.40, -0.55],
    [-1.60, -0.25, P, P, P],
    [-0.07, -0.95, -2.10, -0.35, -0.12],
    [-1.30, -0.04, -0.65, -2.00, P],
])
LENGTHS = [5, 5, 4, 3, 5, 2, 5, 4]
MASK = (torch.arange(5).unsqueeze(0) < torch.tensor(LENGTHS).unsqueeze(1)).float()
LOGP = torch.where(MASK > 0, LOGP, torch.full_like(LOGP, 7.7))  # finite junk on padding
OLD = LOGP.clone()
for (i, j), v in {(0, 3): -2.60, (1, 2): -1.40, (3, 2): -2.90, (4, 1): -2.70, (4, 2): -0.33}.items():
    OLD[i, j] = v
A_SEQ = torch.tensor([0.866025, -0.866025, 0.866025, -0.866025, 1.5, -0.5, -0.5, -0.5])
ADV = A_SEQ.unsqueeze(1).expand(8, 5).clone()


def ppo_token_loss(logp: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, eps_low: float, eps_high: float) -> torch.Tensor:
    """The reference's per-token PPO loss max(-A r, -A clip(r)), (B, T): the oracle the loss tests use."""
    ratio = torch.exp(logp - old)
    return torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - eps_low, 1 + eps_high))


def token_mean(per_token: torch.Tensor) -> torch.Tensor:
    return (per_token * MASK).sum() / MASK.sum()

def loss_batch(logp=LOGP, old=OLD, adv=ADV, eps=0.2, **kw) -> LossBatch:
    """A loss micro-batch over the toy batch (DAPO loss, one process); ``kw`` sets optional fields."""
    logp = logp.clone().requires_grad_(True)
    return LossBatch(
        logps=logp, old_logps=old, on_policy=False, entropy=torch.zeros_like(logp), advantages=adv, mask=MASK,
        group_ids=torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), weight=torch.ones_like(MASK), loss_type="dapo",
        epsilon_low=eps, epsilon_high=eps, importance_sampling_level="token", step=0, micro_step=0, seed=0,
        process_index=0, num_processes=1, gather=lambda x: x, **kw,
    )
