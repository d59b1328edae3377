"""Run under ``torchrun --nproc_per_node 2``: one generation batch whose groups span both processes.

Each rank writes what it saw to ``$OUT/rank<r>.json``; ``test_multiprocess.py`` checks the files.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from helpers.processes import finish_worker  # noqa: E402
from helpers.trainers import cpu_args, prompt_rows  # noqa: E402  (tests/ is on PYTHONPATH)
from transformers import AutoTokenizer, set_seed

from rlvr_entropy import EntropyGRPOConfig, EntropyGRPOTrainer  # noqa: E402
from rlvr_entropy.methods import Method, TokenTerms  # noqa: E402
from rlvr_entropy.tasks import make_dataset  # noqa: E402

RECORD: dict = {}  # filled in the imported module (the registry imports it by name), not __main__


def dense(prompts, completions, **kwargs):
    return [float(len(c) % 4) for c in completions]


@dataclass
class GroupCentre(Method):
    """Rescale by mean rollout entropy, then re-centre each group: needs every member of the group."""

    name = "group_centre"
    needs = frozenset({"entropy"})

    def init_state(self):
        return {"calls": 0, "mean_entropy": 0.0}

    def advantage(self, advantages, batch):
        x = advantages * (1 + batch.mean_entropy())
        g = batch.group_ids
        means = torch.zeros(int(g.max()) + 1).index_add_(0, g, x) / batch.group_size
        out = x - means[g]
        self.state["calls"] += 1
        self.state["mean_entropy"] = float(batch.mean_entropy().mean())
        RECORD.update(global_in=advantages.tolist(), global_out=out.tolist(), group_ids=g.tolist(),
                      entropy_rows=batch.entropy.shape[0])
        return out


@dataclass
class LogTokens(Method):
    name = "log_tokens"

    def token_loss(self, batch):
        batch.log("tokens", batch.mask.sum(), reduce="sum")
        return TokenTerms(weight=torch.ones_like(batch.mask))


def main() -> None:
    model_dir, out_dir = sys.argv[1], Path(sys.argv[2])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    set_seed(0)
    trainer = EntropyGRPOTrainer(
        model=model_dir,
        reward_funcs=[dense],
        args=EntropyGRPOConfig(**cpu_args(out_dir / "run", per_device_train_batch_size=6, methods=[
            {"name": "multiproc_worker.GroupCentre"}, {"name": "multiproc_worker.LogTokens"}])),
        train_dataset=make_dataset("arithmetic", 16, 0),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    rows = prompt_rows(3, 4)  # 12 rows, 3 groups of 4: group 1 spans both processes
    local = rows[rank * 6 : (rank + 1) * 6]
    set_seed(100 + rank)
    out = trainer._generate_and_score_completions(local)
    loss = trainer._compute_loss(trainer.model, out)
    metrics = {k: v for k, v in trainer._metrics["train"].items() if "/" in k}
    result = dict(
        rank=rank, world=world, local_advantages=out["advantages"].tolist(), group_ids=out["group_ids"].tolist(),
        state=trainer.pipeline.state_dict(), record=__import__("multiproc_worker").RECORD, loss=loss.item(), metrics=metrics,
        local_tokens=float(out["completion_mask"].sum()),
    )
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    finish_worker(trainer.accelerator)


if __name__ == "__main__":
    main()
