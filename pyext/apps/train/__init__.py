"""`slimtune.train`: multi-stage fine-tuning recipes with forgetting measured after every stage."""

from .recipe import Recipe, load_recipe
from .runner import RunResult, run
from .schema import RecipeError

__all__ = ["Recipe", "RecipeError", "RunResult", "load_recipe", "run"]
