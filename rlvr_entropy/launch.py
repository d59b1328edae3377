"""Launch checks: the run got the processes, the sharding engine and the data its launch asked for.

Three silent failures seen on real launches are refused here with a one-line reason:

- several processes that each believe they are alone (``WORLD_SIZE > 1`` but one process in accelerate's
  state: e.g. ``use_cpu: false`` on a machine without a GPU, where N independent runs would write into one
  ``output_dir`` and exit 0);
- an FSDP or DeepSpeed launch config that produced neither (accelerate turns an FSDP config into FSDP on
  GPU-like devices only, and runs plain DDP elsewhere, with no warning);
- a dataset too small to fill one generation batch: TRL's sampler then yields nothing, transformers prints
  "There seems not to be a single sample in your epoch_iterator" and the run ends at step 0 with exit 0.

:func:`check_geometry` runs before anything is built (from the launch environment) and again in the trainer
(after bad rows are dropped, with the real process count); :func:`check_engine` runs when the trainer is
built and when training starts.
"""

from __future__ import annotations

import os
from typing import Any

from accelerate.utils import DistributedType

from rlvr_entropy.config import RecipeError


class LaunchError(RecipeError):
    """What the launch produced is not what it asked for; the message says what to change."""


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def launched_processes() -> int:
    """The number of processes the launcher started (``WORLD_SIZE``; 1 without a launcher)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def requested_engine() -> str | None:
    """``"deepspeed"`` or ``"fsdp"`` when the launch config asks for one (accelerate's environment), else None."""
    if _env_flag("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    if _env_flag("ACCELERATE_USE_FSDP"):
        return "fsdp"
    return None


def check_engine(distributed_type: Any, num_processes: int, wrapped_model: Any = None) -> None:
    """Refuse a launch whose processes or sharding engine silently fell back to something else.

    Args:
        distributed_type: accelerate's ``DistributedType`` of this run.
        num_processes: processes in accelerate's state.
        wrapped_model: the model as accelerate prepared it, once training started (None before).
    """
    world = launched_processes()
    if world > 1 and num_processes == 1:
        raise LaunchError(
            f"the launcher started {world} processes (WORLD_SIZE={world}) but each sees only itself, so each would "
            "train alone and they would overwrite one output_dir. On a machine without a GPU set use_cpu: true in "
            "the recipe (the processes then talk over gloo); on GPUs check CUDA_VISIBLE_DEVICES and the launch config"
        )
    engine = requested_engine()
    if engine == "fsdp" and distributed_type != DistributedType.FSDP:
        raise LaunchError(
            f"the launch config asks for FSDP but accelerate set up {getattr(distributed_type, 'value', distributed_type)}"
            " (accelerate enables FSDP on GPUs only; on this device it would silently train with DDP). Launch on GPUs, "
            "or use recipes/accelerate/ddp.yaml or a DeepSpeed config here"
        )
    if engine == "deepspeed" and distributed_type != DistributedType.DEEPSPEED:
        raise LaunchError(
            f"the launch config asks for DeepSpeed but accelerate set up "
            f"{getattr(distributed_type, 'value', distributed_type)}: is deepspeed installed "
            "(pip install 'rlvr-entropy[deepspeed]')?"
        )
    if wrapped_model is None or engine is None:
        return
    kind = type(wrapped_model).__name__
    if engine == "deepspeed" and kind != "DeepSpeedEngine":
        raise LaunchError(f"the launch config asks for DeepSpeed but the model was prepared as {kind}")
    if engine == "fsdp" and not _is_fsdp_model(wrapped_model):
        raise LaunchError(f"the launch config asks for FSDP but the model was prepared as {kind}, with no sharded "
                          "parameter")


def _is_fsdp_model(model: Any) -> bool:
    """FSDP1 wraps the module; FSDP2 shards it in place (its parameters become DTensors)."""
    if type(model).__name__ == "FullyShardedDataParallel":
        return True
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def prompts_per_generation(args: Any, num_processes: int) -> int:
    """Distinct prompts one generation batch takes: per-device batch x processes x steps_per_generation, over
    num_generations (each prompt is sampled num_generations times)."""
    steps = args.steps_per_generation or args.gradient_accumulation_steps
    return args.per_device_train_batch_size * num_processes * steps // args.num_generations


def check_geometry(num_prompts: int, args: Any, num_processes: int, what: str = "the training dataset") -> None:
    """Refuse a dataset that cannot fill one generation batch (the run would train 0 steps and exit 0)."""
    needed = prompts_per_generation(args, num_processes)
    if num_prompts >= needed:
        return
    steps = args.steps_per_generation or args.gradient_accumulation_steps
    per_device_fit = num_prompts * args.num_generations // (num_processes * steps)
    fix = [f"data.num_prompts (or the dataset) to at least {needed}"]
    if per_device_fit >= args.num_generations:
        fix.append(f"per_device_train_batch_size to {per_device_fit - per_device_fit % args.num_generations} or less")
    if steps > 1:
        fix.append("steps_per_generation lower")
    raise LaunchError(
        f"{what} has {num_prompts} prompts, but one generation batch takes {needed}: per_device_train_batch_size "
        f"{args.per_device_train_batch_size} x {num_processes} process{'es' if num_processes > 1 else ''} x "
        f"steps_per_generation {steps} / num_generations {args.num_generations}, so no step would train. Raise "
        + ", or set ".join(fix)
    )
