"""Launching the worker scripts of ``tests/workers/`` in processes of their own (torchrun, or plain Python)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
WORKERS = TESTS / "workers"


def worker_env(cache: Path | str | None = None) -> dict[str, str]:
    """The environment of a worker: one OpenMP thread, the workers (importable by name, as the methods they
    register are referenced) and the test helpers on the path, and the tiny-model cache when given."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(WORKERS), str(TESTS)])}
    if cache is not None:
        env["RLVR_ENTROPY_CACHE"] = str(cache)
    return env


def torchrun(worker: str, *args: object, nproc: int = 2) -> list[str]:
    """The command that runs ``tests/workers/<worker>`` on ``nproc`` CPU processes (gloo)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            str(WORKERS / worker), *map(str, args)]


def python(worker: str, *args: object) -> list[str]:
    """The command that runs ``tests/workers/<worker>`` in one plain Python process."""
    return [sys.executable, str(WORKERS / worker), *map(str, args)]


def finish_worker(accelerator) -> None:
    """End a worker rank whose results are on disk: meet the other ranks, tear gloo down, and leave without
    interpreter teardown, where a rank occasionally aborted on a C++ thread ("terminate called without an
    active exception", seen once in CI after both ranks had written their results)."""
    accelerator.wait_for_everyone()
    accelerator.end_training()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
