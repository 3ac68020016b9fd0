"""Recipes: staged YAML (native or SparseML) that runs prune -> fine-tune -> evaluate -> export."""

from sparsefit.recipes.loading import builtin_recipes, load_recipe, recipe_from_data
from sparsefit.recipes.report import read_report, write_report
from sparsefit.recipes.runner import run_recipe
from sparsefit.recipes.schema import Recipe, validate_recipe

__all__ = [
    "Recipe",
    "builtin_recipes",
    "load_recipe",
    "read_report",
    "recipe_from_data",
    "run_recipe",
    "validate_recipe",
    "write_report",
]
