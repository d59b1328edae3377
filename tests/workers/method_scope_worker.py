"""Run under ``torchrun --nproc_per_node N``: every method, one at a time, on the same fixed generation batch.

    torchrun --nproc_per_node N method_scope_worker.py MODEL_DIR OUT METHODS_JSON

``METHODS_JSON`` maps a method name to its recipe entry and to the rollout tags to attach (``{"entry": {...},
"tags": {"<method>/<tag>": [global rows]}}``). Generation is replaced by fixed completions of the global rows,
so 1 and N processes see the very same batch; the rollout hooks, which would sample, are bypassed (their tags
come from the JSON). For each method every rank writes ``OUT/<method>_<world>_<rank>.json``: the rewards and
advantages of the whole batch (after the hooks), this rank's advantages, token weights, detach masks and extra
terms of one loss micro-batch (its whole slice), the method's state and the method's logged statistics.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from helpers.processes import finish_worker  # noqa: E402
from helpers.trainers import cpu_args, prompt_rows  # noqa: E402  (tests/ is on PYTHONPATH)
from transformers import AutoTokenizer, set_seed

from rlvr_entropy import EntropyGRPOConfig, EntropyGRPOTrainer
from rlvr_entropy.methods import Rollout
from rlvr_entropy.tasks import make_dataset
from rlvr_entropy.tasks.rewards import correctness

PROMPTS, GROUP = 4, 4  # 16 rows: on two processes 8 each, so groups 0-1 are on rank 0 and 2-3 on rank 1...
GLOBAL_ROWS = PROMPTS * GROUP


def dense(prompts, completions, **kwargs):
    """A reward with spread inside every group (digit sum modulo 3)."""
    return [float(sum(int(c) for c in text if c.isdigit()) % 3) for text in completions]


def completion_text(row: int, answer: str) -> str:
    """Global row ``row``'s completion: thinking of varying length, then an answer that is right for some rows."""
    steps = " ".join(f"{row}+{k}={row + k}" for k in range(row % 3))
    final = answer if row % 3 != 1 else str(int(answer) + row % 5 + 1)
    return f"{steps}</think>{final}"


def main() -> None:
    model_dir, out_dir, methods = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = prompt_rows(PROMPTS, GROUP)
    local_rows = GLOBAL_ROWS // world
    mine = rows[rank * local_rows : (rank + 1) * local_rows]
    start = rank * local_rows
    texts = [completion_text(start + i, r["answer"]) for i, r in enumerate(mine)]
    fixed = [tokenizer.encode(t, add_special_tokens=False) + [tokenizer.eos_token_id] for t in texts]

    for name, spec in methods.items():
        set_seed(0)
        trainer = EntropyGRPOTrainer(
            model=model_dir,
            reward_funcs=[correctness, dense],
            # 8 rows per micro-batch on every process count: one optimizer step sees the whole batch
            args=EntropyGRPOConfig(**cpu_args(out_dir / f"run_{name}_{world}", per_device_train_batch_size=local_rows,
                                              num_generations=GROUP, max_completion_length=24,
                                              methods=[spec["entry"]], **{"beta": 0.04, "epsilon": 0.2,
                                                                          **spec.get("args", {})})),
            train_dataset=make_dataset("arithmetic", 16, 0),
            processing_class=tokenizer,
        )
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1
        tags = {key: torch.tensor([float(start + i in set(value)) for i in range(local_rows)])
                for key, value in spec.get("tags", {}).items()}

        def fixed_batch(prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
            trainer._pending_rollout = Rollout([list(c) for c in fixed], None, {}, dict(tags))
            return trainer._pending_rollout.completion_ids, None

        trainer._generate_single_turn = fixed_batch  # the same batch on every process count, hooks bypassed
        seen: dict = {}
        pipeline = trainer.pipeline
        real_reward, real_advantage, real_token_loss = pipeline.reward, pipeline.advantage, pipeline.token_loss

        def reward(batch):
            columns = real_reward(batch)
            seen["rewards"] = batch.rewards.tolist()
            return columns

        def advantage(advantages, batch):
            out = real_advantage(advantages, batch)
            seen["advantages"] = (out * batch.mask).sum(1).tolist() if out.dim() == 2 else out.tolist()
            return out

        def token_loss(batch):
            terms = real_token_loss(batch)
            lengths = batch.mask.sum(1).long().tolist()  # padding width differs between process counts
            for key in ("weight", "detach", "extra"):
                value = getattr(terms, key)
                if value is not None:
                    seen[key] = [row[:n] for row, n in zip(value.detach().float().tolist(), lengths, strict=True)]
            return terms

        pipeline.reward, pipeline.advantage, pipeline.token_loss = reward, advantage, token_loss
        out = trainer._generate_and_score_completions([dict(r) for r in mine])
        trainer.model.zero_grad(set_to_none=True)
        trainer._compute_loss(trainer.model, out).backward()
        probe = torch.Generator().manual_seed(7)
        # Two linear functionals of each parameter's gradient: DDP averages gradients over processes, so the
        # mean over ranks must equal the one-process value (TRL's own loss terms included, e.g. its entropy mask).
        gradient = [[float(p.grad.sum()), float((p.grad * torch.randn(p.shape, generator=probe)).sum())]
                    for p in trainer.model.parameters() if p.grad is not None]
        method_keys = {k: v for k, v in trainer._metrics["train"].items() if k.startswith((f"{name}/", "rewards/"))}
        method_keys.update({k: v for k, v in trainer._metrics["train"].items() if k in ("reward", "entropy_coef")})
        advantages = out["advantages"]
        result = {
            "seen": seen,
            "local_advantages": (advantages * out["completion_mask"]).sum(1).tolist() if advantages.dim() == 2
            else advantages.tolist(),
            "gradient": gradient,
            "state": trainer.pipeline.state_dict(),
            "metrics": method_keys,
        }
        (out_dir / f"{name}_{world}_{rank}.json").write_text(json.dumps(result))
        trainer.accelerator.wait_for_everyone()
    finish_worker(trainer.accelerator)


if __name__ == "__main__":
    main()
