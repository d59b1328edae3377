"""The offline tiny model: tokenizer, cached build, warm-start quality and a plain TRL GRPO run."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from helpers.trainers import cpu_args
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer

import rlvr_entropy.tiny.build as build_module
from rlvr_entropy.tasks import correctness, make_dataset
from rlvr_entropy.tiny import TinyModelSettings, build_char_tokenizer, build_tiny_model, evaluate_accuracy


@pytest.mark.parametrize("text", ["</think>12+7=19", "\\boxed{3}", "<answer> x_1^2, y:3 </answer>", "a  b\nC?"])
def test_tokenizer_round_trip(text, tmp_path):
    build_char_tokenizer().save_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and len(ids) == len(text) + 1  # <bos> + one id per character
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_special_tokens_and_padding():
    tokenizer = build_char_tokenizer()
    assert tokenizer.padding_side == "left"
    special = [tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id]
    assert len(set(special)) == 4 and None not in special
    # SFTTrainer appends the literal "<eos>" string: it must encode as the single EOS id.
    assert tokenizer("1+1=2<eos>")["input_ids"][-1] == tokenizer.eos_token_id
    batch = tokenizer(["1=", "12+3="], padding=True)
    assert batch["input_ids"][0][:3] == [tokenizer.pad_token_id] * 3 and batch["attention_mask"][0][:3] == [0] * 3


def test_cache_key_depends_on_settings():
    assert TinyModelSettings().cache_key() == TinyModelSettings().cache_key()
    assert TinyModelSettings(sft_steps=1).cache_key() != TinyModelSettings().cache_key()
    assert TinyModelSettings(seed=1).cache_key() != TinyModelSettings().cache_key()
    with pytest.raises(TypeError):
        build_tiny_model(cache_dir="unused", no_such_setting=1)


def test_interrupted_build_leaves_no_cache_entry(tmp_path, monkeypatch):
    def failing_build(directory: Path, settings: TinyModelSettings) -> None:
        (directory / "config.json").write_text("{}")  # half-written output
        raise KeyboardInterrupt

    monkeypatch.setattr(build_module, "_build", failing_build)
    with pytest.raises(KeyboardInterrupt):
        build_tiny_model(cache_dir=tmp_path, sft_steps=1)
    assert list(tmp_path.iterdir()) == []


def test_cached_second_call_is_fast(tiny_model_path):
    started = time.perf_counter()
    assert build_tiny_model(cache_dir=tiny_model_path.parent) == tiny_model_path
    assert time.perf_counter() - started < 1.0


def test_saved_model_and_tokenizer_agree(tiny_model_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    assert 0.5e6 < model.num_parameters() < 6e6
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.hidden_size // model.config.num_attention_heads >= 32
    for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
        assert getattr(model.config, name) == getattr(model.generation_config, name) == getattr(tokenizer, name)


def test_warm_start_learned_to_stop(tiny_model_path):
    """Greedy completions end with EOS well before the length limit: the appended EOS was learned."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    prompts = make_dataset("arithmetic", 32, seed=0, split="eval")["prompt"]
    inputs = tokenizer(list(prompts), return_tensors="pt", padding=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    completion_ids = output[:, inputs["input_ids"].shape[1] :]  # (32, generated_len)
    stopped = (completion_ids == tokenizer.eos_token_id).any(dim=1)
    assert stopped.float().mean() >= 0.9


def test_warm_start_accuracy_is_partial(tiny_model_path):
    """Partly right at temperature 1.0: GRPO groups get mixed rewards and there is room to improve."""
    accuracy = evaluate_accuracy(tiny_model_path, "arithmetic", num_prompts=64, temperature=1.0, seed=0)
    assert 0.1 <= accuracy <= 0.8


def test_plain_trl_grpo_runs_on_the_tiny_world(tiny_model_path, tmp_path):
    args = GRPOConfig(**cpu_args(tmp_path, per_device_train_batch_size=8, num_generations=4, max_steps=2))
    trainer = GRPOTrainer(
        model=str(tiny_model_path),
        reward_funcs=correctness,
        args=args,
        train_dataset=make_dataset("arithmetic", 32, seed=0),
    )
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "rewards/correctness/mean" in entry]
    assert len(logged) == 2
    assert all(0.0 <= entry["rewards/correctness/mean"] <= 1.0 for entry in logged)
