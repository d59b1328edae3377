"""Run under torchrun with 1 or 2 processes on the same, deterministic generation batch.

A test-only rollout method writes fixed completions that depend only on the global row index, so
the batch is identical whatever the process count. Each rank writes the (global row, column) pairs
its method selected (covariance methods), its slice of the advantages and the method's state to
``$OUT/result<world>_<rank>.json``.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from helpers.processes import finish_worker  # noqa: E402
from helpers.trainers import cpu_args, prompt_rows  # noqa: E402  (tests/ is on PYTHONPATH)
from transformers import AutoTokenizer, set_seed

from rlvr_entropy import EntropyGRPOConfig, EntropyGRPOTrainer  # noqa: E402
from rlvr_entropy.methods import Method, Rollout  # noqa: E402
from rlvr_entropy.tasks import make_dataset  # noqa: E402

GLOBAL_ROWS = 12


@dataclass
class FixedRollout(Method):
    """Completion of global row g: the digits of ((g // 2) * 37) % 100, then EOS (rows pair up on answers)."""

    name = "fixed_rollout"
    eos: int = 1
    digit_ids: list | None = None

    def rollout(self, ctx, generate):
        start = ctx.process_index * len(ctx.prompt_ids)
        ids = [[self.digit_ids[int(c)] for c in str((((start + i) // 2) * 37) % 100)] + [self.eos]
               for i in range(len(ctx.prompt_ids))]
        return Rollout(ids, None, {})


def digit_value(prompts, completions, **kwargs):
    return [float(int(c) % 3) if c.isdigit() else 0.0 for c in completions]


def main() -> None:
    model_dir, out_dir, method = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    fixed = {"name": "multiproc_scope_worker.FixedRollout", "eos": tokenizer.eos_token_id,
             "digit_ids": [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]}
    local_rows = GLOBAL_ROWS // world
    set_seed(0)
    trainer = EntropyGRPOTrainer(
        model=model_dir,
        reward_funcs=[digit_value],
        args=EntropyGRPOConfig(**cpu_args(out_dir / f"run{world}", per_device_train_batch_size=local_rows,
                                          methods=[fixed, method], epsilon=1.0, epsilon_high=1e6)),
        train_dataset=make_dataset("arithmetic", 16, 0),
        processing_class=tokenizer,
    )
    trainer.model.train()
    rows = prompt_rows(3, 4)
    out = trainer._generate_and_score_completions(rows[rank * local_rows : (rank + 1) * local_rows])
    key = f"carry/{method['name']}/selected"
    pairs = [[rank * local_rows + i, j] for i, j in out[key].bool().nonzero().tolist()] if key in out else []
    state = trainer.pipeline.state_dict()[method["name"].rsplit(".", 1)[-1]]
    result = {"selected": pairs, "advantages": out["advantages"].tolist(), "state": state}
    (out_dir / f"result{world}_{rank}.json").write_text(json.dumps(result))
    finish_worker(trainer.accelerator)


if __name__ == "__main__":
    main()
