"""Shared pytest setup: offline, single-threaded CPU runs, the cached tiny model, and the e2e marker.

A test is end to end (``e2e``) when it builds a trainer or launches a run. Tests that take a model on disk
(``model_dir``, ``tiny_model_path``) or are marked ``slow``, ``multiproc`` or ``vllm`` are marked automatically; any other test that builds a trainer must say
so with ``@pytest.mark.e2e``, or it fails: ``pytest -m "not e2e"`` is then the fast unit loop, trustworthy.
"""

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
MODEL_FIXTURES = {"model_dir", "tiny_model_path"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        runs = any(item.get_closest_marker(m) for m in ("slow", "multiproc", "vllm"))  # launch runs by definition
        if runs or MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(autouse=True)
def _unit_tests_build_no_trainer(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test not marked e2e that builds a trainer (HF's Trainer: GRPO, or the tiny model's SFT) fails."""
    if request.node.get_closest_marker("e2e") is not None:
        return
    from transformers import Trainer

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"{request.node.nodeid} builds a trainer: mark it @pytest.mark.e2e")

    monkeypatch.setattr(Trainer, "__init__", refuse)


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
    from helpers.trainers import save_random_model

    return save_random_model(tmp_path_factory.mktemp("random_model"))
