"""Train the tiny recipe with a checkpoint every step; in the middle of writing checkpoint-2 (after the weights
and the optimizer, before the RNG and trainer states), touch a marker file and wait to be killed."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from transformers import Trainer

from rlvr_entropy.config import load_recipe
from rlvr_entropy.runner import train


def main() -> None:
    recipe, out, marker = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    save_rng_state = Trainer._save_rng_state

    def stall_on_step_2(self, output_dir):
        if self.state.global_step == 2:
            marker.write_text(output_dir)
            time.sleep(3600)  # the test kills the process here
        return save_rng_state(self, output_dir)

    Trainer._save_rng_state = stall_on_step_2
    train(load_recipe(recipe, [
        "per_device_train_batch_size=16", "steps_per_generation=1", "num_generations=4", "data.num_prompts=64",
        "max_steps=3", "save_strategy=steps", "save_steps=1", "save_total_limit=1", f"output_dir={out}",
    ]))


if __name__ == "__main__":
    main()
