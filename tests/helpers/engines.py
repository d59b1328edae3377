"""CPU (gloo, two processes) versions of the shipped accelerate configs, for the sharding-engine tests.

Each is derived from the file users launch with (``recipes/accelerate/*.yaml``) with only what a CPU run
needs changed: two processes, no mixed precision, no sharded model init (a 1M-parameter model), and for
ZeRO-3 a DeepSpeed JSON with ``stage3_param_persistence_threshold: 0`` so that even the tiny model's small
tensors are really partitioned (by default ZeRO-3 keeps tensors under 1e5 elements whole on every process).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from helpers.processes import WORKERS

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "recipes" / "accelerate"


def cpu_launch_config(engine: str, directory: Path) -> Path:
    """Write ``<directory>/<engine>.yaml`` for ``ddp``, ``zero2``, ``zero3`` or ``fsdp2``; return its path."""
    config = yaml.safe_load((SHIPPED / f"{engine}.yaml").read_text())
    config.update(num_processes=2, mixed_precision="no")
    if engine == "zero3":
        ds = config.pop("deepspeed_config")
        offload = {"device": "none"}
        ds_json = {
            "zero_optimization": {"stage": ds["zero_stage"], "stage3_param_persistence_threshold": 0,
                                  "offload_optimizer": offload, "offload_param": offload,
                                  "stage3_gather_16bit_weights_on_model_save": ds["zero3_save_16bit_model"]},
            "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
            "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
        }
        (directory / "zero3.json").write_text(json.dumps(ds_json))
        # With a DeepSpeed JSON, accelerate refuses the same settings in the YAML (mixed precision included).
        config.pop("mixed_precision")
        config["deepspeed_config"] = {"deepspeed_config_file": str(directory / "zero3.json"), "zero3_init_flag": False}
    elif engine == "zero2":
        config["deepspeed_config"]["zero3_init_flag"] = False
    elif engine == "fsdp2":
        config["fsdp_config"]["fsdp_cpu_ram_efficient_loading"] = False
    path = directory / f"{engine}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def accelerate_launch(config: Path, port: int, *args: object) -> list[str]:
    """``accelerate launch --config_file config tests/workers/engine_worker.py args...``."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--main_process_port",
            str(port), str(WORKERS / "engine_worker.py"), *map(str, args)]
