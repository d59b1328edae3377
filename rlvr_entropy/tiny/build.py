"""Build (and cache) the offline tiny model: char tokenizer + ~1M-param Qwen2 + short SFT warm start.

RLVR needs a policy that is right *sometimes*: a random policy never earns a reward (no learning
signal), a fully trained one always does (nothing left to learn). The defaults below warm-start the
model just far enough to be partially correct when sampling at temperature 1.0 on ``arithmetic``,
and the whole build takes well under a minute on one CPU thread.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM, set_seed
from trl import SFTConfig, SFTTrainer

from rlvr_entropy.config import checkpointing_off
from rlvr_entropy.tasks import make_sft_dataset
from rlvr_entropy.tiny.tokenizer import CHARACTERS, build_char_tokenizer

logger = logging.getLogger(__name__)

# Bump when the build recipe changes in a way the settings do not capture, to invalidate old caches.
FORMAT_VERSION = 2
BUILD_INFO_FILE = "tiny_build.json"
CACHE_ENV_VAR = "RLVR_ENTROPY_CACHE"


@dataclasses.dataclass(frozen=True)
class TinyModelSettings:
    """Everything that determines the built model; its hash names the cache entry."""

    task: str = "arithmetic"
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4  # head_dim = hidden_size / num_heads = 32
    num_kv_heads: int = 2
    intermediate_size: int = 512
    max_position_embeddings: int = 128
    sft_examples: int = 20000
    sft_steps: int = 600
    sft_batch_size: int = 64
    sft_learning_rate: float = 1e-3
    seed: int = 0

    def cache_key(self) -> str:
        """Short hash of the settings, the build recipe version and the tokenizer's character set."""
        payload = {**dataclasses.asdict(self), "format_version": FORMAT_VERSION, "characters": CHARACTERS}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def default_cache_dir() -> Path:
    """``$RLVR_ENTROPY_CACHE`` if set, else ``./.cache/rlvr_entropy`` (relative to the working directory)."""
    env = os.environ.get(CACHE_ENV_VAR)
    return Path(env) if env else Path.cwd() / ".cache" / "rlvr_entropy"


def make_tiny_model(tokenizer: PreTrainedTokenizerBase, settings: TinyModelSettings) -> Qwen2ForCausalLM:
    """A randomly initialised Qwen2 causal LM sized by ``settings``, sharing the tokenizer's special ids."""
    if settings.hidden_size % settings.num_heads or settings.hidden_size // settings.num_heads < 32:
        raise ValueError("hidden_size / num_heads must be an integer >= 32 (attention kernels need head_dim >= 32).")
    special_ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden_size,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads,
        num_key_value_heads=settings.num_kv_heads,
        intermediate_size=settings.intermediate_size,
        max_position_embeddings=settings.max_position_embeddings,
        tie_word_embeddings=True,
        use_cache=True,
        **special_ids,
    )
    model = Qwen2ForCausalLM(config)
    for name, value in special_ids.items():
        setattr(model.generation_config, name, value)
    return model


def warm_start(
    model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerBase, settings: TinyModelSettings, output_dir: Path
) -> float:
    """Supervised warm start with TRL's SFTTrainer on prompt/completion pairs; returns the final train loss.

    Prompt/completion data gives completion-only loss, and SFTTrainer appends ``<eos>`` to every
    completion, which is how the model learns to stop right after the answer.
    """
    dataset = make_sft_dataset(settings.task, settings.sft_examples, seed=settings.seed)
    args = SFTConfig(
        output_dir=str(output_dir),
        max_steps=settings.sft_steps,
        per_device_train_batch_size=settings.sft_batch_size,
        learning_rate=settings.sft_learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, settings.sft_steps // 20),
        weight_decay=0.0,
        adam_beta2=0.98,  # faster-adapting second moment: learns noticeably quicker at this tiny scale
        completion_only_loss=True,
        seed=settings.seed,
        data_seed=settings.seed,
        use_cpu=True,
        bf16=False,
        **checkpointing_off(),  # under transformers' current name: the old one prints a FutureWarning
        report_to="none",
        save_strategy="no",
        logging_steps=max(1, settings.sft_steps // 5),
        disable_tqdm=True,
        dataloader_pin_memory=False,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    return float(trainer.train().training_loss)


def _build(directory: Path, settings: TinyModelSettings) -> None:
    """Build tokenizer + model + warm start and save them (and a build-info file) into ``directory``."""
    started = time.perf_counter()
    set_seed(settings.seed)
    tokenizer = build_char_tokenizer()
    model = make_tiny_model(tokenizer, settings)
    sft_dir = directory / "sft_run"
    loss = warm_start(model, tokenizer, settings, sft_dir)
    shutil.rmtree(sft_dir, ignore_errors=True)
    model.config.use_cache = True  # the Trainer turns the KV cache off for training; generation wants it
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    info = {
        "settings": dataclasses.asdict(settings),
        "format_version": FORMAT_VERSION,
        "num_parameters": model.num_parameters(),
        "sft_final_loss": loss,
        "build_seconds": round(time.perf_counter() - started, 2),
    }
    (directory / BUILD_INFO_FILE).write_text(json.dumps(info, indent=2))


def build_tiny_model(cache_dir: str | Path | None = None, **settings: object) -> Path:
    """Directory holding the warm-started tiny model and its tokenizer, building it on first use.

    Keyword arguments override TinyModelSettings fields. The entry is named after a hash of the
    settings, so a later call with the same settings returns at once. The build happens in a
    temporary directory that is renamed into place only when complete: an interrupted build never
    leaves an entry that looks valid, and concurrent builders simply keep the first one renamed.
    """
    resolved = TinyModelSettings(**settings)  # type: ignore[arg-type]  # unknown fields raise TypeError
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / f"tiny-{resolved.task}-{resolved.cache_key()}"
    if (final / BUILD_INFO_FILE).is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=root))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache entry should be readable like any directory
    try:
        # Seeding for the build must not leave the caller's torch RNG in a different state.
        with torch.random.fork_rng(devices=[]):
            _build(staging, resolved)
        if final.exists() and not (final / BUILD_INFO_FILE).is_file():
            shutil.rmtree(final)  # not written by this function (only complete builds are renamed in)
        try:
            os.replace(staging, final)
        except OSError:
            if not (final / BUILD_INFO_FILE).is_file():  # not a concurrent builder winning the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("Built tiny model in %s", final)
    return final
