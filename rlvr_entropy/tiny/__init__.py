"""The offline tiny world's model: a char-level Qwen2 warm-started on arithmetic, built locally."""

from rlvr_entropy.tiny.build import TinyModelSettings, build_tiny_model, default_cache_dir, make_tiny_model
from rlvr_entropy.tiny.evaluate import evaluate_accuracy, sample_accuracy
from rlvr_entropy.tiny.tokenizer import build_char_tokenizer

__all__ = [
    "TinyModelSettings",
    "build_char_tokenizer",
    "build_tiny_model",
    "default_cache_dir",
    "evaluate_accuracy",
    "make_tiny_model",
    "sample_accuracy",
]
