"""rlvr-entropy: GRPO with composable entropy-control methods, built on TRL."""

from rlvr_entropy.config import EntropyGRPOConfig, Recipe, RecipeError, load_recipe
from rlvr_entropy.methods import METHODS, Method, Pipeline, register
from rlvr_entropy.trainer import EntropyGRPOTrainer

__all__ = [
    "METHODS",
    "EntropyGRPOConfig",
    "EntropyGRPOTrainer",
    "Method",
    "Pipeline",
    "Recipe",
    "RecipeError",
    "load_recipe",
    "register",
]
__version__ = "0.1.0"
