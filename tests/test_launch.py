"""Launch checks: silent fallbacks of a launch and a batch geometry the data cannot fill are refused in one line."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from accelerate.utils import DistributedType

from rlvr_entropy.cli import main
from rlvr_entropy.launch import LaunchError, check_engine, check_geometry, prompts_per_generation

RECIPE = Path(__file__).parent.parent / "recipes" / "tiny" / "grpo.yaml"


def args(per_device=128, steps=4, generations=8, accumulation=1):
    return SimpleNamespace(per_device_train_batch_size=per_device, steps_per_generation=steps,
                           num_generations=generations, gradient_accumulation_steps=accumulation)


def test_prompts_per_generation_batch():
    assert prompts_per_generation(args(), 1) == 64
    assert prompts_per_generation(args(), 2) == 128  # the tiny recipe on two processes
    assert prompts_per_generation(args(steps=None, accumulation=2), 2) == 64  # TRL's default: accumulation steps


def test_geometry_that_cannot_fill_one_generation_batch_is_refused_with_what_to_change():
    check_geometry(128, args(), 2)  # exactly one generation batch: fine
    with pytest.raises(LaunchError) as err:
        check_geometry(64, args(), 2)
    message = str(err.value)
    assert "64 prompts, but one generation batch takes 128" in message
    assert "per_device_train_batch_size 128 x 2 processes x steps_per_generation 4 / num_generations 8" in message
    assert "at least 128" in message and "per_device_train_batch_size to 64 or less" in message


@pytest.fixture
def launched(monkeypatch):
    for name in ("WORLD_SIZE", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_processes_that_each_train_alone_are_refused(launched):
    launched.setenv("WORLD_SIZE", "2")
    with pytest.raises(LaunchError) as err:
        check_engine(DistributedType.NO, 1)
    assert "started 2 processes" in str(err.value) and "each sees only itself" in str(err.value)
    assert "set use_cpu: true" in str(err.value)
    check_engine(DistributedType.MULTI_CPU, 2)


def test_an_fsdp_launch_that_became_ddp_is_refused(launched):
    launched.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(LaunchError, match="asks for FSDP but accelerate set up MULTI_CPU"):
        check_engine(DistributedType.MULTI_CPU, 2)
    check_engine(DistributedType.FSDP, 2)
    with pytest.raises(LaunchError, match="no sharded parameter"):
        check_engine(DistributedType.FSDP, 2, wrapped_model=SimpleNamespace(parameters=lambda: iter(())))


def test_a_deepspeed_launch_without_an_engine_is_refused(launched):
    launched.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(LaunchError, match="asks for DeepSpeed but accelerate set up MULTI_GPU"):
        check_engine(DistributedType.MULTI_GPU, 2)

    class DeepSpeedEngine:  # what accelerate's prepare returns under DeepSpeed
        pass

    check_engine(DistributedType.DEEPSPEED, 2, wrapped_model=DeepSpeedEngine())
    with pytest.raises(LaunchError, match="prepared as SimpleNamespace"):
        check_engine(DistributedType.DEEPSPEED, 2, wrapped_model=SimpleNamespace())


def test_the_cli_refuses_a_geometry_before_building_anything(launched, capsys, tmp_path):
    assert main(["train", str(RECIPE), "data.num_prompts=50", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "50 prompts, but one generation batch takes 64" in err
    assert not any(tmp_path.iterdir())  # nothing was built or written


def test_a_run_that_trains_no_step_exits_non_zero(tiny_model_path, capsys, tmp_path):
    out = tmp_path / "run"
    code = main(["train", str(RECIPE), "max_steps=-1", "num_train_epochs=0", f"output_dir={out}",
                 "per_device_train_batch_size=16", "steps_per_generation=1", "num_generations=4"])
    assert code == 2
    assert "ended without training a single step" in capsys.readouterr().err
    assert not (out / "model.safetensors").exists()
