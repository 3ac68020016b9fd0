"""Find, parse and validate a recipe: a builtin name or a YAML file (native or SparseML)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from sparsefit.config import load_yaml
from sparsefit.errors import UsageError
from sparsefit.recipes import sparseml
from sparsefit.recipes.schema import Recipe, validate_recipe
from sparsefit.recipes.variables import apply_overrides, parse_sets


def builtin_recipes() -> dict[str, Path]:
    folder = resources.files("sparsefit.recipes") / "builtin"
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(".yaml")}


def read_recipe_data(spec: str) -> tuple[dict, str]:
    """The parsed YAML of a builtin name or a file, and a label for errors."""
    builtins = builtin_recipes()
    if spec in builtins:
        path = builtins[spec]
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            names = ", ".join(sorted(builtins))
            raise UsageError(f"recipe '{spec}' is neither a builtin ({names}) nor an existing YAML file")
    return load_yaml(path, "recipe"), path.name


def load_recipe(spec: str, sets: list[str] | dict[str, Any] | None = None, model: str | None = None) -> Recipe:
    """Validated recipe: SparseML recipes are converted, variables substituted, `--set` applied."""
    data, label = read_recipe_data(spec)
    return recipe_from_data(data, label, sets, model)


def recipe_from_data(
    data: Any, label: str = "recipe", sets: list[str] | dict[str, Any] | None = None, model: str | None = None
) -> Recipe:
    if sparseml.is_sparseml(data):
        data = sparseml.convert(data, Path(label).stem)
    _check_shape(data, label)
    overrides = parse_sets(sets) if isinstance(sets, list) else dict(sets or {})
    data = apply_overrides(data, overrides)
    if model is not None:
        data["model"] = model
    return validate_recipe(data, label)


def _check_shape(data: Any, label: str) -> None:
    """The recipe's skeleton (a mapping; `variables` a mapping; `stages` a list of mappings), checked
    before variables and `--set` touch it, so a malformed file is one line, not a crash."""
    if not isinstance(data, dict):
        raise UsageError(f"{label}: a recipe is a mapping with 'stages' (got {type(data).__name__})")
    if not isinstance(data.get("variables") or {}, dict):
        raise UsageError(f"{label}: 'variables' must map names to values, e.g. variables: {{sparsity: 0.5}}")
    stages = data.get("stages")
    if stages is not None and not isinstance(stages, list):
        raise UsageError(f"{label}: 'stages' must be a list of stages (got {type(stages).__name__})")
    for i, stage in enumerate(stages or []):
        if not isinstance(stage, dict):
            raise UsageError(f"{label}: stage {i + 1} must be a mapping with a 'kind' (got {type(stage).__name__})")
