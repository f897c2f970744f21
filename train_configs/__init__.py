"""Training recipes: the original ACNet repository's per-arch defaults, kept as one table of data.

Use :func:`get_recipe` (``Recipe`` for an arch, with optional overrides) and :data:`RECIPES`.
"""
from train_configs.recipes import RECIPES, Recipe, get_recipe, list_recipes

__all__ = ["RECIPES", "Recipe", "get_recipe", "list_recipes"]
