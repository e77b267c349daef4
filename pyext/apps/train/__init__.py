"""`slimtune.train`: multi-stage fine-tuning recipes with forgetting measured after every stage."""

from .recipe import Recipe, RecipeError, load_recipe
from .runner import RunResult, run

__all__ = ["Recipe", "RecipeError", "RunResult", "load_recipe", "run"]
