"""Shared pytest setup: offline, single-threaded CPU runs and the cached tiny model."""

from __future__ import annotations

import os

# Before torch/transformers are imported: two OpenMP threads stall badly on small CI machines, and
# nothing may be fetched from the Hugging Face hub.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_path() -> Path:
    """The warm-started tiny model with default settings, built once and cached across sessions.

    Cached under ``$RLVR_ENTROPY_CACHE`` or ``<repo>/.cache/rlvr_entropy``, so CI can keep the
    directory between runs and later test sessions skip the ~1 minute build.
    """
    from rlvr_entropy.tiny import build_tiny_model

    cache_dir = os.environ.get("RLVR_ENTROPY_CACHE") or REPO_ROOT / ".cache" / "rlvr_entropy"
    return build_tiny_model(cache_dir=cache_dir)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A randomly initialised tiny model + tokenizer on disk (no warm start): for trainer mechanics tests."""
    from trainer_utils import save_random_model

    return save_random_model(tmp_path_factory.mktemp("random_model"))
